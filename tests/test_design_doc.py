"""docs/design.md is the design reference that code, tests and docs cite: every citation names a section
that exists, and nothing cites the contract the repository does not carry."""

from __future__ import annotations

import re

from tests.conftest import ROOT

DESIGN = ROOT / "docs" / "design.md"
CITED_FROM = ("preserve_onnx", "passes", "tests", "bench", "sample_models", "tools")
# README.md, docs/*.md and the walkthroughs are read too (below).
SUFFIXES = {".py", ".toml", ".cc", ".h", ".md", ".txt"}


def _sources():
    for folder in CITED_FROM:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                yield path
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").glob("*.md"))
    yield from sorted((ROOT / "examples").glob("*/README.md"))
    yield ROOT / "Makefile"
    yield ROOT / "setup.py"


def test_sections_mirror_the_contracts_numbering():
    headings = re.findall(r"^## (\d+)\. (.+)$", DESIGN.read_text(), re.M)
    assert [int(n) for n, _ in headings] == list(range(1, 10))
    assert [title for _, title in headings] == [
        "Purpose",
        "Inputs the tool understands",
        "The Prefetch operator",
        "Planning rules",
        "Command line",
        "Cost model and hardware profiles",
        "Reference CPU runtime",
        "Sharding",
        "Chain safety",
    ]


def test_every_citation_names_an_existing_section():
    text = DESIGN.read_text()
    planning = text.split("## 4. Planning rules", 1)[1].split("\n## 5.", 1)[0]
    rules = {int(n) for n in re.findall(r"^(\d+)\. \*\*", planning, re.M)}
    assert rules == {1, 2, 3, 4, 5, 6, 7, 8}
    bad = []
    for path in _sources():
        for section, rule in re.findall(
            r"docs/design\.md §(\d+)(?:\.(\d+))?", path.read_text(errors="replace")
        ):
            if not 1 <= int(section) <= 9 or (rule and (section != "4" or int(rule) not in rules)):
                bad.append(f"{path.relative_to(ROOT)}: §{section}{'.' + rule if rule else ''}")
    assert bad == []


def test_nothing_cites_the_contract_outside_the_repository():
    word = "SP" + "EC"  # spelled apart so that this file does not match itself
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in _sources()
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if word in line
    ]
    assert found == []
