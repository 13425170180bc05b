"""Inputs for a decode step: generated from a seed, or read from an ``.npz`` file; outputs to ``.npz``.

Invariant: feeds are a pure function of the models' input metadata and the arguments (batch, context,
seed, vocab): the same call gives the same bytes, so an original and an optimized model can be run on
identical inputs. Each input is drawn from its own generator (seeded by the seed, its name and, for
per-rank inputs, the rank), so adding an input never changes the values of the others.

File convention (``--inputs`` / ``--save``): key ``NAME`` feeds graph input NAME on every rank, key
``rank{r}/NAME`` feeds rank r only. Types numpy cannot name (bfloat16, float8) are recorded under the
extra key ``__dtypes__`` so that they survive the round trip.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import zipfile
import zlib
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np
import onnxruntime as ort

from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.dims import DecodeLayout, bind_lenient
from preserve_onnx.model_io import write_bytes_atomic
from preserve_onnx.runtime.session import Ranks
from preserve_onnx.runtime.values import TensorMeta, tensor_meta

SharedFeeds = dict[str, np.ndarray]
PerRankFeeds = dict[int, dict[str, np.ndarray]]

DEFAULT_VOCAB = 100
DEFAULT_CONTEXT = 16
_RANK_KEY = re.compile(r"^rank(\d+)/(.+)$")
_DTYPES_KEY = "__dtypes__"
_NAMED_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


def layout_of(source: object) -> DecodeLayout:
    """The decode layout (docs/design.md §2: KV-cache inputs, present -> past) of the models behind
    ``source`` (a RankSession or MpiRankSession: :attr:`Ranks.decode_layout`); an empty layout for bare
    metadata."""
    return source.decode_layout if isinstance(source, Ranks) else DecodeLayout()


def _input_meta(source: object) -> list[tuple[TensorMeta, ...]]:
    """Per-rank input metadata from a RankSession, InferenceSession(s) or TensorMeta sequences."""
    if isinstance(source, Ranks):
        return list(source.input_meta)
    if isinstance(source, ort.InferenceSession):
        return [tensor_meta(source.get_inputs())]
    if isinstance(source, Sequence) and source:
        if all(isinstance(m, TensorMeta) for m in source):
            return [tuple(source)]
        if all(isinstance(s, ort.InferenceSession) for s in source):
            return [tensor_meta(s.get_inputs()) for s in source]
        if all(isinstance(r, Sequence) and all(isinstance(m, TensorMeta) for m in r) for r in source):
            return [tuple(r) for r in source]
    raise PreserveError(
        "generate_feeds needs a RankSession, InferenceSession(s) or per-rank TensorMeta lists"
    )


def _discover_vocab(source: object) -> int:
    """The smallest static last dim of any rank's ``logits`` output, else DEFAULT_VOCAB.

    The smallest one is safe: a vocab-parallel rank's logits cover a shard of the vocabulary.
    """
    if not isinstance(source, Ranks):
        return DEFAULT_VOCAB
    sizes = [
        m.shape[-1]
        for outputs in source.output_meta
        for m in outputs
        if m.name == "logits" and m.shape and isinstance(m.shape[-1], int) and m.shape[-1] > 0
    ]
    return min(sizes) if sizes else DEFAULT_VOCAB


def _shape(
    meta: TensorMeta, layout: DecodeLayout, values: Mapping[str, int], batch: int, context: int
) -> tuple[int, ...]:
    """``meta``'s shape at the step: its KV-cache axes (an unnamed dim there too) by the layout's roles."""
    axes = layout.kv_axes.get(meta.name)
    by_axis = {axis: size for axis, size in zip(axes, (batch, context)) if axis is not None} if axes else None
    return bind_lenient(meta.shape or (), values, batch, by_axis)


def _rng(seed: int, name: str, rank: int | None) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), 0 if rank is None else rank + 1])


def _generate(
    meta: TensorMeta,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    context: int,
    vocab: int,
    kv_cache: bool,
):
    dtype = meta.dtype
    name = meta.name
    if dtype == np.dtype(object):
        raise PreserveError(f"cannot generate input {name!r} of type {meta.onnx_type}: give it in --inputs")
    if dtype == np.bool_:
        return np.ones(shape, dtype=np.bool_)  # e.g. use_cache_branch
    if np.issubdtype(dtype, np.integer):
        if name == "input_ids":
            return rng.integers(0, vocab, size=shape).astype(dtype)
        if name == "attention_mask":
            return np.ones(shape, dtype=dtype)
        if name == "position_ids":
            steps = shape[-1] if shape else 1
            return np.broadcast_to(np.arange(context, context + steps), shape).astype(dtype)
        if name == "seqlens_k":  # GroupQueryAttention: total length - 1 per sequence
            return np.full(shape, context, dtype=dtype)
        if name == "total_sequence_length":
            return np.full(shape, context + 1, dtype=dtype)
        return np.zeros(shape, dtype=dtype)
    scale = 0.1 if kv_cache else 1.0
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)


def generate_feeds(
    source: object,
    *,
    batch: int = 1,
    context: int = DEFAULT_CONTEXT,
    seed: int = 0,
    vocab: int | None = None,
    dims: Mapping[str, int] | None = None,
    layout: DecodeLayout | None = None,
) -> tuple[SharedFeeds, PerRankFeeds]:
    """Generates the inputs of one decode step with a past of ``context`` tokens.

    Symbolic dims are bound by ``dims`` (``--dim``), the dims the graph fixes and the roles its structure
    shows (:class:`~preserve_onnx.graph.dims.DecodeLayout`: a KV-cache input's batch axis -> batch, its
    sequence axis -> context, a present output's sequence axis and the attention mask's -> context + 1,
    ``X + k`` evaluated), then axis 0 -> batch and anything else -> 1. Values: ``input_ids``
    uniform in [0, vocab), ``attention_mask`` ones, ``position_ids`` = context, bool inputs True,
    other integer inputs zeros (``seqlens_k`` = context, ``total_sequence_length`` = context + 1),
    KV-cache inputs small normal values (0.1 sigma) different on every rank, other float inputs
    standard normal.

    Args:
        source: A RankSession, an InferenceSession (or a list, one per rank), or per-rank sequences
            of TensorMeta.
        batch: Batch size.
        context: Past sequence length.
        seed: Seed of every generator.
        vocab: Upper bound (exclusive) of generated token ids; default: the smallest static vocab of
            the ranks' ``logits`` outputs, else 100.
        dims: Symbolic dim name -> value, bound before anything else (``--dim``).
        layout: The models' decode layout; default: the layout of ``source``'s first model
            (:func:`layout_of`).

    Returns:
        ``(shared, per_rank)``: inputs fed to every rank, and per rank those fed only to it (the
        KV-cache, and any input whose dtype or shape differs between ranks).

    Raises:
        PreserveError: An input cannot be generated (string tensors) or the arguments are invalid.
    """
    if batch < 1 or context < 0:
        raise PreserveError(f"batch must be >= 1 and context >= 0, got batch={batch} context={context}")
    ranks = _input_meta(source)
    vocab = vocab if vocab is not None else _discover_vocab(source)
    if vocab < 1:
        raise PreserveError(f"vocab must be >= 1, got {vocab}")
    layout = layout if layout is not None else layout_of(source)
    values = layout.values(batch=batch, context=context, dims=dims)
    signatures: dict[str, set[tuple]] = {}
    for metas in ranks:
        for m in metas:
            signatures.setdefault(m.name, set()).add((m.dtype, _shape(m, layout, values, batch, context)))
    shared: SharedFeeds = {}
    per_rank: PerRankFeeds = {r: {} for r in range(len(ranks))}
    for rank, metas in enumerate(ranks):
        for m in metas:
            shape = _shape(m, layout, values, batch, context)
            kv_cache = m.name in layout.kv_axes
            if kv_cache or len(signatures[m.name]) > 1:
                per_rank[rank][m.name] = _generate(
                    m, shape, _rng(seed, m.name, rank), context, vocab, kv_cache
                )
            elif m.name not in shared:
                shared[m.name] = _generate(m, shape, _rng(seed, m.name, None), context, vocab, kv_cache)
    return shared, per_rank


def load_feeds(path: str | os.PathLike) -> tuple[SharedFeeds, PerRankFeeds]:
    """Reads feeds from an ``.npz`` file: ``NAME`` for every rank, ``rank{r}/NAME`` for rank r.

    Args:
        path: The ``.npz`` file.

    Returns:
        ``(shared, per_rank)``; ``per_rank`` has an entry for each rank named in the file.

    Raises:
        PreserveError: The file is missing or not a readable ``.npz`` archive.
    """
    shared: SharedFeeds = {}
    per_rank: PerRankFeeds = {}
    not_npz = f"inputs file {path} is not an .npz archive of named arrays (write one with numpy.savez)"
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise PreserveError(f"{not_npz}: it holds one unnamed array (.npy)")
        with loaded as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError as exc:
        raise PreserveError(f"inputs file {path} does not exist") from exc
    except ValueError as exc:
        if "pickled" in str(exc):  # numpy's guess for a file that is neither .npy nor .npz
            raise PreserveError(not_npz) from exc
        raise PreserveError(f"cannot read inputs file {path}: {str(exc).splitlines()[0]}") from exc
    except (OSError, zipfile.BadZipFile) as exc:
        raise PreserveError(f"cannot read inputs file {path}: {str(exc).splitlines()[0]}") from exc
    dtypes = {}
    if _DTYPES_KEY in arrays:
        try:
            dtypes = json.loads(str(arrays.pop(_DTYPES_KEY)))
        except ValueError as exc:
            raise PreserveError(f"inputs file {path}: {_DTYPES_KEY} is not valid JSON") from exc
    for key, value in arrays.items():
        if key in dtypes and dtypes[key] in _NAMED_DTYPES:
            value = value.view(_NAMED_DTYPES[dtypes[key]])
        match = _RANK_KEY.match(key)
        if match:
            per_rank.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            shared[key] = value
    return shared, per_rank


def save_outputs(
    path: str | os.PathLike, outputs_per_rank: Sequence[Mapping[str, np.ndarray]]
) -> pathlib.Path:
    """Writes every rank's outputs to an ``.npz`` file as ``rank{r}/NAME``, atomically.

    Args:
        path: Destination file (written as given; no ``.npz`` suffix is added).
        outputs_per_rank: One mapping of output name to array per rank, in rank order.

    Returns:
        The path written.

    Raises:
        PreserveError: The file cannot be written.
    """
    path = pathlib.Path(path)
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for rank, outputs in enumerate(outputs_per_rank):
        for name, value in outputs.items():
            key = f"rank{rank}/{name}"
            value = np.asarray(value)
            for dtype_name, dtype in _NAMED_DTYPES.items():
                if value.dtype == dtype:
                    dtypes[key] = dtype_name
                    value = value.view(np.uint8 if dtype.itemsize == 1 else np.uint16)
            arrays[key] = value
    if dtypes:
        arrays[_DTYPES_KEY] = np.array(json.dumps(dtypes, sort_keys=True))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())
    return path
