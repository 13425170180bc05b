"""The MPI backend: one process per rank under ``mpirun``; the collectives exchange tensors through MPI.

    mpirun -n 2 preserve-onnx run DIR --backend mpi [--against ORIG] [--save out.npz]

Invariant: the same bytes as the thread backend. Process r loads only rank r's model; the library's
AllReduce / AllGather kernels (``csrc/preserve_ops.cc``, transport ``mpi``) send every rank's inputs
to every other rank and compute the result locally in the fixed rank order 0..p-1 with the very code
the thread transport uses. Feeds are generated from every rank's input metadata (exchanged at start),
so each process generates the same feeds the thread backend would; the decode loop takes the next
token from rank 0's logits, broadcast to every rank.

The C++ library is not linked against MPI. :class:`MpiContext` passes it the path of the libmpi that
mpi4py loaded and the handles of duplicated communicators; the library takes MPI_Isend / MPI_Irecv /
MPI_Test / MPI_Cancel from that image (dlopen with RTLD_NOLOAD) and polls, so a collective can end on
a deadline or on another rank's failure notice instead of blocking in MPI for ever.

Failures: a rank that fails tells every peer (a FAIL notice with its reason); a peer waiting in a
collective or in an exchange here stops with "stopped because rank r failed: ...". Once a collective
has failed, MPI_Finalize could wait for a rank that will never come, so the process exits with status
1 without it, after every peer has said it reported its error (or after a grace period). A rank that
dies outright is mpirun's business: it kills the others with SIGTERM, and each prints one line saying
so (a handler in the library, since the main thread is usually inside a kernel then).
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from preserve_onnx.config import PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.model_io import resolve_ranks
from preserve_onnx.runtime.backend import RunResult, decode, running_original, session_kwargs
from preserve_onnx.runtime.compare import Comparison, compare_outputs
from preserve_onnx.runtime.decode import run_steps
from preserve_onnx.runtime.library import PREFETCH_KERNEL_ATTRS, native_library
from preserve_onnx.runtime.options import (
    ModelLike,
    imports_com_microsoft,
    optimization_level,
    session_options,
)
from preserve_onnx.runtime.session import Ranks, _first_line
from preserve_onnx.runtime.values import from_ortvalue, tensor_meta

INSTALL_HINT = (
    "the mpi backend needs mpi4py and an MPI library: `make mpi` (Open MPI from the distribution's "
    "packages, mpi4py into the venv), or `pip install 'preserve-onnx[mpi]'` next to an installed MPI"
)
_TAG_OBJECT = 21
_STOPPED = "stopped because rank"  # the library's words when a peer's failure ended a collective
_EXIT_GRACE_S = 10.0
_GROUPS = itertools.count()
_context: MpiContext | None = None
_context_lock = threading.Lock()


def mpi_module():
    """Imports ``mpi4py.MPI`` (initialising MPI) or raises a PreserveError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise PreserveError(f"{INSTALL_HINT} ({exc})") from exc
    return MPI


