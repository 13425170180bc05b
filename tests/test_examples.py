"""The walkthroughs in examples/NN_*/README.md run as written (after onnx-graphsurgeon's
tests/test_examples.py).

Every line of every ```bash block is one command; they run in order in a fresh temporary folder that
links `sample_models/` and `bench/` from the repository (the commands are written for the repository
root), with the venv's `preserve-onnx` and `python` first on PATH. For each command the test knows its
exit code and the output lines it must print; each of those lines must also appear in one of the
README's output blocks, so what the walkthrough shows is what the tool prints (timings aside).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
LINKED = ("sample_models", "bench")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_TIMING = re.compile(r"\d+\.\d+ s\b")


def blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced blocks of one language ("" = no language: output blocks)."""
    return [body for tag, body in _FENCE.findall(text) if tag == lang]


def commands(text: str) -> list[str]:
    """The commands of the ```bash blocks, in order: continuation lines joined, comments and blanks
    dropped."""
    found = []
    for body in blocks(text, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                found.append(" ".join(line.split()))
    return found


def shown(text: str) -> set[str]:
    """Every line of the output blocks, timings masked."""
    return {_mask(line) for body in blocks(text, "") for line in body.splitlines()}


def _mask(line: str) -> str:
    return _TIMING.sub("<t> s", line.rstrip())


def run_commands(cmds: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run each command with bash in `cwd` (where sample_models/ and bench/ are links into the repository)."""
    for name in LINKED:
        if not (cwd / name).exists():
            (cwd / name).symlink_to(ROOT / name)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "COLUMNS": "200",
        "NO_COLOR": "1",
        "TERM": "dumb",
    }
    env.pop("PRESERVE_DEBUG", None)
    return [
        subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        for cmd in cmds
    ]


def check(text: str, expected: list[tuple[str, int, tuple[str, ...]]], cwd: Path) -> None:
    """`expected`: (command, exit code, lines it prints) for every command of `text`, in order."""
    assert commands(text) == [cmd for cmd, _, _ in expected]
    documented = shown(text)
    for (cmd, code, lines), result in zip(expected, run_commands(commands(text), cwd)):
        out = {_mask(line) for line in (result.stdout + result.stderr).splitlines()}
        assert result.returncode == code, (cmd, result.stdout, result.stderr)
        for line in lines:
            assert _mask(line) in out, (cmd, line, result.stdout, result.stderr)
            assert _mask(line) in documented, (cmd, "not shown in the walkthrough", line)


OPTIMIZED = "done: 2 model(s), 30 prefetches, 32.3 MiB planned; wrote out in 0.15 s"
PASSED_GQA = (
    "PASSED: 10 outputs on 2 rank(s) bit-identical to sample_models/llama-gqa/tp2 after 3 step(s) "
    "(max abs diff 0)"
)

EXPECTED: dict[str, list[tuple[str, int, tuple[str, ...]]]] = {
    "01_optimize_and_verify": [
        ("preserve-onnx optimize sample_models/llama-gqa/tp2 out --report report.json -q", 0, (OPTIMIZED,)),
        (
            "python -c \"import json; r = json.load(open('report.json')); m = r['models'][0]; "
            "print(m['source'], m['prefetch_count'], m['prefetched_bytes'])\"",
            0,
            ("sample_models/llama-gqa/tp2/model_00.onnx 15 16932864",),
        ),
        ("preserve-onnx run out --against sample_models/llama-gqa/tp2 --steps 3 -q", 0, (PASSED_GQA,)),
        (
            "preserve-onnx optimize sample_models/merged-decoder/tp2 merged -q",
            0,
            ("done: 2 model(s), 60 prefetches, 64.6 MiB planned; wrote merged in 0.11 s",),
        ),
        (
            "preserve-onnx run merged --against sample_models/merged-decoder/tp2 --steps 3 -q",
            0,
            (
                "PASSED: 10 outputs on 2 rank(s) bit-identical to sample_models/merged-decoder/tp2 after 3 "
                "step(s) (max abs diff 0)",
            ),
        ),
        ("preserve-onnx optimize sample_models/llama-gqa/tp2 out --with-runtime -q", 0, (OPTIMIZED,)),
        (
            "python out/run_ranks.py --against sample_models/llama-gqa/tp2",
            0,
            (
                "PASSED: 10 outputs on 2 rank(s) bit-identical to sample_models/llama-gqa/tp2 "
                "(max abs diff 0)",
            ),
        ),
    ],
    "02_review_in_ci": [
        (
            "preserve-onnx inspect sample_models/llama-gqa/tp2/model_00.onnx --budget 1MiB",
            0,
            (
                "model_00.onnx: 4 collectives, 4 planned, 11 prefetches, 1.1 MiB (--budget 1048576 B per "
                "window, 2 rank(s))",
                "done: 1 model(s), 4 collectives, 11 prefetches, 1.1 MiB would be planned; "
                "nothing written in 0.04 s",
            ),
        ),
        ("preserve-onnx inspect sample_models/llama-gqa/tp2 --budget 1MiB --json > plan.json", 0, ()),
        (
            "python -c \"import json; print([(m['prefetch_count'], len(m['collectives'])) "
            "for m in json.load(open('plan.json'))['models']])\"",
            0,
            ("[(11, 4), (11, 4)]",),
        ),
        (
            "preserve-onnx optimize sample_models/llama-gqa/tp2 small --budget 1MiB -q",
            0,
            ("done: 2 model(s), 22 prefetches, 2.2 MiB planned; wrote small in 0.16 s",),
        ),
        (
            "preserve-onnx diff sample_models/llama-gqa/tp2 small",
            1,
            (
                "sample_models/llama-gqa/tp2/model_00.onnx -> small/model_00.onnx: 11 Prefetch nodes added, "
                "4 collectives rewired, 1 opset import added, 1 function added",
                "  + opset preserve: version 1",
                "different: sample_models/llama-gqa/tp2 vs small: 2 of 2 model(s) differ",
            ),
        ),
        ("preserve-onnx strip small stripped", 0, ("done: removed 22 Prefetch nodes; wrote stripped",)),
        (
            "preserve-onnx diff sample_models/llama-gqa/tp2 stripped",
            0,
            ("equal: sample_models/llama-gqa/tp2 vs stripped: no differences",),
        ),
        ("preserve-onnx diff sample_models/llama-gqa/tp2 small --markdown > diff.md", 1, ()),
        (
            "head -3 diff.md",
            0,
            (
                "### preserve-onnx diff: `sample_models/llama-gqa/tp2` → `small`",
                "",
                "**2 of 2 model(s) differ**",
            ),
        ),
    ],
    "03_cost_model": [
        (
            "python bench/make_big_model.py big70b --preset llama3-70b --ranks 8",
            0,
            ("8 rank models in big70b (0.6 s): 158.8 GiB of weights referenced, 0.0 MiB on disk",),
        ),
        (
            "preserve-onnx estimate big70b",
            0,
            (
                "big70b/model_00.onnx: ascend-910b, batch 8, context 16384, 8 ranks",
                "step: baseline 25.644 ms, with prefetches 21.462 ms (1.195x), upper bound 21.193 ms "
                "(1.210x); the plan reaches 94% of the upper bound's saving",
            ),
        ),
        (
            "preserve-onnx estimate big70b --sweep batch=1,8,32 ranks=2,8,16",
            0,
            (
                "big70b: speedup on ascend-910b (baseline / plan step time)",
                "┃ batch ┃ context ┃ 2 ranks ┃ 8 ranks ┃ 16 ranks ┃ KV read (2 ranks) ┃  hinted ┃",
                "│     1 │     16k │   1.05x │   1.18x │    1.25x │           2.5 GiB │ 5.2 GiB │",
                "│     8 │     16k │   1.05x │   1.19x │    1.34x │          20.0 GiB │ 6.0 GiB │",
                "│    32 │     16k │   1.04x │   1.21x │    1.39x │          80.0 GiB │ 8.9 GiB │",
                "done: 9 points; best 1.392x at batch 32, context 16384, 16 ranks in 2.10 s",
            ),
        ),
        ("preserve-onnx estimate big70b --hardware h100-sxm --json > h100.json", 0, ()),
        ("preserve-onnx estimate big70b --hardware h100-sxm@oneshot --json > oneshot.json", 0, ()),
        (
            "python -c \"import json; print([round(json.load(open(f))['speedup'], 3) "
            "for f in ('h100.json', 'oneshot.json')])\"",
            0,
            ("[1.059, 1.071]",),
        ),
        ("preserve-onnx estimate big70b --trace trace.json", 0, ()),
    ],
    "04_shard_a_builder_export": [
        ("mkdir -p llama", 0, ()),
        ("cp -r sample_models/exporters/genai-llama-fp32/full llama/full", 0, ()),
        (
            "preserve-onnx shard llama/full llama/tp2 --tp 2",
            0,
            (
                "done: 2 rank models (6 column-parallel and 4 row-parallel linears, 4 AllReduce per rank), "
                "736.0 KiB of weights; wrote llama/tp2 in 0.09 s",
            ),
        ),
        (
            "preserve-onnx optimize llama/tp2 llama/opt -q",
            0,
            ("done: 2 model(s), 26 prefetches, 32.5 MiB planned; wrote llama/opt in 0.10 s",),
        ),
        (
            "preserve-onnx run llama/opt --twin llama/full -q",
            0,
            (
                "PASSED: 10 outputs on 2 rank(s) match llama/full within tolerance after 1 step(s); worst: "
                "rank 0 'logits', max abs diff 7.45058e-08 (atol 0.0001)",
            ),
        ),
        (
            "preserve-onnx run llama/opt --against llama/tp2 --steps 3 -q",
            0,
            ("PASSED: 10 outputs on 2 rank(s) bit-identical to llama/tp2 after 3 step(s) (max abs diff 0)",),
        ),
    ],
}

# What each walkthrough leaves in its folder (beyond the commands' printed lines).
WRITTEN = {
    "01_optimize_and_verify": {
        "out/model_00.onnx",
        "out/model_01.onnx",
        "out/run_ranks.py",
        "out/libpreserve_ops.so",
        "report.json",
        "merged/model_01.onnx",
    },
    "02_review_in_ci": {"plan.json", "small/model_00.onnx", "stripped/model_01.onnx", "diff.md"},
    "03_cost_model": {"big70b/model_07.onnx", "h100.json", "oneshot.json", "trace.json"},
    "04_shard_a_builder_export": {
        "llama/tp2/model_00.onnx",
        "llama/tp2/genai_config.json",
        "llama/opt/model_01.onnx",
    },
}


def test_every_walkthrough_is_tested_and_numbered():
    found = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir())
    assert found == sorted(EXPECTED) == sorted(WRITTEN)
    assert [name[:3] for name in found] == [f"{n:02d}_" for n in range(1, len(found) + 1)]
    assert all((EXAMPLES / name / "README.md").is_file() for name in found)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_walkthrough_runs_as_written(name, tmp_path):
    text = (EXAMPLES / name / "README.md").read_text()
    start = time.perf_counter()
    check(text, EXPECTED[name], tmp_path)
    elapsed = time.perf_counter() - start
    assert {p for p in WRITTEN[name] if not (tmp_path / p).is_file()} == set()
    # Each walkthrough takes under 20 s on an idle 2-core machine; the bound leaves room for a busy one.
    assert elapsed < 60, elapsed


def test_commands_join_continuations_and_drop_comments():
    text = (
        "intro\n```bash\n# a comment\npreserve-onnx optimize a \\\n    b -q\n\nls\n```\n"
        "```\nout 1.25 s\n```\n"
    )
    assert commands(text) == ["preserve-onnx optimize a b -q", "ls"]
    assert shown(text) == {"out <t> s"}
    assert blocks(text, "python") == []


def test_check_fails_on_a_wrong_exit_code_or_an_unshown_line(tmp_path):
    text = "```bash\nfalse\necho hello\n```\n```\nhello\n```\n"
    check(text, [("false", 1, ()), ("echo hello", 0, ("hello",))], tmp_path)
    with pytest.raises(AssertionError):
        check(text, [("false", 0, ()), ("echo hello", 0, ())], tmp_path)
    with pytest.raises(AssertionError):  # printed, but the walkthrough does not show it
        check("```bash\necho bye\n```\n", [("echo bye", 0, ("bye",))], tmp_path)
    with pytest.raises(AssertionError):  # a command the test does not know
        check(text, [("false", 1, ())], tmp_path)
