"""The MPI backend: `mpirun -n 2` on loopback gives the thread backend's bytes; failures end every rank.

Skipped (with the reason) when Open MPI's mpirun or mpi4py is missing: `make test` installs both
(`make mpi`). The thread backend's tests never import MPI.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from preserve_onnx.runtime import RankSession, load_feeds
from preserve_onnx.runtime.feeds import generate_feeds, save_outputs
from preserve_onnx.runtime.runner import run_models

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_models"
WORKER = Path(__file__).resolve().parent / "_mpi_worker.py"
BIN = Path(sys.executable).parent
CLI = BIN / "preserve-onnx"
MPIRUN = shutil.which("mpirun")

_MISSING = MPIRUN is None or importlib.util.find_spec("mpi4py") is None
# `make test` installs MPI and sets PRESERVE_REQUIRE_MPI=1: there a missing MPI fails, never skips.
if _MISSING and os.environ.get("PRESERVE_REQUIRE_MPI") == "1":
    raise RuntimeError("PRESERVE_REQUIRE_MPI=1 but mpirun or mpi4py is missing (`make mpi`)")
pytestmark = pytest.mark.skipif(
    _MISSING, reason="MPI backend tests need Open MPI's mpirun and mpi4py (`make mpi`)"
)


def mpirun(n: int, *argv: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs argv in n processes on this machine, over loopback only."""
    environ = dict(
        os.environ,
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_btl_tcp_if_include="lo",
        OMPI_MCA_oob_tcp_if_include="lo",
        OMPI_MCA_btl_vader_single_copy_mechanism="none",
        NO_COLOR="1",
        COLUMNS="200",
    )
    environ.update(env or {})
    cmd = [MPIRUN, "-n", str(n), "--oversubscribe", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environ, cwd=REPO)


def npz(path: Path) -> dict[str, bytes]:
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k].dtype.str.encode() + archive[k].tobytes() for k in archive.files}


