"""The committed exports of real exporters (sample_models/exporters/, made by `make exporter-samples`).

Reads only committed files: each export loads in onnxruntime, a prefill then a decode step with past reproduce
torch's logits for the same token ids (reference.npz, written by the exporter script), and the graphs have the
exact structures sample_models/exporters/README.md describes (the ones `shard` and the planner must handle).
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

EXPORTS = Path(__file__).resolve().parent.parent / "sample_models" / "exporters"
_spec = importlib.util.spec_from_file_location("prefill_decode", EXPORTS / "prefill_decode.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
prefill_and_decode = _module.prefill_and_decode  # the export script's own check (numpy + onnxruntime)

GENAI = [
    "genai-llama-fp16",
    "genai-llama-fp32",
    "genai-llama-int4",
    "genai-llama-int4-zp",
    "genai-llama8h-int4-zp",
    "genai-phi3-fp32",
    "genai-phi3-int4",
    "genai-qwen2-fp32",
    "genai-qwen2-sepqkv-fp32",
]
TORCH = ["torch-llama-dynamo-fp32", "torch-llama-fp32"]
LAYERS = 2
# (q heads, kv heads, head size) by sample
HEADS = {name: (8, 4, 16) if "llama8h" in name else (4, 2, 16) for name in GENAI + TORCH}
# torch's logits against onnxruntime's: what the precision loses (int4: 4-bit weights, int8 activations)
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int4": 0.25}


def precision(name: str) -> str:
    return "int4" if "-int4" in name else "fp16" if name.endswith("-fp16") else "fp32"


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(EXPORTS / name / "full" / "model.onnx"), load_external_data=False)


def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node))


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_the_committed_samples_are_these():
    names = sorted(p.parent.parent.name for p in EXPORTS.glob("*/full/model.onnx"))
    assert names == sorted(GENAI + TORCH + list(ARCH_2026))


@pytest.mark.parametrize("name", GENAI + TORCH)
def test_source_json_lists_the_files_as_written(name):
    folder = EXPORTS / name / "full"
    source = json.loads((folder / "source.json").read_text())
    on_disk = {p.name: p.stat().st_size for p in folder.iterdir() if p.name != "source.json"}
    assert source["files"] == on_disk
    assert source["name"] == name
    assert source["precision"] == precision(name)
    assert source["hf_config"]["num_hidden_layers"] == LAYERS
    family = "Qwen2" if "qwen2" in name else "Phi3" if "phi3" in name else "Llama"
    assert source["hf_config"]["architectures"] == [f"{family}ForCausalLM"]
    assert source["hf_config"]["vocab_size"] == 320
    q, kv, _ = HEADS[name]
    assert (source["hf_config"]["num_attention_heads"], source["hf_config"]["num_key_value_heads"]) == (q, kv)
    expected_versions = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "onnxruntime-genai": "0.18.0"}
    assert {k: source["versions"][k] for k in expected_versions} == expected_versions


def run_prefill_and_decode(name: str):
    """Prefill all reference tokens but the last, then decode the last with the prefill's present as past."""
    reference = np.load(EXPORTS / name / "reference.npz")
    ids, logits = reference["input_ids"], reference["logits"]
    batch, prompt = ids.shape[0], ids.shape[1] - 1
    _, kv, head = HEADS[name]
    first, second = prefill_and_decode(EXPORTS / name / "full" / "model.onnx", ids, LAYERS, kv, head)
    return first, second, logits, (batch, kv, prompt, head)


@pytest.mark.parametrize("name", GENAI + TORCH)
def test_prefill_and_decode_in_onnxruntime_match_torch(name):
    first, second, logits, (batch, kv, prompt, head) = run_prefill_and_decode(name)
    for i in range(LAYERS):
        for kind in ("key", "value"):
            assert first[f"present.{i}.{kind}"].shape == (batch, kv, prompt, head)
            assert second[f"present.{i}.{kind}"].shape == (batch, kv, prompt + 1, head)
            # the decode step appends to the cache: the prefill's entries come back unchanged
            np.testing.assert_array_equal(
                second[f"present.{i}.{kind}"][:, :, :prompt], first[f"present.{i}.{kind}"]
            )
    tolerance = TOLERANCE[precision(name)]
    assert np.abs(first["logits"].astype(np.float32) - logits[:, :prompt]).max() <= tolerance
    assert np.abs(second["logits"].astype(np.float32) - logits[:, prompt:]).max() <= tolerance


