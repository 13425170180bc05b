"""Weight bytes in and out, one tensor at a time: never the whole model in memory.

Reading: an external initializer is a read-only ``np.memmap`` window on its data file (only the pages a
slice touches are read); an inline one is decoded from the protobuf (inline tensors are small).
Writing: :class:`DataWriter` appends each output tensor of ``threshold`` bytes or more to the rank's
``<model>.data`` file at an aligned offset: a contiguous slice of a source file is copied file to file
by the kernel (``copy_file_range``), other slices stream through memory in row chunks (all-zero chunks
become holes of a sparse file); smaller tensors stay inline as ``raw_data``. A sparse input's holes are never
read: a tensor inside one is a zero-strided view of a zero. The layout depends only on the input, so
the same input gives the same bytes.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, numpy_helper

from preserve_onnx.errors import PreserveError
from preserve_onnx.model_io import external_info, validate_location

# Storage dtype per ONNX element type (bfloat16 is moved as raw 16-bit words).
_STORAGE = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.BFLOAT16: np.uint16,
    TensorProto.DOUBLE: np.float64,
    TensorProto.INT64: np.int64,
    TensorProto.INT32: np.int32,
    TensorProto.INT16: np.int16,
    TensorProto.INT8: np.int8,
    TensorProto.UINT8: np.uint8,
    TensorProto.UINT16: np.uint16,
    TensorProto.UINT32: np.uint32,
    TensorProto.UINT64: np.uint64,
    TensorProto.BOOL: np.bool_,
}
THRESHOLD = 1024  # bytes: smaller tensors stay inline (onnx.save_model's size_threshold; see ONNX notes)
CHUNK = 16 << 20  # bytes written per slice piece


def storage_dtype(t: TensorProto) -> np.dtype:
    if t.data_type not in _STORAGE:
        raise PreserveError(
            f"initializer '{t.name}': element type {TensorProto.DataType.Name(t.data_type)} cannot be sharded"
        )
    return np.dtype(_STORAGE[t.data_type])


def _is_hole(path: Path, offset: int, length: int) -> bool:
    """Whether bytes [offset, offset+length) of a sparse file (a range inside it) are one hole."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:
        return exc.errno == errno.ENXIO  # no data after offset at all (EINVAL: SEEK_DATA unsupported)
    finally:
        os.close(fd)


def _zeros(piece: np.ndarray) -> bool:
    """A zero-strided view of a zero scalar: an all-zero tensor that was never materialised."""
    return (
        piece.size > 0
        and not any(piece.strides)
        and not np.asarray(piece.reshape(-1)[:1]).view(np.uint8).any()
    )


class TensorReader:
    """Initializer values of a model whose external data stays on disk (memory-mapped on demand)."""

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self._maps: dict[Path, np.memmap] = {}
        self._fds: dict[Path, int] = {}

    def array(self, t: TensorProto) -> np.ndarray:
        """``t``'s values in storage dtype and its shape; a memory map for external tensors."""
        dtype = storage_dtype(t)
        shape = tuple(int(d) for d in t.dims)
        if t.data_location != TensorProto.EXTERNAL:
            if t.data_type == TensorProto.BFLOAT16 and not t.raw_data:
                return np.asarray(t.int32_data, np.uint32).astype(np.uint16).reshape(shape)
            return np.asarray(numpy_helper.to_array(t)).view(dtype).reshape(shape)
        info = external_info(t)
        path = validate_location(t, self.base)
        if path not in self._maps:
            try:
                self._maps[path] = np.memmap(path, np.uint8, mode="r")
            except (OSError, ValueError) as exc:
                raise PreserveError(f"cannot read weights from {path}: {exc}") from None
        data = self._maps[path]
        offset = int(info.get("offset", 0))
        count = int(np.prod(shape, dtype=np.int64))
        length = count * dtype.itemsize
        if "length" in info and int(info["length"]) != length or offset + length > data.size:
            raise PreserveError(
                f"initializer '{t.name}': {length} bytes at offset {offset} do not fit "
                f"its data file {path.name} ({data.size} bytes)"
            )
        if length and _is_hole(path, offset, length):  # never written: zeros, read without touching the disk
            return np.broadcast_to(np.zeros((), dtype), shape)
        return data[offset : offset + length].view(dtype).reshape(shape)

    def locate(self, piece: np.ndarray) -> tuple[int, int] | None:
        """(file descriptor, offset) of a contiguous piece that lies in a mapped data file, else None:
        such bytes are copied file to file by the kernel, never through this process."""
        if not piece.flags.c_contiguous or piece.size == 0:
            return None
        address = piece.ctypes.data
        for path, data in self._maps.items():
            start = data.ctypes.data
            if start <= address and address + piece.nbytes <= start + data.size:
                if path not in self._fds:
                    self._fds[path] = os.open(path, os.O_RDONLY)
                return self._fds[path], address - start
        return None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def release(self) -> None:
        """Drop the mapped pages read so far from this process (they stay in the page cache): the
        resident set stays near one tensor, not the whole model."""
        for data in self._maps.values():
            data._mmap.madvise(mmap.MADV_DONTNEED)


