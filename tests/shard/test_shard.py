"""``shard``: structure of the rank models, numbers against the single-device model, determinism, refusals.

Numerical equivalence: every rank's logits equal the single model's, and every rank's present KV-cache
equals its heads' slice of the single model's, over 3 decode steps (float32 within 1e-4, like
tests/runtime/test_twins.py). The committed 2-rank samples were sharded by hand by
sample_models/make_samples.py from the same weights: ``shard`` of their single-device twin must write
the same weight bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.errors import PreserveError, UsageError
from preserve_onnx.graph.dims import graph_dims
from preserve_onnx.model_io import resolve_single
from preserve_onnx.runtime import RankSession, generate_feeds, run_steps
from preserve_onnx.shard import shard_model
from tests.conftest import SAMPLES
from tests.shard._models import decoder

HAND_SHARDED = ["llama-gqa", "llama-gqa-fp16", "llama-int4", "llama-qdq", "gpt-attention", "merged-decoder"]
TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 2e-2}


def kv_axis(name: str) -> int:
    return 2 if name.startswith(("past_", "present_")) and name[-1].isdigit() else 1


def assert_twin(out: Path, full: Path, opt_level: str = "all", dims: dict | None = None) -> None:
    files = sorted(out.glob("model_*.onnx"))
    world = len(files)
    ranks = RankSession(files, opt_level=opt_level)
    single = RankSession(full, opt_level=opt_level)
    # a symbolic head size (the builder's kv_cache_dim) is bound from the graph, as `run` does
    dims = dims or graph_dims(onnx.load(full, load_external_data=False))
    shared, per_rank = generate_feeds(ranks, batch=2, context=8, seed=3, dims=dims)
    feeds = {n: np.concatenate([per_rank[r][n] for r in range(world)], axis=kv_axis(n)) for n in per_rank[0]}
    sharded = run_steps(ranks, shared, per_rank, 3)
    (expected,) = run_steps(single, shared, {0: feeds}, 3)
    for name, value in expected.items():
        # logits and a replicated layer's state (the same shape on every rank) are whole on every rank
        whole = name == "logits" or sharded[0][name].shape == value.shape
        parts = [value] * world if whole else np.split(value, world, axis=kv_axis(name))
        for r in range(world):
            np.testing.assert_allclose(
                sharded[r][name], parts[r], atol=TOL[value.dtype], rtol=0, err_msg=name
            )


def nodes(path: Path, op: str) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(path, load_external_data=False).graph.node if n.op_type == op]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module")
def gqa2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gqa") / "tp2"
    shard_model(SAMPLES / "llama-gqa" / "full" / "model.onnx", out, 2)
    return out


# -- structure -------------------------------------------------------------------------------------


def test_rank_files_and_megatron_shapes(gqa2):
    assert sorted(p.name for p in gqa2.iterdir()) == [
        "model_00.onnx",
        "model_00.onnx.data",
        "model_01.onnx",
        "model_01.onnx.data",
    ]
    model = onnx.load(gqa2 / "model_01.onnx", load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    layer = "model.layers.0"
    assert dims[f"{layer}.attn.q_proj.MatMul.weight"] == [64, 32]
    assert dims[f"{layer}.attn.k_proj.MatMul.weight"] == [64, 16]
    assert dims[f"{layer}.attn.o_proj.MatMul.weight"] == [32, 64]
    assert dims[f"{layer}.mlp.gate_proj.MatMul.weight"] == [64, 48]
    assert dims[f"{layer}.mlp.down_proj.MatMul.weight"] == [48, 64]
    assert dims["lm_head.MatMul.weight"] == [64, 160]  # replicated
    assert dims["model.embed_tokens.weight"] == [160, 64] and dims["cos_cache"] == [256, 8]
    (gqa,) = [n for n in model.graph.node if n.name == "/model/layers.0/attn/GroupQueryAttention"]
    assert (attrs(gqa)["num_heads"], attrs(gqa)["kv_num_heads"]) == (2, 1)
    past = {
        vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
        for vi in list(model.graph.input) + list(model.graph.output)
    }
    assert past["past_key_values.1.value"] == ["batch_size", 1, "past_sequence_length", 16]
    assert past["present.0.key"] == ["batch_size", 1, "total_sequence_length", 16]
    assert {p.key: p.value for p in model.metadata_props}["preserve.shard.rank"] == "1"


def test_allreduce_right_after_each_row_parallel_matmul(gqa2):
    graph = onnx.load(gqa2 / "model_00.onnx", load_external_data=False).graph
    order = list(graph.node)
    reduces = [i for i, n in enumerate(order) if n.op_type == "AllReduce"]
    assert [order[i - 1].name for i in reduces] == [
        f"/model/layers.{i}/{p}/MatMul" for i in (0, 1) for p in ("attn/o_proj", "mlp/down_proj")
    ]
    for i in reduces:
        assert order[i].domain == "com.microsoft" and not order[i].attribute
        assert list(order[i].input) == [order[i - 1].output[0]]
        assert (
            order[i + 1].op_type == "SkipSimplifiedLayerNormalization"
            and order[i].output[0] in order[i + 1].input
        )


def test_bias_of_a_row_parallel_linear_is_added_after_the_allreduce(tmp_path):
    shard_model(SAMPLES / "gpt-attention" / "full" / "model.onnx", tmp_path / "tp2", 2)
    order = list(onnx.load(tmp_path / "tp2" / "model_00.onnx", load_external_data=False).graph.node)
    for i, node in enumerate(order):
        if node.op_type == "AllReduce":
            assert order[i - 1].op_type == "MatMul" and order[i + 1].op_type == "Add"
            assert order[i + 1].input[0] == node.output[0]
    (att,) = [n for n in order if n.op_type == "Attention"][:1]
    assert attrs(att)["num_heads"] == 2


@pytest.mark.parametrize("variant", HAND_SHARDED)
def test_same_weight_bytes_as_the_hand_sharded_samples(variant, tmp_path):
    shard_model(SAMPLES / variant / "full" / "model.onnx", tmp_path / "tp2", 2)
    for r in (0, 1):
        ours = onnx.load(tmp_path / "tp2" / f"model_0{r}.onnx")
        theirs = onnx.load(SAMPLES / variant / "tp2" / f"model_0{r}.onnx")
        mine = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
        for t in theirs.graph.initializer:
            expected = numpy_helper.to_array(t)
            assert mine[t.name].shape == expected.shape and mine[t.name].tobytes() == expected.tobytes(), (
                t.name
            )


def test_int4_row_parallel_splits_whole_k_blocks_and_repacks_zero_points(tmp_path):
    shard_model(SAMPLES / "llama-int4" / "full" / "model.onnx", tmp_path / "tp2", 2)
    model = onnx.load(tmp_path / "tp2" / "model_00.onnx", load_external_data=False)
    found = {n.name: attrs(n) for n in model.graph.node if n.op_type == "MatMulNBits"}
    down = found["/model/layers.0/mlp/down_proj/MatMulNBits"]
    gate = found["/model/layers.0/mlp/gate_proj/MatMulNBits"]
    assert (down["K"], down["N"], gate["K"], gate["N"]) == (48, 64, 64, 48)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    # 3 K blocks of 16 per rank: the packed zero points hold 2 bytes per output column
    assert dims["model.layers.0.mlp.down_proj.MatMul.weight_Q4"] == [64, 3, 8]
    assert dims["model.layers.0.mlp.down_proj.MatMul.weight_zero_points"] == [128]


def shape_value(path: Path, name: str) -> list:
    graph = onnx.load(path, load_external_data=False).graph
    consts = {t.name: numpy_helper.to_array(t).tolist() for t in graph.initializer if t.raw_data}
    consts.update(
        (n.output[0], numpy_helper.to_array(n.attribute[0].t).tolist())
        for n in graph.node
        if n.op_type == "Constant"
    )
    made = {o: n for n in graph.node for o in n.output}
    if name in consts:
        return consts[name]
    return [d for piece in made[name].input for d in (consts.get(piece) or [None])]


def reshape_shapes(model: onnx.ModelProto) -> list[list]:
    """Every Reshape's target shape as far as constants say (None: a dim computed at run time)."""
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t).tolist() for t in graph.initializer if t.raw_data}
    for n in graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t).tolist()
    made = {o: n for n in graph.node for o in n.output}

    def value(name):
        if name in consts:
            return consts[name]
        node = made[name]
        return [d for piece in node.input for d in value(piece)] if node.op_type == "Concat" else [None]

    return [value(n.input[1]) for n in graph.node if n.op_type == "Reshape"]