@pytest.mark.parametrize(
    "sample", ["llama-gqa", "llama-gqa-fp16", "gpt-attention", "merged-decoder", "llama-int4"]
)
def test_cli_mpi_is_bit_identical_to_threads(sample, tmp_path):
    src = SAMPLES / sample / "tp2"
    res = mpirun(
        2,
        str(CLI),
        "run",
        str(src),
        "--backend",
        "mpi",
        "--steps",
        "3",
        "--save",
        str(tmp_path / "mpi.npz"),
        "-q",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("done: ran 2 rank(s)") == 1  # rank 0 reports for both
    threads = run_models(src, steps=3)
    save_outputs(tmp_path / "threads.npz", threads.outputs)
    got, want = npz(tmp_path / "mpi.npz"), npz(tmp_path / "threads.npz")
    assert sorted(got) == sorted(want) and any(k.startswith("rank1/") for k in got)
    assert got == want


def test_cli_against_passes_under_mpi(tmp_path):
    src = SAMPLES / "llama-gqa" / "tp2"
    opt = tmp_path / "opt"
    subprocess.run([str(CLI), "optimize", str(src), str(opt), "-q"], check=True, capture_output=True)
    res = mpirun(
        2, str(CLI), "run", str(opt), "--backend", "mpi", "--against", str(src), "--steps", "3", "-q"
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("PASSED") == 1 and "10 outputs on 2 rank(s) bit-identical" in " ".join(
        res.stdout.split()
    )


def test_no_colour_codes_under_mpirun():
    # Open MPI hands each rank a pseudo-terminal even when the job's output is piped.
    res = mpirun(
        2,
        str(CLI),
        "run",
        str(SAMPLES / "llama-gqa" / "tp2"),
        "--backend",
        "mpi",
        "-q",
        env={"NO_COLOR": "", "TERM": "xterm-256color"},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith("done: ran 2 rank(s) in ") and "\x1b[" not in res.stdout + res.stderr


def test_against_with_another_rank_count_says_so_under_mpi():
    src = SAMPLES / "llama-gqa" / "tp2"
    twin = SAMPLES / "llama-gqa" / "full" / "model.onnx"
    res = mpirun(2, str(CLI), "run", str(src), "--backend", "mpi", "--against", str(twin))
    assert res.returncode == 1
    assert f"error: {src} has 2 ranks but {twin} has 1" in " ".join(res.stderr.split())
    assert "mpirun -n 1" not in res.stderr


def test_cli_inputs_file_under_mpi(tmp_path):
    src = SAMPLES / "llama-gqa" / "tp2"
    shared, per_rank = generate_feeds(RankSession(sorted(src.glob("model_*.onnx"))), seed=5, context=7)
    arrays = dict(shared)
    for r, feeds in per_rank.items():
        arrays.update({f"rank{r}/{k}": v for k, v in feeds.items()})
    np.savez(tmp_path / "feeds.npz", **arrays)
    res = mpirun(
        2,
        str(CLI),
        "run",
        str(src),
        "--backend",
        "mpi",
        "--inputs",
        str(tmp_path / "feeds.npz"),
        "--save",
        str(tmp_path / "mpi.npz"),
        "-q",
    )
    assert res.returncode == 0, res.stderr
    threads = run_models(src, inputs=tmp_path / "feeds.npz")
    save_outputs(tmp_path / "threads.npz", threads.outputs)
    assert npz(tmp_path / "mpi.npz") == npz(tmp_path / "threads.npz")
    assert load_feeds(tmp_path / "mpi.npz")[1][1]["present.0.key"].shape[2] == 8


def test_kernels_all_dtypes_and_allgather_axes_match_threads_on_three_ranks(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    import _mpi_worker

    res = mpirun(3, sys.executable, str(WORKER), "kernels", str(tmp_path / "mpi.npz"))
    assert res.returncode == 0, res.stderr
    out = RankSession(_mpi_worker.kernel_models(3)).run({}, _mpi_worker.kernel_feeds(3))
    save_outputs(tmp_path / "threads.npz", out)
    got, want = npz(tmp_path / "mpi.npz"), npz(tmp_path / "threads.npz")
    assert len(got) == 3 * 11 + 1 and got == want  # + the __dtypes__ record of bfloat16


def test_wrong_process_count_is_an_error_on_every_rank():
    start = time.monotonic()
    res = mpirun(3, str(CLI), "run", str(SAMPLES / "llama-gqa" / "tp2"), "--backend", "mpi", timeout=90)
    assert res.returncode != 0
    assert (
        res.stderr.count(
            "has 2 rank model(s) but this MPI job has 3 process(es): start it with `mpirun -n 2`"
        )
        == 3
    )
    assert "Traceback" not in res.stderr
    assert time.monotonic() - start < 60


def test_mpi_backend_outside_mpirun_names_the_process_count():
    res = subprocess.run(
        [str(CLI), "run", str(SAMPLES / "llama-gqa" / "tp2"), "--backend", "mpi"],
        capture_output=True,
        text=True,
        timeout=90,
        env=dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"),
    )
    assert res.returncode == 1
    assert "this MPI job has 1 process(es): start it with `mpirun -n 2`" in res.stderr


def test_failing_rank_stops_every_rank_with_its_reason(tmp_path):
    src = SAMPLES / "llama-gqa" / "tp2"
    shared, per_rank = generate_feeds(RankSession(sorted(src.glob("model_*.onnx"))))
    arrays = dict(shared)
    for r, feeds in per_rank.items():
        arrays.update({f"rank{r}/{k}": v for k, v in feeds.items()})
    arrays["rank1/input_ids"] = np.zeros((1, 1), np.float32)  # wrong type on rank 1 only
    np.savez(tmp_path / "bad.npz", **arrays)
    start = time.monotonic()
    res = mpirun(
        2, str(CLI), "run", str(src), "--backend", "mpi", "--inputs", str(tmp_path / "bad.npz"), timeout=90
    )
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert any(
        line.startswith("error: rank 1: ") and "expected: (tensor(int64))" in line for line in lines
    ), res.stderr
    assert any(line.startswith("error: rank 0: stopped because rank 1 failed: ") for line in lines), (
        res.stderr
    )
    assert time.monotonic() - start < 30


def test_mismatched_collective_inputs_name_both_ranks():
    res = mpirun(2, sys.executable, str(WORKER), "mismatch", timeout=90)
    assert res.returncode == 1
    for rank in (0, 1):  # its own check, or the peer's report if that came first
        assert (
            f"error: rank {rank}: AllReduce 'ar'" in res.stderr
            or f"error: rank {rank}: stopped because" in res.stderr
        )
    assert res.stderr.count("input 0 is float32[2, 5] on rank 0 but float32[3, 5] on rank 1") == 2


def test_killed_rank_ends_the_job_with_a_message_on_the_survivor():
    start = time.monotonic()
    res = mpirun(2, sys.executable, str(WORKER), "kill", str(SAMPLES / "llama-gqa" / "tp2"), timeout=90)
    assert res.returncode != 0
    assert "error: rank 0: stopped by mpirun (SIGTERM)" in res.stderr, res.stderr
    assert time.monotonic() - start < 30


def test_hung_rank_times_out_instead_of_hanging():
    start = time.monotonic()
    res = mpirun(
        2,
        "-x",
        "TIMEOUT_S",
        "-x",
        "PRESERVE_MPI_EXIT_GRACE_S",
        sys.executable,
        str(WORKER),
        "sleep",
        str(SAMPLES / "llama-gqa" / "tp2"),
        timeout=90,
        env={"TIMEOUT_S": "2", "PRESERVE_MPI_EXIT_GRACE_S": "2"},
    )
    assert res.returncode != 0
    assert (
        "error: rank 0: AllReduce" in res.stderr
        and "timed out after 2000 ms waiting for rank(s) 1" in res.stderr
    )
    assert "error: rank 1: stopped by mpirun (SIGTERM)" in res.stderr
    assert time.monotonic() - start < 30


def test_cli_mpi_binds_symbolic_dims_like_threads(tmp_path):
    """The builder's `kv_cache_dim` is bound from the graph (and by --dim) under MPI too."""
    src = SAMPLES / "exporters" / "genai-llama-fp32" / "tp2"
    for extra in ([], ["--dim", "batch_size=3"]):
        res = mpirun(
            2,
            str(CLI),
            "run",
            str(src),
            "--backend",
            "mpi",
            "--steps",
            "2",
            "--save",
            str(tmp_path / "mpi.npz"),
            "-q",
            *extra,
        )
        assert res.returncode == 0, res.stderr
        threads = run_models(src, steps=2, dims=dict(batch_size=3) if extra else None)
        save_outputs(tmp_path / "threads.npz", threads.outputs)
        assert npz(tmp_path / "mpi.npz") == npz(tmp_path / "threads.npz")
    assert np.load(tmp_path / "mpi.npz")["rank0/logits"].shape[0] == 3
