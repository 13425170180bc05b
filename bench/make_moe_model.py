#!/usr/bin/env python
"""A shape-only single-device mixture-of-experts decoder of a real size, in seconds and without weights.

    python bench/make_moe_model.py OUT_DIR [--layers N]

Writes OUT_DIR/model.onnx + a SPARSE OUT_DIR/model.onnx.data (made with truncate(): no weight byte is
computed or written; reading gives zeros) in the layout onnxruntime-genai's model builder 0.18 writes
for gpt-oss with int4 experts (sample_models/exporters/genai-gptoss-int4, the tiny real one): embedding
Gather, SimplifiedLayerNormalization, a fused q|k|v MatMul + bias Add into GroupQueryAttention (packed
query, rotary inside, attention sinks in[11], alternating sliding-window and full layers), o_proj MatMul
+ bias, a router MatMul + bias + Reshape to [tokens, experts], ``com.microsoft::QMoE`` (4-bit experts in
blocks of 32, SwiGLU with interleaved gate/value rows, expert biases), residual Adds, the LM head.

The shape is gpt-oss-20b's: hidden 2880, 24 layers, 64 q heads and 8 KV heads of 64, 32 experts (top 4)
of intermediate 2880, vocabulary 201088, window 128; float16 activations, linears and scales. About
14 GiB of weights (11 GiB of expert banks). `bench/run_bench.py` shards it with `preserve-onnx shard
--tp 2` (holes stay holes: nothing is read) and optimizes a rank against the load+save floor.

Function API: make_moe_model(out_dir, layers=None) -> path.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
# gpt-oss-20b (config.json of the released model)
SHAPE = {
    "hidden": 2880,
    "layers": 24,
    "heads": 64,
    "kv_heads": 8,
    "head_dim": 64,
    "experts": 32,
    "top_k": 4,
    "inter": 2880,
    "vocab": 201088,
    "window": 128,
    "max_pos": 4096,
    "block": 32,
}
F16 = TensorProto.FLOAT16


class _Sparse:
    """Initializers as external-data references into one sparse file (4096-aligned offsets)."""

    def __init__(self, location: str) -> None:
        self.location, self.size, self.tensors = location, 0, []

    def add(self, name: str, dtype: int, dims: tuple[int, ...]) -> str:
        t = TensorProto()
        t.name, t.data_type = name, dtype
        t.dims.extend(dims)
        nbytes = int(np.prod(dims, dtype=np.int64)) * (1 if dtype == TensorProto.UINT8 else 2)
        offset = -(-self.size // 4096) * 4096
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.size = offset + nbytes
        self.tensors.append(t)
        return name


def build(layers: int | None = None) -> tuple[onnx.ModelProto, _Sparse]:
    s = dict(SHAPE, layers=layers or SHAPE["layers"])
    H, NH, KV, D, E, INTER = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["experts"], s["inter"]
    w = _Sparse("model.onnx.data")
    nodes: list[onnx.NodeProto] = []
    inline: list[TensorProto] = []

    def node(op, inputs, name, domain="", n_out=1, **attrs):
        outs = [f"{name}/output_{j}" for j in range(n_out)]
        nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(name, values):
        inline.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def norm(x, weight, name):
        return node(
            "SimplifiedLayerNormalization",
            [x, w.add(weight, F16, (H,))],
            name,
            epsilon=1e-5,
            axis=-1,
            stash_type=1,
        )

    def linear(x, weight, shape, name, bias=None):
        """MatMul (the builder's ``<name>/MatMul``), then its bias Add when ``bias`` names one."""
        y = node("MatMul", [x, w.add(weight, F16, shape)], f"{name}/MatMul")
        return node("Add", [y, w.add(bias, F16, shape[-1:])], f"{name}/Add") if bias else y

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
    ]
    outputs = [helper.make_tensor_value_info("logits", F16, ["batch_size", "sequence_length", s["vocab"]])]
    one = const("/model/constants/INT64/1", 1)
    seqlens = node(
        "Cast",
        [
            node(
                "Sub",
                [
                    node(
                        "ReduceSum",
                        ["attention_mask", const("/model/constants/INT64/[1]", [1])],
                        "/model/attn_mask_reformat/ReduceSum",
                        keepdims=0,
                    ),
                    one,
                ],
                "/model/attn_mask_reformat/Sub",
            )
        ],
        "/model/attn_mask_reformat/Cast",
        to=TensorProto.INT32,
    )
    total = node(
        "Cast",
        [
            node(
                "Gather",
                [node("Shape", ["attention_mask"], "/model/attn_mask_reformat/Shape"), one],
                "/model/attn_mask_reformat/Gather",
                axis=0,
            )
        ],
        "/model/attn_mask_reformat/Cast_1",
        to=TensorProto.INT32,
    )
    cos = w.add("cos_cache", F16, (s["max_pos"], D // 2))
    sin = w.add("sin_cache", F16, (s["max_pos"], D // 2))
    x = node(
        "Gather",
        [w.add("model.embed_tokens.weight", F16, (s["vocab"], H)), "input_ids"],
        "/model/embed_tokens/Gather",
        axis=0,
    )
    routed = const("/model/constants/INT64/[-1, 32]", [-1, E])
    for i in range(s["layers"]):
        p, n = f"/model/layers.{i}", f"model.layers.{i}"
        sliding = i % 2 == 0
        past = "past_sliding_length" if sliding else "past_sequence_length"
        present = "total_sliding_length" if sliding else "total_sequence_length"
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", F16, ["batch_size", KV, past, D])
            )
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{kind}", F16, ["batch_size", KV, present, D])
            )
        h = norm(x, f"{n}.input_layernorm.weight", f"{p}/input_layernorm/LayerNorm")
        qkv_width = (NH + 2 * KV) * D
        qkv = linear(
            h,
            f"{n}.attn.qkv_proj.MatMul.weight",
            (H, qkv_width),
            f"{p}/attn/qkv_proj",
            f"{n}.attn.qkv_proj.Add.bias",
        )
        window = (
            {"local_window_size": s["window"], "sliding_window_cache": 1}
            if sliding
            else {"local_window_size": -1}
        )
        gqa = f"{p}/attn/GroupQueryAttention"
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [
                    qkv,
                    "",
                    "",
                    f"past_key_values.{i}.key",
                    f"past_key_values.{i}.value",
                    seqlens,
                    total,
                    cos,
                    sin,
                    "",
                    "",
                    w.add(f"{n}.attn.sinks", F16, (NH,)),
                ],
                [f"{gqa}/output_0", f"present.{i}.key", f"present.{i}.value"],
                name=gqa,
                domain=MS,
                num_heads=NH,
                kv_num_heads=KV,
                scale=D**-0.5,
                do_rotary=1,
                softcap=0.0,
                **window,
            )
        )
        o = linear(
            f"{gqa}/output_0",
            f"{n}.attn.o_proj.MatMul.weight",
            (NH * D, H),
            f"{p}/attn/o_proj",
            f"{n}.attn.o_proj.Add.bias",
        )
        x = node("Add", [x, o], f"{p}/residual_add/Add")
        h = norm(x, f"{n}.post_attention_layernorm.weight", f"{p}/post_attention_layernorm/LayerNorm")
        logits = linear(
            h, f"{n}.moe.router.MatMul.weight", (H, E), f"{p}/moe/router", f"{n}.moe.router.Add.bias"
        )
        router = node("Reshape", [logits, routed], f"{p}/moe/router/Reshape")
        e = f"{n}.moe.experts"
        moe = node(
            "QMoE",
            [
                h,
                router,
                w.add(f"{e}.gate_up_proj.qweight", TensorProto.UINT8, (E, 2 * INTER, H // 2)),
                w.add(f"{e}.gate_up_proj.scales", F16, (E, 2 * INTER, H // s["block"])),
                w.add(f"{e}.gate_up_proj.bias", F16, (E, 2 * INTER)),
                w.add(f"{e}.down_proj.qweight", TensorProto.UINT8, (E, H, INTER // 2)),
                w.add(f"{e}.down_proj.scales", F16, (E, H, INTER // s["block"])),
                w.add(f"{e}.down_proj.bias", F16, (E, H)),
            ],
            f"{p}/moe/QMoE",
            domain=MS,
            k=s["top_k"],
            activation_type="swiglu",
            swiglu_fusion=1,
            normalize_routing_weights=1,
            activation_alpha=1.702,
            activation_beta=1.0,
            swiglu_limit=7.0,
            expert_weight_bits=4,
            block_size=s["block"],
        )
        x = node("Add", [x, moe], f"{p}/moe_residual/Add")
    h = norm(x, "model.norm.weight", "/model/norm/LayerNorm")
    nodes.append(
        helper.make_node(
            "MatMul",
            [h, w.add("lm_head.MatMul.weight", F16, (H, s["vocab"]))],
            ["logits"],
            name="/lm_head/MatMul",
        )
    )
    graph = helper.make_graph(nodes, "gpt-oss-20b-shape", inputs, outputs, inline + w.tensors)
    model = helper.make_model(
        graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
    )
    meta = model.metadata_props.add()
    meta.key, meta.value = "preserve.sample.shape_only", "1"
    return model, w


def make_moe_model(out_dir, layers: int | None = None) -> Path:
    """Write OUT_DIR/model.onnx + sparse model.onnx.data; return the model path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, weights = build(layers)
    tmp = out / "model.onnx.tmp"
    tmp.write_bytes(model.SerializeToString())
    with open(out / "model.onnx.data", "wb") as f:
        f.truncate(weights.size)
    path = out / "model.onnx"
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--layers", type=int, default=None, help=f"layers (default {SHAPE['layers']})")
    a = ap.parse_args(argv)
    path = make_moe_model(a.out_dir, a.layers)
    print(f"wrote {path} (+ sparse {Path(str(path) + '.data').stat().st_size / 2**30:.1f} GiB of weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