# ------------------------------------------------------------------------------------------------------------
# onnxruntime-genai model builder 0.18.0

GENAI_COMMON = {
    "ai.onnx::Cast": 2,
    "ai.onnx::Constant": 2,
    "ai.onnx::Gather": 2,
    "ai.onnx::Mul": 4,
    "ai.onnx::ReduceSum": 1,
    "ai.onnx::Shape": 1,
    "ai.onnx::Sigmoid": 2,
    "ai.onnx::Sub": 1,
    "ai.onnx::SimplifiedLayerNormalization": 1,
    "com.microsoft::GroupQueryAttention": 2,
    "com.microsoft::SkipSimplifiedLayerNormalization": 4,
}
# linears per layer: qkv (1 or 3), o, gate+up (2, or 1 fused + Split), down; plus the LM head
GENAI_OPS = {
    "genai-llama-fp32": {"ai.onnx::MatMul": 11},
    "genai-llama-fp16": {"ai.onnx::MatMul": 11},
    "genai-llama-int4": {"com.microsoft::MatMulNBits": 11},
    "genai-llama-int4-zp": {"com.microsoft::MatMulNBits": 11},
    "genai-llama8h-int4-zp": {"com.microsoft::MatMulNBits": 11},
    "genai-qwen2-fp32": {"ai.onnx::MatMul": 11, "ai.onnx::Add": 2},
    "genai-qwen2-sepqkv-fp32": {"ai.onnx::MatMul": 15, "ai.onnx::Add": 6},
    "genai-phi3-fp32": {"ai.onnx::MatMul": 9, "ai.onnx::Split": 2},
    "genai-phi3-int4": {"com.microsoft::MatMulNBits": 9, "ai.onnx::Split": 2},
}


