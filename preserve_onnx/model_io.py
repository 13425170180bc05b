"""Loading and saving rank models without ever reading weight bytes, and writing nothing half-way.

* Models are parsed with their external data left on disk: initializers keep their
  ``external_data`` references (location, offset, length) and sizes come from metadata.
* External-data locations are validated on load: a location must be a relative path that stays in
  the model's folder (``/etc/passwd`` or ``../../x`` are refused, never followed).
* A model written beside its source keeps referencing the original data file; written elsewhere,
  the data files are copied (sparse-aware, to a temporary name, then renamed). Never hard-linked:
  ``onnx.load`` refuses a data file with more than one link.
* Every file is written to a temporary name in its destination folder and renamed into place, so an
  interrupted run leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from preserve_onnx.errors import PreserveError

# What `optimize --with-runtime` writes into OUT beside the rank models (runtime/bundle.py).
RUNTIME_FILES = frozenset({"libpreserve_ops.so", "run_ranks.py"})

RANK_PATTERNS = (
    # Olive: model_00.onnx, model_01.onnx, ...
    (re.compile(r"^model_(\d+)\.onnx$"), lambda m: "model_{rank}.onnx"),
    # onnxruntime llama tools: rank_0_<name>.onnx
    (re.compile(r"^rank_(\d+)_(.+)\.onnx$"), lambda m: "rank_{rank}_" + m.group(2) + ".onnx"),
)

ProgressFactory = Callable[[str, int], Callable[[int], None]]

_UMASK = os.umask(0)
os.umask(_UMASK)


def default_mode(directory: bool = False) -> int:
    """The permissions a plain ``open``/``mkdir`` would give (mkstemp/mkdtemp use 0600/0700)."""
    return (0o777 if directory else 0o666) & ~_UMASK


@dataclass(frozen=True)
class RankSet:
    """One family of rank files in a directory, e.g. model_00.onnx .. model_07.onnx (rank order)."""

    pattern: str
    files: tuple[Path, ...]


def load_model(path: Path) -> onnx.ModelProto:
    """Parse an ONNX file, leaving external data on disk; validate its external-data locations."""
    path = Path(path)
    if not path.exists():
        raise PreserveError(f"{path}: no such file")
    if path.is_dir():
        raise PreserveError(f"{path}: is a directory, expected an .onnx file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PreserveError(f"{path}: cannot read: {exc.strerror}") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise PreserveError(f"{path}: not an ONNX model (protobuf parse failed: {exc})") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise PreserveError(f"{path}: not an ONNX model (no graph or IR version)")
    checked: set[str] = set()
    for tensor in external_tensors(model):
        location = external_info(tensor).get("location", "")
        if location not in checked:  # thousands of tensors share one data file: check it once
            validate_location(tensor, path.parent)
            checked.add(location)
    return model


def external_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every initializer (main graph and subgraphs) whose data lives in an external file."""
    from preserve_onnx.graph.index import iter_graphs  # local: keeps model_io importable alone

    for _, graph in iter_graphs(model):
        for t in graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                yield t


