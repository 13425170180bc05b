"""Output without a terminal (CI logs, `| tee`, `> file`): the CLI as a subprocess with stdout a pipe and
COLUMNS=80 never splits a name across lines (tables take the width of their content, titles are not
wrapped); -q and --json print exactly what they print anywhere else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import onnx
import pytest

from tests.conftest import SAMPLES

GQA = SAMPLES / "llama-gqa" / "tp2"
MERGED = SAMPLES / "merged-decoder" / "tp2"


def logged(*args, columns: int = 80, cwd=None) -> subprocess.CompletedProcess:
    """``preserve-onnx ARGS`` with stdout and stderr pipes, no stdin, and COLUMNS=columns."""
    env = {**os.environ, "COLUMNS": str(columns)}
    env.pop("NO_COLOR", None)  # a CI log without NO_COLOR: still no colour codes, since there is no terminal
    return subprocess.run(
        [sys.executable, "-m", "preserve_onnx", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def node_names(folder, op_types=("AllReduce", "AllGather", "AllToAll", "Prefetch")) -> set[str]:
    """Every collective's (and Prefetch's) node name in the folder's models, subgraphs included."""
    names = set()

    def walk(graph):
        for node in graph.node:
            if node.op_type in op_types:
                names.add(node.name)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    for path in sorted(folder.glob("*.onnx")):
        walk(onnx.load(path, load_external_data=False).graph)
    assert names
    return names


def assert_whole(stdout: str, names: set[str]) -> None:
    assert "\x1b[" not in stdout
    lines = stdout.splitlines()
    missing = sorted(n for n in names if not any(n in line for line in lines))
    assert missing == [], f"split or missing: {missing[:3]}"


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """llama-gqa tp2 optimized at the hardware budget and at 1 MiB, and the first run's log."""
    root = tmp_path_factory.mktemp("logs")
    r = logged("optimize", GQA, root / "full", "-v")
    assert r.returncode == 0, r.stderr
    assert logged("optimize", GQA, root / "tight", "--budget", "1MiB", "-q").returncode == 0
    return root, r.stdout


def test_optimize_verbose_log_names_every_collective_and_prefetch_whole(optimized):
    root, stdout = optimized
    assert_whole(
        stdout,
        node_names(GQA)
        | {n.rsplit("/Prefetch/", 1)[1] for n in node_names(root / "full") if "/Prefetch/" in n},
    )
    assert stdout.splitlines()[0] == "model_00.onnx: 4 windows, 15 prefetches, 16.1 MiB"
    assert max(len(line) for line in stdout.splitlines()) > 80  # wider than the 80 columns, not folded


def test_inspect_of_subgraph_collectives_keeps_the_long_names_and_the_title_on_one_line():
    r = logged("inspect", MERGED / "model_00.onnx", "-v")
    assert r.returncode == 0, r.stderr
    assert_whole(r.stdout, node_names(MERGED, ("AllReduce",)))
    title = r.stdout.splitlines()[0]
    assert title.startswith("model_00.onnx: 8 collectives, 8 planned, 30 prefetches") and title.endswith(
        "rank(s))"
    )


def test_estimate_diff_and_run_logs_keep_names_whole(optimized):
    root, _ = optimized
    estimate = logged("estimate", GQA)
    assert estimate.returncode == 0, estimate.stderr
    assert_whole(estimate.stdout, node_names(GQA))
    diff = logged("diff", root / "full", root / "tight")
    assert diff.returncode == 1, diff.stderr
    removed = node_names(root / "full") - node_names(root / "tight")
    assert len(removed) == 4  # the same names on both ranks
    assert_whole(diff.stdout, removed | {"/model/layers.0/mlp/down_proj/AllReduce"})  # the rewired collective
    run = logged("run", root / "tight", "--against", GQA)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == (
        f"PASSED: 10 outputs on 2 rank(s) bit-identical to {GQA} after 1 step(s) (max abs diff 0)"
    )


def test_an_error_with_a_long_path_is_one_line(tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "model_00.onnx"
    r = logged("inspect", deep)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"error: {deep}: no such file or directory\n"


def test_quiet_and_json_are_the_same_at_any_width(optimized, tmp_path):
    narrow = logged("inspect", GQA, "--json")
    wide = logged("inspect", GQA, "--json", columns=300)
    assert narrow.returncode == wide.returncode == 0
    assert narrow.stdout == wide.stdout
    assert json.loads(narrow.stdout)["schema"] == 1
    for columns in (80, 300):
        out = tmp_path / f"q{columns}"
        quiet = logged("optimize", GQA, out, "-q", columns=columns)
        assert quiet.returncode == 0 and quiet.stderr == ""
        lines = quiet.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"done: 2 model(s), 30 prefetches, 32.3 MiB planned; wrote {out} in "
        )
        shutil.rmtree(out)