def test_plain_operator_attention_gets_its_reshape_head_counts_divided(tmp_path):
    """Shapes in initializers, Constant nodes, and Concats of both with Shape-derived dims."""
    full = decoder(tmp_path / "full", attention="plain")
    shard_model(full, tmp_path / "tp2", 2)
    before = reshape_shapes(onnx.load(full, load_external_data=False))[:6]
    after = reshape_shapes(onnx.load(tmp_path / "tp2" / "model_00.onnx", load_external_data=False))[:6]
    expands = [
        n
        for n in onnx.load(tmp_path / "tp2" / "model_00.onnx", load_external_data=False).graph.node
        if n.op_type == "Expand"
    ][:2]
    assert [shape_value(tmp_path / "tp2" / "model_00.onnx", e.input[1]) for e in expands] == [
        [None, 1, 2, None, 16],  # [B, kv heads, n_rep, T, HS]: the KV heads divided, n_rep (also 2) kept
        [1, 1, 2, 1, 1],
    ]
    assert before == [
        [None, None, 4, 16],
        [0, 0, 2, 16],
        [0, 0, 2, 16],
        [0, 4, -1, 16],
        [0, 4, -1, 16],
        [0, 0, 64],
    ]
    assert after == [
        [None, None, 2, 16],
        [0, 0, 1, 16],
        [0, 0, 1, 16],
        [0, 2, -1, 16],
        [0, 2, -1, 16],
        [0, 0, 32],
    ]


