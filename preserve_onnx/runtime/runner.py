"""`preserve-onnx run` as a library call: run rank models (and optionally their originals) on the
reference runtime over N decode steps, and compare outputs bit for bit.

Invariant: the optimized and the original models see exactly the same feeds (generated once from
a seed, or read from an .npz), so any output difference is the optimizer's fault.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from preserve_onnx.config import PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.model_io import find_rank_sets, sibling_rank_count
from preserve_onnx.runtime.compare import Comparison, compare_outputs
from preserve_onnx.runtime.decode import run_steps
from preserve_onnx.runtime.feeds import DEFAULT_CONTEXT, generate_feeds, load_feeds, model_dims
from preserve_onnx.runtime.session import RankSession

if TYPE_CHECKING:
    from preserve_onnx.runtime.twin import TwinComparison


BACKENDS = ("threads", "mpi")


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


def rank_models(path: Path) -> tuple[Path, ...]:
    """The rank files of a directory (in rank order); for one rank file, its whole family in its folder
    (a rank alone would run its collectives as a world of one: not the model); else the file itself."""
    path = Path(path)
    if not path.exists():
        raise PreserveError(f"{path}: no such file or directory")
    if not path.is_dir():
        if sibling_rank_count(path) == 1:
            return (path,)
        return next(s.files for s in find_rank_sets(path.parent) if any(f.name == path.name for f in s.files))
    sets = find_rank_sets(path)
    if len(sets) > 1:
        names = ", ".join(s.pattern.replace("{rank}", "*") for s in sets)
        raise PreserveError(f"{path} holds several rank-model families ({names}); run one of them by naming "
                            f"any of its files")
    return sets[0].files


def session_kwargs(naming: PrefetchNaming, opt_level: str, timeout_s: float) -> dict:
    """The keyword arguments both backends' sessions take for one `run`."""
    return dict(prefetch_domain=naming.domain, prefetch_op=naming.op_type,
                prefetch_attrs=(naming.max_size, naming.offset, naming.max_tokens), opt_level=opt_level, timeout_s=timeout_s)


def decode(session, inputs: Path | None, *, steps: int, batch: int, context: int, seed: int,
           dims: Mapping[str, int] | None = None):
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


def run_models(path: Path, *, against: Path | None = None, inputs: Path | None = None, steps: int = 1,
               batch: int = 1, context: int = DEFAULT_CONTEXT, seed: int = 0, opt_level: str = "all",
               naming: PrefetchNaming = PrefetchNaming(), timeout_s: float = 60,
               backend: str = "threads", dims: Mapping[str, int] | None = None) -> RunResult:
    """Run ``path`` (file or rank directory) for ``steps`` decode steps; compare with ``against``.

    ``backend="mpi"``: call it in every process of ``mpirun -n RANKS``; process r runs rank r (see
    :mod:`preserve_onnx.runtime.mpi`). ``dims`` (``--dim``) bind symbolic dims of generated feeds before
    the dims the graphs fix and ``batch``/``context``.
    """
    if backend not in BACKENDS:
        raise PreserveError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "mpi":
        from preserve_onnx.runtime.mpi import run_models_mpi

        return run_models_mpi(path, against=against, inputs=inputs, steps=steps, batch=batch, context=context,
                              seed=seed, opt_level=opt_level, naming=naming, timeout_s=timeout_s)
    start = time.perf_counter()
    models = rank_models(path)
    originals: Sequence[Path] = rank_models(against) if against is not None else ()
    if against is not None and len(originals) != len(models):
        raise PreserveError(f"{path} has {len(models)} ranks but {against} has {len(originals)}")
    kw = session_kwargs(naming, opt_level, timeout_s)
    with RankSession(list(models), **kw) as session:
        shared, per_rank, outputs = decode(session, inputs, steps=steps, batch=batch, context=context, seed=seed,
                                           dims=model_dims(models, dims) if inputs is None else None)
    comparison = None
    if against is not None:
        with running_original(against), RankSession(list(originals), **kw) as original:
            expected = run_steps(original, shared, per_rank, steps)
        comparison = compare_outputs(expected, outputs)
    return RunResult(tuple(models), outputs, comparison, steps, time.perf_counter() - start)
