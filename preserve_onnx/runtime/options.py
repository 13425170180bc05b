"""Session options for one rank: optimization levels, the custom-op library's configuration entries,
and which domains a model file imports (read without parsing its graph)."""

from __future__ import annotations

import os
from typing import Union

import onnx
import onnxruntime as ort

from preserve_onnx.errors import PreserveError
from preserve_onnx.runtime.library import PREFETCH_KERNEL_ATTRS, library_path

ModelLike = Union[str, os.PathLike, onnx.ModelProto]

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):
    _OPT_LEVELS["layout"] = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT


def optimization_level(level: ort.GraphOptimizationLevel | str | int) -> ort.GraphOptimizationLevel:
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


def session_options(
    *,
    rank: int,
    world: int,
    group: str,
    level: ort.GraphOptimizationLevel,
    threads: int,
    timeout_s: float,
    prefetch: tuple[str, ...],
    transport: str = "threads",
    com_microsoft: bool = True,
) -> ort.SessionOptions:
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
        raise PreserveError(
            f"Prefetch has {len(PREFETCH_KERNEL_ATTRS)} attributes the runtime reads "
            f"({', '.join(PREFETCH_KERNEL_ATTRS)}), got {len(names)} names"
        )
    names += PREFETCH_KERNEL_ATTRS[len(names) :]
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