def test_shape_constants_in_the_external_data_file_are_read_and_divided(tmp_path):
    """TorchScript exports put every initializer in the data file; onnxruntime cannot even load such a
    model (shape inference reads no external data), the ranks keep small tensors inline and can."""
    external = decoder(tmp_path / "external", attention="plain", qkv="split", mlp="slice", all_external=True)
    shard_model(external, tmp_path / "tp2", 2)
    assert_twin(tmp_path / "tp2", decoder(tmp_path / "inline", attention="plain", qkv="split", mlp="slice"))


def test_bfloat16_weights_are_cut_like_any_other(tmp_path):
    """The CPU provider has no bfloat16 MatMul: bytes are checked against slices of the source."""
    import ml_dtypes

    full = decoder(tmp_path / "full", bias=True, dtype=ml_dtypes.bfloat16)
    shard_model(full, tmp_path / "tp2", 2)
    source = onnx.load(full)
    weights = [t for t in source.graph.initializer if list(t.dims) == [64, 64]][:1]
    q = numpy_helper.to_array(weights[0])
    biases = [t for t in source.graph.initializer if list(t.dims) == [64] and t.name.startswith("b_")]
    for r in (0, 1):
        rank = {
            t.name: numpy_helper.to_array(t)
            for t in onnx.load(tmp_path / "tp2" / f"model_0{r}.onnx").graph.initializer
        }
        assert rank[weights[0].name].dtype == ml_dtypes.bfloat16
        assert rank[weights[0].name].tobytes() == q[:, 32 * r : 32 * (r + 1)].tobytes()
        q_bias = numpy_helper.to_array(biases[1])  # biases[0] is the first norm's weight
        assert rank[biases[1].name].tobytes() == q_bias[32 * r : 32 * (r + 1)].tobytes()


# -- numbers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama-gqa", "llama-int4", "gpt-attention", "merged-decoder"])
def test_hand_sharded_samples_twins(variant, tmp_path):
    shard_model(SAMPLES / variant / "full" / "model.onnx", tmp_path / "tp2", 2)
    assert_twin(tmp_path / "tp2", SAMPLES / variant / "full" / "model.onnx")


