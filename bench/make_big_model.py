#!/usr/bin/env python
"""Shape-only tensor-parallel rank models of real LLM sizes, in seconds and without the weights.

    python bench/make_big_model.py OUT_DIR [--preset llama3-70b] [--ranks 8] [--layers N]
                                   [--dtype float16] [--vocab-parallel]
    python bench/make_big_model.py OUT_DIR --single [--preset llama3-8b] [--layers N] [--dtype float16]

Each rank r gets OUT_DIR/model_{r:02d}.onnx with the same graph as sample_models' llama-gqa
(GroupQueryAttention, SkipSimplifiedLayerNormalization, com.microsoft::AllReduce after o_proj and
down_proj). Its weight initializers are external-data references (location `model_{r:02d}.onnx.data`,
4096-aligned offsets, lengths) into a SPARSE data file made with truncate(): no weight byte is
computed or written, so disk use stays near zero while sizes, offsets and shapes are those of the
real model (Llama-3-70B at 8 ranks: about 21 GB per rank with a replicated embedding and LM head).
Reading the data gives zeros. Small int64 constants stay inline.

`--single` writes instead the single-device model the ranks would be sharded from, in the
onnxruntime-genai model builder's layout (the same decoder without collectives, full head counts:
SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, separate q/k/v MatMul,
GroupQueryAttention with rotary, gate/up MatMul, lm_head MatMul): OUT_DIR/model.onnx + a sparse
model.onnx.data. `--single --dense` fills the data file with a non-zero pattern instead (real disk
use): the input of `preserve-onnx shard` in `make bench`, since `shard` keeps a sparse input's holes
as holes without reading or writing them.

Function API: make_big_model(out_dir, preset="llama3-70b", ranks=8, layers=None, ...) -> [paths];
make_single_model(out_dir, preset="llama3-8b", layers=None, dtype="float16") -> path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

_SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
if str(_SAMPLES) not in sys.path:
    sys.path.insert(0, str(_SAMPLES))

import make_samples as ms  # noqa: E402

PRESETS: dict[str, ms.Config] = {
    "llama3-70b": ms.Config(
        hidden=8192,
        layers=80,
        heads=64,
        kv_heads=8,
        intermediate=28672,
        vocab=128256,
        max_seq=8192,
        rope_theta=500000.0,
    ),
    "llama3-8b": ms.Config(
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        intermediate=14336,
        vocab=128256,
        max_seq=8192,
        rope_theta=500000.0,
    ),
    "llama2-70b": ms.Config(
        hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=32000, max_seq=4096
    ),
    "llama2-7b": ms.Config(
        hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000, max_seq=4096
    ),
}


def _config(preset: str, layers: int | None, overrides: dict):
    """The preset's Config with ``layers`` and other field overrides applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if layers is not None:
        overrides["layers"] = layers
    return replace(PRESETS[preset], **overrides) if overrides else PRESETS[preset]


def make_big_model(
    out_dir,
    preset: str = "llama3-70b",
    ranks: int = 8,
    layers: int | None = None,
    dtype: str = "float16",
    vocab_parallel: bool = False,
    align: int = 4096,
    **overrides,
) -> list[Path]:
    """Write OUT_DIR/model_{r:02d}.onnx + sparse .data for every rank; return the model paths.

    `overrides` replace Config fields (hidden, heads, kv_heads, intermediate, vocab, max_seq, ...)."""
    cfg = _config(preset, layers, overrides)
    cfg.check(ranks, "llama")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = ms.ShapeOnlyWeights(cfg, "llama", ms.np_dtype(dtype))
    paths = []
    for r in range(ranks):
        name = f"model_{r:02d}.onnx"
        sink = ms.ExternalRefs(name + ".data", align=align)
        model, _ = ms.build_rank_model(
            cfg, src, "llama", r, ranks, True, sink=sink, vocab_parallel=vocab_parallel
        )
        meta = model.metadata_props.add()
        meta.key, meta.value = "preserve.sample.shape_only", "1"
        path = out / name
        tmp = out / (name + ".tmp")
        tmp.write_bytes(model.SerializeToString())
        sink.create_sparse_file(out / (name + ".data"))
        os.replace(tmp, path)
        paths.append(path)
    return paths


def write_dense(path: Path, size: int, block: int = 16 << 20) -> None:
    """Fill ``path`` with ``size`` bytes: one seeded pseudo-random block repeated (no zero run, no hole)."""
    import numpy as np

    pattern = np.random.default_rng(20261201).integers(1, 256, block, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for start in range(0, size, block):
            f.write(pattern[: min(block, size - start)])


def make_single_model(
    out_dir,
    preset: str = "llama3-8b",
    layers: int | None = None,
    dtype: str = "float16",
    align: int = 4096,
    dense: bool = False,
    **overrides,
) -> Path:
    """Write OUT_DIR/model.onnx + model.onnx.data (sparse; with ``dense``, every byte written, none zero):
    the unsharded decoder; return the model path."""
    cfg = _config(preset, layers, overrides)
    cfg.check(1, "llama")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sink = ms.ExternalRefs("model.onnx.data", align=align)
    model, _ = ms.build_rank_model(
        cfg, ms.ShapeOnlyWeights(cfg, "llama", ms.np_dtype(dtype)), "llama", 0, 1, False, sink=sink
    )
    meta = model.metadata_props.add()
    meta.key, meta.value = "preserve.sample.shape_only", "1"
    path = out / "model.onnx"
    tmp = out / "model.onnx.tmp"
    tmp.write_bytes(model.SerializeToString())
    if dense:
        write_dense(out / "model.onnx.data", sink.size)
    else:
        sink.create_sparse_file(out / "model.onnx.data")
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="shape-only tensor-parallel rank models with sparse data files")
    ap.add_argument("out_dir")
    ap.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="model shape (default llama3-70b; llama3-8b with --single)",
    )
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    ap.add_argument(
        "--vocab-parallel",
        action="store_true",
        help="split the LM head by vocabulary and AllGather the logits",
    )
    ap.add_argument(
        "--single",
        action="store_true",
        help="write the single-device model (OUT_DIR/model.onnx), the input of `shard`",
    )
    ap.add_argument(
        "--dense",
        action="store_true",
        help="with --single: write every byte of the data file (non-zero pattern) instead of a hole",
    )
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.single:
        paths = [make_single_model(a.out_dir, a.preset or "llama3-8b", a.layers, a.dtype, dense=a.dense)]
    else:
        paths = make_big_model(
            a.out_dir, a.preset or "llama3-70b", a.ranks, a.layers, a.dtype, a.vocab_parallel
        )
    data = [Path(str(p) + ".data") for p in paths]
    logical = sum(d.stat().st_size for d in data)
    on_disk = sum(d.stat().st_blocks * 512 for d in data)
    what = "single-device model" if a.single else f"{len(paths)} rank models"
    print(
        f"{what} in {a.out_dir} ({time.perf_counter() - t0:.1f} s): "
        f"{logical / 2**30:.1f} GiB of weights referenced, {on_disk / 2**20:.1f} MiB on disk"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