@dataclass(frozen=True)
class Piece:
    """One output tensor as a sequence of array pieces whose bytes, concatenated, are the tensor."""

    shape: tuple[int, ...]
    pieces: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def chunks(piece: np.ndarray) -> Iterator[np.ndarray]:
    """Contiguous row blocks of ``piece`` of about CHUNK bytes (a strided slice is copied per block)."""
    if piece.ndim == 0 or piece.nbytes <= CHUNK:
        yield np.ascontiguousarray(piece)
        return
    rows = max(1, CHUNK // max(1, piece[0].nbytes))
    for start in range(0, piece.shape[0], rows):
        yield np.ascontiguousarray(piece[start : start + rows])


class DataWriter:
    """Appends tensors to one rank's external-data file; small ones become inline ``raw_data``."""

    def __init__(self, path: Path, location: str) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close(), after the last tensor
        self.location = location
        self.size = 0

    def write(
        self,
        t: TensorProto,
        value: Piece,
        after_chunk: Callable[[], None] | None = None,
        locate: Callable[[np.ndarray], tuple[int, int] | None] | None = None,
    ) -> None:
        """Rewrite ``t`` (name and type kept) to hold ``value``, in the data file or inline.
        ``after_chunk`` runs after each chunk written (the reader drops the source pages it mapped);
        ``locate`` finds a piece's bytes in a source file, copied by ``copy_file_range`` then."""
        del t.dims[:]
        t.dims.extend(value.shape)
        t.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            t.ClearField(field)
        del t.external_data[:]
        if value.nbytes < THRESHOLD:
            t.data_location = TensorProto.DEFAULT
            t.raw_data = b"".join(
                np.ascontiguousarray(p).astype(p.dtype.newbyteorder("<")).tobytes() for p in value.pieces
            )
            return
        align = 4096 if value.nbytes >= 1 << 20 else 64
        offset = -(-self.size // align) * align
        self.file.seek(offset)
        for piece in value.pieces:
            if _zeros(piece):
                self.file.seek(piece.nbytes, os.SEEK_CUR)
                continue
            where = locate(piece) if locate is not None else None
            if where is not None and self._copy_range(*where, piece.nbytes):
                continue
            for block in chunks(piece):
                if block.reshape(-1).view(np.uint8).any():  # bytes: -0.0 is not a hole
                    self.file.write(block.astype(block.dtype.newbyteorder("<"), copy=False).data)
                else:  # zeros stay a hole (sparse file), as `cp` keeps them; they read back as zeros
                    self.file.seek(block.nbytes, os.SEEK_CUR)
                if after_chunk is not None:
                    after_chunk()
        self.size = offset + value.nbytes
        t.data_location = TensorProto.EXTERNAL
        for key, val in (("location", self.location), ("offset", str(offset)), ("length", str(value.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, val

    def _copy_range(self, fd: int, offset: int, length: int) -> bool:
        """Copy ``length`` bytes of ``fd`` from ``offset`` to the current position in the kernel; False
        (nothing written) where the file systems cannot, and the bytes then go through memory."""
        self.file.flush()
        dst = self.file.tell()
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(fd, self.file.fileno(), length - done, offset + done, dst + done)
                if n == 0:
                    raise OSError(errno.EIO, "source file shrank while copying")
                done += n
        except OSError as exc:
            if done or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            return False
        except AttributeError:  # pragma: no cover - Python without os.copy_file_range (not Linux)
            return False
        self.file.seek(dst + length)
        return True

    def close(self) -> None:
        self.file.truncate(self.size)  # a trailing hole still counts
        self.file.flush()
        self.file.close()
