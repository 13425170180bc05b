"""`optimize --with-runtime`: the custom-op library and run_ranks.py beside the optimized models, and the
runner executing them where preserve-onnx is not installed (a venv with onnxruntime and numpy only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.runtime import library_path
from tests.conftest import ROOT, SAMPLES

GQA = SAMPLES / "llama-gqa" / "tp2"
RUNNER_SOURCE = ROOT / "preserve_onnx" / "runtime" / "standalone_runner.py"


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A venv's python that can import onnxruntime and numpy, and nothing else of this environment."""
    root = tmp_path_factory.mktemp("bare")
    deps = root / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.split("-")[0].split(".")[0] in ("onnxruntime", "numpy"):
            (deps / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], check=True)
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "_deps.pth").write_text(f"{deps}\n")
    for module in ("preserve_onnx", "onnx", "typer", "ml_dtypes"):
        r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, cwd=root)
        assert f"No module named '{module}'" in r.stderr
    return python


@pytest.fixture(scope="module")
def bundled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "out"
    r = cli("optimize", GQA, out, "--with-runtime", "-q")
    assert r.exit_code == 0, r.output
    return out


def runner(python: Path, script: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd)}
    return subprocess.run([python, script, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def test_with_runtime_writes_the_library_and_the_runner_beside_the_models(bundled):
    assert sorted(p.name for p in bundled.iterdir()) == [
        "libpreserve_ops.so",
        "model_00.onnx",
        "model_00.onnx.data",
        "model_01.onnx",
        "model_01.onnx.data",
        "run_ranks.py",
    ]
    assert (bundled / "libpreserve_ops.so").read_bytes() == library_path().read_bytes()
    # The runner's source with the decode layout the rank graphs show (by structure, docs/design.md §2).
    layout = (
        'LAYOUT = {"kv": ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", '
        '"past_key_values.1.value"], "batch": ["batch_size"], "past": ["past_sequence_length"], '
        '"total": ["total_sequence_length"]}'
    )
    # The naming: the default spelled out, every attribute under its own name.
    naming = (
        'NAMING = {"domain": "preserve", "op": "Prefetch", "max_size": "max_size", "offset": "offset", '
        '"max_tokens": "max_tokens", "min_tokens": "min_tokens", "seq_axis": "seq_axis", "window": "window"}'
    )
    source = RUNNER_SOURCE.read_text().replace(
        'LAYOUT = {"kv": [], "batch": [], "past": [], "total": []}', layout
    )
    source = source.replace('NAMING = {"domain": "preserve", "op": "Prefetch"}', naming)
    assert (bundled / "run_ranks.py").read_text() == source
    assert os.access(bundled / "run_ranks.py", os.X_OK)


def test_without_the_option_out_holds_only_the_models(tmp_path):
    r = cli("optimize", GQA, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model_00.onnx",
        "model_00.onnx.data",
        "model_01.onnx",
        "model_01.onnx.data",
    ]


def test_the_runner_passes_against_the_original_without_preserve_onnx(bundled, bare_python, tmp_path):
    r = runner(bare_python, bundled / "run_ranks.py", "--against", GQA, cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"PASSED: 10 outputs on 2 rank(s) bit-identical to {GQA} (max abs diff 0)\n"


def test_the_runner_lists_outputs_and_saves_them(bundled, bare_python, tmp_path):
    r = runner(
        bare_python,
        bundled / "run_ranks.py",
        bundled / "model_01.onnx",
        "--save",
        tmp_path / "o.npz",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "rank 0  logits  float32  1x1x160"
    assert lines[1] == "rank 0  present.0.key  float32  1x1x17x16"
    assert lines[-1] == f"ran 2 rank(s) of {bundled / 'model_01.onnx'}"
    import numpy as np

    with np.load(tmp_path / "o.npz") as saved:
        assert sorted(saved.files)[:2] == ["rank0/logits", "rank0/present.0.key"]
        assert len(saved.files) == 10 and saved["rank1/logits"].shape == (1, 1, 160)


def test_the_runner_fails_against_a_model_with_other_weights(bundled, bare_python, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(GQA, changed)
    data = bytearray((changed / "model_00.onnx.data").read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)  # zero the first half of rank 0's weights
    (changed / "model_00.onnx.data").write_bytes(bytes(data))
    r = runner(bare_python, bundled / "run_ranks.py", "--against", changed, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout.startswith(f"FAILED: 10 outputs on 2 rank(s) differ from {changed} (max abs diff ")


def test_the_runner_without_its_library_is_one_line(bundled, bare_python, tmp_path):
    shutil.copy(bundled / "run_ranks.py", tmp_path / "run_ranks.py")
    r = runner(bare_python, tmp_path / "run_ranks.py", GQA, cwd=tmp_path)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (
        f"error: {tmp_path / 'libpreserve_ops.so'} is missing: it comes with this file "
        f"(preserve-onnx optimize --with-runtime)\n"
    )


def test_the_runner_names_a_folder_without_rank_models(bundled, bare_python, tmp_path):
    r = runner(bare_python, bundled / "run_ranks.py", tmp_path, cwd=tmp_path)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (
        f"error: {tmp_path} holds no rank models (model_00.onnx, ... or rank_0_<name>.onnx, ...)\n"
    )


def test_one_model_file_is_a_usage_error(tmp_path):
    """The runner runs a folder's rank family: one rank file's OUT folder may hold anything else."""
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "run_ranks.py").write_text("mine\n")
    r = cli("optimize", GQA / "model_00.onnx", tmp_path / "one" / "model_00.onnx", "--with-runtime")
    assert r.exit_code == 2
    assert r.output == (
        "error: --with-runtime writes a runnable folder: give IN as a directory of rank models "
        "(and OUT as a folder)\n"
    )
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["run_ranks.py"]
    assert (tmp_path / "one" / "run_ranks.py").read_text() == "mine\n"


def test_optimizing_again_into_the_same_out_replaces_it(tmp_path):
    for _ in range(2):
        r = cli("optimize", GQA, tmp_path / "out", "--with-runtime", "-q")
        assert r.exit_code == 0, r.output
    r = cli("optimize", GQA, tmp_path / "out", "-q")  # and without the option: the runtime files go
    assert r.exit_code == 0, r.output
    assert not {"libpreserve_ops.so", "run_ranks.py"} & {p.name for p in (tmp_path / "out").iterdir()}


def test_the_runner_knows_the_vendor_naming_optimize_used(bare_python, tmp_path):
    out = tmp_path / "vendor"
    r = cli(
        "optimize",
        GQA,
        out,
        "--with-runtime",
        "-q",
        "--prefetch-domain",
        "com.acme.npu",
        "--prefetch-op",
        "CmoPrefetch",
        "--prefetch-attr",
        "max_size=size",
        "--prefetch-attr",
        "max_tokens=vt",
    )
    assert r.exit_code == 0, r.output
    run = runner(bare_python, out / "run_ranks.py", "--against", GQA, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "PASSED" in run.stdout


def test_with_runtime_and_dry_run_is_a_usage_error(tmp_path):
    r = cli("optimize", GQA, tmp_path / "out", "--with-runtime", "--dry-run")
    assert r.exit_code == 2
    assert r.output == "error: --with-runtime writes files beside the models; --dry-run writes none\n"
    assert not (tmp_path / "out").exists()


def test_the_runner_binds_the_dims_the_graphs_fix(bare_python, tmp_path):
    """onnxruntime-genai's kv_cache_dim: `run` reads it from the graph, the runner gets it written in."""
    src = SAMPLES / "exporters" / "genai-llama-fp32" / "tp2"
    out = tmp_path / "genai"
    r = cli("optimize", src, out, "--with-runtime", "-q")
    assert r.exit_code == 0, r.output
    assert 'DIMS = {"kv_cache_dim": 16}' in (out / "run_ranks.py").read_text()
    run = runner(bare_python, out / "run_ranks.py", "--against", src, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "PASSED" in run.stdout


def test_the_runner_reads_renamed_live_range_attributes(bare_python, tmp_path):
    """A builder export's KV links carry L with seq_axis and window (docs/design.md §4.7): renamed, the
    runner passes the names to the library, which needs seq_axis with L (a link without it fails)."""
    src = SAMPLES / "exporters" / "genai-llama-fp32" / "tp2"
    out = tmp_path / "genai"
    r = cli(
        "optimize",
        src,
        out,
        "--with-runtime",
        "-q",
        "--prefetch-attr",
        "seq_axis=kv_axis",
        "--prefetch-attr",
        "window=kv_window",
        "--prefetch-attr",
        "min_tokens=fewest",
    )
    assert r.exit_code == 0, r.output
    assert '"seq_axis": "kv_axis", "window": "kv_window"' in (out / "run_ranks.py").read_text()
    assert '"min_tokens": "fewest"' in (out / "run_ranks.py").read_text()
    run = runner(bare_python, out / "run_ranks.py", "--against", src, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "PASSED" in run.stdout