STRUCTURES = {
    "builder-gqa-packed-qkv": {"attention": "gqa", "qkv": "packed"},
    "builder-gqa-qkv-split-bias-gate-up-slice": {
        "attention": "gqa",
        "qkv": "split",
        "mlp": "slice",
        "bias": True,
    },
    "builder-gqa-separate-bias-gate-up-split": {"attention": "gqa", "bias": True, "mlp": "split"},
    "builder-int4-packed-qkv-bias": {"attention": "gqa", "qkv": "packed", "bias": True, "quant": "int4"},
    "builder-int4-fused-bias": {"attention": "gqa", "mlp": "split", "quant": "int4+bias"},
    "optimized-mha-rotary": {"attention": "mha", "bias": True},
    "torch-plain": {"attention": "plain"},
    "onnx-attention-op": {"attention": "onnx", "qkv": "split"},
    "torch-plain-fused": {"attention": "plain", "qkv": "split", "mlp": "split", "bias": True},
}


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_rank_sum_equals_the_single_model(structure, tmp_path):
    full = decoder(tmp_path / "full", **STRUCTURES[structure])
    shard_model(full, tmp_path / "tp2", 2)
    assert_twin(tmp_path / "tp2", full)


def _export_cases() -> list[tuple[str, int]]:
    """(export, ranks): every real export at 2 ranks, and at 4 where its KV heads allow it."""
    cases = []
    for path in sorted((SAMPLES / "exporters").glob("*/full/*.onnx")):
        graph = onnx.load(path, load_external_data=False).graph
        kv_heads = {
            vi.type.tensor_type.shape.dim[1].dim_value
            for vi in graph.input
            if len(vi.type.tensor_type.shape.dim) == 4
        }
        cases += [
            (path.parent.parent.name, tp)
            for tp in (2, 4)
            if tp == 2 or all(h and h % 4 == 0 for h in kv_heads)
        ]
    return cases


@pytest.mark.parametrize(("export", "tp"), _export_cases())
def test_real_exporter_output_shards_to_ranks_that_match_it(export, tp, tmp_path):
    """Exports made by the real tools (sample_models/exporters: onnxruntime-genai builder, torch.onnx)."""
    full = SAMPLES / "exporters" / export / "full"
    shard_model(full, tmp_path / "out", tp)
    assert_twin(tmp_path / "out", resolve_single(full))


def test_four_ranks(tmp_path):
    full = decoder(tmp_path / "full", attention="mha")  # 4 heads and 4 KV heads
    shard_model(full, tmp_path / "tp4", 4)
    assert_twin(tmp_path / "tp4", full)


def test_vocab_parallel_gathers_the_logits(tmp_path):
    full = SAMPLES / "llama-gqa" / "full" / "model.onnx"
    shard_model(full, tmp_path / "tp2", 2, vocab_parallel=True)
    model = onnx.load(tmp_path / "tp2" / "model_00.onnx", load_external_data=False)
    (gather,) = [n for n in model.graph.node if n.op_type == "AllGather"]
    assert attrs(gather) == {"group_size": 2, "axis": -1} and gather.output[0] == "logits"
    assert [list(t.dims) for t in model.graph.initializer if t.name == "lm_head.MatMul.weight"] == [[64, 80]]
    assert_twin(tmp_path / "tp2", full)


def test_vocab_parallel_int4_lm_head(tmp_path):
    full = SAMPLES / "llama-int4" / "full" / "model.onnx"
    shard_model(full, tmp_path / "tp2", 2, vocab_parallel=True)
    model = onnx.load(tmp_path / "tp2" / "model_01.onnx", load_external_data=False)
    (head,) = [n for n in model.graph.node if n.name == "/lm_head/MatMulNBits"]
    assert (attrs(head)["K"], attrs(head)["N"]) == (64, 80)
    assert_twin(tmp_path / "tp2", full)


# -- files -------------------------------------------------------------------------------------------


def test_same_input_same_bytes(tmp_path, gqa2):
    shard_model(SAMPLES / "llama-gqa" / "full" / "model.onnx", tmp_path / "again", 2)
    for p in gqa2.iterdir():
        assert (tmp_path / "again" / p.name).read_bytes() == p.read_bytes(), p.name


def test_folder_input_copies_companions_and_rewrites_genai_head_counts(tmp_path):
    src = tmp_path / "export"
    shutil.copytree(SAMPLES / "llama-gqa" / "full", src)
    (src / "tokenizer.json").write_text('{"v": 1}')
    config = {
        "model": {
            "decoder": {
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_size": 16,
                "filename": "model.onnx",
            }
        }
    }
    (src / "genai_config.json").write_text(json.dumps(config))
    shard_model(src, tmp_path / "tp2", 2)
    assert (tmp_path / "tp2" / "tokenizer.json").read_text() == '{"v": 1}'
    written = json.loads((tmp_path / "tp2" / "genai_config.json").read_text())
    assert written["model"]["decoder"] == {
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_size": 16,
        "filename": "model.onnx",
    }


