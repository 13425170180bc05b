"""Graphs that reproduce what real exporters write (see the README's "Real exporter output"), built
small enough to read, with tests/builders.py. Each function names the exporter structure it mirrors."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from tests.builders import MS, G

HIDDEN, HEADS, HEAD = 32, 2, 16  # per rank
INNER, VOCAB, POSITIONS = 48, 80, 64


def _weight(g: G, name: str, shape, seed: int) -> str:
    return g.init(name, (np.random.default_rng(seed).standard_normal(shape) * 0.2).astype(np.float32))


def _rms_norm(g: G, x: str, weight: str, prefix: str) -> str:
    """RMSNorm as TorchScript exports it: Pow / ReduceMean / Add / Sqrt / Div / Mul."""
    two = g.constant(f"{prefix}/Constant_pow", np.float32(2.0))
    g.node("Pow", [x, two], [f"{prefix}/Pow_out"], name=f"{prefix}/Pow")
    g.node(
        "ReduceMean",
        [f"{prefix}/Pow_out"],
        [f"{prefix}/Mean_out"],
        name=f"{prefix}/ReduceMean",
        axes=[-1],
        keepdims=1,
    )
    eps = g.constant(f"{prefix}/Constant_eps", np.float32(1e-5))
    g.node("Add", [f"{prefix}/Mean_out", eps], [f"{prefix}/Add_out"], name=f"{prefix}/Add")
    g.node("Sqrt", [f"{prefix}/Add_out"], [f"{prefix}/Sqrt_out"], name=f"{prefix}/Sqrt")
    g.node("Div", [x, f"{prefix}/Sqrt_out"], [f"{prefix}/Div_out"], name=f"{prefix}/Div")
    g.node("Mul", [f"{prefix}/Div_out", weight], [f"{prefix}/Mul_out"], name=f"{prefix}/Mul")
    return f"{prefix}/Mul_out"


def _split_heads(g: G, x: str, prefix: str) -> str:
    """[B, S, heads*head] -> [B, heads, S, head] with the shape built from Shape/Gather/Concat at run time."""
    g.node("Shape", [x], [f"{prefix}/Shape_out"], name=f"{prefix}/Shape")
    for axis in (0, 1):
        idx = g.constant(f"{prefix}/Constant_{axis}", np.int64(axis))
        g.node(
            "Gather",
            [f"{prefix}/Shape_out", idx],
            [f"{prefix}/Gather_{axis}_out"],
            name=f"{prefix}/Gather_{axis}",
            axis=0,
        )
        g.node(
            "Unsqueeze",
            [f"{prefix}/Gather_{axis}_out", g.constant(f"{prefix}/Constant_ax{axis}", np.array([0]))],
            [f"{prefix}/Unsqueeze_{axis}_out"],
            name=f"{prefix}/Unsqueeze_{axis}",
        )
    heads = g.constant(f"{prefix}/Constant_heads", np.array([HEADS], dtype=np.int64))
    head = g.constant(f"{prefix}/Constant_head", np.array([HEAD], dtype=np.int64))
    g.node(
        "Concat",
        [f"{prefix}/Unsqueeze_0_out", f"{prefix}/Unsqueeze_1_out", heads, head],
        [f"{prefix}/Concat_out"],
        name=f"{prefix}/Concat",
        axis=0,
    )
    g.node("Reshape", [x, f"{prefix}/Concat_out"], [f"{prefix}/Reshape_out"], name=f"{prefix}/Reshape")
    g.node(
        "Transpose",
        [f"{prefix}/Reshape_out"],
        [f"{prefix}/Transpose_out"],
        name=f"{prefix}/Transpose",
        perm=[0, 2, 1, 3],
    )
    return f"{prefix}/Transpose_out"


def torchscript_decoder(
    layers: int = 2,
    *,
    kv_dims=("batch_size", HEADS, "past_sequence_length", HEAD),
    allreduce_value_info: bool = True,
) -> onnx.ModelProto:
    """One rank of a TorchScript export of a Llama decoder, as Olive's tensor-parallel pass wrote it.

    Mirrors: weights named ``onnx::MatMul_<n>``; rotary caches as ``Constant`` nodes shared by every
    layer; ``Constant``/``Shape``/``Gather``/``Concat`` chains inside each window; RMSNorm as
    Pow/ReduceMean/Add/Sqrt/Div/Mul; attention as MatMul/Softmax/MatMul with the KV-cache through
    ``Concat`` into ``present.*`` outputs that the attention MatMuls also read; the AllReduce outputs'
    value_info with generated dim names unrelated to the input's ``batch_size``.
    """
    g = G("torch_jit")
    g.input("input_ids", ["batch_size", "sequence_length"], TensorProto.INT64)
    g.input("position_ids", ["batch_size", "sequence_length"], TensorProto.INT64)
    for i in range(layers):
        for kind in ("key", "value"):
            g.input(f"past_key_values.{i}.{kind}", list(kv_dims))
    counter = iter(range(560, 10_000))
    embed = _weight(g, f"onnx::Gather_{next(counter)}", (VOCAB, HIDDEN), 1)
    g.node(
        "Gather",
        [embed, "input_ids"],
        ["/model/embed_tokens/Gather_output_0"],
        name="/model/embed_tokens/Gather",
    )
    angles = np.outer(np.arange(POSITIONS), 1.0 / 10000 ** (np.arange(HEAD) / HEAD)).astype(np.float32)
    cos = g.constant("/model/rotary_emb/Constant_output_0", np.cos(angles))
    sin = g.constant("/model/rotary_emb/Constant_1_output_0", np.sin(angles))
    hidden = "/model/embed_tokens/Gather_output_0"
    for i in range(layers):
        p = f"/model/layers.{i}"
        norm_w = _weight(g, f"onnx::Mul_{next(counter)}", (HIDDEN,), 10 + i)
        x = _rms_norm(g, hidden, norm_w, f"{p}/input_layernorm")
        heads = {}
        for proj in ("q", "k", "v"):
            w = _weight(g, f"onnx::MatMul_{next(counter)}", (HIDDEN, HEADS * HEAD), 20 + 3 * i + len(heads))
            g.node(
                "MatMul",
                [x, w],
                [f"{p}/self_attn/{proj}_proj/MatMul_output_0"],
                name=f"{p}/self_attn/{proj}_proj/MatMul",
            )
            heads[proj] = _split_heads(
                g, f"{p}/self_attn/{proj}_proj/MatMul_output_0", f"{p}/self_attn/{proj}"
            )
        # Rotary: the shared caches gathered at position_ids, [B, 1, S, head].
        for name, cache in (("cos", cos), ("sin", sin)):
            g.node(
                "Gather",
                [cache, "position_ids"],
                [f"{p}/self_attn/{name}_out"],
                name=f"{p}/self_attn/Gather_{name}",
                axis=0,
            )
            g.node(
                "Unsqueeze",
                [f"{p}/self_attn/{name}_out", g.constant(f"{p}/self_attn/Constant_{name}", np.array([1]))],
                [f"{p}/self_attn/{name}_4d"],
                name=f"{p}/self_attn/Unsqueeze_{name}",
            )
        for proj in ("q", "k"):
            g.node(
                "Mul",
                [heads[proj], f"{p}/self_attn/cos_4d"],
                [f"{p}/self_attn/{proj}_cos"],
                name=f"{p}/self_attn/Mul_{proj}c",
            )
            g.node(
                "Mul",
                [heads[proj], f"{p}/self_attn/sin_4d"],
                [f"{p}/self_attn/{proj}_sin"],
                name=f"{p}/self_attn/Mul_{proj}s",
            )
            g.node(
                "Add",
                [f"{p}/self_attn/{proj}_cos", f"{p}/self_attn/{proj}_sin"],
                [f"{p}/self_attn/{proj}_rot"],
                name=f"{p}/self_attn/Add_{proj}",
            )
        g.node(
            "Concat",
            [f"past_key_values.{i}.key", f"{p}/self_attn/k_rot"],
            [f"present.{i}.key"],
            name=f"{p}/self_attn/Concat_k",
            axis=2,
        )
        g.node(
            "Concat",
            [f"past_key_values.{i}.value", heads["v"]],
            [f"present.{i}.value"],
            name=f"{p}/self_attn/Concat_v",
            axis=2,
        )
        g.node(
            "Transpose",
            [f"present.{i}.key"],
            [f"{p}/self_attn/kT"],
            name=f"{p}/self_attn/Transpose_k",
            perm=[0, 1, 3, 2],
        )
        g.node(
            "MatMul",
            [f"{p}/self_attn/q_rot", f"{p}/self_attn/kT"],
            [f"{p}/self_attn/scores"],
            name=f"{p}/self_attn/MatMul",
        )
        scale = g.constant(f"{p}/self_attn/Constant_scale", np.float32(np.sqrt(HEAD)))
        g.node("Div", [f"{p}/self_attn/scores", scale], [f"{p}/self_attn/scaled"], name=f"{p}/self_attn/Div")
        g.node(
            "Softmax",
            [f"{p}/self_attn/scaled"],
            [f"{p}/self_attn/probs"],
            name=f"{p}/self_attn/Softmax",
            axis=-1,
        )
        g.node(
            "MatMul",
            [f"{p}/self_attn/probs", f"present.{i}.value"],
            [f"{p}/self_attn/ctx"],
            name=f"{p}/self_attn/MatMul_1",
        )
        g.node(
            "Transpose",
            [f"{p}/self_attn/ctx"],
            [f"{p}/self_attn/ctx_t"],
            name=f"{p}/self_attn/Transpose_ctx",
            perm=[0, 2, 1, 3],
        )
        g.node(
            "Shape", [f"{p}/self_attn/ctx_t"], [f"{p}/self_attn/ctx_shape"], name=f"{p}/self_attn/Shape_ctx"
        )
        g.node(
            "Slice",
            [
                f"{p}/self_attn/ctx_shape",
                g.constant(f"{p}/self_attn/Constant_s0", np.array([0])),
                g.constant(f"{p}/self_attn/Constant_s1", np.array([2])),
            ],
            [f"{p}/self_attn/bs"],
            name=f"{p}/self_attn/Slice",
        )
        g.node(
            "Concat",
            [f"{p}/self_attn/bs", g.constant(f"{p}/self_attn/Constant_w", np.array([HEADS * HEAD]))],
            [f"{p}/self_attn/ctx_new_shape"],
            name=f"{p}/self_attn/Concat_shape",
            axis=0,
        )
        g.node(
            "Reshape",
            [f"{p}/self_attn/ctx_t", f"{p}/self_attn/ctx_new_shape"],
            [f"{p}/self_attn/ctx_2d"],
            name=f"{p}/self_attn/Reshape_ctx",
        )
        o = _weight(g, f"onnx::MatMul_{next(counter)}", (HEADS * HEAD, HIDDEN), 40 + i)
        g.node(
            "MatMul",
            [f"{p}/self_attn/ctx_2d", o],
            [f"{p}/self_attn/o_proj/MatMul_output_0"],
            name=f"{p}/self_attn/o_proj/MatMul",
        )
        attn_out = f"{p}/self_attn/o_proj/AllReduce_output_0"
        g.allreduce(f"{p}/self_attn/o_proj/MatMul_output_0", attn_out, name=f"{p}/self_attn/o_proj/AllReduce")
        g.node("Add", [hidden, attn_out], [f"{p}/Add_output_0"], name=f"{p}/Add")
        post_w = _weight(g, f"onnx::Mul_{next(counter)}", (HIDDEN,), 50 + i)
        y = _rms_norm(g, f"{p}/Add_output_0", post_w, f"{p}/post_attention_layernorm")
        gate = _weight(g, f"onnx::MatMul_{next(counter)}", (HIDDEN, INNER), 60 + i)
        up = _weight(g, f"onnx::MatMul_{next(counter)}", (HIDDEN, INNER), 70 + i)
        down = _weight(g, f"onnx::MatMul_{next(counter)}", (INNER, HIDDEN), 80 + i)
        g.node("MatMul", [y, gate], [f"{p}/mlp/gate"], name=f"{p}/mlp/gate_proj/MatMul")
        g.node("Sigmoid", [f"{p}/mlp/gate"], [f"{p}/mlp/sig"], name=f"{p}/mlp/act_fn/Sigmoid")
        g.node("Mul", [f"{p}/mlp/gate", f"{p}/mlp/sig"], [f"{p}/mlp/silu"], name=f"{p}/mlp/act_fn/Mul")
        g.node("MatMul", [y, up], [f"{p}/mlp/up"], name=f"{p}/mlp/up_proj/MatMul")
        g.node("Mul", [f"{p}/mlp/silu", f"{p}/mlp/up"], [f"{p}/mlp/prod"], name=f"{p}/mlp/Mul")
        g.node(
            "MatMul",
            [f"{p}/mlp/prod", down],
            [f"{p}/mlp/down_proj/MatMul_output_0"],
            name=f"{p}/mlp/down_proj/MatMul",
        )
        mlp_out = f"{p}/mlp/down_proj/AllReduce_output_0"
        g.allreduce(f"{p}/mlp/down_proj/MatMul_output_0", mlp_out, name=f"{p}/mlp/down_proj/AllReduce")
        g.node("Add", [f"{p}/Add_output_0", mlp_out], [f"{p}/Add_1_output_0"], name=f"{p}/Add_1")
        hidden = f"{p}/Add_1_output_0"
        if allreduce_value_info:
            for out in (attn_out, mlp_out):
                g.declare(out, [f"{out.replace('/', '_')}_dim_0", f"{out.replace('/', '_')}_dim_1", HIDDEN])
    final_w = _weight(g, f"onnx::Mul_{next(counter)}", (HIDDEN,), 90)
    z = _rms_norm(g, hidden, final_w, "/model/norm")
    head = _weight(g, f"onnx::MatMul_{next(counter)}", (HIDDEN, VOCAB), 91)
    g.node("MatMul", [z, head], ["logits"], name="/lm_head/MatMul")
    g.output("logits", ["batch_size", "sequence_length", VOCAB])
    for i in range(layers):
        for kind in ("key", "value"):
            g.output(f"present.{i}.{kind}", ["batch_size", HEADS, "total_sequence_length", HEAD])
    return g.model(opset=17)


def genai_kv_cache_dim(model: onnx.ModelProto) -> onnx.ModelProto:
    """The onnxruntime-genai builder's KV-cache spelling on one of our GQA samples:
    ``[batch_size, kv_heads, past_sequence_length, kv_cache_dim]``, the head size symbolic (on the
    inputs and the ``present`` outputs alike)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in (*out.graph.input, *out.graph.output):
        if vi.name.startswith(("past_key_values.", "present.")):
            dim = vi.type.tensor_type.shape.dim[3]
            dim.ClearField("dim_value")
            dim.dim_param = "kv_cache_dim"
    return out


__all__ = ["MS", "genai_kv_cache_dim", "torchscript_decoder"]
