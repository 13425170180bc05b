#!/usr/bin/env python
"""Deterministic generator of the committed sample models (and of benchmark-sized ones).

From ONE set of full weights (numpy, fixed seed) it writes, per variant V::

    V/tp{W}/model_00.onnx (+ .data) ... model_{W-1:02d}.onnx (+ .data)   tensor-parallel ranks (Olive naming)
    V/full/model.onnx (+ .data)                                          the unsharded "twin"

Sharding (Megatron style, as Olive exports it): q/k/v/gate/up (and a fused QKV) are split by
columns, o_proj/down_proj by rows and followed by ``com.microsoft::AllReduce``; norms, the embedding
and the LM head are replicated. Heads per rank = heads / world. The twin is the same builder with
world 1 and no collectives.

Variants: llama-gqa, llama-gqa-fp16, llama-int4 (MatMulNBits), llama-qdq (int8 DequantizeLinear ->
MatMul), gpt-attention (com.microsoft Attention with a fused QKV and a single ``past``),
merged-decoder (an ``If`` on ``use_cache_branch`` whose branches hold the decoder, weights captured
from the outer graph).

The same builder writes SHAPE-ONLY models (``ExternalRefs``): initializers are external-data
references into a sparse file and no weight is ever materialised (bench/make_big_model.py).

CLI: ``python sample_models/make_samples.py [--out sample_models]`` regenerates the committed set.
Everything here is deterministic: only IEEE basic arithmetic on numpy's seeded Generator output and
``math.cos``/``math.sin`` (libm, float64) are used to make values, so two runs give identical bytes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
OPSET = 21
IR_VERSION = 10
PRODUCER = "preserve-onnx sample_models/make_samples.py"
SIZE_THRESHOLD = 1024

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}
try:  # bfloat16 through ml_dtypes (optional)
    import ml_dtypes

    _NP_TO_ONNX[np.dtype(ml_dtypes.bfloat16)] = TensorProto.BFLOAT16
except ImportError:  # pragma: no cover
    ml_dtypes = None


def np_dtype(name: str) -> np.dtype:
    if name in ("float32", "fp32"):
        return np.dtype(np.float32)
    if name in ("float16", "fp16"):
        return np.dtype(np.float16)
    if name in ("bfloat16", "bf16") and ml_dtypes is not None:
        return np.dtype(ml_dtypes.bfloat16)
    raise ValueError(f"unsupported dtype {name!r}")


# ----------------------------------------------------------------------------------------------
# configuration and weights


@dataclass(frozen=True)
class Config:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 96
    vocab: int = 160
    max_seq: int = 256  # rows of the rotary cos/sin caches
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads

    def check(self, world: int, arch: str = "llama") -> None:
        if self.hidden % self.heads:
            raise ValueError("hidden must be a multiple of heads")
        if self.heads % world or self.kv_heads % world or self.intermediate % world:
            raise ValueError(f"heads, kv_heads and intermediate must split across {world} ranks")
        if arch == "llama" and self.heads % self.kv_heads:
            raise ValueError("heads must be a multiple of kv_heads")
        widths = {
            self.hidden,
            self.intermediate,
            self.heads * self.head_size,
            self.kv_heads * self.head_size,
            3 * self.hidden,
            (self.heads + 2 * self.kv_heads) * self.head_size,
        }
        if self.vocab in widths:  # onnxruntime-genai finds the LM head by its width
            raise ValueError(f"vocab {self.vocab} equals another linear width {sorted(widths)}")


class RandomWeights:
    """Full (unsharded) weights, drawn in a fixed order from one seeded Generator."""

    shape_only = False

    def __init__(self, cfg: Config, arch: str, dtype: np.dtype, seed: int):
        self.cfg, self.arch, self.dtype = cfg, arch, np.dtype(dtype)
        rng = np.random.default_rng(seed)
        H, F, V, hs = cfg.hidden, cfg.intermediate, cfg.vocab, cfg.head_size  # F: the MLP's inner width
        qw, kvw = cfg.heads * hs, cfg.kv_heads * hs
        w: dict[str, np.ndarray] = {}

        def lin(key, k, n):
            w[key] = rng.standard_normal((k, n), dtype=np.float32) * np.float32(1.0 / math.sqrt(k))

        def norm(key, n):
            w[key] = np.float32(1.0) + np.float32(0.1) * rng.standard_normal(n, dtype=np.float32)

        def bias(key, n):
            w[key] = np.float32(0.02) * rng.standard_normal(n, dtype=np.float32)

        w["embed"] = rng.standard_normal((V, H), dtype=np.float32)
        for i in range(cfg.layers):
            p = f"l{i}."
            if arch == "llama":
                norm(p + "in_norm", H)
                lin(p + "q", H, qw)
                lin(p + "k", H, kvw)
                lin(p + "v", H, kvw)
                lin(p + "o", qw, H)
                norm(p + "post_norm", H)
                lin(p + "gate", H, F)
                lin(p + "up", H, F)
                lin(p + "down", F, H)
            else:  # gpt
                norm(p + "ln1.w", H)
                bias(p + "ln1.b", H)
                lin(p + "qkv", H, 3 * H)
                bias(p + "qkv_b", 3 * H)
                lin(p + "o", H, H)
                bias(p + "o_b", H)
                norm(p + "ln2.w", H)
                bias(p + "ln2.b", H)
                lin(p + "fc1", H, F)
                bias(p + "fc1_b", F)
                lin(p + "fc2", F, H)
                bias(p + "fc2_b", H)
        if arch == "llama":
            norm("norm", H)
        else:
            norm("lnf.w", H)
            bias("lnf.b", H)
        lin("lm_head", H, V)
        # one rounding to the model dtype, before any sharding: twin and ranks share the values
        self.w = {k: v.astype(self.dtype, copy=False) for k, v in w.items()}
        self.w32 = w

    def __getitem__(self, key: str) -> np.ndarray:
        return self.w[key]

    def float32(self, key: str) -> np.ndarray:
        return self.w32[key]

    def rope(self) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        half = cfg.head_size // 2
        cos = np.empty((cfg.max_seq, half), np.float64)
        sin = np.empty((cfg.max_seq, half), np.float64)
        for j in range(half):
            inv = 1.0 / (cfg.rope_theta ** (2.0 * j / cfg.head_size))
            for p in range(cfg.max_seq):
                cos[p, j] = math.cos(p * inv)  # libm, not numpy's SIMD: bit-stable across machines
                sin[p, j] = math.sin(p * inv)
        return cos.astype(self.dtype), sin.astype(self.dtype)


class ShapeOnlyWeights:
    """Weights that are never materialised: zero-strided views with the right shape and dtype."""

    shape_only = True

    def __init__(self, cfg: Config, arch: str, dtype: np.dtype):
        if arch != "llama":
            raise ValueError("shape-only weights are implemented for the llama architecture")
        self.cfg, self.arch, self.dtype = cfg, arch, np.dtype(dtype)
        H, F, V, hs = cfg.hidden, cfg.intermediate, cfg.vocab, cfg.head_size
        qw, kvw = cfg.heads * hs, cfg.kv_heads * hs
        self.shapes = {"embed": (V, H), "norm": (H,), "lm_head": (H, V)}
        for i in range(cfg.layers):
            p = f"l{i}."
            self.shapes.update(
                {
                    p + "in_norm": (H,),
                    p + "q": (H, qw),
                    p + "k": (H, kvw),
                    p + "v": (H, kvw),
                    p + "o": (qw, H),
                    p + "post_norm": (H,),
                    p + "gate": (H, F),
                    p + "up": (H, F),
                    p + "down": (F, H),
                }
            )

    def _z(self, shape):
        return np.broadcast_to(np.zeros((), self.dtype), shape)

    def __getitem__(self, key):
        return self._z(self.shapes[key])

    def float32(self, key):
        raise TypeError("shape-only weights cannot be quantized")

    def rope(self):
        shape = (self.cfg.max_seq, self.cfg.head_size // 2)
        return self._z(shape), self._z(shape)


# ----------------------------------------------------------------------------------------------
# quantization (done on the FULL weight; shards are cut from the quantized arrays)


def quantize_nbits(w: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """Asymmetric 4-bit blockwise quantization along K, in MatMulNBits' layout.

    Returns unpacked q [N, kb, block] (uint8 0..15), scales [N, kb] and zero points [N, kb]."""
    K, N = w.shape
    if K % block:
        raise ValueError(f"K={K} is not a multiple of block_size={block}")
    kb = K // block
    wb = w.astype(np.float32).T.reshape(N, kb, block)
    lo = np.minimum(wb.min(axis=2), np.float32(0.0))
    hi = np.maximum(wb.max(axis=2), np.float32(0.0))
    scale = (hi - lo) / np.float32(15.0)
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.round(wb / scale[:, :, None]) + zp[:, :, None], 0, 15).astype(np.uint8)
    return {"q": q, "scales": scale, "zp": zp}


def pack_nbits(q: np.ndarray, scales: np.ndarray, zp: np.ndarray, dtype: np.dtype):
    """(q [N, kb, block], scales [N, kb], zp [N, kb]) -> MatMulNBits B, scales, zero_points."""
    N, kb, block = q.shape
    B = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)  # [N, kb, block/2]
    zpad = zp if kb % 2 == 0 else np.concatenate([zp, np.zeros((N, 1), np.uint8)], axis=1)
    Z = (zpad[:, 0::2] | (zpad[:, 1::2] << 4)).astype(np.uint8).reshape(-1)  # [N * ceil(kb/2)]
    return np.ascontiguousarray(B), scales.astype(dtype).reshape(-1), Z


def dequantize_nbits(q, scales, zp) -> np.ndarray:
    N, kb, block = q.shape
    w = (q.astype(np.float32) - zp[:, :, None].astype(np.float32)) * scales[:, :, None].astype(np.float32)
    return w.reshape(N, kb * block).T


def quantize_int8(w: np.ndarray, per_channel: bool) -> dict[str, np.ndarray]:
    """Symmetric int8; per output channel (axis 1) or per tensor."""
    w = w.astype(np.float32)
    amax = np.abs(w).max(axis=0) if per_channel else np.abs(w).max()
    scale = np.asarray(np.where(amax == 0, np.float32(1.0), amax / np.float32(127.0)), np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return {"q": q, "scale": scale, "zp": np.zeros(scale.shape, np.int8)}


# ----------------------------------------------------------------------------------------------
# initializer sinks


class InlineTensors:
    """Initializers carry their values (samples); saved later with external data."""

    shape_only = False

    def make(self, name: str, arr: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(np.ascontiguousarray(arr), name)


class DataFileWriter:
    """Tensors of SIZE_THRESHOLD bytes or more are written straight into `<model>.data` (no copy
    through protobuf) at `align`-byte offsets; smaller ones stay inline. Same result as
    onnx.save_model(..., save_as_external_data=True, size_threshold=1024), in a fraction of the
    time and memory for benchmark-sized models."""

    shape_only = False

    def __init__(self, path: Path, location: str, align: int = 64, threshold: int = SIZE_THRESHOLD):
        self.f = open(path, "wb")
        self.location, self.align, self.threshold, self.size = location, align, threshold, 0

    def make(self, name: str, arr: np.ndarray) -> TensorProto:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes < self.threshold:
            return numpy_helper.from_array(arr, name)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        offset = -(-self.size // self.align) * self.align
        self.f.write(b"\0" * (offset - self.size))
        self.f.write(arr.reshape(-1).view(np.uint8).data)
        self.size = offset + arr.nbytes
        t = TensorProto()
        t.name = name
        t.data_type = _NP_TO_ONNX[np.dtype(arr.dtype)]
        t.dims.extend(int(d) for d in arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def close(self) -> None:
        self.f.close()


def write_model(path: Path, build, align: int = 64):
    """`build(sink)` -> (ModelProto, extra); the model and its `<file>.data` appear atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    tmp_data, tmp_model = data.with_name(data.name + ".tmp"), path.with_name(path.name + ".tmp")
    sink = DataFileWriter(tmp_data, data.name, align=align)
    try:
        model, extra = build(sink)
    finally:
        sink.close()
    tmp_model.write_bytes(model.SerializeToString())
    if sink.size:
        os.replace(tmp_data, data)
    else:
        tmp_data.unlink()
        data.unlink(missing_ok=True)
    os.replace(tmp_model, path)
    return extra