# -- refusals: one line, nothing written -----------------------------------------------------------


def refused(model: Path, out: Path, tp: int, match: str, **kw) -> None:
    before = sorted(out.parent.iterdir())
    with pytest.raises(PreserveError, match=match):
        shard_model(model, out, tp, **kw)
    assert sorted(out.parent.iterdir()) == before  # no OUT, no temporary folder left


def test_refuses_tp_not_dividing_heads(tmp_path):
    refused(
        SAMPLES / "llama-gqa" / "full" / "model.onnx",
        tmp_path / "out",
        3,
        r"^--tp 3 does not divide the 4 attention heads of '/model/layers.0/attn/GroupQueryAttention'$",
    )


def test_refuses_tp_not_dividing_kv_heads(tmp_path):
    refused(
        SAMPLES / "llama-gqa" / "full" / "model.onnx",
        tmp_path / "out",
        4,
        r"^--tp 4 does not divide the 2 KV heads of '/model/layers.0/attn/GroupQueryAttention'$",
    )


def test_refuses_tp_not_dividing_the_ffn(tmp_path):
    full = decoder(tmp_path / "m" / "full", ffn=99)
    refused(full, tmp_path / "out", 2, r"^--tp 2 does not divide the 99 FFN columns of '/MatMul_\d+'$")


def test_refuses_tp_not_dividing_int4_k_blocks(tmp_path):
    full = decoder(tmp_path / "m" / "full", quant="int4", ffn=80)  # down_proj: 5 blocks of 16
    refused(
        full,
        tmp_path / "out",
        2,
        r"^--tp 2 does not divide the 5 K blocks \(block_size 16\) of "
        r"'/MatMulNBits_\d+'$",
    )


def test_refuses_vocab_parallel_when_tp_does_not_divide_the_vocabulary(tmp_path):
    full = decoder(tmp_path / "m" / "full", vocab=161)
    refused(
        full,
        tmp_path / "out",
        2,
        r"^--tp 2 does not divide the 161 vocabulary entries of '/MatMul_\d+'$",
        vocab_parallel=True,
    )


def test_refuses_an_unrecognised_linear_by_name(tmp_path):
    full = decoder(tmp_path / "m" / "full", extra_linear=True)
    refused(
        full,
        tmp_path / "out",
        2,
        r"^unrecognised layer structure at node '/MatMul_\d+': a linear layer "
        r"that is not part of attention, an MLP or the LM head$",
    )


def test_refuses_a_model_with_collectives(tmp_path):
    refused(
        SAMPLES / "llama-gqa" / "tp2" / "model_00.onnx",
        tmp_path / "out",
        2,
        r"^the model already has collectives \(AllReduce '/model/layers.0/attn/o_proj/AllReduce'\)",
    )


def test_merged_decoder_is_sharded_in_both_branches(tmp_path):
    shard_model(SAMPLES / "merged-decoder" / "full" / "model.onnx", tmp_path / "tp2", 2)
    model = onnx.load(tmp_path / "tp2" / "model_00.onnx", load_external_data=False)
    (if_node,) = model.graph.node
    for branch in (a.g for a in if_node.attribute):
        assert [n.op_type for n in branch.node].count("AllReduce") == 4
        assert {attrs(n)["kv_num_heads"] for n in branch.node if n.op_type == "GroupQueryAttention"} == {1}
        assert [d.dim_value for d in branch.output[1].type.tensor_type.shape.dim][1] == 1
    dims = {
        vi.name: vi.type.tensor_type.shape.dim[1].dim_value for vi in model.graph.input if "past" in vi.name
    }
    assert set(dims.values()) == {1} and len(dims) == 4


