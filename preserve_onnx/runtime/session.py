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

import concurrent.futures
import contextlib
import ctypes
import functools
import itertools
import os
import pathlib
import queue
import re
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, NamedTuple, Union

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

from preserve_onnx.errors import PreserveError

ModelLike = Union[str, os.PathLike, onnx.ModelProto]

_LIB_NAME = "libpreserve_ops.so"
# Prefetch's attributes that the kernel reads, in the order of ``prefetch_attrs`` (docs/design.md §3).
PREFETCH_KERNEL_ATTRS = ("max_size", "offset", "max_tokens", "min_tokens", "seq_axis", "window")
_LIB_DIR = pathlib.Path(__file__).resolve().parent / "_lib"  # setup.py and `make lib` build it there

# onnxruntime type strings -> numpy dtypes (ml_dtypes for the types numpy lacks).
_ORT_TYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(bfloat16)": np.dtype(ml_dtypes.bfloat16),
    "tensor(float8e4m3fn)": np.dtype(ml_dtypes.float8_e4m3fn),
    "tensor(float8e5m2)": np.dtype(ml_dtypes.float8_e5m2),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(object),
}

# numpy dtypes that onnxruntime's Python binding cannot take or return directly: they cross as raw
# bytes with an explicit ONNX element type.
_RAW_TYPES: dict[np.dtype, int] = {
    np.dtype(ml_dtypes.bfloat16): onnx.TensorProto.BFLOAT16,
    np.dtype(ml_dtypes.float8_e4m3fn): onnx.TensorProto.FLOAT8E4M3FN,
    np.dtype(ml_dtypes.float8_e5m2): onnx.TensorProto.FLOAT8E5M2,
}
_UINT_OF_SIZE = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16)}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):
    _OPT_LEVELS["layout"] = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
# Our kernels' messages already name the op, node, rank and group: drop onnxruntime's wrapper.
_OWN_KERNEL = re.compile(r"Non-zero status code returned while running \S+ node\. Name:'[^']*' Status Message: "
                         r"(?=(?:AllReduce|AllGather) '|Prefetch: )")
_ABORTED_MARK = "group aborted:"
_ABORT_GRACE_S = 10.0
_GROUP_COUNTER = itertools.count()


