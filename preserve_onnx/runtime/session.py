"""Rank sessions: one onnxruntime InferenceSession per tensor-parallel rank, run on threads.

Invariant: the runtime never changes a value. Every rank's session loads the project's custom-op
library (``Prefetch`` is a pass-through of its anchor, ``AllReduce`` sums the ranks in the fixed order
0..p-1, ``AllGather`` concatenates), so running the same rank models on the same feeds gives the same
bytes on every run, and an optimized model that only adds Prefetch nodes gives the bytes of the
original.

The ranks of one :class:`RankSession` rendezvous in the library through a group id that is unique to
that object. When one rank fails, the others are woken through ``preserve_abort_group`` so that
:meth:`RankSession.run` raises within seconds instead of waiting for the collective's timeout.
"""

from __future__ import annotations

import abc
import concurrent.futures
import functools
import itertools
import os
import queue
import re
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.dims import DecodeLayout, decode_layout
from preserve_onnx.model_io import load_model
from preserve_onnx.runtime.library import PREFETCH_KERNEL_ATTRS, native_library
from preserve_onnx.runtime.options import (
    ModelLike,
    imports_com_microsoft,
    optimization_level,
    session_options,
)
from preserve_onnx.runtime.values import TensorMeta, from_ortvalue, tensor_meta, to_ortvalue

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
# Our kernels' messages already name the op, node, rank and group: drop onnxruntime's wrapper.
_OWN_KERNEL = re.compile(
    r"Non-zero status code returned while running \S+ node\. Name:'[^']*' Status Message: "
    r"(?=(?:AllReduce|AllGather) '|Prefetch: )"
)
_ABORTED_MARK = "group aborted:"
_ABORT_GRACE_S = 10.0
_GROUP_COUNTER = itertools.count()


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line, without onnxruntime's status prefix.

    onnxruntime puts the useful part of some messages on their second line ("index: 1 Got: 7
    Expected: 8"), so the lines are joined rather than cut.
    """
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _OWN_KERNEL.sub("", _ORT_PREFIX.sub("", " ".join(lines))).strip()


class _RankWorkers:
    """One long-lived daemon thread per rank, started on first use, so that a decode step does not pay
    for starting threads (about 0.15 ms per step for two ranks)."""

    def __init__(self, world: int) -> None:
        self._queues: list[queue.SimpleQueue | None] = [None] * world

    def submit(self, rank: int, fn: Callable[[], None]) -> None:
        q = self._queues[rank]
        if q is None:
            q = self._queues[rank] = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(q,), name=f"preserve-rank-{rank}", daemon=True).start()
        q.put(fn)

    def close(self) -> None:
        """Lets every thread end after its current work."""
        for rank, q in enumerate(self._queues):
            self._queues[rank] = None
            if q is not None:
                q.put(None)


def _serve(q: queue.SimpleQueue) -> None:
    while True:
        fn = q.get()
        if fn is None:
            return
        fn()
        del fn  # the work holds its RankSession: waiting with it would keep the session alive forever


class Ranks(abc.ABC):
    """What every way of running a rank family offers (threads here, one process per rank in
    :class:`~preserve_onnx.runtime.mpi.MpiRankSession`): the models, their inputs and outputs, feed
    checks, and ``run``/``close``.

    Attributes:
        model_sources: The rank models as given (paths or ModelProtos): the feeds read their decode
            layout (docs/runtime.md, "Generated feeds").
    """

    def __init__(self, models: Sequence[ModelLike], group: str, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise PreserveError(f"timeout_s must be positive, got {timeout_s}")
        self.model_sources = tuple(models)
        self._world = len(self.model_sources)
        self._group = group
        self._timeout_s = float(timeout_s)
        self._sessions: tuple[ort.InferenceSession, ...] = ()
        self._inputs: tuple[tuple[TensorMeta, ...], ...] = ()
        self._outputs: tuple[tuple[TensorMeta, ...], ...] = ()

    @functools.cached_property
    def decode_layout(self) -> DecodeLayout:
        """The first rank's decode layout (docs/design.md §2: KV-cache inputs, present -> past), read from
        its graph once per session (never its weights): every decode step asks."""
        first = self.model_sources[0]
        return decode_layout(first if isinstance(first, onnx.ModelProto) else load_model(Path(first)))

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self._world

    @property
    def group(self) -> str:
        """The rendezvous group id shared by this object's ranks."""
        return self._group

    @property
    def sessions(self) -> tuple[ort.InferenceSession, ...]:
        """The onnxruntime sessions this object holds, in rank order."""
        return self._sessions

    @property
    def input_meta(self) -> tuple[tuple[TensorMeta, ...], ...]:
        """Per rank, the graph inputs (name, dtype, shape) in graph order."""
        return self._inputs

    @property
    def output_meta(self) -> tuple[tuple[TensorMeta, ...], ...]:
        """Per rank, the graph outputs (name, dtype, shape) in graph order."""
        return self._outputs

    def input_names(self, rank: int = 0) -> list[str]:
        """Names of rank ``rank``'s graph inputs."""
        return [m.name for m in self._inputs[rank]]

    def output_names(self, rank: int = 0) -> list[str]:
        """Names of rank ``rank``'s graph outputs."""
        return [m.name for m in self._outputs[rank]]

    def _check_feeds(
        self, feeds: Mapping[str, np.ndarray], rank_feeds: Mapping[int, Mapping[str, np.ndarray]]
    ) -> None:
        for rank in rank_feeds:
            if not isinstance(rank, (int, np.integer)) or not 0 <= rank < self._world:
                raise PreserveError(f"feeds given for rank {rank}, but the world has {self._world} rank(s)")
        known = set().union(*(self.input_names(r) for r in range(self._world)))
        unknown = sorted(set(feeds) - known)
        if unknown:
            raise PreserveError(f"feed {unknown[0]!r} is not an input of any rank model")

    def _feeds_of(
        self, rank: int, feeds: Mapping[str, np.ndarray], rank_feeds: Mapping[int, Mapping[str, np.ndarray]]
    ) -> dict[str, ort.OrtValue]:
        """Rank ``rank``'s inputs: ``feeds`` overridden by its own, each input given exactly once."""
        meta = {m.name: m for m in self._inputs[rank]}
        own = dict(rank_feeds.get(rank, {}))
        for name in own:
            if name not in meta:
                raise PreserveError(f"rank {rank}: feed {name!r} is not an input of this rank's model")
        merged = {k: v for k, v in feeds.items() if k in meta}
        merged.update(own)
        missing = [name for name in meta if name not in merged]
        if missing:
            raise PreserveError(f"rank {rank}: no feed for input {missing[0]!r}")
        return {name: to_ortvalue(value, meta[name]) for name, value in merged.items()}

    @abc.abstractmethod
    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        rank_feeds: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Runs the ranks once and returns every rank's outputs (one dict per rank, rank order)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases the sessions; the object cannot run afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RankSession(Ranks):
    """One onnxruntime session per rank, run concurrently on threads of this process.

    Example:
        >>> session = RankSession(["model_00.onnx", "model_01.onnx"])
        >>> outputs = session.run({"x": x}, {0: {"past": p0}, 1: {"past": p1}})
        >>> outputs[1]["logits"]

    Args:
        models: One model per rank, in rank order: file paths or ``onnx.ModelProto``. A single path or
            ModelProto is a world of size one.
        prefetch_domain: Domain of the Prefetch op in these models.
        prefetch_op: Op type of the Prefetch op in these models.
        prefetch_attrs: The names of Prefetch's attributes in these models (vendor naming), in the
            order of ``PREFETCH_KERNEL_ATTRS`` (``max_size``, ``offset``, ``max_tokens``, ``min_tokens``,
            ``seq_axis``, ``window``); omitted trailing ones keep their own names. Only the cache hint
            reads them.
        opt_level: onnxruntime graph optimization level (a ``GraphOptimizationLevel`` or one of
            ``disable``, ``basic``, ``extended``, ``layout``, ``all``, or its int value).
        timeout_s: How long a rank waits in a collective for the others before it fails.
        intra_op_threads: onnxruntime intra-op threads per rank; default: the CPU count divided by
            the world size (at least 1), so that ranks do not oversubscribe the machine.
        data_dir: For models given as ``onnx.ModelProto`` whose weights live in external data
            files: the folder those files are in (one for all ranks, or one per rank). A ModelProto
            does not know where it was loaded from, so without it such a model is refused.

    Raises:
        PreserveError: The library is missing or a rank's model cannot be loaded.
    """

    def __init__(
        self,
        models: Sequence[ModelLike] | ModelLike,
        *,
        prefetch_domain: str = "preserve",
        prefetch_op: str = "Prefetch",
        prefetch_attrs: tuple[str, ...] = PREFETCH_KERNEL_ATTRS,
        opt_level: ort.GraphOptimizationLevel | str | int = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        timeout_s: float = 60,
        intra_op_threads: int | None = None,
        data_dir: str | os.PathLike | Sequence[str | os.PathLike | None] | None = None,
    ) -> None:
        if isinstance(models, (str, os.PathLike, onnx.ModelProto)):
            models = [models]
        models = list(models)
        if not models:
            raise PreserveError("RankSession needs at least one model")
        if data_dir is None or isinstance(data_dir, (str, os.PathLike)):
            data_dirs = [data_dir] * len(models)
        else:
            data_dirs = list(data_dir)
            if len(data_dirs) != len(models):
                raise PreserveError(f"data_dir names {len(data_dirs)} folders for {len(models)} models")
        super().__init__(
            models, f"preserve-{os.getpid()}-{next(_GROUP_COUNTER)}-{uuid.uuid4().hex[:8]}", timeout_s
        )
        self._lib = native_library()
        level = optimization_level(opt_level)
        threads = intra_op_threads or max(1, (os.cpu_count() or 1) // self._world)

        def create(rank: int) -> ort.InferenceSession:
            model = models[rank]
            options = session_options(
                rank=rank,
                world=self._world,
                group=self._group,
                level=level,
                threads=threads,
                timeout_s=self._timeout_s,
                prefetch=(prefetch_domain, prefetch_op, *prefetch_attrs),
                com_microsoft=imports_com_microsoft(model),
            )
            if isinstance(model, onnx.ModelProto):
                external = next(
                    (t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL), None
                )
                if external is not None:
                    if data_dirs[rank] is None:
                        raise PreserveError(
                            f"rank {rank}: the model keeps '{external.name}' in an external data file, and a "
                            f"ModelProto does not know its folder: pass data_dir=..., or the model's path"
                        )
                    # onnxruntime would otherwise look for the files in the current directory.
                    options.add_session_config_entry(
                        "session.model_external_initializers_file_folder_path", os.fspath(data_dirs[rank])
                    )
                source = model.SerializeToString()
            else:
                source = os.fspath(model)
            try:
                return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises several unrelated types here
                raise PreserveError(f"rank {rank}: {_first_line(exc)}") from exc

        with concurrent.futures.ThreadPoolExecutor(max_workers=self._world) as pool:
            futures = [pool.submit(create, r) for r in range(self._world)]
            self._sessions = tuple(f.result() for f in futures)
        self._inputs = tuple(tensor_meta(s.get_inputs()) for s in self._sessions)
        self._run_lock = threading.Lock()  # one run at a time: ranks of two runs would mix in the group
        self._workers = _RankWorkers(self._world)
        # An earlier run's rank threads that had not returned when it raised: (its condition, its flags).
        self._stragglers: tuple[threading.Condition, list[bool]] | None = None
        weakref.finalize(self, self._workers.close)
        if self._world > 1:
            weakref.finalize(self, self._lib.preserve_release_group, self._group.encode())
        self._outputs = tuple(tensor_meta(s.get_outputs()) for s in self._sessions)

    def _rank_feeds(
        self, feeds: Mapping[str, np.ndarray], rank_feeds: Mapping[int, Mapping[str, np.ndarray]]
    ) -> list[dict[str, ort.OrtValue]]:
        self._check_feeds(feeds, rank_feeds)
        return [self._feeds_of(rank, feeds, rank_feeds) for rank in range(self._world)]

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        rank_feeds: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Runs every rank once, concurrently, and returns every rank's outputs.

        Args:
            feeds: Inputs given to every rank that has an input of that name.
            rank_feeds: Per rank, inputs for that rank only; they override ``feeds``.

        Returns:
            One dict per rank (rank order) mapping each output name to a numpy array.

        Raises:
            PreserveError: ``rank r: <reason>`` for the first rank that failed; the other ranks are
                released from their collectives first.
        """
        if not self._sessions:
            raise PreserveError("this RankSession is closed")
        per_rank = self._rank_feeds(feeds, rank_feeds or {})
        with self._run_lock:
            return self._run(per_rank)

    def _run(self, per_rank: list[dict[str, ort.OrtValue]]) -> list[dict[str, np.ndarray]]:
        """Runs the ranks on threads; see :meth:`run`."""
        results: list[dict[str, np.ndarray] | None] = [None] * self._world
        errors: list[tuple[float, int, BaseException]] = []
        lock = threading.Lock()
        finished = threading.Condition()
        done = [False] * self._world  # per rank: its thread has finished its work; guarded by `finished`

        def work(rank: int) -> None:
            try:
                values = self._sessions[rank].run_with_ort_values(None, per_rank[rank])
                results[rank] = {
                    m.name: from_ortvalue(v, m) for m, v in zip(self._outputs[rank], values, strict=True)
                }
            except BaseException as exc:  # noqa: BLE001 - reported to the caller below
                with lock:
                    errors.append((time.monotonic(), rank, exc))
                if self._world > 1:
                    # Wake the ranks that wait in a collective for this one.
                    self._lib.preserve_abort_group(self._group.encode())
            finally:
                with finished:
                    done[rank] = True
                    finished.notify_all()

        if self._world == 1:
            work(0)
        else:
            self._await_stragglers()
            for r in range(self._world):
                self._workers.submit(r, functools.partial(work, r))
            # No deadline while all ranks are healthy (a CPU step of a big model may take minutes and
            # every collective wait is bounded in the library); once one failed, the others were
            # aborted and must return promptly.
            deadline = None
            try:
                with finished:
                    while not all(done):
                        if errors and deadline is None:
                            deadline = time.monotonic() + _ABORT_GRACE_S
                        if deadline is not None and time.monotonic() > deadline:
                            stuck = [r for r in range(self._world) if not done[r]] or [-1]
                            self._stragglers = (finished, done)
                            _, rank, exc = min(errors, key=lambda e: e[0])
                            raise PreserveError(
                                f"rank {rank}: {_first_line(exc)} (rank {stuck[0]} did not stop within "
                                f"{_ABORT_GRACE_S:.0f} s)"
                            )
                        finished.wait(
                            timeout=0.5 if deadline is None else max(0.01, deadline - time.monotonic())
                        )
            except KeyboardInterrupt:
                # Release the ranks and, once they have returned, leave the group ready for the next run.
                self._lib.preserve_abort_group(self._group.encode())
                with finished:
                    if finished.wait_for(lambda: all(done), timeout=_ABORT_GRACE_S):
                        self._lib.preserve_reset_group(self._group.encode())
                    else:
                        self._stragglers = (finished, done)
                raise
            # Every rank has returned: clear the aborted state so the next run starts clean.
            self._lib.preserve_reset_group(self._group.encode())
        if errors:
            errors.sort(key=lambda e: e[0])
            # The root cause is the first failure that was not just the abort it triggered.
            root = next((e for e in errors if _ABORTED_MARK not in str(e[2])), errors[0])
            _, rank, exc = root
            raise PreserveError(f"rank {rank}: {_first_line(exc)}") from exc
        return [r for r in results if r is not None]

    def _await_stragglers(self) -> None:
        """Before a run: the ranks of an earlier run that did not stop in time (a long operator after a
        failure, Ctrl-C) must have returned, or two threads would act as one rank. Waits for them a
        while, then resets the group; refuses to run if they are still busy."""
        if self._stragglers is None:
            return
        finished, done = self._stragglers
        with finished:
            if not finished.wait_for(lambda: all(done), timeout=_ABORT_GRACE_S):
                stuck = next(r for r, d in enumerate(done) if not d)
                raise PreserveError(
                    f"rank {stuck} of an earlier run is still running (it did not stop after "
                    f"that run failed); wait for it or create a new RankSession"
                )
        self._stragglers = None
        self._lib.preserve_reset_group(self._group.encode())

    def close(self) -> None:
        """Releases the sessions and the rendezvous group; the object cannot run afterwards."""
        self._sessions = ()
        self._workers.close()
        if self._world > 1:
            self._lib.preserve_release_group(self._group.encode())

    def __repr__(self) -> str:
        return f"RankSession(world_size={self._world}, group={self._group!r})"