def test_refuses_layers_inside_a_loop_body(tmp_path):
    h = onnx.helper
    body = h.make_graph(
        [
            h.make_node("MatMul", ["x_in", "w"], ["x_out"], name="body/MatMul"),
            h.make_node("Identity", ["cond_in"], ["cond_out"], name="body/cond"),
        ],
        "body",
        [
            h.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
            h.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
            h.make_tensor_value_info("x_in", onnx.TensorProto.FLOAT, [1, 4]),
        ],
        [
            h.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
            h.make_tensor_value_info("x_out", onnx.TensorProto.FLOAT, [1, 4]),
        ],
    )
    graph = h.make_graph(
        [h.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)],
        "g",
        [
            h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]),
            h.make_tensor_value_info("n", onnx.TensorProto.INT64, []),
        ],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")],
    )
    (tmp_path / "m").mkdir()
    onnx.save(h.make_model(graph), tmp_path / "m" / "model.onnx")
    refused(
        tmp_path / "m" / "model.onnx",
        tmp_path / "out",
        2,
        r"^unrecognised layer structure at node 'body/MatMul' in loop:body: layers inside Loop/Scan bodies "
        r"or nested subgraphs are not supported$",
    )


def test_refuses_out_inside_the_models_folder(tmp_path):
    src = tmp_path / "export"
    shutil.copytree(SAMPLES / "llama-gqa" / "full", src)
    refused(src / "model.onnx", src / "tp2", 2, r"^OUT .*/export/tp2 is inside MODEL's folder")
    refused(src, src, 2, r"is inside MODEL's folder")


def test_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    refused(
        SAMPLES / "llama-gqa" / "full" / "model.onnx",
        tmp_path / "out",
        2,
        r"exists and is not an empty folder",
    )
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_refuses_a_model_without_attention(tmp_path):
    from tests.builders import two_layer_mlp

    model = two_layer_mlp()
    model.graph.ClearField("node")
    model.graph.node.extend([onnx.helper.make_node("MatMul", ["x", "w0"], ["y"], name="mm")])
    (tmp_path / "m").mkdir()
    onnx.save(model, tmp_path / "m" / "m.onnx")
    refused(
        tmp_path / "m" / "m.onnx", tmp_path / "out", 2, r"^unrecognised layer structure: no attention found"
    )


def test_tp_below_two_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="--tp must be at least 2"):
        shard_model(SAMPLES / "llama-gqa" / "full" / "model.onnx", tmp_path / "out", 1)


# -- command line ------------------------------------------------------------------------------------