@dataclass(frozen=True)
class TensorMeta:
    """Name, element type and shape of a graph input or output of one rank's model.

    Attributes:
        name: The graph input or output name.
        dtype: The numpy dtype of its elements (``ml_dtypes.bfloat16`` for bfloat16).
        shape: One entry per axis: an int when static, the symbol name when symbolic, None when
            unknown. None as a whole when the rank is unknown.
        onnx_type: onnxruntime's type string, e.g. ``tensor(float16)``.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None
    onnx_type: str


def library_path() -> pathlib.Path:
    """Returns the path of the built custom-op library.

    Returns:
        The absolute path of ``libpreserve_ops.so`` inside the package.

    Raises:
        PreserveError: The library has not been built.
    """
    path = (_LIB_DIR / _LIB_NAME).resolve()
    if not path.is_file():
        # The package build (setup.py) writes why it could not build the library next to where it would be.
        marker = path.with_name("NOT_BUILT")
        if marker.is_file():
            reason = (marker.read_text().strip().splitlines() or ["unknown reason"])[0]
            raise PreserveError(f"the runtime's custom-op library was not built when preserve-onnx was installed "
                                f"({reason}): provide what it names (a C++ compiler such as g++; onnxruntime's C "
                                f"headers: ORT_INCLUDE_DIR=<the include folder of onnxruntime's release archive or "
                                f"of Debian's libonnxruntime-dev>) and reinstall: pip install --force-reinstall "
                                f"--no-deps <preserve-onnx's source folder or sdist>")
        raise PreserveError(f"the runtime's custom-op library {path} is missing: reinstall preserve-onnx from its "
                            f"source folder or sdist where g++ is installed, or run `make lib` in a clone")
    return path


_native_lock = threading.Lock()
_native_lib: ctypes.CDLL | None = None


def _version_tuple(version: str) -> tuple[int, ...]:
    """``1.21.0.dev20250101`` -> (1, 21, 0): the leading numeric fields of a version string."""
    fields = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        fields.append(int(digits.group()))
    return tuple(fields)


def check_onnxruntime(lib: ctypes.CDLL) -> None:
    """Refuses an installed onnxruntime older than the library's C API (onnxruntime 1.N serves API N): it
    would fail to register the library and then report every AllReduce as an unknown operator.

    Raises:
        PreserveError: one line naming what to upgrade.
    """
    try:
        api_version = lib.preserve_ort_api_version
    except AttributeError:  # a library built from an older source than this package
        raise PreserveError(f"the runtime's custom-op library {lib._name} is older than this preserve-onnx: rebuild "
                            f"it (`make lib` in a clone, or reinstall preserve-onnx)") from None
    api_version.restype = ctypes.c_int
    api = int(api_version())
    installed = ort.__version__
    if _version_tuple(installed)[:2] < (1, api):
        raise PreserveError(f"onnxruntime {installed} is older than the runtime's custom-op library needs "
                            f"(onnxruntime 1.{api}, C API version {api}): upgrade it: pip install --upgrade "
                            f"'onnxruntime>=1.{api}'")


def _native() -> ctypes.CDLL:
    """Loads the library into this process once (the same image onnxruntime loads for the sessions), and
    checks that the installed onnxruntime can register it."""
    global _native_lib
    with _native_lock:
        if _native_lib is None:
            lib = ctypes.CDLL(str(library_path()))
            for fn in ("preserve_abort_group", "preserve_reset_group", "preserve_release_group"):
                getattr(lib, fn).argtypes = [ctypes.c_char_p]
                getattr(lib, fn).restype = ctypes.c_int
            lib.preserve_prefetch_recorded.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_uint64]
            lib.preserve_prefetch_recorded.restype = ctypes.c_uint64
            lib.preserve_prefetch_record.argtypes = [ctypes.c_int]
            _native_lib = lib
        check_onnxruntime(_native_lib)
        return _native_lib


class PrefetchCounters(NamedTuple):
    """What the Prefetch kernels of this process did since the library loaded (docs/design.md §3)."""

    issued: int  # cache hints issued
    skipped_above: int  # hints skipped: more tokens per step than the node's max_tokens
    skipped_below: int  # hints skipped: fewer tokens per step than the node's min_tokens
    bytes: int  # bytes of X the issued hints covered (live bytes when the node has L)

    def __sub__(self, other: PrefetchCounters) -> PrefetchCounters:  # type: ignore[override]
        return PrefetchCounters(*(a - b for a, b in zip(self, other)))


def prefetch_counters() -> PrefetchCounters:
    """The process-wide Prefetch counters; subtract two readings to see what a run did."""
    lib = _native()
    values = [ctypes.c_uint64(0) for _ in PrefetchCounters._fields]
    lib.preserve_prefetch_counters(*(ctypes.byref(v) for v in values))
    return PrefetchCounters(*(v.value for v in values))


@contextlib.contextmanager
def recording_prefetch_ranges():
    """Records the byte ranges ``(begin, end)`` of X that every Prefetch hint issued inside the block
    covers (contiguous ones merged), into the list it yields, in the order the hints were issued
    (across ranks: the order the threads ran). One recording at a time per process."""
    lib = _native()
    ranges: list[tuple[int, int]] = []
    lib.preserve_prefetch_record(1)
    try:
        yield ranges
    finally:
        count = lib.preserve_prefetch_recorded(None, 0)
        buf = (ctypes.c_uint64 * (2 * count))()
        lib.preserve_prefetch_recorded(buf, count)
        lib.preserve_prefetch_record(0)
        ranges.extend((buf[2 * i], buf[2 * i + 1]) for i in range(count))


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line, without onnxruntime's status prefix.

    onnxruntime puts the useful part of some messages on their second line ("index: 1 Got: 7
    Expected: 8"), so the lines are joined rather than cut.
    """
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _OWN_KERNEL.sub("", _ORT_PREFIX.sub("", " ".join(lines))).strip()


def _opt_level(level: ort.GraphOptimizationLevel | str | int) -> ort.GraphOptimizationLevel:
    if isinstance(level, ort.GraphOptimizationLevel):
        return level
    if isinstance(level, int) and not isinstance(level, bool):
        by_value = {int(v): v for v in _OPT_LEVELS.values()}
        if level in by_value:
            return by_value[level]
    key = str(level).lower().removeprefix("ort_").removeprefix("enable_").removesuffix("_all")
    if key in _OPT_LEVELS:
        return _OPT_LEVELS[key]
    raise PreserveError(f"unknown optimization level {level!r}: use one of {', '.join(_OPT_LEVELS)}")


