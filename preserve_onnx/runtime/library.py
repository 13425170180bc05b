"""The runtime's custom-op library: where it is, loading it once per process, the onnxruntime it needs,
and the Prefetch kernels' counters (docs/design.md §3, §7)."""

from __future__ import annotations

import contextlib
import ctypes
import pathlib
import re
import threading
from typing import NamedTuple

import onnxruntime as ort

from preserve_onnx.errors import PreserveError

_LIB_NAME = "libpreserve_ops.so"
# Prefetch's attributes that the kernel reads, in the order of ``prefetch_attrs`` (docs/design.md §3).
PREFETCH_KERNEL_ATTRS = ("max_size", "offset", "max_tokens", "min_tokens", "seq_axis", "window")
_LIB_DIR = pathlib.Path(__file__).resolve().parent / "_lib"  # setup.py and `make lib` build it there


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
            raise PreserveError(
                f"the runtime's custom-op library was not built when preserve-onnx was installed "
                f"({reason}): provide what it names (a C++ compiler such as g++; onnxruntime's C "
                f"headers: ORT_INCLUDE_DIR=<the include folder of onnxruntime's release archive or "
                f"of Debian's libonnxruntime-dev>) and reinstall: pip install --force-reinstall "
                f"--no-deps <preserve-onnx's source folder or sdist>"
            )
        raise PreserveError(
            f"the runtime's custom-op library {path} is missing: reinstall preserve-onnx from its "
            f"source folder or sdist where g++ is installed, or run `make lib` in a clone"
        )
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
        raise PreserveError(
            f"the runtime's custom-op library {lib._name} is older than this preserve-onnx: rebuild "
            f"it (`make lib` in a clone, or reinstall preserve-onnx)"
        ) from None
    api_version.restype = ctypes.c_int
    api = int(api_version())
    installed = ort.__version__
    if _version_tuple(installed)[:2] < (1, api):
        raise PreserveError(
            f"onnxruntime {installed} is older than the runtime's custom-op library needs "
            f"(onnxruntime 1.{api}, C API version {api}): upgrade it: pip install --upgrade "
            f"'onnxruntime>=1.{api}'"
        )


def native_library() -> ctypes.CDLL:
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
    lib = native_library()
    values = [ctypes.c_uint64(0) for _ in PrefetchCounters._fields]
    lib.preserve_prefetch_counters(*(ctypes.byref(v) for v in values))
    return PrefetchCounters(*(v.value for v in values))


@contextlib.contextmanager
def recording_prefetch_ranges():
    """Records the byte ranges ``(begin, end)`` of X that every Prefetch hint issued inside the block
    covers (contiguous ones merged), into the list it yields, in the order the hints were issued
    (across ranks: the order the threads ran). One recording at a time per process."""
    lib = native_library()
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