def test_cli_closing_line_and_exit_codes(tmp_path):
    runner = CliRunner()
    full = str(SAMPLES / "llama-gqa" / "full" / "model.onnx")
    ok = runner.invoke(app, ["shard", full, str(tmp_path / "tp2"), "--tp", "2"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith(
        "done: 2 rank models (10 column-parallel and 4 row-parallel linears, "
        "4 AllReduce per rank), 432.0 KiB of weights; wrote "
    )
    bad = runner.invoke(app, ["shard", full, str(tmp_path / "tp3"), "--tp", "3"])
    assert bad.exit_code == 1
    assert bad.output.strip() == (
        "error: --tp 3 does not divide the 4 attention heads of '/model/layers.0/attn/GroupQueryAttention'"
    )
    usage = runner.invoke(app, ["shard", full, str(tmp_path / "tp1"), "--tp", "1"])
    assert usage.exit_code == 2 and "--tp must be at least 2" in usage.output
    dims = runner.invoke(app, ["shard", full, str(tmp_path / "tpd"), "--tp", "2", "--dim", "x"])
    assert dims.exit_code == 2 and "--dim: expected NAME=N" in dims.output


def test_streams_a_sparse_llama3_8b_shaped_model_without_reading_its_holes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_big_model_for_shard", SAMPLES.parent / "bench" / "make_big_model.py"
    )
    big = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(big)
    single = Path(big.make_single_model(tmp_path / "single", "llama3-8b", 1, "float16"))
    result = shard_model(single.parent, tmp_path / "tp2", 2)
    embed, q, o = 128256 * 4096 * 2, 4096 * 4096 * 2, 4096 * 4096 * 2
    assert result.bytes_written > 2 * (2 * embed + (q + o) // 2)  # embedding and LM head on both ranks
    for r in (0, 1):
        data = tmp_path / "tp2" / f"model_0{r}.onnx.data"
        assert data.stat().st_size == result.bytes_written // 2
        assert data.stat().st_blocks * 512 < 1 << 20  # holes stay holes: nothing was read or written
    model = onnx.load(tmp_path / "tp2" / "model_01.onnx", load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    assert dims["model.layers.0.attn.q_proj.MatMul.weight"] == [4096, 2048]
    assert dims["model.layers.0.mlp.down_proj.MatMul.weight"] == [7168, 4096]


def _edited_sample(tmp_path: Path, edit) -> Path:
    """A copy of llama-gqa's single-device model with ``edit(model)`` applied to its graph."""
    folder = tmp_path / "edited"
    shutil.copytree(SAMPLES / "llama-gqa" / "full", folder)
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    edit(model.graph)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return folder / "model.onnx"


def test_refuses_attention_whose_output_reaches_no_projection(tmp_path):
    def weight_through_identity(graph):  # o_proj's weight computed at run time: not a linear layer any more
        (o_proj,) = [n for n in graph.node if n.name == "/model/layers.0/attn/o_proj/MatMul"]
        graph.node.insert(0, onnx.helper.make_node("Identity", [o_proj.input[1]], ["w_copy"], name="copy"))
        o_proj.input[1] = "w_copy"

    refused(
        _edited_sample(tmp_path, weight_through_identity),
        tmp_path / "out",
        2,
        r"^unrecognised layer structure at node '/model/layers.0/attn/GroupQueryAttention': "
        r"its output does not reach exactly one output projection \(found 0\)$",
    )


def test_refuses_a_head_sharded_tensor_read_outside_attention(tmp_path):
    def expose_q(graph):  # q_proj's output also becomes a graph output: it would hold half the heads
        (q,) = [n for n in graph.node if n.name == "/model/layers.1/attn/q_proj/MatMul"]
        graph.node.append(onnx.helper.make_node("Relu", [q.output[0]], ["q_debug"], name="debug/Relu"))
        graph.output.append(onnx.helper.make_tensor_value_info("q_debug", onnx.TensorProto.FLOAT, None))

    refused(
        _edited_sample(tmp_path, expose_q),
        tmp_path / "out",
        2,
        r"^unrecognised layer structure at node 'debug/Relu': it reads "
        r"'/model/layers.1/attn/q_proj/MatMul/output_0', which is split across ranks, "
        r"outside attention and MLP$",
    )


def test_refuses_a_folder_without_exactly_one_model(tmp_path):
    src = tmp_path / "export"
    shutil.copytree(SAMPLES / "llama-gqa" / "full", src)
    shutil.copy(src / "model.onnx", src / "other.onnx")
    refused(
        src,
        tmp_path / "out",
        2,
        r"export: the folder holds 2 \.onnx files; name the single-device model's "
        r"file$",
    )
    refused(tmp_path / "missing.onnx", tmp_path / "out", 2, r"missing\.onnx: no such file or directory$")


def test_refuses_an_unreadable_genai_config(tmp_path):
    src = tmp_path / "export"
    shutil.copytree(SAMPLES / "llama-gqa" / "full", src)
    (src / "genai_config.json").write_text("{not json")
    refused(src, tmp_path / "out", 2, r"genai_config\.json: not readable as JSON")


def test_refuses_matmulnbits_with_g_idx(tmp_path):
    def add_g_idx(graph):  # act-order int4: rows permuted by g_idx, not cut on whole blocks
        (down,) = [n for n in graph.node if n.name == "/model/layers.0/mlp/down_proj/MatMulNBits"]
        graph.initializer.append(numpy_helper.from_array(np.zeros(96, np.int32), "g_idx"))
        down.input.append("g_idx")

    folder = tmp_path / "edited"
    shutil.copytree(SAMPLES / "llama-int4" / "full", folder)
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    add_g_idx(model.graph)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    refused(
        folder / "model.onnx",
        tmp_path / "out",
        2,
        r"^unrecognised layer structure at node '/model/layers.0/mlp/down_proj/MatMulNBits': "
        r"MatMulNBits with g_idx$",
    )


def test_dim_binds_the_head_size_that_nothing_else_tells(tmp_path):
    full = decoder(tmp_path / "m" / "full", attention="plain", head_dim_name="head_dim")
    refused(
        full,
        tmp_path / "out",
        2,
        r"^unrecognised layer structure at node '/MatMul_\d+': cannot tell its head "
        r"size \(give the KV-cache's last dim with --dim NAME=N\)$",
    )
    shard_model(full, tmp_path / "out", 2, dims={"head_dim": 16})
    assert_twin(tmp_path / "out", full, dims={"head_dim": 16})


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    from preserve_onnx.shard import tensors

    calls = []

    def failing_write(self, t, value, **kwargs):
        calls.append(t.name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return original(self, t, value, **kwargs)

    original = tensors.DataWriter.write
    monkeypatch.setattr(tensors.DataWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        shard_model(SAMPLES / "llama-gqa" / "full" / "model.onnx", tmp_path / "out", 2)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the temporary folder beside it


def test_weights_held_inside_if_branches_are_cut_and_written(tmp_path):
    """onnx-graphsurgeon's export copies an outer weight used only in If branches into each branch."""
    folder = tmp_path / "merged"
    shutil.copytree(SAMPLES / "merged-decoder" / "full", folder)
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    moved = [
        t
        for t in model.graph.initializer
        if t.name.endswith(("q_proj.MatMul.weight", "o_proj.MatMul.weight"))
    ]
    for t in moved:
        model.graph.initializer.remove(t)
        for a in model.graph.node[0].attribute:
            a.g.initializer.append(t)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    shard_model(folder / "model.onnx", tmp_path / "tp2", 2)
    rank = onnx.load(tmp_path / "tp2" / "model_01.onnx", load_external_data=False)
    branch = rank.graph.node[0].attribute[0].g
    dims = {t.name: list(t.dims) for t in branch.initializer}
    assert dims["model.layers.0.attn.q_proj.MatMul.weight"] == [64, 32]
    assert dims["model.layers.1.attn.o_proj.MatMul.weight"] == [32, 64]
    assert_twin(tmp_path / "tp2", SAMPLES / "merged-decoder" / "full" / "model.onnx")


@pytest.mark.parametrize(
    "ranks", sorted(p.relative_to(SAMPLES).as_posix() for p in SAMPLES.glob("exporters/*/tp*"))
)
def test_committed_real_export_shards_are_reproduced_byte_for_byte(ranks, tmp_path):
    """sample_models/exporters/<name>/tpN were written by `shard`: the same input, the same bytes."""
    committed = SAMPLES / ranks
    shard_model(committed.parent / "full", tmp_path / "out", int(committed.name[2:]))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in committed.iterdir())
    for p in committed.iterdir():
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes(), p.name


def test_an_lm_head_followed_by_logit_soft_capping_is_vocab_parallel(tmp_path):
    full = decoder(tmp_path / "full", softcap=True)
    shard_model(full, tmp_path / "tp2", 2, vocab_parallel=True)
    graph = onnx.load(tmp_path / "tp2" / "model_00.onnx", load_external_data=False).graph
    order = [n.op_type for n in graph.node if n.op_type != "Constant"]
    assert order[-6:] == ["MatMul", "AllGather", "Div", "Tanh", "Mul", "Identity"]
    assert_twin(tmp_path / "tp2", full)


def test_refuses_a_kv_cache_that_reaches_its_concat_through_a_transpose(tmp_path):
    """The head axis of a KV-cache input is divided where [batch, heads, sequence, head_size] has it: a
    cache laid out [batch, sequence, heads, head_size] and transposed before its Concat is refused, not
    written with the wrong axis divided."""
    m = onnx.load(SAMPLES / "exporters" / "torch-llama-fp32" / "full" / "model.onnx")
    transposes = []
    for vi in m.graph.input:
        if vi.name.startswith("past_key_values.") and vi.name.endswith(".key"):
            dims = vi.type.tensor_type.shape.dim
            dims[1].dim_param, dims[2].dim_value = "past_sequence_length", 2  # [B, P, H, D]
            for node in m.graph.node:
                for i, name in enumerate(node.input):
                    if name == vi.name:
                        node.input[i] = f"{vi.name}_t"
            transposes.append(
                onnx.helper.make_node(
                    "Transpose", [vi.name], [f"{vi.name}_t"], perm=[0, 2, 1, 3], name=f"{vi.name}/Transpose"
                )
            )
    nodes = transposes + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    (tmp_path / "m").mkdir()
    onnx.save(m, tmp_path / "m" / "model.onnx")
    refused(
        tmp_path / "m" / "model.onnx",
        tmp_path / "out",
        2,
        r"^unrecognised layer structure at node '/model/model/layers.0/self_attn/Concat_5': KV-cache "
        r"input 'past_key_values.0.key' is not laid out \[batch, heads, sequence, head_size\] \(its Concat "
        r"grows axis 1 of it\)$",
    )