class ExternalRefs:
    """Initializers become external-data references into a sparse file; nothing is written."""

    shape_only = True

    def __init__(self, location: str, align: int = 4096):
        self.location, self.align, self.size = location, align, 0

    def make(self, name: str, arr: np.ndarray) -> TensorProto:
        t = TensorProto()
        t.name = name
        t.data_type = _NP_TO_ONNX[np.dtype(arr.dtype)]
        t.dims.extend(int(d) for d in arr.shape)
        nbytes = int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        offset = -(-self.size // self.align) * self.align
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.size = offset + nbytes
        return t

    def create_sparse_file(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(self.size)


# ----------------------------------------------------------------------------------------------
# graph builder


class Graph:
    """Collects nodes of one graph; initializers go to a shared sink (the outer graph's)."""

    def __init__(self, sink: InlineTensors | ExternalRefs, prefix: str = "", inits=None):
        self.sink, self.prefix = sink, prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {} if inits is None else inits
        self.shard_log: list[tuple] = []

    def node(self, op, inputs, name, n_out=1, domain="", outputs=None, **attrs):
        name = self.prefix + name
        if outputs is None:
            outputs = [f"{name}/output_{j}" for j in range(n_out)]
        self.nodes.append(
            helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain or None, **attrs)
        )
        return outputs[0] if len(outputs) == 1 else outputs

    def weight(self, name: str, arr: np.ndarray) -> str:
        if name not in self.inits:
            self.inits[name] = self.sink.make(name, arr)
        return name

    def const(self, name: str, arr: np.ndarray) -> str:
        """Small constant, always inline (never external, never a prefetch target)."""
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.asarray(arr), name)
        return name

    def i64(self, values, scalar=False) -> str:
        vals = np.asarray(values, np.int64)
        tag = "0D" if scalar else "1D"
        if scalar:
            vals = vals.reshape(())
        return self.const(
            f"/model/constants/INT64/{tag}/{'_'.join(str(int(v)) for v in vals.reshape(-1))}", vals
        )


