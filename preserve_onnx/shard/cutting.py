"""Rank r's value of one initializer, from the source tensor and its :class:`Cut`.

Slices stay views of the memory-mapped source wherever the bytes are contiguous or a row-chunked copy
can produce them; only a fused tensor cut on an inner axis (q|k|v columns) is assembled in memory,
one rank's share (1/N of the tensor) at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from preserve_onnx.errors import PreserveError
from preserve_onnx.shard.tensors import Piece


@dataclass(frozen=True)
class Cut:
    """How one initializer becomes rank r's tensor.

    ``how``: ``replicate``; ``split`` (``view`` dims of the source, cut on ``axis`` per part in ``parts``,
    rank r taking the r-th block of each part, result reshaped to ``dims``); ``scale`` (values / N,
    for a bias fused into a row-parallel op); ``zero_points`` (packed 4-bit zero points ``[rows,
    ceil(blocks/2)]`` unpacked, cut on the block axis and packed again, result reshaped to ``dims``);
    ``first`` (rank 0 keeps the tensor, the others get zeros: a bias added to every rank's partial sum,
    counted once)."""

    how: str
    axis: int = 0
    parts: tuple[int, ...] = ()
    view: tuple[int, ...] = ()
    dims: tuple[int, ...] = ()


def _blocks(parts: tuple[int, ...], world: int, rank: int) -> list[tuple[int, int]]:
    """[start, end) on the cut axis of rank's block of each part."""
    out, offset = [], 0
    for part in parts:
        block = part // world
        out.append((offset + rank * block, offset + (rank + 1) * block))
        offset += part
    return out


def _take(arr: np.ndarray, axis: int, start: int, end: int) -> np.ndarray:
    index = [slice(None)] * arr.ndim
    index[axis] = slice(start, end)
    return arr[tuple(index)]


def _scaled(arr: np.ndarray, world: int, data_type: int, name: str) -> np.ndarray:
    from onnx import TensorProto

    if data_type == TensorProto.BFLOAT16:
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - ml_dtypes comes with onnx
            raise PreserveError(f"initializer '{name}': bfloat16 needs the ml_dtypes package") from None
        values = np.asarray(arr).view(ml_dtypes.bfloat16).astype(np.float32) / np.float32(world)
        return values.astype(ml_dtypes.bfloat16).view(np.uint16)
    if arr.dtype.kind != "f":
        raise PreserveError(
            f"initializer '{name}': a fused bias of type {arr.dtype} cannot be divided by --tp"
        )
    return (np.asarray(arr) / arr.dtype.type(world)).astype(arr.dtype)


def _zero_points(arr: np.ndarray, cut: Cut, world: int, rank: int) -> np.ndarray:
    rows, per_row = cut.view
    blocks = cut.parts[0]
    packed = np.asarray(arr).reshape(rows, per_row)
    nibbles = np.empty((rows, per_row * 2), np.uint8)
    nibbles[:, 0::2] = packed & 0x0F
    nibbles[:, 1::2] = packed >> 4
    ((start, end),) = _blocks((blocks,), world, rank)
    mine = nibbles[:, start:end]
    if mine.shape[1] % 2:
        mine = np.concatenate([mine, np.zeros((rows, 1), np.uint8)], axis=1)
    return (mine[:, 0::2] | (mine[:, 1::2] << 4)).astype(np.uint8).reshape(cut.dims)


def rank_value(arr: np.ndarray, cut: Cut | None, world: int, rank: int, data_type: int, name: str) -> Piece:
    """Rank ``rank``'s value of the initializer whose full value is ``arr`` (a view; not read here)."""
    if cut is None or cut.how == "replicate":
        return Piece(tuple(arr.shape), (arr,))
    if cut.how == "first":
        return Piece(
            tuple(arr.shape), (arr if rank == 0 else np.broadcast_to(np.zeros((), arr.dtype), arr.shape),)
        )
    if cut.how == "scale":
        return Piece(tuple(arr.shape), (_scaled(arr, world, data_type, name),))
    if cut.how == "zero_points":
        return Piece(cut.dims, (_zero_points(arr, cut, world, rank),))
    view = arr.reshape(cut.view)
    slices = [_take(view, cut.axis, a, b) for a, b in _blocks(cut.parts, world, rank)]
    if cut.axis == 0 or len(slices) == 1:
        # Row-major bytes of the result are the pieces one after the other (axis 0), or the one
        # strided piece copied in row chunks by the writer.
        return Piece(cut.dims, tuple(slices))
    return Piece(cut.dims, (np.concatenate(slices, axis=cut.axis),))