@pytest.mark.parametrize("name", GENAI)
def test_genai_operators_and_opsets(name):
    model = load(name)
    assert op_counts(model) == {**GENAI_COMMON, **GENAI_OPS[name]}
    assert {o.domain: o.version for o in model.opset_import} == {"": 22, "com.microsoft": 1}
    assert (model.ir_version, model.producer_name, model.producer_version) == (
        10,
        "onnxruntime-genai",
        "0.18.0+00d66ef",
    )
    # The builder's RMSNorm for the first layer is a contrib op that it puts in the default domain.
    assert [n.domain for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization"] == [""]


@pytest.mark.parametrize("name", GENAI)
def test_genai_inputs_outputs_and_kv_dims(name):
    model = load(name)
    _, kv, _ = HEADS[name]
    float_type = onnx.TensorProto.FLOAT16 if name.endswith("fp16") else onnx.TensorProto.FLOAT
    keys = [f"past_key_values.{i}.key" for i in range(LAYERS)]
    values = [f"past_key_values.{i}.value" for i in range(LAYERS)]
    # no position_ids: positions come from attention_mask; all keys first, then all values
    assert [v.name for v in model.graph.input] == ["input_ids", "attention_mask", *keys, *values]
    assert [v.name for v in model.graph.output] == [
        "logits",
        *[f"present.{i}.key" for i in range(LAYERS)],
        *[f"present.{i}.value" for i in range(LAYERS)],
    ]
    shapes = {
        v.name: (v.type.tensor_type.elem_type, dims(v)) for v in [*model.graph.input, *model.graph.output]
    }
    assert shapes["input_ids"] == (onnx.TensorProto.INT64, ["batch_size", "sequence_length"])
    assert shapes["attention_mask"] == (onnx.TensorProto.INT64, ["batch_size", "total_sequence_length"])
    assert shapes["logits"] == (float_type, ["batch_size", "sequence_length", 320])
    for i in range(LAYERS):
        for kind in ("key", "value"):
            # the head size is symbolic (kv_cache_dim), the KV head count a number
            assert shapes[f"past_key_values.{i}.{kind}"] == (
                float_type,
                ["batch_size", kv, "past_sequence_length", "kv_cache_dim"],
            )
            assert shapes[f"present.{i}.{kind}"] == (
                float_type,
                ["batch_size", kv, "total_sequence_length", "kv_cache_dim"],
            )


@pytest.mark.parametrize("name", GENAI)
def test_genai_group_query_attention(name):
    model = load(name)
    q, kv, head = HEADS[name]
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert [n.name for n in nodes] == [f"/model/layers.{i}/attn/GroupQueryAttention" for i in range(LAYERS)]
    separate = name == "genai-qwen2-sepqkv-fp32"
    bias = "qwen2" in name
    for i, node in enumerate(nodes):
        qkv_source = "Add" if bias else "MatMul"
        if separate:
            packed = [f"/model/layers.{i}/attn/{p}_proj/Add/output_0" for p in "qkv"]
        else:
            packed = [f"/model/layers.{i}/attn/qkv_proj/{qkv_source}/output_0", "", ""]
        assert list(node.input) == [
            *packed,
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            "/model/attn_mask_reformat/attn_mask_subgraph/Sub/Cast/output_0",
            "/model/attn_mask_reformat/attn_mask_subgraph/Gather/Cast/output_0",
            "cos_cache",
            "sin_cache",
            "",
            "",
            "",
        ]
        assert list(node.output) == [
            f"/model/layers.{i}/attn/GroupQueryAttention/output_0",
            f"present.{i}.key",
            f"present.{i}.value",
        ]
        assert attributes(node) == {
            "num_heads": q,
            "kv_num_heads": kv,
            "scale": pytest.approx(head**-0.5),
            "local_window_size": -1,
            "softcap": 0.0,
            "do_rotary": 1,
            "rotary_interleaved": 0,
        }
    caches = {i.name: list(i.dims) for i in model.graph.initializer if i.name in ("cos_cache", "sin_cache")}
    assert caches == {"cos_cache": [256, head // 2], "sin_cache": [256, head // 2]}


@pytest.mark.parametrize("name", GENAI)
def test_genai_storage(name):
    """Every initializer external, packed back to back (no alignment), value_info naming every initializer."""
    model = load(name)
    graph = model.graph
    offsets = []
    for tensor in graph.initializer:
        assert tensor.data_location == onnx.TensorProto.EXTERNAL, tensor.name
        info = {e.key: e.value for e in tensor.external_data}
        assert info["location"] == "model.onnx.data"
        offsets.append((int(info["offset"]), int(info["length"])))
    ends = [offset + length for offset, length in offsets]
    assert [offset for offset, _ in offsets] == [0, *ends[:-1]]
    assert ends[-1] == (EXPORTS / name / "full" / "model.onnx.data").stat().st_size
    assert {i.name for i in graph.initializer} <= {v.name for v in graph.value_info}
    constants = [n for n in graph.node if n.op_type == "Constant"]
    assert [n.output[0] for n in constants] == ["/model/constants/INT64/[1]", "/model/constants/INT64/1"]


@pytest.mark.parametrize(
    "name", ["genai-llama-int4", "genai-llama-int4-zp", "genai-llama8h-int4-zp", "genai-phi3-int4"]
)
def test_genai_matmulnbits(name):
    model = load(name)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    hidden = 128 if "llama8h" in name else 64
    ffn = 384 if "llama8h" in name else 192
    q, kv, head = HEADS[name]
    zero_points = name.endswith("-zp")
    fused_gate_up = "phi3" in name
    expected_kn = {
        "qkv_proj": (hidden, (q + 2 * kv) * head),
        "o_proj": (q * head, hidden),
        "down_proj": (ffn, hidden),
    }
    expected_kn.update(
        {"gate_up_proj": (hidden, 2 * ffn)}
        if fused_gate_up
        else {"gate_proj": (hidden, ffn), "up_proj": (hidden, ffn)}
    )
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == LAYERS * len(expected_kn) + 1
    for node in nodes:
        part = node.name.split("/")[-2]
        k, n = (hidden, 320) if node.name == "/lm_head/MatMul_Q4" else expected_kn[part]
        assert node.name.endswith("/MatMul_Q4")
        lm_head = node.name == "/lm_head/MatMul_Q4"
        assert node.output[0] == ("logits" if lm_head else node.name.removesuffix("_Q4") + "/output_0")
        assert attributes(node) == {"K": k, "N": n, "bits": 4, "block_size": 32, "accuracy_level": 4}
        weight = node.input[1].removesuffix("_Q4")
        expected_inputs = [f"{weight}_Q4", f"{weight}_scales"] + (
            [f"{weight}_zero_points"] if zero_points else []
        )
        assert list(node.input[1:]) == expected_inputs
        blocks = k // 32
        assert shapes[f"{weight}_Q4"] == [n, blocks, 16]
        assert shapes[f"{weight}_scales"] == [n, blocks]
        if zero_points:
            assert shapes[f"{weight}_zero_points"] == [n, (blocks + 1) // 2]  # two 4-bit points per byte


@pytest.mark.parametrize("name", ["genai-phi3-fp32", "genai-phi3-int4"])
def test_genai_fused_gate_up_split(name):
    model = load(name)
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    for i, node in enumerate(splits):
        assert node.name == f"/model/layers.{i}/mlp/gate_up_proj/Split"
        assert list(node.input) == [f"/model/layers.{i}/mlp/gate_up_proj/MatMul/output_0"]
        assert list(node.output) == [
            f"/model/layers.{i}/mlp/gate_proj/MatMul/output_0",
            f"/model/layers.{i}/mlp/up_proj/MatMul/output_0",
        ]
        assert attributes(node) == {"axis": -1, "num_outputs": 2}


def test_genai_qwen2_bias_adds():
    fused, separate = load("genai-qwen2-fp32"), load("genai-qwen2-sepqkv-fp32")
    for model, parts in ((fused, ["qkv"]), (separate, ["q", "k", "v"])):
        adds = [(n.name, list(n.input)) for n in model.graph.node if n.op_type == "Add"]
        assert adds == [
            (
                f"/model/layers.{i}/attn/{p}_proj/Add",
                [
                    f"/model/layers.{i}/attn/{p}_proj/MatMul/output_0",
                    f"model.layers.{i}.attn.{p}_proj.Add.bias",
                ],
            )
            for i in range(LAYERS)
            for p in parts
        ]
    shapes = {i.name: list(i.dims) for i in separate.graph.initializer}
    assert [shapes[f"model.layers.0.attn.{p}_proj.Add.bias"] for p in "qkv"] == [[64], [32], [32]]
    assert {i.name: list(i.dims) for i in fused.graph.initializer}[
        "model.layers.0.attn.qkv_proj.Add.bias"
    ] == [128]


# ------------------------------------------------------------------------------------------------------------
# torch.onnx (transformers 5 Llama, eager attention, through a wrapper that builds the DynamicCache)

TORCH_OPS = {
    # TorchScript: shapes through Shape/Gather/Unsqueeze/Concat chains and 199 Constant nodes
    "torch-llama-fp32": {
        "Add": 18,
        "And": 2,
        "Cast": 32,
        "Concat": 27,
        "Constant": 199,
        "ConstantOfShape": 6,
        "Cos": 1,
        "Div": 9,
        "Equal": 5,
        "Expand": 5,
        "Flatten": 1,
        "Gather": 30,
        "LessOrEqual": 1,
        "MatMul": 19,
        "Mul": 37,
        "Neg": 4,
        "Pow": 5,
        "Range": 3,
        "ReduceMean": 5,
        "Reshape": 19,
        "Shape": 34,
        "Sigmoid": 2,
        "Sin": 1,
        "Slice": 8,
        "Softmax": 2,
        "Sqrt": 5,
        "Transpose": 10,
        "Unsqueeze": 75,
        "Where": 6,
    },
    # dynamo: constants are initializers (no Constant node), far fewer shape ops
    "torch-llama-dynamo-fp32": {
        "Add": 17,
        "And": 2,
        "Cast": 2,
        "Concat": 15,
        "Cos": 1,
        "Expand": 7,
        "Gather": 1,
        "GatherND": 1,
        "LessOrEqual": 1,
        "MatMul": 19,
        "Max": 1,
        "Mul": 25,
        "Neg": 4,
        "Pow": 5,
        "Range": 3,
        "Reciprocal": 5,
        "ReduceMean": 5,
        "Reshape": 13,
        "Shape": 4,
        "Sigmoid": 2,
        "Sin": 1,
        "Slice": 8,
        "Softmax": 2,
        "Sqrt": 5,
        "Squeeze": 3,
        "Transpose": 10,
        "Unsqueeze": 15,
        "Where": 1,
    },
}


@pytest.mark.parametrize("name", TORCH)
def test_torch_operators_and_opsets(name):
    model = load(name)
    assert op_counts(model) == {f"ai.onnx::{op}": count for op, count in TORCH_OPS[name].items()}
    assert {o.domain: o.version for o in model.opset_import} == {"": 20}
    dynamo = name == "torch-llama-dynamo-fp32"
    assert (model.ir_version, model.producer_name, model.producer_version) == (
        (10, "pytorch", "2.13.0+cpu") if dynamo else (9, "pytorch", "2.13.0")
    )
    # value_info: none from TorchScript; dynamo names every intermediate and every initializer
    assert len(model.graph.value_info) == (214 if dynamo else 0)
    weights = sorted(i.name for i in model.graph.initializer if len(i.dims) == 2)
    assert weights[0] == "model.model.embed_tokens.weight"
    prefix = "val_" if dynamo else "onnx::MatMul_"  # the linears' names say nothing about what they are
    assert len(weights) == 16 and all(w.startswith(prefix) for w in weights[1:])


@pytest.mark.parametrize("name", TORCH)
def test_torch_inputs_outputs(name):
    model = load(name)
    past = [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    assert [v.name for v in model.graph.input] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [v.name for v in model.graph.output] == ["logits", *present]
    shapes = {v.name: dims(v) for v in [*model.graph.input, *model.graph.output]}
    assert shapes["position_ids"] == ["batch_size", "sequence_length"]
    total = (
        "total_sequence_length" if name == "torch-llama-fp32" else "past_sequence_length + sequence_length"
    )
    for name_ in past:
        assert shapes[name_] == ["batch_size", 2, "past_sequence_length", 16]  # head size a number here
    for name_ in present:
        assert shapes[name_] == ["batch_size", 2, total, 16]
    # one file, everything inline, no contrib ops
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    assert sorted(EXPORTS.joinpath(name, "full").iterdir()) == [
        EXPORTS / name / "full" / "model.onnx",
        EXPORTS / name / "full" / "source.json",
    ]
    assert {o.domain for o in model.opset_import} == {""}


@pytest.mark.parametrize("name", TORCH)
def test_torch_attention_is_plain_operators_with_the_kv_cache_through_concat(name):
    model = load(name)
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    for i in range(LAYERS):
        for kind in ("key", "value"):
            concat = producers[f"present.{i}.{kind}"]
            assert concat.op_type == "Concat" and attributes(concat) == {"axis": -2}
            assert concat.input[0] == f"past_key_values.{i}.{kind}" and len(concat.input) == 2
    counts = op_counts(model)
    assert counts["ai.onnx::Softmax"] == LAYERS
    # q, k, v, o, gate, up, down per layer, the LM head, plus Q.K^T and P.V per layer
    assert counts["ai.onnx::MatMul"] == 7 * LAYERS + 1 + 2 * LAYERS


# ------------------------------------------------------------------------------------------------------------
# The 2026 architectures (builder 0.18.0): MoE/QMoE, attention sinks, sliding windows with window-sized
# caches, q/k norms, a hybrid with linear-attention layers

# name: (q heads, KV heads, head size, window or None, layers with a KV-cache, worst logits diff measured
# when the sample was made: prefill, decode)
ARCH_2026 = {
    "genai-gptoss-fp32": (8, 4, 16, 4, (0, 1), (1.49e-7, 1.79e-7)),
    "genai-gptoss-int4": (8, 4, 16, 4, (0, 1), (0.220, 0.0476)),
    "genai-qwen3-int4": (8, 4, 16, None, (0, 1), (0.149, 0.128)),
    "genai-gemma2-fp32": (8, 4, 32, 4, (0, 1), (5.42e-5, 2.93e-5)),
    "genai-gemma3-fp32": (8, 4, 32, 4, (0, 1), (8.18e-5, 6.41e-5)),
    "genai-qwen35moe-int4": (8, 4, 16, None, (1,), (0.351, 0.355)),
}
ARCH_2026_OPS = {
    "genai-gptoss-fp32": {"ai.onnx::MatMul": 7, "ai.onnx::Add": 6, "com.microsoft::MoE": 2},
    "genai-gptoss-int4": {"com.microsoft::MatMulNBits": 7, "ai.onnx::Add": 6, "com.microsoft::QMoE": 2},
    "genai-qwen3-int4": {"com.microsoft::MatMulNBits": 11, "ai.onnx::Split": 2, "ai.onnx::Reshape": 8},
    "genai-gemma2-fp32": {"ai.onnx::MatMul": 11, "ai.onnx::Gelu": 2, "ai.onnx::Tanh": 1},
    "genai-gemma3-fp32": {"ai.onnx::MatMul": 11, "ai.onnx::Gelu": 2, "ai.onnx::Split": 2},
    "genai-qwen35moe-int4": {
        "com.microsoft::QMoE": 2,
        "com.microsoft::GatedAdd": 2,
        "com.microsoft::MRotaryEmbedding": 2,
        "com.microsoft::LinearAttention": 1,
        "com.microsoft::CausalConvWithState": 1,
        "com.microsoft::GroupQueryAttention": 1,
    },
}


@pytest.mark.parametrize("name", sorted(ARCH_2026))
def test_2026_samples_prefill_and_decode_match_torch(name):
    """Window-sized caches stay W slots (prefill_decode feeds W zero slots at prefill); full caches grow."""
    q, kv, head, window, kv_layers, (worst_prefill, worst_decode) = ARCH_2026[name]
    reference = np.load(EXPORTS / name / "reference.npz")
    ids, logits = reference["input_ids"], reference["logits"]
    batch, prompt = ids.shape[0], ids.shape[1] - 1
    first, second = prefill_and_decode(EXPORTS / name / "full" / "model.onnx", ids, LAYERS, kv, head)
    layer_kinds = json.loads((EXPORTS / name / "full" / "source.json").read_text())["hf_config"]
    layer_kinds = layer_kinds.get("text_config", layer_kinds).get("layer_types") or ["full"] * LAYERS
    assert sorted(int(k.split(".")[1]) for k in second if k.endswith(".key")) == list(kv_layers)
    for i in kv_layers:
        sliding = window is not None and layer_kinds[i] == "sliding_attention"
        assert first[f"present.{i}.key"].shape == (batch, kv, window if sliding else prompt, head)
        assert second[f"present.{i}.value"].shape == (batch, kv, window if sliding else prompt + 1, head)
    prefill = np.abs(first["logits"].astype(np.float32) - logits[:, :prompt]).max()
    decode = np.abs(second["logits"].astype(np.float32) - logits[:, prompt:]).max()
    assert prefill == pytest.approx(worst_prefill, rel=0.01)
    assert decode == pytest.approx(worst_decode, rel=0.01)


@pytest.mark.parametrize("name", sorted(ARCH_2026))
def test_2026_samples_attention_attributes_and_operators(name):
    q, kv, head, window, kv_layers, _ = ARCH_2026[name]
    model = load(name)
    counts = op_counts(model)
    assert {op: counts.get(op, 0) for op in ARCH_2026_OPS[name]} == ARCH_2026_OPS[name]
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert [int(n.name.split("/")[2].split(".")[1]) for n in gqa] == list(kv_layers)
    for node in gqa:
        found = attributes(node)
        assert (found["num_heads"], found["kv_num_heads"]) == (q, kv)
        assert found["scale"] == pytest.approx(head**-0.5)
        sliding = window is not None and node.name.startswith("/model/layers.0/")
        assert found["local_window_size"] == (window if sliding else -1)
        assert found.get("sliding_window_cache", 0) == (1 if sliding else 0)
        # gpt-oss's attention sinks: GroupQueryAttention in[11], one per q head
        sinks = node.input[11] if len(node.input) > 11 else ""
        assert bool(sinks) == ("gptoss" in name)
    past = {i.name: dims(i) for i in model.graph.input if i.name.startswith("past_key_values.")}
    for i in kv_layers:
        length = "past_sliding_length" if window is not None and i == 0 else "past_sequence_length"
        assert past[f"past_key_values.{i}.key"] == ["batch_size", kv, length, "kv_cache_dim"]