def _split(n: int, world: int, rank: int) -> slice:
    s = n // world
    return slice(rank * s, (rank + 1) * s)


class Decoder:
    """Emits one decoder (llama or gpt) for one rank into a Graph."""

    def __init__(
        self,
        g: Graph,
        src,
        rank: int,
        world: int,
        collectives: bool,
        quant: str | None,
        nbits_block: int = 32,
        vocab_parallel: bool = False,
    ):
        self.g, self.src, self.cfg = g, src, src.cfg
        self.vocab_parallel = vocab_parallel and world > 1 and collectives
        self.rank, self.world, self.collectives = rank, world, collectives
        self.quant, self.block = quant, nbits_block
        self.dtype = src.dtype
        self._qcache: dict[str, dict] = {}

    # -- sharding helpers ---------------------------------------------------------------------
    def shard(self, key: str, full: np.ndarray, split: str | None) -> np.ndarray:
        """Cut rank's shard of `full`: split None (replicated), 'col' (last axis), 'row' (axis 0)."""
        if split is None or self.world == 1:
            out = full
        elif split == "col":
            out = full[..., _split(full.shape[-1], self.world, self.rank)]
        elif split == "row":
            out = full[_split(full.shape[0], self.world, self.rank)]
        else:
            raise ValueError(split)
        if not self.src.shape_only:
            self.g.shard_log.append((key, split, self.rank, self.world, out, full))
        return out

    def allreduce(self, x: str, name: str) -> str:
        if not self.collectives:
            return x
        return self.g.node("AllReduce", [x], name, domain=MS)

    # -- linears --------------------------------------------------------------------------------
    def linear(self, x: str, key: str, mod: str, split: str | None, nodes_first: list | None = None) -> str:
        """`mod` is e.g. 'model.layers.0.attn.q_proj' (initializers) -> node '/model/layers.0/attn/q_proj'."""
        path = "/" + mod.replace("model.layers.", "model/layers.").replace(".", "/").replace(
            "layers/", "layers."
        )
        if mod == "lm_head":
            path = "/lm_head"
        if self.quant is None:
            w = self.g.weight(f"{mod}.MatMul.weight", self.shard(key, self.src[key], split))
            return self.g.node("MatMul", [x, w], f"{path}/MatMul")
        if self.quant == "int4":
            if key not in self._qcache:
                self._qcache[key] = quantize_nbits(self.src.float32(key), self.block)
            qz = self._qcache[key]
            # MatMulNBits arrays are [N, kb, ...]: columns of W are axis 0, K-blocks axis 1
            if split == "col":
                sl = _split(qz["q"].shape[0], self.world, self.rank)
                q, s, z = qz["q"][sl], qz["scales"][sl], qz["zp"][sl]
                ax = 0
            elif split == "row":
                sl = _split(qz["q"].shape[1], self.world, self.rank)
                q, s, z = qz["q"][:, sl], qz["scales"][:, sl], qz["zp"][:, sl]
                ax = 1
            else:
                q, s, z, ax = qz["q"], qz["scales"], qz["zp"], None
            if self.world == 1:
                ax = None
            for part, arr in (("q", q), ("scales", s), ("zp", z)):
                self.g.shard_log.append((f"{key}.nbits.{part}", ax, self.rank, self.world, arr, qz[part]))
            B, S, Z = pack_nbits(q, s, z, self.dtype)
            N, kb, block = q.shape
            b = self.g.weight(f"{mod}.MatMul.weight_Q4", B)
            sc = self.g.weight(f"{mod}.MatMul.weight_scales", S)
            zz = self.g.weight(f"{mod}.MatMul.weight_zero_points", Z)
            return self.g.node(
                "MatMulNBits",
                [x, b, sc, zz],
                f"{path}/MatMulNBits",
                domain=MS,
                K=kb * block,
                N=N,
                bits=4,
                block_size=block,
            )
        if self.quant == "qdq":
            per_channel = mod != "lm_head"  # lm_head per tensor, the rest per output channel
            if key not in self._qcache:
                self._qcache[key] = quantize_int8(self.src.float32(key), per_channel)
            qz = self._qcache[key]
            q = self.shard(f"{key}.int8", qz["q"], split)
            scale, zp = qz["scale"], qz["zp"]
            if per_channel and split == "col":
                scale = self.shard(f"{key}.int8.scale", scale, "col")
                zp = self.shard(f"{key}.int8.zp", zp, "col")
            wq = self.g.weight(f"{mod}.MatMul.weight_quantized", q)
            ws = self.g.const(f"{mod}.MatMul.weight_scale", scale.astype(self.dtype))
            wz = self.g.const(f"{mod}.MatMul.weight_zero_point", zp)
            attrs = {"axis": 1} if per_channel else {}
            dq = helper.make_node(
                "DequantizeLinear",
                [wq, ws, wz],
                [f"{mod}.MatMul.weight_dequantized"],
                name=self.g.prefix + f"{path}/DequantizeLinear",
                **attrs,
            )
            if nodes_first is not None:  # emitted elsewhere in the node list (e.g. graph start)
                nodes_first.append(dq)
            else:
                self.g.nodes.append(dq)
            return self.g.node("MatMul", [x, dq.output[0]], f"{path}/MatMul")
        raise ValueError(self.quant)

    # -- llama ------------------------------------------------------------------------------
    def llama(self, inputs: dict[str, str], out_names: dict[str, str]) -> None:
        g, cfg, src = self.g, self.cfg, self.src
        W = self.world
        nh, nkv = cfg.heads // W, cfg.kv_heads // W
        dq_first: list | None = [] if self.quant == "qdq" else None
        # attention-mask preprocessing, as onnxruntime-genai does it for GroupQueryAttention
        m = inputs["attention_mask"]
        a = "/model/attn_mask_reformat/attn_mask_subgraph"
        rs = g.node("ReduceSum", [m, g.i64([1])], f"{a}/ReduceSum", keepdims=0)
        sub = g.node("Sub", [rs, g.i64(1, scalar=True)], f"{a}/Sub")
        seqlens = g.node("Cast", [sub], f"{a}/Sub/Cast", to=TensorProto.INT32)
        shp = g.node("Shape", [m], f"{a}/Shape")
        tot = g.node("Gather", [shp, g.i64(1, scalar=True)], f"{a}/Gather", axis=0)
        total = g.node("Cast", [tot], f"{a}/Gather/Cast", to=TensorProto.INT32)
        cos, sin = src.rope()
        cos_n = g.weight("cos_cache", cos)
        sin_n = g.weight("sin_cache", sin)

        x = g.node(
            "Gather",
            [
                g.weight("model.embed_tokens.weight", self.shard("embed", src["embed"], None)),
                inputs["input_ids"],
            ],
            "/model/embed_tokens/Gather",
            axis=0,
        )
        residual = None
        pending = x  # what is added to the residual by the next (Skip)SimplifiedLayerNorm
        for i in range(cfg.layers):
            L, P = f"/model/layers.{i}", f"model.layers.{i}"
            ln_w = g.weight(
                f"{P}.input_layernorm.weight", self.shard(f"l{i}.in_norm", src[f"l{i}.in_norm"], None)
            )
            if residual is None:
                h = g.node(
                    "SimplifiedLayerNormalization",
                    [pending, ln_w],
                    f"{L}/input_layernorm/LayerNorm",
                    epsilon=cfg.eps,
                    axis=-1,
                    stash_type=1,
                )
                residual = pending
            else:
                outs = g.node(
                    "SkipSimplifiedLayerNormalization",
                    [pending, residual, ln_w],
                    f"{L}/input_layernorm/SkipLayerNorm",
                    domain=MS,
                    epsilon=cfg.eps,
                    outputs=[
                        f"{g.prefix}{L}/input_layernorm/output_0",
                        "",
                        "",
                        f"{g.prefix}{L}/input_layernorm/output_3",
                    ],
                )
                h, residual = outs[0], outs[3]
            q = self.linear(h, f"l{i}.q", f"{P}.attn.q_proj", "col", dq_first)
            k = self.linear(h, f"l{i}.k", f"{P}.attn.k_proj", "col", dq_first)
            v = self.linear(h, f"l{i}.v", f"{P}.attn.v_proj", "col", dq_first)
            gqa = g.node(
                "GroupQueryAttention",
                [
                    q,
                    k,
                    v,
                    inputs[f"past_key_values.{i}.key"],
                    inputs[f"past_key_values.{i}.value"],
                    seqlens,
                    total,
                    cos_n,
                    sin_n,
                ],
                f"{L}/attn/GroupQueryAttention",
                domain=MS,
                outputs=[
                    f"{g.prefix}{L}/attn/GroupQueryAttention/output_0",
                    out_names[f"present.{i}.key"],
                    out_names[f"present.{i}.value"],
                ],
                num_heads=nh,
                kv_num_heads=nkv,
                do_rotary=1,
                rotary_interleaved=0,
            )
            o = self.linear(gqa[0], f"l{i}.o", f"{P}.attn.o_proj", "row", dq_first)
            o = self.allreduce(o, f"{L}/attn/o_proj/AllReduce")
            ln2 = g.weight(
                f"{P}.post_attention_layernorm.weight",
                self.shard(f"l{i}.post_norm", src[f"l{i}.post_norm"], None),
            )
            outs = g.node(
                "SkipSimplifiedLayerNormalization",
                [o, residual, ln2],
                f"{L}/post_attention_layernorm/SkipLayerNorm",
                domain=MS,
                epsilon=cfg.eps,
                outputs=[
                    f"{g.prefix}{L}/post_attention_layernorm/output_0",
                    "",
                    "",
                    f"{g.prefix}{L}/post_attention_layernorm/output_3",
                ],
            )
            h, residual = outs[0], outs[3]
            gate = self.linear(h, f"l{i}.gate", f"{P}.mlp.gate_proj", "col", dq_first)
            up = self.linear(h, f"l{i}.up", f"{P}.mlp.up_proj", "col", dq_first)
            sg = g.node("Sigmoid", [gate], f"{L}/mlp/act_fn/Sigmoid")
            act = g.node("Mul", [gate, sg], f"{L}/mlp/act_fn/Mul")
            mul = g.node("Mul", [act, up], f"{L}/mlp/Mul")
            down = self.linear(mul, f"l{i}.down", f"{P}.mlp.down_proj", "row", dq_first)
            pending = self.allreduce(down, f"{L}/mlp/down_proj/AllReduce")
        L = f"/model/layers.{cfg.layers}"
        nw = g.weight("model.norm.weight", self.shard("norm", src["norm"], None))
        outs = g.node(
            "SkipSimplifiedLayerNormalization",
            [pending, residual, nw],
            f"{L}/final_norm_layernorm/SkipLayerNorm",
            domain=MS,
            epsilon=cfg.eps,
            outputs=[
                f"{g.prefix}{L}/final_norm_layernorm/output_0",
                "",
                "",
                f"{g.prefix}{L}/final_norm_layernorm/output_3",
            ],
        )
        if self.vocab_parallel:  # LM head split by vocabulary columns, logits gathered on every rank
            if self.quant is not None:
                raise ValueError("vocab_parallel is implemented for float weights only")
            part = self.linear(outs[0], "lm_head", "lm_head", "col")
            logits = g.node(
                "AllGather", [part], "/lm_head/AllGather", domain=MS, group_size=self.world, axis=-1
            )
        else:
            logits = self.linear(outs[0], "lm_head", "lm_head", None, dq_first)
        # the LM head writes the graph output directly
        producer = next(n for n in reversed(g.nodes) if logits in n.output)
        producer.output[0] = out_names["logits"]
        if dq_first:
            # the LM head's DequantizeLinear sits at the start of the node list: weights can reach
            # their consumer through constant-only nodes placed anywhere (docs/design.md §2); the rest stay
            # next to their MatMul, where quantization tools put them.
            head = [n for n in dq_first if n.name.endswith("/lm_head/DequantizeLinear")]
            rest = [n for n in dq_first if n not in head]
            for n in rest:  # put them right before their consumer
                idx = next(j for j, m2 in enumerate(g.nodes) if n.output[0] in m2.input)
                g.nodes.insert(idx, n)
            g.nodes[0:0] = head

    # -- gpt ------------------------------------------------------------------------------------
    def gpt(self, inputs: dict[str, str], out_names: dict[str, str]) -> None:
        g, cfg, src = self.g, self.cfg, self.src
        W, H, hs = self.world, cfg.hidden, cfg.head_size
        nh = cfg.heads // W
        mask = g.node("Cast", [inputs["attention_mask"]], "/model/attn_mask/Cast", to=TensorProto.INT32)
        x = g.node(
            "Gather",
            [
                g.weight("transformer.wte.weight", self.shard("embed", src["embed"], None)),
                inputs["input_ids"],
            ],
            "/transformer/wte/Gather",
            axis=0,
        )
        for i in range(cfg.layers):
            L, P = f"/transformer/h.{i}", f"transformer.h.{i}"
            ln = g.node(
                "LayerNormalization",
                [
                    x,
                    g.weight(f"{P}.ln_1.weight", self.shard(f"l{i}.ln1.w", src[f"l{i}.ln1.w"], None)),
                    g.weight(f"{P}.ln_1.bias", self.shard(f"l{i}.ln1.b", src[f"l{i}.ln1.b"], None)),
                ],
                f"{L}/ln_1/LayerNormalization",
                axis=-1,
                epsilon=cfg.eps,
            )
            # fused QKV [H, 3H] laid out [Q | K | V]: rank r takes its heads of each part
            qkv = src[f"l{i}.qkv"].reshape(H, 3, H)
            qkv_r = self.shard(f"l{i}.qkv", qkv, "col").reshape(H, 3 * nh * hs)
            qkv_b = self.shard(f"l{i}.qkv_b", src[f"l{i}.qkv_b"].reshape(3, H), "col").reshape(-1)
            att = g.node(
                "Attention",
                [
                    ln,
                    g.weight(f"{P}.attn.c_attn.weight", qkv_r),
                    g.weight(f"{P}.attn.c_attn.bias", qkv_b),
                    mask,
                    inputs[f"past_{i}"],
                ],
                f"{L}/attn/Attention",
                domain=MS,
                outputs=[f"{g.prefix}{L}/attn/Attention/output_0", out_names[f"present_{i}"]],
                num_heads=nh,
                unidirectional=1,
            )
            o = g.node(
                "MatMul",
                [att[0], g.weight(f"{P}.attn.c_proj.weight", self.shard(f"l{i}.o", src[f"l{i}.o"], "row"))],
                f"{L}/attn/c_proj/MatMul",
            )
            o = self.allreduce(o, f"{L}/attn/c_proj/AllReduce")
            o = g.node(
                "Add",
                [o, g.weight(f"{P}.attn.c_proj.bias", self.shard(f"l{i}.o_b", src[f"l{i}.o_b"], None))],
                f"{L}/attn/c_proj/Add",
            )
            x = g.node("Add", [x, o], f"{L}/Add")
            ln = g.node(
                "LayerNormalization",
                [
                    x,
                    g.weight(f"{P}.ln_2.weight", self.shard(f"l{i}.ln2.w", src[f"l{i}.ln2.w"], None)),
                    g.weight(f"{P}.ln_2.bias", self.shard(f"l{i}.ln2.b", src[f"l{i}.ln2.b"], None)),
                ],
                f"{L}/ln_2/LayerNormalization",
                axis=-1,
                epsilon=cfg.eps,
            )
            f1 = g.node(
                "MatMul",
                [ln, g.weight(f"{P}.mlp.c_fc.weight", self.shard(f"l{i}.fc1", src[f"l{i}.fc1"], "col"))],
                f"{L}/mlp/c_fc/MatMul",
            )
            act = g.node(
                "FastGelu",
                [f1, g.weight(f"{P}.mlp.c_fc.bias", self.shard(f"l{i}.fc1_b", src[f"l{i}.fc1_b"], "col"))],
                f"{L}/mlp/act/FastGelu",
                domain=MS,
            )
            f2 = g.node(
                "MatMul",
                [act, g.weight(f"{P}.mlp.c_proj.weight", self.shard(f"l{i}.fc2", src[f"l{i}.fc2"], "row"))],
                f"{L}/mlp/c_proj/MatMul",
            )
            f2 = self.allreduce(f2, f"{L}/mlp/c_proj/AllReduce")
            f2 = g.node(
                "Add",
                [f2, g.weight(f"{P}.mlp.c_proj.bias", self.shard(f"l{i}.fc2_b", src[f"l{i}.fc2_b"], None))],
                f"{L}/mlp/c_proj/Add",
            )
            x = g.node("Add", [x, f2], f"{L}/Add_1")
        ln = g.node(
            "LayerNormalization",
            [
                x,
                g.weight("transformer.ln_f.weight", self.shard("lnf.w", src["lnf.w"], None)),
                g.weight("transformer.ln_f.bias", self.shard("lnf.b", src["lnf.b"], None)),
            ],
            "/transformer/ln_f/LayerNormalization",
            axis=-1,
            epsilon=cfg.eps,
        )
        g.node(
            "MatMul",
            [ln, g.weight("lm_head.weight", self.shard("lm_head", src["lm_head"], None))],
            "/lm_head/MatMul",
            outputs=[out_names["logits"]],
        )