def _meta(args: Sequence[ort.NodeArg]) -> tuple[TensorMeta, ...]:
    out = []
    for arg in args:
        dims = None if arg.shape is None else tuple(d if isinstance(d, (int, str)) or d is None else None
                                                    for d in arg.shape)
        out.append(TensorMeta(arg.name, _ORT_TYPES.get(arg.type, np.dtype(object)), dims, arg.type))
    return tuple(out)


def _to_ortvalue(array: np.ndarray, meta: TensorMeta) -> ort.OrtValue:
    """Wraps a numpy array for onnxruntime, passing types numpy lacks as raw bytes."""
    array = np.asarray(array)
    if meta.dtype in _RAW_TYPES and array.dtype != meta.dtype and array.dtype.itemsize == meta.dtype.itemsize \
            and array.dtype.kind in "Vu":
        # bfloat16 read back from .npz files arrives as raw bytes (|V2) or as its uint16 view.
        array = array.view(meta.dtype)
    if array.dtype in _RAW_TYPES:
        raw = np.ascontiguousarray(array).view(_UINT_OF_SIZE[array.dtype.itemsize])
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, onnx_element_type=_RAW_TYPES[array.dtype])
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _from_ortvalue(value: ort.OrtValue, meta: TensorMeta) -> np.ndarray:
    """Copies an output into a numpy array that owns its memory."""
    if meta.dtype in _RAW_TYPES:
        shape = tuple(value.shape())
        nbytes = int(np.prod(shape, dtype=np.int64)) * meta.dtype.itemsize
        raw = ctypes.string_at(value.data_ptr(), nbytes) if nbytes else b""
        return np.frombuffer(raw, dtype=meta.dtype).reshape(shape).copy()
    return np.array(value.numpy(), copy=True)


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


def _varint(f) -> int | None:
    value = shift = 0
    while shift < 64:
        byte = f.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    return None


def _file_opset_domains(path: str | os.PathLike) -> set[str] | None:
    """The domains a model file imports, read from its top-level ``opset_import`` fields (ModelProto
    field 8) while every other field, the graph included, is skipped unparsed. None when the file is
    not such a message."""
    domains = set()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            while f.tell() < size:
                key = _varint(f)
                wire = None if key is None else key & 7
                if wire == 0:
                    if _varint(f) is None:
                        return None
                elif wire in (1, 5):
                    f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
                elif wire == 2:
                    length = _varint(f)
                    if length is None or f.tell() + length > size:
                        return None
                    if key >> 3 == 8:
                        entry = onnx.OperatorSetIdProto()
                        entry.ParseFromString(f.read(length))
                        domains.add(entry.domain)
                    else:
                        f.seek(length, os.SEEK_CUR)
                else:
                    return None
    except (OSError, ValueError):  # protobuf's DecodeError is a ValueError
        return None
    return domains


def imports_com_microsoft(model: ModelLike) -> bool:
    """Whether the model imports the com.microsoft domain (True when that cannot be read: the library
    then registers everything and onnxruntime reports what is wrong with the file)."""
    if isinstance(model, onnx.ModelProto):
        return any(o.domain == "com.microsoft" for o in model.opset_import)
    domains = _file_opset_domains(model)
    return domains is None or "com.microsoft" in domains