def external_info(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def validate_location(tensor: TensorProto, base: Path) -> Path:
    """The data file of an external tensor, refusing locations that leave the model's folder."""
    location = external_info(tensor).get("location", "")
    where = f"initializer '{tensor.name}': external-data location '{location}'"
    if not location:
        raise PreserveError(f"{where} is empty")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
        raise PreserveError(f"{where} is absolute; only paths inside the model's folder are accepted")
    parts = Path(location.replace("\\", "/")).parts
    if ".." in parts:
        raise PreserveError(f"{where} escapes the model's folder; refused")
    target = base / location
    real_base = base.resolve()
    if target.exists() and real_base not in target.resolve().parents:
        raise PreserveError(f"{where} resolves outside the model's folder (symlink); refused")
    return target


def check_data_files(model: onnx.ModelProto, base: Path) -> dict[str, int]:
    """{location: bytes needed} for every data file, checking each exists and is long enough."""
    needed: dict[str, int] = {}
    for t in external_tensors(model):
        info = external_info(t)
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        needed[info["location"]] = max(needed.get(info["location"], 0), end)
    for location, end in needed.items():
        path = base / location
        if not path.is_file():
            raise PreserveError(f"external-data file {path} is missing")
        size = path.stat().st_size
        if size < end:
            raise PreserveError(f"external-data file {path} is short: {size} bytes, tensors need {end}")
    return needed


def find_rank_sets(directory: Path) -> tuple[RankSet, ...]:
    """The rank-file families of ``directory``; refuses none at all and gaps in rank numbers."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PreserveError(f"{directory}: no such directory")
    groups: dict[str, dict[int, Path]] = {}
    for entry in sorted(directory.iterdir()):
        for regex, key in RANK_PATTERNS:
            m = regex.match(entry.name)
            if m and entry.is_file():
                groups.setdefault(key(m), {})[int(m.group(1))] = entry
                break
    if not groups:
        raise PreserveError(f"{directory}: no rank models (model_00.onnx, ... or rank_0_<name>.onnx)")
    sets = []
    for pattern, ranks in sorted(groups.items()):
        missing = [r for r in range(max(ranks) + 1) if r not in ranks]
        if missing:
            names = ", ".join(p.name for p in ranks.values())
            raise PreserveError(f"{directory}: rank {missing[0]} is missing from {names}")
        sets.append(RankSet(pattern, tuple(ranks[r] for r in sorted(ranks))))
    return tuple(sets)


def sibling_rank_count(path: Path) -> int:
    """How many ranks the family of ``path`` has in its folder (1 if it is not a rank file)."""
    path = Path(path)
    for regex, key in RANK_PATTERNS:
        m = regex.match(path.name)
        if m:
            pattern = key(m)
            count = 0
            for entry in path.parent.iterdir():
                m2 = regex.match(entry.name)
                if m2 and key(m2) == pattern:
                    count += 1
            return max(count, 1)
    return 1


def resolve_ranks(path: Path) -> tuple[Path, ...]:
    """The rank models a path names, in rank order: a directory's one rank-file family; for one rank file,
    its whole family in its folder (a rank alone would run its collectives as a world of one: not the
    model); any other file alone. The one path -> rank models resolver of every command (docs/cli.md).

    Raises:
        PreserveError: Missing, no rank models, a gap in the ranks, or several families in a directory.
    """
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
        raise PreserveError(
            f"{path} holds several rank-model families ({names}); name any file of the one you mean"
        )
    return sets[0].files


def model_files(directory: Path) -> list[Path]:
    """The ``.onnx`` files of ``directory``, sorted by name."""
    return sorted(p for p in Path(directory).iterdir() if p.suffix == ".onnx" and p.is_file())


def resolve_single(path: Path, what: str = "") -> Path:
    """A single model: the file itself, or the one ``.onnx`` file of a folder (an onnxruntime-genai builder
    output). ``what`` prefixes the messages (``--twin``).

    Raises:
        PreserveError: Missing, or a folder holding no or several models.
    """
    path = Path(path)
    prefix = f"{what} " if what else ""
    if not path.exists():
        raise PreserveError(f"{prefix}{path}: no such file or directory")
    if not path.is_dir():
        return path
    found = model_files(path)
    if len(found) != 1:
        raise PreserveError(
            f"{prefix}{path}: the folder holds {len(found)} .onnx files; name the single-device model's file"
        )
    return found[0]


@contextmanager
def staged_directory(out: Path, suffix: str = ".partial") -> Iterator[Path]:
    """A hidden folder beside ``out`` to build a whole output tree in; on success it replaces ``out`` by
    renames (readers see the old tree or the new, never a mix), on failure it is removed. The one staged
    write of a directory: ``optimize``/``strip`` of rank folders and ``shard`` use it."""
    out = Path(out)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent))
        os.chmod(staging, default_mode(directory=True))
    except OSError as exc:
        raise PreserveError(f"cannot write into {out.parent}: {exc.strerror}") from None
    try:
        yield staging
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.{os.getpid()}.old"
            os.replace(out, old)
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def is_rank_file(name: str) -> bool:
    return any(regex.match(name) for regex, _ in RANK_PATTERNS)


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``dest``; renames it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def check_destination(dest: Path) -> None:
    """Fails now, before any work is done or any other file written, when ``dest`` cannot be written as
    a file: its folder does not exist, or it is a directory."""
    dest = Path(dest)
    if dest.is_dir():
        raise PreserveError(f"cannot write {dest}: it is a directory")
    if not dest.parent.is_dir():
        raise PreserveError(f"cannot write {dest}: folder {dest.parent} does not exist")


def write_bytes_atomic(dest: Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` through a temporary file and a rename (fsync'd).

    A destination that exists and is not a regular file (``/dev/null``, a FIFO) is written through:
    renaming onto it would replace the device node itself.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_file():
        try:
            with open(dest, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise PreserveError(f"cannot write {dest}: {exc.strerror}") from None
        return
    check_destination(dest)
    try:
        with atomic_path(dest) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, dest.stat().st_mode & 0o777 if dest.exists() else default_mode())
    except OSError as exc:
        raise PreserveError(f"cannot write {dest}: {exc.strerror}") from None


def copy_file_atomic(src: Path, dest: Path, progress: ProgressFactory | None = None) -> None:
    """Copy ``src`` to ``dest`` (sparse-aware: holes stay holes), via a temporary file and a rename."""
    try:
        total = src.stat().st_size
        advance = progress(dest.name, total) if progress else None
        with atomic_path(dest) as tmp:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                _copy_sparse(fin, fout, total, advance)
                fout.flush()
                os.fsync(fout.fileno())
            os.chmod(tmp, src.stat().st_mode & 0o777)
    except OSError as exc:
        raise PreserveError(f"cannot copy {src} to {dest}: {exc.strerror}") from None


def _copy_sparse(fin, fout, total: int, advance: Callable[[int], None] | None) -> None:
    """Copy only the data extents of ``fin`` (SEEK_DATA/SEEK_HOLE); holes stay holes in ``fout``."""
    ifd, ofd = fin.fileno(), fout.fileno()
    pos = 0
    while pos < total:
        try:
            start = os.lseek(ifd, pos, os.SEEK_DATA)
            end = min(os.lseek(ifd, start, os.SEEK_HOLE), total)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from pos to the end
                break
            start, end = pos, total  # SEEK_DATA unsupported here: plain copy
        if advance and start > pos:
            advance(start - pos)
        off = start
        while off < end:
            buf = os.pread(ifd, min(8 << 20, end - off), off)
            if not buf:
                raise OSError(errno.EIO, "source file shrank while copying")
            os.pwrite(ofd, buf, off)
            off += len(buf)
            if advance:
                advance(len(buf))
        pos = end
    if advance and total > pos:
        advance(total - pos)
    os.ftruncate(ofd, total)


def save_model(
    model: onnx.ModelProto,
    dest: Path,
    source_dir: Path,
    *,
    copy_data: bool | None = None,
    progress: ProgressFactory | None = None,
) -> None:
    """Write ``model`` to ``dest`` atomically; copy its data files unless written beside the source."""
    dest = Path(dest)
    source_dir = Path(source_dir)
    if copy_data is None:
        copy_data = dest.parent.resolve() != source_dir.resolve()
    # Checked even when the data stays where it is or the caller copies it: a model whose data file is
    # missing or short would be written fine and fail only when someone runs it.
    locations = check_data_files(model, source_dir)
    if copy_data:
        for location in locations:
            target = dest.parent / location
            target.parent.mkdir(parents=True, exist_ok=True)
            src = source_dir / location
            if target.exists() and os.path.samefile(src, target):
                continue
            copy_file_atomic(src, target, progress)
    write_bytes_atomic(dest, model.SerializeToString())


def copy_tree_entry(src: Path, dest: Path, progress: ProgressFactory | None = None) -> None:
    """Copy a file (atomically, sparse-aware) or a folder into place."""
    if src.is_dir():
        try:
            shutil.copytree(src, dest, symlinks=True)
        except OSError as exc:
            raise PreserveError(f"cannot copy {src} to {dest}: {exc}") from None
    else:
        copy_file_atomic(src, dest, progress)
