"""Small single-device decoders in the structures ``shard`` must recognise, written to disk the way
exporters do (external data, size threshold 1024).

``decoder(folder, attention=..., qkv=..., mlp=..., bias=..., quant=...)``:

* attention ``gqa`` (onnxruntime-genai builder: GroupQueryAttention with rotary inside), ``mha``
  (onnxruntime-transformers optimized: RotaryEmbedding + MultiHeadAttention), ``plain`` (torch.onnx:
  Reshape/Transpose, rotate-half rotary from Constant caches, KV through Concat, repeat_kv by
  Expand+Reshape, MatMul/Softmax/MatMul, RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul);
* qkv ``separate``, ``split`` (one MatMul, then Split), ``packed`` (one MatMul into GQA's query input);
* mlp ``separate``, ``split`` (fused gate_up + Split), ``slice`` (fused gate_up + two Slices);
* bias: q/k/v biases as Add after the MatMul (Qwen2); quant ``int4``: MatMulNBits (block 16, zero points),
  ``int4+bias``: the same with MatMulNBits' fused bias (input 5) on every linear.
* 2026 architectures (builder 0.18 structures): ``head_size`` other than hidden / heads (Gemma), per-head
  q/k norms (``qk_norm="reshape"``: Reshape -> SimplifiedLayerNormalization -> Reshape, Qwen3 on CPU;
  ``"fused"``: GroupQueryAttention in[14]/in[15]), attention sinks (GQA in[11], gpt-oss), sliding windows
  and softcap attributes, mixture-of-experts (``moe``: MoE fp32 / QMoE 4-bit per row or per block, with
  or without zero points, router MatMul + bias + Reshape, optionally a gated shared expert, Qwen-MoE),
  and a hybrid's convolution-state layer (``state_layer``, Gated DeltaNet).

hidden 64, 4 heads / 2 KV heads of size 16, FFN 96, vocab 160, 2 layers, rotary caches of 64 positions.

Nodes, initializers, graph inputs/outputs and the model (IR version 10, opsets) go through
:class:`tests.builders.G`; this module adds the exporters' naming (``/<Op>_<n>``) and the layers.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.builders import MS, G, init, opsets

H, NH, NKV, HS, FFN, VOCAB, LAYERS, MAXPOS = 64, 4, 2, 16, 96, 160, 2, 64
_SAMPLES = Path(__file__).resolve().parents[2] / "sample_models" / "make_samples.py"


def _make_samples():
    spec = importlib.util.spec_from_file_location("make_samples_for_shard", _SAMPLES)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


class _B:
    """The decoder's layers on a :class:`G`, named by :meth:`name` (``<base>_<n>``, one count over
    nodes, initializers and values)."""

    def __init__(self, seed: int, dtype, quant: str | None) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype, self.quant = np.dtype(dtype), quant
        self.g = G("decoder")
        self.count = 0
        self.ms = _make_samples() if quant else None
        self.quant_bias = quant == "int4+bias"
        self.head_dim_name: str | None = None

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def init(self, arr: np.ndarray, base: str = "w") -> str:
        return self.g.init(self.name(base), arr)

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs):
        """A node as exporters write it: the default domain left unset (``domain`` empty)."""
        return self.g.node(op, inputs, outputs, name=name, domain=domain or None, **attrs)

    def const_node(self, arr: np.ndarray) -> str:
        """A Constant node (torch.onnx puts rotary caches and shapes there)."""
        out = self.name("const")
        self.node("Constant", [], [out], out + "/Constant", value=init(out + "_value", arr))
        return out

    def op(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs):
        base = self.name(f"/{op}")
        outs = [f"{base}/output_{j}" for j in range(n_out)]
        self.node(op, inputs, outs, base, domain, **attrs)
        return outs[0] if n_out == 1 else outs

    def i64(self, values) -> str:
        return self.init(np.asarray(values, np.int64), "shape")

    def linear(self, x: str, k: int, n: int) -> str:
        w = self.rng.standard_normal((k, n), dtype=np.float32) / np.float32(math.sqrt(k))
        if self.quant in ("int4", "int4+bias"):
            q = self.ms.quantize_nbits(w, 16)
            b, s, z = self.ms.pack_nbits(q["q"], q["scales"], q["zp"], self.dtype)
            inputs = [x, self.init(b, "q4"), self.init(s, "scales"), self.init(z, "zp")]
            if self.quant_bias:  # MatMulNBits' own bias, input 5 (g_idx, input 4, empty)
                inputs += [
                    "",
                    self.init(self.rng.standard_normal(n, dtype=np.float32).astype(self.dtype), "b"),
                ]
            return self.op("MatMulNBits", inputs, domain=MS, K=k, N=n, bits=4, block_size=16)
        return self.op("MatMul", [x, self.init(w.astype(self.dtype))])

    def vec(self, n: int, scale: float = 0.02, base: float = 0.0) -> str:
        return self.init(
            (np.float32(base) + np.float32(scale) * self.rng.standard_normal(n, dtype=np.float32)).astype(
                self.dtype
            ),
            "b",
        )


def _rope(dtype, hs: int = HS) -> tuple[np.ndarray, np.ndarray]:
    half = hs // 2
    inv = 1.0 / (10000.0 ** (np.arange(half) * 2.0 / hs))
    ang = np.arange(MAXPOS)[:, None] * inv[None, :]
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


def _rms(b: _B, x: str) -> str:
    """RMSNorm in plain operators (TorchScript)."""
    two, eps = b.const_node(np.asarray(2.0, b.dtype)), b.const_node(np.asarray(1e-5, b.dtype))
    var = b.op("ReduceMean", [b.op("Pow", [x, two]), b.i64([-1])], keepdims=1)
    return b.op("Mul", [b.vec(H, 0.1, 1.0), b.op("Div", [x, b.op("Sqrt", [b.op("Add", [var, eps])])])])


def _qkv(b: _B, h: str, qkv: str, bias: bool, kvh: int, hs: int = HS) -> tuple[str, ...]:
    widths = (NH * hs, kvh * hs, kvh * hs)
    if qkv == "separate":
        outs = [b.linear(h, H, w) for w in widths]
        return tuple(b.op("Add", [o, b.vec(w)]) if bias else o for o, w in zip(outs, widths))
    fused = b.linear(h, H, sum(widths))
    if bias:
        fused = b.op("Add", [fused, b.vec(sum(widths))])
    if qkv == "packed":
        return (fused,)
    return tuple(b.op("Split", [fused, b.i64(list(widths))], n_out=3, axis=-1))


def _mlp(b: _B, h: str, mlp: str, FFN: int = FFN) -> str:
    if mlp == "separate":
        gate, up = b.linear(h, H, FFN), b.linear(h, H, FFN)
    else:
        gu = b.linear(h, H, 2 * FFN)
        if mlp == "split":
            gate, up = b.op("Split", [gu, b.i64([FFN, FFN])], n_out=2, axis=-1)
        else:
            gate = b.op("Slice", [gu, b.i64([0]), b.i64([FFN]), b.i64([-1])])
            up = b.op("Slice", [gu, b.i64([FFN]), b.i64([2**62]), b.i64([-1])])
    act = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
    return b.linear(b.op("Mul", [act, up]), FFN, H)


def _head_norm(b: _B, t: str, hs: int, width: int) -> str:
    """The builder's per-head RMS norm: Reshape [0, -1, head_size] -> SimplifiedLayerNormalization ->
    Reshape [0, -1, width]."""
    heads = b.op("Reshape", [t, b.i64([0, -1, hs])])
    normed = b.op("SimplifiedLayerNormalization", [heads, b.vec(hs, 0.1, 1.0)], epsilon=1e-6, axis=-1)
    return b.op("Reshape", [normed, b.i64([0, -1, width])])


E, TOPK = 4, 2


def _moe(b: _B, h: str, kind: str, inter: int, shared: bool, ffn: int) -> str:
    """The builder's MoE layer: router MatMul + bias Add, Reshape to [tokens, E], then MoE (fp32:
    ``moe``) or QMoE (4-bit: ``qmoe`` per output row, ``qmoe-block`` blocks of 16, ``-zp`` with zero
    points), SwiGLU with interleaved gate/value rows (swiglu_fusion 1), fc1 and fc2 biases, top-2 of 4
    experts (``-routed``: top-k chosen in the graph, LFM2-MoE). ``shared``: a dense SwiGLU MLP beside
    the experts, gated by sigmoid(linear(h)) (Qwen-MoE), added to the experts' output (``"gatedadd"``:
    by the builder's GatedAdd). ``moe-fc3``: gate in fc1, value in fc3 (Phi-3.5-MoE)."""
    router = b.op("Add", [b.linear(h, H, E), b.vec(E, 0.1)])
    probs = b.op("Reshape", [router, b.i64([-1, E])])
    if kind.endswith("-routed"):  # routing in the graph (LFM2-MoE): sigmoid scores, top-k, scattered back
        kind = kind.removesuffix("-routed")
        scores = b.op("Sigmoid", [probs])
        values, indices = b.op("TopK", [scores, b.i64([TOPK])], n_out=2, axis=-1)
        zeros = b.op("ConstantOfShape", [b.op("Shape", [scores])])
        probs = b.op("ScatterElements", [zeros, indices, values], axis=-1)
    tokens = b.op("Reshape", [h, b.i64([-1, H])])

    def floats(*shape, scale=1.0):
        return b.init(
            (b.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(b.dtype), "expert"
        )

    attrs = {"k": TOPK, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 1}
    bias1, bias2 = floats(E, 2 * inter, scale=0.1), floats(E, H, scale=0.1)
    if kind == "moe":
        inputs = [
            floats(E, 2 * inter, H, scale=H**-0.5),
            bias1,
            floats(E, H, inter, scale=inter**-0.5),
            bias2,
        ]
        out = b.op("MoE", [tokens, probs, *inputs], domain=MS, **attrs)
    elif kind == "moe-fc3":  # Phi-3.5-MoE's layout: gate in fc1, value in fc3 (swiglu_fusion 0), biases
        inputs = [
            floats(E, inter, H, scale=H**-0.5),
            floats(E, inter, scale=0.1),
            floats(E, H, inter, scale=inter**-0.5),
            bias2,
            floats(E, inter, H, scale=H**-0.5),
            floats(E, inter, scale=0.1),
        ]
        out = b.op("MoE", [tokens, probs, *inputs], domain=MS, **dict(attrs, swiglu_fusion=0))
    else:
        block = 16 if "block" in kind else 0

        def packed(*shape):
            return b.init(b.rng.integers(0, 256, shape, dtype=np.uint8), "q4")

        def scales(rows, k, depth):
            shape = (E, rows, depth // block) if block else (E, rows)
            return b.init(
                (np.abs(b.rng.standard_normal(shape, dtype=np.float32)) * 0.02 / k + 0.002).astype(b.dtype),
                "scales",
            )

        inputs = [
            packed(E, 2 * inter, H // 2),
            scales(2 * inter, 1, H),
            bias1,
            packed(E, H, inter // 2),
            scales(H, 1, inter),
            bias2,
            "",
            "",
            "",
        ]
        if kind.endswith("-zp"):
            inputs += [
                packed(E, 2 * inter, -(-(H // block) // 2)) if block else packed(E, inter),
                packed(E, H, -(-(inter // block) // 2)) if block else packed(E, H // 2),
            ]
        extra = {"block_size": block} if block else {}
        out = b.op("QMoE", [tokens, probs, *inputs], domain=MS, expert_weight_bits=4, **attrs, **extra)
    out = b.op("Reshape", [out, b.op("Shape", [h])])
    if shared:
        gate = b.op("Sigmoid", [b.linear(h, H, 1)])
        if shared == "gatedadd":  # the builder's com.microsoft::GatedAdd(a, b, g) = a + g * b
            return b.op("GatedAdd", [out, _mlp(b, h, "separate", ffn), gate], domain=MS)
        out = b.op("Add", [out, b.op("Mul", [gate, _mlp(b, h, "separate", ffn)])])
    return out


def _state_layer(b: _B, h: str, layer: int, et: int, enclosed: bool) -> str:
    """A convolution-state layer as Gated DeltaNet writes it: state in -> CausalConvWithState -> state
    out. ``enclosed``: between its own input and output projections, added to the residual stream
    (computed whole on every rank); else the op alone on the MLP's input (refused)."""
    past, present = f"past_conv.{layer}", f"present_conv.{layer}"
    b.g.input(past, ["batch_size", H, 3], et)
    b.g.output(present, ["batch_size", H, 3], et)
    x = b.op("Transpose", [b.linear(h, H, H) if enclosed else h], perm=[0, 2, 1])
    y = b.name("/conv") + "/output_0"
    weight = b.init((b.rng.standard_normal((H, 1, 4), dtype=np.float32) * 0.5).astype(b.dtype), "conv")
    b.node(
        "CausalConvWithState",
        [x, weight, b.vec(H), past],
        [y, present],
        b.name("/CausalConvWithState"),
        MS,
        ndim=1,
        activation="silu",
    )
    y = b.op("Transpose", [y], perm=[0, 2, 1])
    return b.linear(y, H, H) if enclosed else y


def _rotate(b: _B, x: str, cos: str, sin: str) -> str:
    """x * cos + rotate_half(x) * sin on [B, heads, S, HS]."""
    x1 = b.op("Slice", [x, b.i64([0]), b.i64([HS // 2]), b.i64([-1])])
    x2 = b.op("Slice", [x, b.i64([HS // 2]), b.i64([HS]), b.i64([-1])])
    rot = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rot, sin])])


def _plain_attention(
    b: _B, parts, past_k, past_v, present_k, present_v, cos, sin, onnx_attention=False
) -> str:
    # The three shape spellings of TorchScript exports: q's shape a Concat of Shape-derived dims and
    # Constant nodes, k's a Constant node, v's an initializer.
    dims = [
        b.op(
            "Unsqueeze",
            [
                b.op("Gather", [b.op("Shape", [parts[0]]), b.init(np.asarray(a, np.int64), "axis")], axis=0),
                b.i64([0]),
            ],
        )
        for a in (0, 1)
    ]
    q_shape = b.op(
        "Concat",
        [*dims, b.const_node(np.asarray([NH], np.int64)), b.const_node(np.asarray([HS], np.int64))],
        axis=0,
    )
    shapes = (q_shape, b.const_node(np.asarray([0, 0, NKV, HS], np.int64)), b.i64([0, 0, NKV, HS]))
    if b.head_dim_name:  # every shape a Concat: nothing but --dim tells the head size
        kv_shape = b.op("Concat", [*dims, b.const_node(np.asarray([NKV, HS], np.int64))], axis=0)
        shapes = (q_shape, kv_shape, kv_shape)
    q, k, v = (
        b.op("Transpose", [b.op("Reshape", [p, shape])], perm=[0, 2, 1, 3]) for p, shape in zip(parts, shapes)
    )
    q, k = _rotate(b, q, cos, sin), _rotate(b, k, cos, sin)
    if onnx_attention:  # ONNX Attention (opset 23) on [B, heads, S, HS], its own KV-cache inputs/outputs
        ctx = b.name("/Attention") + "/output_0"
        b.node("Attention", [q, k, v, "", past_k, past_v], [ctx, present_k, present_v], b.name("/Attention"))
        return b.op("Reshape", [b.op("Transpose", [ctx], perm=[0, 2, 1, 3]), b.i64([0, 0, NH * HS])])
    b.node("Concat", [past_k, k], [present_k], b.name("/Concat"), axis=2)
    b.node("Concat", [past_v, v], [present_v], b.name("/Concat"), axis=2)

    def repeat(t, full_shape=False):  # repeat_kv: [B, kv, T, HS] -> [B, heads, T, HS]
        if full_shape:  # dynamo: [B, kv, n_rep, T, HS] with kv and n_rep constants (both 2 here)
            batch, total = (b.op("Gather", [b.op("Shape", [t]), b.i64([a])], axis=0) for a in (0, 2))
            consts = [b.const_node(np.asarray([v], np.int64)) for v in (NKV, NH // NKV, HS)]
            shape = b.op("Concat", [batch, consts[0], consts[1], total, consts[2]], axis=0)
        else:  # TorchScript: a broadcast from [1, 1, n_rep, 1, 1]
            shape = b.i64([1, 1, NH // NKV, 1, 1])
        e = b.op("Expand", [b.op("Unsqueeze", [t, b.i64([2])]), shape])
        return b.op("Reshape", [e, b.i64([0, NH, -1, HS])])

    kt = b.op("Transpose", [repeat(present_k, full_shape=True)], perm=[0, 1, 3, 2])
    scores = b.op("Mul", [b.op("MatMul", [q, kt]), b.const_node(np.asarray(1 / math.sqrt(HS), b.dtype))])
    ctx = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), repeat(present_v)])
    out_shape = b.const_node(np.asarray([0, 0, NH * HS], np.int64))
    return b.op("Reshape", [b.op("Transpose", [ctx], perm=[0, 2, 1, 3]), out_shape])


def decoder(
    folder: Path,
    *,
    attention: str = "gqa",
    qkv: str = "separate",
    mlp: str = "separate",
    bias: bool = False,
    quant: str | None = None,
    dtype=np.float32,
    seed: int = 7,
    ffn: int = FFN,
    extra_linear: bool = False,
    vocab: int = VOCAB,
    all_external: bool = False,
    head_dim_name: str | None = None,
    softcap: bool = False,
    head_size: int = HS,
    qk_norm: str | None = None,
    sinks: bool = False,
    window: int | None = None,
    moe: str | None = None,
    experts_inter: int = 32,
    shared_expert: bool | str = False,
    state_layer: str | None = None,
    opaque_query: bool = False,
) -> Path:
    """Write ``folder/model.onnx`` (+ ``model.onnx.data``) and return its path. ``all_external``: every
    initializer in the data file, shape constants too (TorchScript and the builder do that)."""
    b = _B(seed, dtype, quant)
    b.head_dim_name = head_dim_name
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    b.g.input("input_ids", ["batch_size", "sequence_length"], TensorProto.INT64)
    b.g.input("attention_mask", ["batch_size", "total_sequence_length"], TensorProto.INT64)
    b.g.output("logits", ["batch_size", "sequence_length", vocab], et)
    cos_np, sin_np = _rope(dtype, head_size)
    if attention == "gqa":
        m = "attention_mask"
        seqlens = b.op(
            "Cast",
            [
                b.op(
                    "Sub",
                    [b.op("ReduceSum", [m, b.i64([1])], keepdims=0), b.init(np.asarray(1, np.int64), "one")],
                )
            ],
            to=TensorProto.INT32,
        )
        total = b.op(
            "Cast",
            [b.op("Gather", [b.op("Shape", [m]), b.init(np.asarray(1, np.int64), "one")], axis=0)],
            to=TensorProto.INT32,
        )
        cos, sin = b.init(cos_np, "cos_cache"), b.init(sin_np, "sin_cache")
    else:
        # positions of the new tokens: past length + 0..S-1, from the mask and the ids (no position_ids input)
        s = b.op("Gather", [b.op("Shape", ["input_ids"]), b.init(np.asarray(1, np.int64), "one")], axis=0)
        t = b.op(
            "Gather", [b.op("Shape", ["attention_mask"]), b.init(np.asarray(1, np.int64), "one")], axis=0
        )
        pos = b.op("Range", [b.op("Sub", [t, s]), t, b.init(np.asarray(1, np.int64), "one")])
        if attention in ("plain", "onnx"):
            cos = b.op("Gather", [b.const_node(cos_np), pos], axis=0)
            sin = b.op("Gather", [b.const_node(sin_np), pos], axis=0)
            cos = b.op("Concat", [cos, cos], axis=-1)
            sin = b.op("Concat", [sin, sin], axis=-1)
        else:
            cos, sin = b.init(cos_np, "cos_cache"), b.init(sin_np, "sin_cache")
            position_ids = b.op(
                "Expand", [b.op("Unsqueeze", [pos, b.i64([0])]), b.op("Shape", ["input_ids"])]
            )
    x = b.op(
        "Gather",
        [b.init(b.rng.standard_normal((vocab, H), dtype=np.float32).astype(dtype), "embed"), "input_ids"],
        axis=0,
    )
    if extra_linear:  # a projection that is neither attention, MLP nor LM head: refused
        x = b.linear(x, H, H)
    kvh = NH if attention == "mha" else NKV  # MultiHeadAttention: as many KV heads as heads
    for i in range(LAYERS):
        for kind in ("key", "value"):
            head = head_dim_name or head_size
            b.g.input(f"past_key_values.{i}.{kind}", ["batch_size", kvh, "past_sequence_length", head], et)
            b.g.output(f"present.{i}.{kind}", ["batch_size", kvh, "total_sequence_length", head], et)
        past = (f"past_key_values.{i}.key", f"past_key_values.{i}.value")
        present = (f"present.{i}.key", f"present.{i}.value")
        if attention in ("plain", "onnx"):
            h = _rms(b, x)
        else:
            h = b.op("SimplifiedLayerNormalization", [x, b.vec(H, 0.1, 1.0)], epsilon=1e-5, axis=-1)
        parts = _qkv(b, h, qkv, bias, kvh, head_size)
        if attention == "gqa":
            q, k, v = parts if len(parts) == 3 else (parts[0], "", "")
            if qk_norm == "reshape":  # the builder's CPU q/k norm: [B, S*heads, head_size] and back
                q, k = (_head_norm(b, t, head_size, n * head_size) for t, n in ((q, NH), (k, NKV)))
            if opaque_query:  # q scaled on its way: its width is no longer traced back to q_proj
                q = b.op("Mul", [q, b.const_node(np.asarray(1.0, dtype))])
            extra = ["", "", ""]  # position_ids, attention_bias, head_sink (in[9..11])
            if sinks:
                extra[2] = b.vec(NH, 0.5)
            if qk_norm == "fused":  # GroupQueryAttention in[14]/in[15]
                extra += ["", "", b.vec(head_size, 0.1, 1.0), b.vec(head_size, 0.1, 1.0)]
            window_attrs = {"local_window_size": window} if window else {}
            outs = [b.name("/gqa") + "/output_0", *present]
            b.node(
                "GroupQueryAttention",
                [q, k, v, *past, seqlens, total, cos, sin, *extra],
                outs,
                b.name("/GQA"),
                MS,
                num_heads=NH,
                kv_num_heads=NKV,
                do_rotary=1,
                softcap=30.0 if softcap else 0.0,
                **window_attrs,
            )
            ctx = outs[0]
        elif attention == "mha":
            q = b.op("RotaryEmbedding", [parts[0], position_ids, cos, sin], domain=MS, num_heads=NH)
            k = b.op("RotaryEmbedding", [parts[1], position_ids, cos, sin], domain=MS, num_heads=NH)
            outs = [b.name("/mha") + "/output_0", *present]
            b.node(
                "MultiHeadAttention",
                [q, k, parts[2], "", "", "", *past],
                outs,
                b.name("/MHA"),
                MS,
                num_heads=NH,
                unidirectional=1,
            )
            ctx = outs[0]
        else:
            ctx = _plain_attention(b, parts, *past, *present, cos, sin, attention == "onnx")
        x = b.op("Add", [x, b.linear(ctx, NH * head_size, H)])
        h = (
            _rms(b, x)
            if attention in ("plain", "onnx")
            else b.op("SimplifiedLayerNormalization", [x, b.vec(H, 0.1, 1.0)], epsilon=1e-5, axis=-1)
        )
        if state_layer == "enclosed":  # a hybrid's convolution-state layer with its own projections
            x = b.op("Add", [x, _state_layer(b, h, i, et, True)])
            h = b.op("SimplifiedLayerNormalization", [x, b.vec(H, 0.1, 1.0)], epsilon=1e-5, axis=-1)
        elif state_layer:  # the convolution-state op alone on the MLP's input
            h = _state_layer(b, h, i, et, False)
        if moe:
            x = b.op("Add", [x, _moe(b, h, moe, experts_inter, shared_expert, ffn)])
        else:
            x = b.op("Add", [x, _mlp(b, h, mlp, ffn)])
    h = b.op("SimplifiedLayerNormalization", [x, b.vec(H, 0.1, 1.0)], epsilon=1e-5, axis=-1)
    logits = b.linear(h, H, vocab)
    if softcap:  # Gemma-2's logit soft-capping: tanh(logits / 30) * 30
        cap = b.const_node(np.asarray(30.0, dtype))
        logits = b.op("Mul", [b.op("Tanh", [b.op("Div", [logits, cap])]), cap])
    b.node("Identity", [logits], ["logits"], "/logits/Identity")
    model = b.g.model(ir_version=10, imports=opsets(23 if attention == "onnx" else 21, MS))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0 if all_external else 1024,
    )
    return path
