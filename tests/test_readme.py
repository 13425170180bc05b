"""The README is short, opens with the two commands, and what it shows runs; every link in the README,
docs/ and the walkthroughs resolves; the Python examples in the README and docs/ run."""

from __future__ import annotations

import re
import subprocess
import sys

import typer

from preserve_onnx.cli import app
from tests.conftest import ROOT
from tests.test_examples import EXPECTED, blocks, check, commands

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
WALKTHROUGHS = sorted((ROOT / "examples").glob("*/README.md"))
# Named in the command synopsis before it lands (docs/calibrate.md comes with it).
PENDING_COMMANDS = {"calibrate"}


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```\n(.*?)```", text, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_short_and_says_where_the_cli_lands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    first_screen = "\n".join(lines[:12])
    assert "`.venv/bin/preserve-onnx`" in first_screen and "`source .venv/bin/activate`" in first_screen
    assert re.search(r"^CLI\s+:= \$\(VENV\)/bin/preserve-onnx$", (ROOT / "Makefile").read_text(), re.M)
    assert re.search(r"^VENV\s+:= \.venv$", (ROOT / "Makefile").read_text(), re.M)


def test_quick_start_reaches_a_verified_result(tmp_path):
    """The README's first ```bash block, as written: activate, optimize a sample, PASSED against the
    original."""
    cmds = commands(README.read_text())
    assert cmds[0] == "source .venv/bin/activate"  # the test's PATH already starts with the venv's bin
    quick_start = (
        "```bash\n"
        + "\n".join(cmds[1:])
        + "\n```\n"
        + "".join(f"```\n{body}```\n" for body in blocks(README.read_text(), ""))
    )
    check(
        quick_start,
        [
            (
                "preserve-onnx optimize sample_models/llama-gqa/tp2 out/ --report report.json",
                0,
                (
                    "model_00.onnx: 4 windows, 15 prefetches, 16.1 MiB",
                    "done: 2 model(s), 30 prefetches, 32.3 MiB planned; wrote out in 0.18 s",
                ),
            ),
            (
                "preserve-onnx run out/ --against sample_models/llama-gqa/tp2 --steps 3",
                0,
                (
                    "PASSED: 10 outputs on 2 rank(s) bit-identical to sample_models/llama-gqa/tp2 after 3 "
                    "step(s) (max abs diff 0)",
                ),
            ),
        ],
        tmp_path,
    )
    assert (tmp_path / "report.json").is_file()


def test_hugging_face_path_is_the_one_the_shard_walkthrough_runs():
    text = README.read_text()
    path = next(body for body in blocks(text, "") if "onnxruntime_genai.models.builder" in body)
    steps = [line.split("#")[0].split() for line in path.splitlines()]
    assert [s[:2] for s in steps] == [
        ["python", "-m"],
        ["preserve-onnx", "shard"],
        ["preserve-onnx", "optimize"],
        ["preserve-onnx", "run"],
    ]
    walked = {cmd for cmd, _, _ in EXPECTED["04_shard_a_builder_export"]}
    for step in steps[1:]:
        assert " ".join(step) in walked or " ".join([*step, "-q"]) in walked, step
    assert path in (ROOT / "docs" / "shard.md").read_text()


def test_synopsis_names_every_command_once():
    text = README.read_text()
    synopsis = next(body for body in blocks(text, "") if body.startswith("optimize "))
    named = [line.split()[0] for line in synopsis.splitlines()]
    registered = set(typer.main.get_command(app).commands)
    assert len(named) == len(set(named))
    assert set(named) - PENDING_COMMANDS == registered - PENDING_COMMANDS
    assert set(named) >= registered


def python_blocks():
    for path in [README, *DOCS]:
        for block in blocks(path.read_text(), "python"):
            yield path, block


def test_python_examples_run(tmp_path):
    found = list(python_blocks())
    assert [p.name for p, _ in found].count("README.md") == 1 and len(found) >= 4
    for i, (path, block) in enumerate(found):
        script = tmp_path / f"example_{i}.py"
        script.write_text(block)
        r = subprocess.run(
            [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, (path.name, r.stderr)
        assert "prefetches," in r.stdout, path.name


# Links: [text](target) and ![alt](target) outside code blocks; external ones are not checked.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces to -, repeats
    -1, -2."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _CODE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(path, root=ROOT) -> list[str]:
    """The relative links of `path` whose file (inside `root`) or heading anchor does not exist."""
    text = path.read_text()
    bad = []
    for target in _LINK.findall(_CODE.sub("", text)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists() or root not in dest.parents:
            bad.append(f"{path.relative_to(root)}: {target}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text())):
            bad.append(f"{path.relative_to(root)}: {target}")
    return bad


def test_every_relative_link_resolves():
    assert [p for path in [README, *DOCS, *WALKTHROUGHS] for p in broken_links(path)] == []
    assert len(_LINK.findall(README.read_text())) >= 20


def test_anchors_and_broken_links_are_found(tmp_path):
    assert anchors("# A\n## JSON report (`--report`)\n## A\n```\n# not a heading\n```\n") == {
        "a",
        "json-report---report",
        "a-1",
    }
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "cli.md").write_text("# Command reference\n## JSON report (`--report`)\n")
    (tmp_path / "outside.md").write_text("# Outside\n")
    doc = tmp_path / "docs" / "probe.md"
    doc.write_text(
        "[ok](cli.md#json-report---report) [file](nope.md) [anchor](cli.md#nope) [self](#here) "
        "[up](../outside.md) [web](https://example.com/x)\n```\n[in code](nope.md)\n```\n# Here\n"
    )
    assert broken_links(doc, tmp_path / "docs") == [
        "probe.md: nope.md",
        "probe.md: cli.md#nope",
        "probe.md: ../outside.md",
    ]
    assert broken_links(doc, tmp_path) == ["docs/probe.md: nope.md", "docs/probe.md: cli.md#nope"]
