"""`preserve-onnx run` as a library call: run rank models (and optionally their originals) on the
reference runtime over N decode steps, and compare outputs bit for bit.

Invariant: the optimized and the original models see exactly the same feeds (generated once from
a seed, or read from an .npz), so any output difference is the optimizer's fault.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

from preserve_onnx.config import PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.model_io import resolve_ranks
from preserve_onnx.runtime.backend import RunResult, decode, running_original, session_kwargs
from preserve_onnx.runtime.compare import compare_outputs
from preserve_onnx.runtime.decode import run_steps
from preserve_onnx.runtime.feeds import DEFAULT_CONTEXT
from preserve_onnx.runtime.session import RankSession

__all__ = ["BACKENDS", "RunResult", "run_models", "session_kwargs"]


BACKENDS = ("threads", "mpi")


def run_models(
    path: Path,
    *,
    against: Path | None = None,
    inputs: Path | None = None,
    steps: int = 1,
    batch: int = 1,
    context: int = DEFAULT_CONTEXT,
    seed: int = 0,
    opt_level: str = "all",
    naming: PrefetchNaming = PrefetchNaming(),
    timeout_s: float = 60,
    backend: str = "threads",
    dims: Mapping[str, int] | None = None,
) -> RunResult:
    """Run ``path`` (file or rank directory) for ``steps`` decode steps; compare with ``against``.

    ``backend="mpi"``: call it in every process of ``mpirun -n RANKS``; process r runs rank r (see
    :mod:`preserve_onnx.runtime.mpi`). ``dims`` (``--dim``) bind symbolic dims of generated feeds before
    the dims the graphs fix and ``batch``/``context``.
    """
    if backend not in BACKENDS:
        raise PreserveError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "mpi":
        from preserve_onnx.runtime.mpi import run_models_mpi

        return run_models_mpi(
            path,
            against=against,
            inputs=inputs,
            steps=steps,
            batch=batch,
            context=context,
            seed=seed,
            opt_level=opt_level,
            naming=naming,
            timeout_s=timeout_s,
            dims=dims,
        )
    start = time.perf_counter()
    models = resolve_ranks(path)
    originals: Sequence[Path] = resolve_ranks(against) if against is not None else ()
    if against is not None and len(originals) != len(models):
        raise PreserveError(f"{path} has {len(models)} ranks but {against} has {len(originals)}")
    kw = session_kwargs(naming, opt_level, timeout_s)
    with RankSession(list(models), **kw) as session:
        shared, per_rank, outputs = decode(
            session,
            inputs,
            steps=steps,
            batch=batch,
            context=context,
            seed=seed,
            dims=dims if inputs is None else None,
        )
    comparison = None
    if against is not None:
        with running_original(against), RankSession(list(originals), **kw) as original:
            expected = run_steps(original, shared, per_rank, steps)
        comparison = compare_outputs(expected, outputs)
    return RunResult(tuple(models), outputs, comparison, steps, time.perf_counter() - start)