def _loaded_libmpi() -> str:
    """Path of the MPI library image this process has loaded (through mpi4py)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.split()[-1] if line.strip() else ""
                base = os.path.basename(path)
                if base.startswith("libmpi.so") or base.startswith("libmpich.so"):
                    return path
    except OSError:
        pass
    raise PreserveError(
        "mpi4py is imported but no libmpi.so is mapped in this process; cannot bind the kernels to MPI"
    )


class PeerFailed(PreserveError):
    """This rank stopped because another rank failed (the message names it and its reason)."""


class MpiContext:
    """This process's binding of the kernels to an MPI communicator (one per process: :func:`get_context`).

    Holds three duplicates of the communicator, all with MPI_ERRORS_RETURN: ``data`` (the kernels'
    tensors), ``control`` (FAIL / EXIT notices) and ``objects`` (the exchanges of Python objects here).

    Args:
        comm: The communicator whose ranks are the model's ranks; default ``MPI.COMM_WORLD``.
    """

    def __init__(self, comm: Any = None) -> None:
        MPI = mpi_module()
        self.MPI = MPI
        comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.group = f"preserve-mpi-{os.getpid()}-{next(_GROUPS)}"
        self.failed = False  # a collective or exchange failed: MPI_Finalize is no longer safe
        self._lib = native_library()
        self._comms = [comm.Dup() for _ in range(3)]
        for c in self._comms:
            c.Set_errhandler(MPI.ERRORS_RETURN)
        self.data, self.control, self.objects = self._comms
        shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = shared.Get_size()
        shared.Free()
        lib = self._lib
        lib.preserve_mpi_bind.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.preserve_mpi_bind.restype = ctypes.c_int
        lib.preserve_mpi_last_error.restype = ctypes.c_char_p
        lib.preserve_mpi_fail.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        lib.preserve_mpi_failure.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        lib.preserve_mpi_finish.argtypes = [ctypes.c_char_p, ctypes.c_double]
        lib.preserve_mpi_unbind.argtypes = [ctypes.c_char_p]
        lib.preserve_set_sigterm_message.argtypes = [ctypes.c_char_p]
        handle_size = MPI._sizeof(MPI.Comm)
        rc = lib.preserve_mpi_bind(
            self.group.encode(),
            _loaded_libmpi().encode(),
            handle_size,
            MPI._handleof(self.data),
            MPI._handleof(self.control),
            MPI._handleof(MPI.BYTE),
            self.rank,
            self.size,
        )
        if rc != 0:
            raise PreserveError(lib.preserve_mpi_last_error().decode(errors="replace"))
        if self.size > 1:
            lib.preserve_set_sigterm_message(
                f"error: rank {self.rank}: stopped by mpirun (SIGTERM): another process of the job ended; "
                "see its message".encode()
            )
        atexit.register(self._at_exit)

    # -- failures ---------------------------------------------------------------------------------

    def failure(self) -> tuple[int, str] | None:
        """The first failure this rank knows of: ``(rank, reason)``, or None."""
        buf = ctypes.create_string_buffer(1024)
        who = self._lib.preserve_mpi_failure(self.group.encode(), buf, len(buf))
        return None if who < 0 else (who, buf.value.decode(errors="replace"))

    def check_peers(self) -> None:
        """Raises PeerFailed when another rank has reported a failure."""
        known = self.failure()
        if known is not None and known[0] != self.rank:
            self.failed = True
            raise PeerFailed(f"rank {self.rank}: stopped because rank {known[0]} failed: {known[1]}")

    def fail(self, reason: str) -> None:
        """Reports this rank's failure to every peer (once) and marks the process as failed."""
        self.failed = True
        self._lib.preserve_mpi_fail(self.group.encode(), reason.encode(errors="replace")[:1000])

    def _at_exit(self) -> None:
        # This rank has said what it had to say: if mpirun now ends the job, that is no news.
        self._lib.preserve_set_sigterm_message(b"")
        if self.failed and self.size > 1:
            # Pending MPI requests (a collective cut short, a peer that is gone) would make MPI_Finalize
            # wait for ever: say goodbye, give the peers time to print their own error, leave.
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
            grace = float(os.environ.get("PRESERVE_MPI_EXIT_GRACE_S", _EXIT_GRACE_S))
            self._lib.preserve_mpi_finish(self.group.encode(), grace)
            os._exit(1)
        self._lib.preserve_mpi_unbind(self.group.encode())
        for c in self._comms:
            try:
                c.Free()
            except Exception:  # noqa: BLE001 - MPI may be finalized already
                pass

    # -- exchanges of Python objects, failure- and deadline-aware ---------------------------------

    def _exchange(
        self, sends: Mapping[int, Any], sources: Sequence[int], what: str, timeout_s: float | None
    ) -> dict[int, Any]:
        """Sends ``sends[p]`` to each p and receives one object from each source, polling for failures."""
        self.check_peers()
        requests = [self.objects.isend(obj, dest=p, tag=_TAG_OBJECT) for p, obj in sends.items()]
        got: dict[int, Any] = {}
        start = time.monotonic()
        naps = 0
        while True:
            for p in sources:
                if p not in got:
                    message = self.objects.improbe(source=p, tag=_TAG_OBJECT)
                    if message is not None:
                        got[p] = message.recv()
            requests = [r for r in requests if not r.test()[0]]
            if len(got) == len(sources) and not requests:
                return got
            self.check_peers()
            waited = time.monotonic() - start
            if timeout_s is not None and waited > timeout_s:
                missing = ", ".join(str(p) for p in sources if p not in got) or "(sends did not finish)"
                raise PreserveError(
                    f"rank {self.rank}: timed out after {timeout_s:g} s waiting for rank(s) "
                    f"{missing} in {what}"
                )
            naps += 1
            if naps > 200:
                time.sleep(0.0005 if waited < 1 else 0.005)

    def allgather(self, obj: Any, what: str, timeout_s: float | None = None) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        peers = [p for p in range(self.size) if p != self.rank]
        got = self._exchange({p: obj for p in peers}, peers, what, timeout_s)
        got[self.rank] = obj
        return [got[p] for p in range(self.size)]

    def bcast(self, obj: Any, root: int, what: str, timeout_s: float | None = None) -> Any:
        """``obj`` of rank ``root`` on every rank."""
        if self.rank == root:
            self._exchange({p: obj for p in range(self.size) if p != root}, [], what, timeout_s)
            return obj
        return self._exchange({}, [root], what, timeout_s)[root]

    def gather(self, obj: Any, root: int, what: str, timeout_s: float | None = None) -> list[Any] | None:
        """Every rank's ``obj`` on ``root`` (rank order); None elsewhere."""
        if self.rank != root:
            self._exchange({root: obj}, [], what, timeout_s)
            return None
        got = self._exchange({}, [p for p in range(self.size) if p != root], what, timeout_s)
        got[root] = obj
        return [got[p] for p in range(self.size)]


