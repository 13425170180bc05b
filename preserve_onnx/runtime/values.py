"""Tensors between numpy and onnxruntime: graph input/output metadata and value conversion, with the
types numpy lacks (bfloat16, float8) crossing as raw bytes."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

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


def tensor_meta(args: Sequence[ort.NodeArg]) -> tuple[TensorMeta, ...]:
    out = []
    for arg in args:
        dims = (
            None
            if arg.shape is None
            else tuple(d if isinstance(d, (int, str)) or d is None else None for d in arg.shape)
        )
        out.append(TensorMeta(arg.name, _ORT_TYPES.get(arg.type, np.dtype(object)), dims, arg.type))
    return tuple(out)


def to_ortvalue(array: np.ndarray, meta: TensorMeta) -> ort.OrtValue:
    """Wraps a numpy array for onnxruntime, passing types numpy lacks as raw bytes."""
    array = np.asarray(array)
    if (
        meta.dtype in _RAW_TYPES
        and array.dtype != meta.dtype
        and array.dtype.itemsize == meta.dtype.itemsize
        and array.dtype.kind in "Vu"
    ):
        # bfloat16 read back from .npz files arrives as raw bytes (|V2) or as its uint16 view.
        array = array.view(meta.dtype)
    if array.dtype in _RAW_TYPES:
        raw = np.ascontiguousarray(array).view(_UINT_OF_SIZE[array.dtype.itemsize])
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, onnx_element_type=_RAW_TYPES[array.dtype])
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def from_ortvalue(value: ort.OrtValue, meta: TensorMeta) -> np.ndarray:
    """Copies an output into a numpy array that owns its memory."""
    if meta.dtype in _RAW_TYPES:
        shape = tuple(value.shape())
        nbytes = int(np.prod(shape, dtype=np.int64)) * meta.dtype.itemsize
        raw = ctypes.string_at(value.data_ptr(), nbytes) if nbytes else b""
        return np.frombuffer(raw, dtype=meta.dtype).reshape(shape).copy()
    return np.array(value.numpy(), copy=True)