# ----------------------------------------------------------------------------------------------
# model assembly


def _vi(name: str, elem: int, dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(dims))


def io_spec(cfg: Config, arch: str, world: int, dtype: np.dtype):
    """Graph inputs and outputs (name, elem type, dims) of one rank."""
    et = _NP_TO_ONNX[np.dtype(dtype)]
    hs = cfg.head_size
    ins = [
        ("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        ("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    outs = [("logits", et, ["batch_size", "sequence_length", cfg.vocab])]
    if arch == "llama":
        kvh = cfg.kv_heads // world
        for i in range(cfg.layers):
            for kv in ("key", "value"):
                ins.append((f"past_key_values.{i}.{kv}", et, ["batch_size", kvh, "past_sequence_length", hs]))
                outs.append((f"present.{i}.{kv}", et, ["batch_size", kvh, "total_sequence_length", hs]))
    else:
        nh = cfg.heads // world
        for i in range(cfg.layers):
            ins.append((f"past_{i}", et, [2, "batch_size", nh, "past_sequence_length", hs]))
            outs.append((f"present_{i}", et, [2, "batch_size", nh, "total_sequence_length", hs]))
    return ins, outs


def build_rank_model(
    cfg: Config,
    src,
    arch: str,
    rank: int,
    world: int,
    collectives: bool,
    quant: str | None = None,
    merged: bool = False,
    sink=None,
    nbits_block: int = 32,
    vocab_parallel: bool = False,
) -> tuple[onnx.ModelProto, list]:
    """One model: rank `rank` of `world` (collectives=True) or the twin (world 1, collectives=False).

    Returns the ModelProto (initializers inline, or external references when `sink` is ExternalRefs)
    and the shard log used by verify_sharding."""
    sink = sink or InlineTensors()
    ins, outs = io_spec(cfg, arch, world, src.dtype)
    inits: dict[str, TensorProto] = {}
    shard_log: list = []
    if not merged:
        g = Graph(sink, "", inits)
        dec = Decoder(g, src, rank, world, collectives, quant, nbits_block, vocab_parallel)
        names = {n: n for n, _, _ in outs}
        (dec.llama if arch == "llama" else dec.gpt)({n: n for n, _, _ in ins}, names)
        nodes, shard_log = g.nodes, g.shard_log
        graph_inputs = [_vi(*s) for s in ins]
    else:
        branches = {}
        for br in ("then", "else"):
            g = Graph(sink, f"/{br}", inits)
            dec = Decoder(g, src, rank, world, collectives, quant, nbits_block, vocab_parallel)
            names = {n: f"/{br}/{n}" for n, _, _ in outs}
            (dec.llama if arch == "llama" else dec.gpt)({n: n for n, _, _ in ins}, names)
            # branch graphs have no initializers of their own: weights are captured from outside
            branches[br] = helper.make_graph(
                g.nodes, f"{br}_branch", [], [_vi(names[n], et, d) for n, et, d in outs]
            )
            if br == "then":
                shard_log = g.shard_log
        ifn = helper.make_node(
            "If",
            ["use_cache_branch"],
            [n for n, _, _ in outs],
            name="optimum::if",
            then_branch=branches["then"],
            else_branch=branches["else"],
        )
        nodes = [ifn]
        graph_inputs = [_vi(*s) for s in ins] + [_vi("use_cache_branch", TensorProto.BOOL, [1])]
    graph = helper.make_graph(
        nodes, "main_graph", graph_inputs, [_vi(*s) for s in outs], initializer=list(inits.values())
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
        producer_name=PRODUCER,
        producer_version="1",
    )
    model.ir_version = IR_VERSION
    meta = {
        "preserve.sample.arch": arch,
        "preserve.sample.world": str(world),
        "preserve.sample.rank": str(rank),
        "preserve.sample.quant": quant or "none",
        "preserve.sample.dtype": str(np.dtype(src.dtype)),
    }
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    return model, shard_log


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with all tensors >= 1024 bytes in `<file>.data` beside the model; atomically per file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_model = Path(tmp) / path.name
        onnx.save_model(
            model,
            str(tmp_model),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=SIZE_THRESHOLD,
            convert_attribute=False,
        )
        tmp_data = Path(tmp) / data.name
        if tmp_data.exists():
            os.replace(tmp_data, data)
        elif data.exists():
            data.unlink()
        os.replace(tmp_model, path)


def verify_sharding(log: list) -> int:
    """Assert that the rank shards reassemble the full tensors (concatenation / replication)."""
    groups: dict[str, list] = {}
    for key, split, rank, world, arr, full in log:
        groups.setdefault(key, []).append((split, rank, world, arr, full))
    for key, parts in groups.items():
        parts.sort(key=lambda p: p[1])
        split, _, world, _, full = parts[0]
        if [p[1] for p in parts] != list(range(world)):
            raise AssertionError(f"{key}: ranks {[p[1] for p in parts]} for world {world}")
        full = np.asarray(full)
        if split is None:
            for p in parts:
                if not np.array_equal(p[3], full):
                    raise AssertionError(f"{key}: replicated shard differs on rank {p[1]}")
            continue
        axis = {"col": full.ndim - 1, "row": 0}.get(split, split)
        if not np.array_equal(np.concatenate([p[3] for p in parts], axis=axis), full):
            raise AssertionError(f"{key}: shards do not reassemble the full tensor")
    return len(groups)


def build_variant(
    out_dir: Path,
    cfg: Config,
    arch: str,
    dtype: str,
    world: int,
    seed: int,
    quant: str | None = None,
    merged: bool = False,
    nbits_block: int = 32,
    align: int = 64,
    vocab_parallel: bool = False,
) -> dict:
    """Write out_dir/tp{world}/model_0r.onnx for every rank and out_dir/full/model.onnx (the twin).

    Data offsets are `align`-byte aligned. Raises AssertionError if a shard does not reassemble."""
    cfg.check(world, arch)
    if arch == "llama" and cfg.head_size % 16:
        raise ValueError("GroupQueryAttention on CPU needs head_size to be a multiple of 16")
    out_dir = Path(out_dir)
    src = RandomWeights(cfg, arch, np_dtype(dtype), seed)
    written = {"ranks": [], "full": None}
    log: list = []
    tp = out_dir / f"tp{world}"
    for r in range(world):
        p = tp / f"model_{r:02d}.onnx"
        log += write_model(
            p,
            lambda sink, r=r: build_rank_model(
                cfg,
                src,
                arch,
                r,
                world,
                True,
                quant,
                merged,
                sink=sink,
                nbits_block=nbits_block,
                vocab_parallel=vocab_parallel,
            ),
            align,
        )
        written["ranks"].append(p)
    p = out_dir / "full" / "model.onnx"
    lg_full = write_model(
        p,
        lambda sink: build_rank_model(
            cfg, src, arch, 0, 1, False, quant, merged, sink=sink, nbits_block=nbits_block
        ),
        align,
    )
    written["full"] = p
    written["checked_tensors"] = verify_sharding(log)
    # and the twin holds exactly the full tensors
    for key, _, _, _, arr, full in lg_full:
        if not np.array_equal(np.asarray(arr), np.asarray(full)):
            raise AssertionError(f"twin tensor {key} differs from the full weights")
    return written


def build_llama(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    world: int,
    dtype: str,
    out_dir,
    seed: int = 0,
    *,
    quant: str | None = None,
    merged: bool = False,
    max_seq: int = 2048,
    nbits_block: int = 32,
    align: int = 4096,
    vocab_parallel: bool = False,
) -> dict:
    """Benchmark entry point: llama-style tp ranks + twin for arbitrary sizes.

    Writes out_dir/tp{world}/model_{r:02d}.onnx (+ .data) and out_dir/full/model.onnx (+ .data).
    quant: None (float MatMul), 'int4' (MatMulNBits) or 'qdq' (int8 DequantizeLinear -> MatMul);
    merged: wrap the decoder in an If on `use_cache_branch`; vocab_parallel: split the LM head by vocabulary
    and AllGather the logits (Megatron's parallel LM head). Returns the written paths."""
    cfg = Config(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        max_seq=max_seq,
    )
    return build_variant(
        Path(out_dir), cfg, "llama", dtype, world, seed, quant, merged, nbits_block, align, vocab_parallel
    )


SAMPLE_CFG = Config()
SAMPLE_SEED = 20250114
VARIANTS = {
    # name: (arch, dtype, quant, merged)
    "llama-gqa": ("llama", "float32", None, False),
    "llama-gqa-fp16": ("llama", "float16", None, False),
    "llama-int4": ("llama", "float32", "int4", False),
    "llama-qdq": ("llama", "float32", "qdq", False),
    "gpt-attention": ("gpt", "float32", None, False),
    "merged-decoder": ("llama", "float32", None, True),
}


def build_samples(out: Path, world: int = 2, variants=None) -> dict:
    out = Path(out)
    res = {}
    for name, (arch, dtype, quant, merged) in VARIANTS.items():
        if variants and name not in variants:
            continue
        res[name] = build_variant(
            out / name,
            SAMPLE_CFG,
            arch,
            dtype,
            world,
            SAMPLE_SEED,
            quant,
            merged,
            nbits_block=16 if quant == "int4" else 32,
        )
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="output folder")
    ap.add_argument("--variant", action="append", help="only these variants (repeatable)")
    args = ap.parse_args(argv)
    res = build_samples(Path(args.out), variants=args.variant)
    for name, r in res.items():
        print(f"{name}: {len(r['ranks'])} ranks + twin, {r['checked_tensors']} sharded tensors verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