def get_context(comm: Any = None) -> MpiContext:
    """The process's MpiContext, created (collectively: every rank must call it) on first use."""
    global _context
    with _context_lock:
        if _context is None:
            _context = MpiContext(comm)
        elif comm is not None and comm.Get_size() != _context.size:
            raise PreserveError("the MPI context is already bound to a communicator of another size")
        return _context


def check_world(models: Sequence[Any], ctx: MpiContext, what: str = "the model") -> None:
    """Refuses a job whose process count is not the model's rank count (every rank says so alike)."""
    if len(models) != ctx.size:
        raise PreserveError(
            f"{what} has {len(models)} rank model(s) but this MPI job has {ctx.size} process(es): "
            f"start it with `mpirun -n {len(models)}`"
        )


class MpiRankSession(Ranks):
    """Rank ``comm.rank``'s onnxruntime session of a tensor-parallel model; peers are MPI processes.

    Every process of the communicator constructs it with the same model list (all ranks' files) and
    loads only its own. The metadata of every rank is exchanged, so ``input_meta`` / ``output_meta``
    cover all ranks and :func:`~preserve_onnx.runtime.generate_feeds` gives every process the same
    feeds it gives the thread backend.

    Example (under ``mpirun -n 2``):
        >>> session = MpiRankSession(["model_00.onnx", "model_01.onnx"])
        >>> outputs = session.run({"x": x})
        >>> outputs[session.rank]["logits"]

    Args:
        models: One model per rank, in rank order (paths or ModelProtos).
        comm: The MPI communicator; default ``MPI.COMM_WORLD``.
        prefetch_domain, prefetch_op, opt_level, timeout_s: As for :class:`RankSession`.
        intra_op_threads: Default: the CPU count divided by the ranks on this machine.

    Raises:
        PreserveError: MPI is missing, the process count differs from the rank count, or a rank's
            model cannot be loaded (every rank raises; the others with "stopped because rank r failed").
    """

    def __init__(
        self,
        models: Sequence[ModelLike] | ModelLike,
        *,
        comm: Any = None,
        prefetch_domain: str = "preserve",
        prefetch_op: str = "Prefetch",
        prefetch_attrs: tuple[str, ...] = PREFETCH_KERNEL_ATTRS,
        opt_level: ort.GraphOptimizationLevel | str | int = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        timeout_s: float = 60,
        intra_op_threads: int | None = None,
    ) -> None:
        if isinstance(models, (str, os.PathLike, onnx.ModelProto)):
            models = [models]
        models = list(models)
        if timeout_s <= 0:
            raise PreserveError(f"timeout_s must be positive, got {timeout_s}")
        self._ctx = ctx = get_context(comm)
        check_world(models, ctx)
        super().__init__(models, ctx.group, timeout_s)
        self._lib = native_library()
        self._rank = ctx.rank
        self._run_lock = threading.Lock()
        options = session_options(
            rank=ctx.rank,
            world=ctx.size,
            group=ctx.group,
            level=optimization_level(opt_level),
            threads=intra_op_threads or max(1, (os.cpu_count() or 1) // ctx.local_size),
            timeout_s=self._timeout_s,
            prefetch=(prefetch_domain, prefetch_op, *prefetch_attrs),
            transport="mpi",
            com_microsoft=imports_com_microsoft(models[ctx.rank]),
        )
        model = models[ctx.rank]
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
        try:
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several unrelated types here
            reason = _first_line(exc)
            ctx.fail(reason)
            raise PreserveError(f"rank {ctx.rank}: {reason}") from exc
        self._session = session
        self._sessions = (session,)
        mine = (tensor_meta(session.get_inputs()), tensor_meta(session.get_outputs()))
        # Loading takes as long as it takes: no deadline here, but a peer's failure ends the wait.
        metas = ctx.allgather(mine, "the exchange of model metadata")
        self._inputs = tuple(m[0] for m in metas)
        self._outputs = tuple(m[1] for m in metas)
        self._share_logits = any(m.name == "logits" for m in self._outputs[0])

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self._rank

    @property
    def local_ranks(self) -> tuple[int, ...]:
        """The ranks whose outputs :meth:`run` returns in full: this process's."""
        return (self._rank,)

    @property
    def context(self) -> MpiContext:
        """The MPI binding."""
        return self._ctx

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        rank_feeds: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Runs this rank once (its peers run theirs) and returns the outputs.

        Args:
            feeds: Inputs for every rank; only those of this rank's model are used.
            rank_feeds: Per rank, inputs for that rank only (other ranks' entries are ignored).

        Returns:
            One dict per rank, in rank order: this rank's outputs in full; the other ranks' dicts are
            empty except that rank 0's ``logits`` (when its model has them) is on every rank, because
            the decode loop picks the next token from it.

        Raises:
            PreserveError: ``rank r: <reason>`` for this rank's failure, or PeerFailed (``stopped
                because rank q failed: ...``) when another rank's failure stopped this one.
        """
        if not self._sessions:
            raise PreserveError("this MpiRankSession is closed")
        ctx = self._ctx
        try:
            feed = self._local_feeds(feeds, rank_feeds or {})
            with self._run_lock:
                values = self._session.run_with_ort_values(None, feed)
            mine = {
                m.name: from_ortvalue(v, m) for m, v in zip(self._outputs[self._rank], values, strict=True)
            }
            results: list[dict[str, np.ndarray]] = [{} for _ in range(self._world)]
            results[self._rank] = mine
            if self._share_logits and self._world > 1:
                logits = ctx.bcast(
                    mine.get("logits") if self._rank == 0 else None,
                    0,
                    "the broadcast of rank 0's logits",
                    self._timeout_s,
                )
                if self._rank != 0:
                    results[0] = {"logits": logits}
            return results
        except PeerFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - classified and reported below
            reason = _first_line(exc)
            if _STOPPED in reason:
                ctx.check_peers()  # a peer's failure is what cut this rank's collective short
            ctx.fail(reason)
            raise PreserveError(f"rank {self._rank}: {reason}") from exc

    def _local_feeds(
        self, feeds: Mapping[str, np.ndarray], rank_feeds: Mapping[int, Mapping[str, np.ndarray]]
    ) -> dict[str, ort.OrtValue]:
        self._check_feeds(feeds, rank_feeds)
        return self._feeds_of(self._rank, feeds, rank_feeds)

    def close(self) -> None:
        """Releases the session (the MPI binding stays for the next session of this process)."""
        self._sessions = ()
        self._session = None

    def __repr__(self) -> str:
        return f"MpiRankSession(rank={self._rank}, world_size={self._world}, group={self._group!r})"


def _merge(comparisons: Sequence[Comparison]) -> Comparison:
    """One Comparison from per-rank ones (each computed over its own rank only)."""
    worst = None
    differing: list[tuple[int, str]] = []
    for c in comparisons:
        differing.extend(c.differing)
        if c.worst is not None and (worst is None or c.worst[2] > worst[2]):
            worst = c.worst
    return Comparison(identical=not differing, worst=worst, differing=tuple(sorted(differing)))


def run_models_mpi(
    path: Path,
    *,
    against: Path | None = None,
    inputs: Path | None = None,
    steps: int = 1,
    batch: int = 1,
    context: int = 16,
    seed: int = 0,
    opt_level: str = "all",
    naming: PrefetchNaming = PrefetchNaming(),
    timeout_s: float = 60,
    comm: Any = None,
    dims: Mapping[str, int] | None = None,
):
    """:func:`~preserve_onnx.runtime.runner.run_models` with one process per rank (call it on every rank).

    Every process reads the same paths (models, ``--inputs``): across machines they must exist on each.
    Rank 0's result holds every rank's outputs (gathered) and ``report=True``; the others' hold their own.
    The comparison against ``against`` is merged over all ranks on every rank, so all exit alike.
    """
    start = time.perf_counter()
    models = resolve_ranks(path)
    originals: Sequence[Path] = resolve_ranks(against) if against is not None else ()
    ctx = get_context(comm)
    check_world(models, ctx, str(path))
    if against is not None and len(originals) != len(models):  # the thread backend's words
        raise PreserveError(f"{path} has {len(models)} ranks but {against} has {len(originals)}")
    try:
        # Every process must run the same command: a difference would pair the wrong collectives.
        args = (
            tuple(str(m) for m in models),
            tuple(str(m) for m in originals),
            str(inputs),
            steps,
            batch,
            context,
            seed,
            opt_level,
            naming.domain,
            naming.op_type,
            tuple(sorted((dims or {}).items())),
        )
        seen = ctx.allgather(args, "the start-up check", timeout_s)
        for rank, other in enumerate(seen):
            if other != args:
                raise PreserveError(f"rank {rank} was started with other arguments than rank {ctx.rank}")
        kw = session_kwargs(naming, opt_level, timeout_s)
        with MpiRankSession(list(models), comm=comm, **kw) as session:
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
            with (
                running_original(against, keep=(PeerFailed,)),
                MpiRankSession(list(originals), comm=comm, **kw) as original,
            ):
                expected = run_steps(original, shared, per_rank, steps)
            pad = [{} for _ in range(ctx.size)]
            mine = compare_outputs(
                [*pad[: ctx.rank], expected[ctx.rank]], [*pad[: ctx.rank], outputs[ctx.rank]]
            )
            comparison = _merge(ctx.allgather(mine, "the exchange of comparisons", timeout_s))
        everyone = ctx.gather(outputs[ctx.rank], 0, "the gathering of outputs on rank 0", timeout_s)
    except PeerFailed:
        raise
    except PreserveError as exc:
        ctx.check_peers()
        reason = str(exc)
        prefix = f"rank {ctx.rank}: "
        ctx.fail(reason[len(prefix) :] if reason.startswith(prefix) else reason)
        raise PreserveError(reason if reason.startswith(prefix) else prefix + reason) from exc
    except Exception as exc:  # noqa: BLE001 - any failure must reach the peers
        ctx.check_peers()
        reason = _first_line(exc)
        ctx.fail(reason)
        raise PreserveError(f"rank {ctx.rank}: {reason}") from exc
    result_outputs = (
        everyone if everyone is not None else [outputs[r] if r == ctx.rank else {} for r in range(ctx.size)]
    )
    return RunResult(
        tuple(models),
        result_outputs,
        comparison,
        steps,
        time.perf_counter() - start,
        backend="mpi",
        report=ctx.rank == 0,
        rank=ctx.rank,
    )