def session_options(*, rank: int, world: int, group: str, level: ort.GraphOptimizationLevel, threads: int,
                    timeout_s: float, prefetch: tuple[str, ...], transport: str = "threads",
                    com_microsoft: bool = True) -> ort.SessionOptions:
    """Options for one rank's session with the custom-op library registered.

    ``prefetch`` is (domain, op type, then the names of the attributes of PREFETCH_KERNEL_ATTRS in that
    order; any omitted at the end keep their own names).
    The library reads the ``preserve.*`` entries while it registers, so they are set before it is loaded.
    ``com_microsoft`` False, for a model that does not import that domain (:func:`imports_com_microsoft`):
    no op of ours is registered in com.microsoft, where it would hide onnxruntime's own ops from the
    model (the FusedMatMul its optimizer inserts would not resolve).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    # Failures reach the caller as one PreserveError; onnxruntime's own log would repeat them.
    options.log_severity_level = 4
    domain, op, *names = prefetch
    if len(names) > len(PREFETCH_KERNEL_ATTRS):
        raise PreserveError(f"Prefetch has {len(PREFETCH_KERNEL_ATTRS)} attributes the runtime reads "
                            f"({', '.join(PREFETCH_KERNEL_ATTRS)}), got {len(names)} names")
    names += PREFETCH_KERNEL_ATTRS[len(names):]
    for key, value in (
        ("preserve.rank", rank),
        ("preserve.world_size", world),
        ("preserve.group", group),
        ("preserve.transport", transport),
        ("preserve.timeout_ms", max(1, round(timeout_s * 1000))),
        ("preserve.prefetch_domain", domain),
        ("preserve.prefetch_op", op),
        *((f"preserve.prefetch_attr_{attr}", name) for attr, name in zip(PREFETCH_KERNEL_ATTRS, names)),
        ("preserve.com_microsoft", int(com_microsoft)),
    ):
        options.add_session_config_entry(key, str(value))
    options.register_custom_ops_library(str(library_path()))
    return options


class RankSession:
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
        if timeout_s <= 0:
            raise PreserveError(f"timeout_s must be positive, got {timeout_s}")
        self._lib = _native()
        self.model_sources = tuple(models)  # paths or ModelProtos: the feeds read their decode layout
        self._world = len(models)
        self._timeout_s = float(timeout_s)
        self._group = f"preserve-{os.getpid()}-{next(_GROUP_COUNTER)}-{uuid.uuid4().hex[:8]}"
        level = _opt_level(opt_level)
        threads = intra_op_threads or max(1, (os.cpu_count() or 1) // self._world)

        def create(rank: int) -> ort.InferenceSession:
            model = models[rank]
            options = session_options(rank=rank, world=self._world, group=self._group, level=level,
                                      threads=threads, timeout_s=self._timeout_s, prefetch=(
                                          prefetch_domain, prefetch_op, *prefetch_attrs),
                                      com_microsoft=imports_com_microsoft(model))
            if isinstance(model, onnx.ModelProto):
                external = next((t for t in model.graph.initializer
                                 if t.data_location == onnx.TensorProto.EXTERNAL), None)
                if external is not None:
                    if data_dirs[rank] is None:
                        raise PreserveError(
                            f"rank {rank}: the model keeps '{external.name}' in an external data file, and a "
                            f"ModelProto does not know its folder: pass data_dir=..., or the model's path")
                    # onnxruntime would otherwise look for the files in the current directory.
                    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                     os.fspath(data_dirs[rank]))
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
        self._inputs = tuple(_meta(s.get_inputs()) for s in self._sessions)
        self._run_lock = threading.Lock()  # one run at a time: ranks of two runs would mix in the group
        self._workers = _RankWorkers(self._world)
        # An earlier run's rank threads that had not returned when it raised: (its condition, its flags).
        self._stragglers: tuple[threading.Condition, list[bool]] | None = None
        weakref.finalize(self, self._workers.close)
        if self._world > 1:
            weakref.finalize(self, self._lib.preserve_release_group, self._group.encode())
        self._outputs = tuple(_meta(s.get_outputs()) for s in self._sessions)

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
        """The onnxruntime sessions, in rank order."""
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

    def _rank_feeds(
        self, feeds: Mapping[str, np.ndarray], rank_feeds: Mapping[int, Mapping[str, np.ndarray]]
    ) -> list[dict[str, ort.OrtValue]]:
        for rank in rank_feeds:
            if not isinstance(rank, (int, np.integer)) or not 0 <= rank < self._world:
                raise PreserveError(f"feeds given for rank {rank}, but the world has {self._world} rank(s)")
        known = set().union(*(self.input_names(r) for r in range(self._world)))
        unknown = sorted(set(feeds) - known)
        if unknown:
            raise PreserveError(f"feed {unknown[0]!r} is not an input of any rank model")
        result = []
        for rank in range(self._world):
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
            result.append({name: _to_ortvalue(value, meta[name]) for name, value in merged.items()})
        return result

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
                    m.name: _from_ortvalue(v, m) for m, v in zip(self._outputs[rank], values, strict=True)
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
                        finished.wait(timeout=0.5 if deadline is None else max(0.01, deadline - time.monotonic()))
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
                raise PreserveError(f"rank {stuck} of an earlier run is still running (it did not stop after "
                                    f"that run failed); wait for it or create a new RankSession")
        self._stragglers = None
        self._lib.preserve_reset_group(self._group.encode())

    def close(self) -> None:
        """Releases the sessions and the rendezvous group; the object cannot run afterwards."""
        self._sessions = ()
        self._workers.close()
        if self._world > 1:
            self._lib.preserve_release_group(self._group.encode())

    def __enter__(self) -> RankSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RankSession(world_size={self._world}, group={self._group!r})"
