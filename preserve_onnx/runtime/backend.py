"""What the runtime's two backends share for one `run`: the rank files of a path, the sessions' keyword
arguments, feeds plus decode steps, how a failure of the original is named, and the result.

:mod:`preserve_onnx.runtime.runner` (threads, and the ``backend=`` dispatch) and
:mod:`preserve_onnx.runtime.mpi` (one process per rank) both build on this module; it imports neither,
so the two backends do not import each other (the runner loads the MPI backend only when asked for it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from preserve_onnx.config import PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.runtime.compare import Comparison, TwinComparison
from preserve_onnx.runtime.decode import run_steps
from preserve_onnx.runtime.feeds import generate_feeds, load_feeds
from preserve_onnx.runtime.library import PREFETCH_KERNEL_ATTRS


@dataclass(frozen=True)
class RunResult:
    models: tuple[Path, ...]
    outputs: list[dict[str, np.ndarray]]  # per rank, the last step's outputs
    comparison: Comparison | None  # against the original, when asked
    steps: int
    seconds: float
    backend: str = "threads"
    # Under MPI only rank 0 reports (prints, saves): it holds every rank's outputs, the others their own.
    report: bool = True
    rank: int = 0
    twin: TwinComparison | None = None  # against the single-device model (`run --twin`), when asked


def session_kwargs(naming: PrefetchNaming, opt_level: str, timeout_s: float) -> dict:
    """The keyword arguments both backends' sessions take for one `run`."""
    return dict(
        prefetch_domain=naming.domain,
        prefetch_op=naming.op_type,
        prefetch_attrs=prefetch_attr_names(naming),
        opt_level=opt_level,
        timeout_s=timeout_s,
    )


def prefetch_attr_names(naming: PrefetchNaming) -> tuple[str, ...]:
    """How ``naming`` spells the Prefetch attributes the kernel reads (PREFETCH_KERNEL_ATTRS, in order); an
    attribute the naming does not rename keeps its own name."""
    return tuple(getattr(naming, attr, attr) for attr in PREFETCH_KERNEL_ATTRS)


def decode(
    session,
    inputs: Path | None,
    *,
    steps: int,
    batch: int,
    context: int,
    seed: int,
    dims: Mapping[str, int] | None = None,
):
    """``(shared, per_rank, outputs)``: feeds from ``inputs`` (or generated), then ``steps`` decode
    steps on ``session`` (a RankSession or an MpiRankSession)."""
    if inputs is not None:
        shared, per_rank = load_feeds(inputs)
    else:
        shared, per_rank = generate_feeds(session, batch=batch, context=context, seed=seed, dims=dims)
    return shared, per_rank, run_steps(session, shared, per_rank, steps)


@contextlib.contextmanager
def running_original(against: Path, keep: tuple[type, ...] = ()):
    """Names ``--against``'s model in a failure of its run (its feeds are MODEL's: a dtype or input
    it does not share fails there, not in MODEL). Exceptions of the ``keep`` types pass unchanged."""
    try:
        yield
    except keep:
        raise
    except PreserveError as exc:
        raise PreserveError(f"the original {against}: {exc}") from exc
