"""``shard`` on the structures of 2026's decoders (docs/design.md §8, the (new) bullets): head size from
the attention op and the projections, per-head q/k norms, attention sinks, sliding-window attributes,
mixture-of-experts (MoE / QMoE, shared experts) and hybrid state layers. Each structure: the exact
rank tensors and graph, the rank models against the single model (``assert_twin``: logits and KV-cache
over 3 decode steps within the dtype's tolerance), and its refusals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.shard import shard_model
from tests.shard._models import E, H, decoder
from tests.shard.test_shard import assert_twin, attrs, refused, reshape_shapes


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(path)


def values(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in load(path).graph.initializer}


def cli_shard(full: Path, out: Path) -> str:
    """`preserve-onnx shard FULL OUT --tp 2`: its output (exit 0 asserted)."""
    ok = CliRunner().invoke(app, ["shard", str(full), str(out), "--tp", "2"])
    assert ok.exit_code == 0, ok.output
    return ok.output


def node_of(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


# -- head size and q/k norms -------------------------------------------------------------------------


def test_head_size_comes_from_the_projections_not_hidden_over_heads(tmp_path):
    """Gemma's shape: 4 heads of 32 at hidden 64 (q 128 wide), with the builder's per-head q/k norms
    (Reshape [0, -1, 32] -> SimplifiedLayerNormalization -> Reshape [0, -1, width]) between the
    projections and GroupQueryAttention: the norms replicated, the widths in their Reshapes divided."""
    full = decoder(tmp_path / "full", head_size=32, qk_norm="reshape")
    shard_model(full, tmp_path / "tp2", 2)
    rank = load(tmp_path / "tp2" / "model_01.onnx")
    assert reshape_shapes(rank)[:4] == [[0, -1, 32], [0, -1, 64], [0, -1, 32], [0, -1, 32]]
    assert reshape_shapes(load(full))[:4] == [[0, -1, 32], [0, -1, 128], [0, -1, 32], [0, -1, 64]]
    dims = {t.name: list(t.dims) for t in rank.graph.initializer}
    norms = [n.input[1] for n in node_of(rank, "SimplifiedLayerNormalization") if dims[n.input[1]] == [32]]
    assert len(norms) == 4  # q and k norm weights of both layers, whole on every rank
    assert all(np.array_equal(values(tmp_path / "tp2" / "model_01.onnx")[w], values(full)[w]) for w in norms)
    (gqa, _) = node_of(rank, "GroupQueryAttention")
    assert (attrs(gqa)["num_heads"], attrs(gqa)["kv_num_heads"]) == (2, 1)
    assert_twin(tmp_path / "tp2", full)


def test_dim_binds_the_head_size_of_grouped_query_attention(tmp_path):
    """The issue's case: a query whose width cannot be traced back and a symbolic KV-cache last dim.
    ``--dim kv_cache_dim=N`` is what tells the head size."""
    full = decoder(tmp_path / "m" / "full", opaque_query=True, head_dim_name="kv_cache_dim")
    refused(
        full,
        tmp_path / "out",
        2,
        r"^unrecognised layer structure at node '/GQA_\d+': cannot tell its head size \(give the "
        r"KV-cache's last dim with --dim NAME=N\)$",
    )
    shard_model(full, tmp_path / "out", 2, dims={"kv_cache_dim": 16})
    assert_twin(tmp_path / "out", full, dims={"kv_cache_dim": 16})


def test_a_head_size_that_contradicts_the_query_width_is_refused(tmp_path):
    full = decoder(tmp_path / "m" / "full", head_dim_name="kv_cache_dim")
    refused(
        full,
        tmp_path / "out",
        2,
        r"^unrecognised layer structure at node '/GQA_\d+': head size 32 \(from the last dim of KV-cache "
        r"input 'past_key_values.0.key'\) times its 4 heads is not the 64 columns of its query$",
        dims={"kv_cache_dim": 32},
    )


def test_q_k_norm_weights_fused_into_grouped_query_attention_tell_the_head_size(tmp_path):
    """GroupQueryAttention in[14]/in[15] ([head_size], what the builder writes for CUDA): replicated,
    and enough to find the head size of an opaque query. onnxruntime's CPU provider does not run these
    inputs, so this case is checked by structure and bytes only."""
    full = decoder(tmp_path / "full", qk_norm="fused", opaque_query=True, head_dim_name="kv_cache_dim")
    shard_model(full, tmp_path / "tp2", 2)
    source = values(full)
    for r in (0, 1):
        rank = load(tmp_path / "tp2" / f"model_0{r}.onnx")
        mine = values(tmp_path / "tp2" / f"model_0{r}.onnx")
        for gqa in node_of(rank, "GroupQueryAttention"):
            assert (attrs(gqa)["num_heads"], attrs(gqa)["kv_num_heads"]) == (2, 1)
            for name in gqa.input[14:16]:
                assert mine[name].shape == (16,) and np.array_equal(mine[name], source[name])


# -- attention sinks, windows, softcap ---------------------------------------------------------------


def test_attention_sinks_are_split_like_the_q_heads_and_window_attributes_kept(tmp_path):
    full = decoder(tmp_path / "full", sinks=True, window=4, softcap=True)
    shard_model(full, tmp_path / "tp2", 2)
    source = load(full)
    sinks = [n.input[11] for n in node_of(source, "GroupQueryAttention")]
    for r in (0, 1):
        rank = load(tmp_path / "tp2" / f"model_0{r}.onnx")
        mine = values(tmp_path / "tp2" / f"model_0{r}.onnx")
        for name in sinks:
            assert np.array_equal(mine[name], values(full)[name][2 * r : 2 * r + 2])
        for gqa in node_of(rank, "GroupQueryAttention"):
            assert attrs(gqa) == {
                "num_heads": 2,
                "kv_num_heads": 1,
                "do_rotary": 1,
                "softcap": 30.0,
                "local_window_size": 4,
            }
    assert_twin(tmp_path / "tp2", full)


def test_sinks_that_are_not_a_per_head_initializer_are_refused(tmp_path):
    full = decoder(tmp_path / "m" / "full", sinks=True)
    model = load(full)
    gqa = node_of(model, "GroupQueryAttention")[0]
    model.graph.node.insert(
        0, onnx.helper.make_node("Identity", [gqa.input[11]], ["sinks_copy"], name="copy")
    )
    gqa.input[11] = "sinks_copy"
    onnx.save(model, full, save_as_external_data=True, location="model.onnx.data")
    refused(
        full,
        tmp_path / "out",
        2,
        r"^unrecognised layer structure at node '/GQA_\d+': its per-head input 11 \('sinks_copy'\) is not an "
        r"initializer of its 4 heads$",
    )


@pytest.mark.parametrize(("dims", "refused_"), [((), False), ((1,), False), ((2, 16), True)])
def test_a_quantized_kv_cache_keeps_per_tensor_scales_and_refuses_per_channel_ones(dims, refused_, tmp_path):
    """GroupQueryAttention in[12]/in[13] (k_scale, v_scale): a per-tensor scale is the same on every rank;
    a per-channel one would have to follow the KV heads and is refused (structure only: onnxruntime's CPU
    provider has no quantized KV-cache)."""
    full = decoder(tmp_path / "m" / "full")
    model = load(full)
    for gqa in node_of(model, "GroupQueryAttention"):
        gqa.input.extend([""] * (12 - len(gqa.input)) + ["k_scale", "v_scale"])  # in[12], in[13]
    model.graph.initializer.extend(
        numpy_helper.from_array(np.ones(dims, np.float32), name) for name in ("k_scale", "v_scale")
    )
    onnx.save(model, full, save_as_external_data=True, location="model.onnx.data")
    if refused_:
        refused(
            full,
            tmp_path / "out",
            2,
            r"^unrecognised layer structure at node '/GQA_\d+': its KV-cache quantization scale input 12 "
            r"\('k_scale'\) is not one per-tensor value \(a per-channel scale is not split\)$",
        )
    else:
        shard_model(full, tmp_path / "out", 2)
        assert values(tmp_path / "out" / "model_01.onnx")["k_scale"].shape == dims


# -- mixture-of-experts ------------------------------------------------------------------------------


def _moe_nodes(path: Path) -> list[onnx.NodeProto]:
    return [n for n in load(path).graph.node if n.op_type in ("MoE", "QMoE")]


def test_moe_splits_every_expert_on_its_intermediate_axis(tmp_path):
    """fp32 MoE, SwiGLU with interleaved gate/value rows: rank r takes rows [32r, 32r + 32) of fc1
    (16 whole pairs) and of its bias, columns [16r, 16r + 16) of fc2; fc2's bias stays on rank 0, zeros
    elsewhere; every rank keeps all 4 experts and the router."""
    full = decoder(tmp_path / "full", moe="moe")
    shard_model(full, tmp_path / "tp2", 2)
    source = values(full)
    (moe, _) = _moe_nodes(full)
    fc1, b1, fc2, b2 = moe.input[2:6]
    routers = [name for name, v in source.items() if v.shape == (H, E)]
    assert len(routers) == 2
    for r in (0, 1):
        mine = values(tmp_path / "tp2" / f"model_0{r}.onnx")
        assert np.array_equal(mine[fc1], source[fc1][:, 32 * r : 32 * r + 32])
        assert np.array_equal(mine[b1], source[b1][:, 32 * r : 32 * r + 32])
        assert np.array_equal(mine[fc2], source[fc2][:, :, 16 * r : 16 * r + 16])
        assert np.array_equal(mine[b2], source[b2] if r == 0 else np.zeros_like(source[b2]))
        assert all(np.array_equal(mine[name], source[name]) for name in routers)
    assert_twin(tmp_path / "tp2", full)


def test_an_allreduce_follows_each_moe_before_the_residual_add(tmp_path):
    full = decoder(tmp_path / "full", moe="moe")
    shard_model(full, tmp_path / "tp2", 2)
    order = list(load(tmp_path / "tp2" / "model_00.onnx").graph.node)
    moe = [i for i, n in enumerate(order) if n.op_type == "MoE"]
    assert len(moe) == 2
    for i in moe:
        reduce = order[i + 1]
        assert (reduce.op_type, reduce.domain, list(reduce.input)) == (
            "AllReduce",
            "com.microsoft",
            [order[i].output[0]],
        )
        assert attrs(order[i]) == {
            "k": 2,
            "activation_type": b"swiglu",
            "swiglu_fusion": 1,
            "normalize_routing_weights": 1,
        }
    assert [n.op_type for n in order].count("AllReduce") == 4  # o_proj and the MoE of 2 layers


@pytest.mark.parametrize(
    ("moe", "attention", "tp"),
    [
        ("moe", "mha", 4),
        ("moe-routed", "gqa", 2),
        ("qmoe", "gqa", 2),
        ("qmoe-zp", "gqa", 2),
        ("qmoe-block", "gqa", 2),
        ("qmoe-block-zp", "mha", 4),
    ],
)
def test_moe_and_qmoe_ranks_match_the_single_model(moe, attention, tp, tmp_path):
    """Intermediate 64: 16 per rank at 4 ranks, one block of 16 (MultiHeadAttention's 4 KV heads allow
    4 ranks). ``moe-routed``: the router's top-k is chosen in the graph (Sigmoid, TopK, ScatterElements
    into router_probs, as the builder writes LFM2-MoE): the router linear is still found and replicated."""
    full = decoder(tmp_path / "full", moe=moe, attention=attention, experts_inter=64)
    shard_model(full, tmp_path / "out", tp)
    assert_twin(tmp_path / "out", full)


def test_qmoe_block_scales_and_4_bit_zero_points_are_cut_on_whole_blocks(tmp_path):
    """Intermediate 64 in blocks of 16: fc2's 4 K blocks, 2 per rank; its zero points hold 2 blocks per
    byte, so rank r's are byte r of each row; fc1's per-row scales and zero points follow its rows."""
    full = decoder(tmp_path / "full", moe="qmoe-block-zp", experts_inter=64)
    shard_model(full, tmp_path / "tp2", 2)
    source = values(full)
    (qmoe, _) = _moe_nodes(full)
    w1, s1, _, w2, s2, _, _, _, _, z1, z2 = qmoe.input[2:13]
    assert source[w2].shape == (E, H, 32) and source[s2].shape == (E, H, 4) and source[z2].shape == (E, H, 2)
    for r in (0, 1):
        mine = values(tmp_path / "tp2" / f"model_0{r}.onnx")
        assert np.array_equal(mine[w1], source[w1][:, 64 * r : 64 * r + 64])
        assert np.array_equal(mine[s1], source[s1][:, 64 * r : 64 * r + 64])
        assert np.array_equal(mine[z1], source[z1][:, 64 * r : 64 * r + 64])
        assert np.array_equal(mine[w2], source[w2][:, :, 16 * r : 16 * r + 16])
        assert np.array_equal(mine[s2], source[s2][:, :, 2 * r : 2 * r + 2])
        assert np.array_equal(mine[z2], source[z2][:, :, r : r + 1])
    assert_twin(tmp_path / "tp2", full)


def test_qmoe_odd_blocks_per_rank_repack_the_zero_points(tmp_path):
    """4 ranks' worth of blocks at 2 ranks is not needed: 2 blocks of 16 (intermediate 32) give 1 block
    per rank, so each rank's zero points are one nibble of the source byte, packed alone."""
    full = decoder(tmp_path / "full", moe="qmoe-block-zp", experts_inter=32)
    shard_model(full, tmp_path / "tp2", 2)
    (qmoe, _) = _moe_nodes(full)
    z2 = qmoe.input[12]
    source = values(full)[z2]
    for r in (0, 1):
        mine = values(tmp_path / "tp2" / f"model_0{r}.onnx")[z2]
        assert mine.shape == (E, H, 1)
        assert np.array_equal(mine, (source >> 4) if r else (source & 0x0F))
    assert_twin(tmp_path / "tp2", full)


@pytest.mark.parametrize("combine", [True, "gatedadd"], ids=["mul-add", "gatedadd"])
def test_a_shared_expert_is_split_like_a_dense_mlp_and_its_gate_replicated(combine, tmp_path):
    """Qwen-MoE: experts + sigmoid(h W_g) * shared(h). The shared expert's down projection gets its own
    AllReduce (each partial sum completed before the gate multiplies it: the same rounding steps as
    the single model), the gate's [64, 1] weight stays whole. The experts and the shared expert are
    combined by Mul + Add, or by the builder's ``GatedAdd(experts, shared, gate)``."""
    full = decoder(tmp_path / "full", moe="qmoe-block-zp", experts_inter=64, shared_expert=combine)
    shard_model(full, tmp_path / "tp2", 2)
    rank = load(tmp_path / "tp2" / "model_01.onnx")
    dims = {t.name: list(t.dims) for t in rank.graph.initializer}
    assert (
        sorted(dims[n.input[1]] for n in node_of(rank, "MatMul") if dims[n.input[1]][1] == 1) == [[64, 1]] * 2
    )
    assert [n.op_type for n in rank.graph.node].count("AllReduce") == 6  # o_proj, QMoE, shared down x 2
    assert_twin(tmp_path / "tp2", full)


def test_swiglu_fusion_2_cuts_the_gate_and_value_blocks_each(tmp_path):
    """[gate | value] rows (swiglu_fusion 2; onnxruntime's CPU kernel runs only 1, so bytes only): rank r
    takes rows [16r, 16r + 16) of the gate block and [32 + 16r, 32 + 16r + 16) of the value block."""
    full = _edit_moe(
        tmp_path,
        "moe",
        lambda n, m: next(a for a in n.attribute if a.name == "swiglu_fusion").__setattr__("i", 2),
    )
    shard_model(full, tmp_path / "tp2", 2)
    (moe, _) = _moe_nodes(full)
    source = values(full)
    for r in (0, 1):
        mine = values(tmp_path / "tp2" / f"model_0{r}.onnx")
        for name in moe.input[2:4]:
            rows = np.concatenate(
                [source[name][:, 16 * r : 16 * r + 16], source[name][:, 32 + 16 * r : 48 + 16 * r]], axis=1
            )
            assert np.array_equal(mine[name], rows)


def test_fc3_experts_are_cut_on_their_intermediate_rows_like_fc1(tmp_path):
    """Phi-3.5-MoE's layout (gate in fc1, value in fc3, swiglu_fusion 0; onnxruntime's CPU MoE has no
    fc3, so bytes only): fc1, fc3 and their biases take rows [16r, 16r + 16), fc2 columns too."""
    full = decoder(tmp_path / "full", moe="moe-fc3")
    shard_model(full, tmp_path / "tp2", 2)
    (moe, _) = _moe_nodes(full)
    fc1, b1, fc2, b2, fc3, b3 = moe.input[2:8]
    source = values(full)
    for r in (0, 1):
        mine = values(tmp_path / "tp2" / f"model_0{r}.onnx")
        for name in (fc1, b1, fc3, b3):
            assert np.array_equal(mine[name], source[name][:, 16 * r : 16 * r + 16]), name
        assert np.array_equal(mine[fc2], source[fc2][:, :, 16 * r : 16 * r + 16])
        assert np.array_equal(mine[b2], source[b2] if r == 0 else np.zeros_like(source[b2]))


def test_cli_counts_the_moe_layers_and_their_allreduces(tmp_path):
    assert cli_shard(decoder(tmp_path / "full", moe="moe"), tmp_path / "tp2").startswith(
        "done: 2 rank models (6 column-parallel and 2 row-parallel linears, 2 mixture-of-experts layers, "
        "4 AllReduce per rank), "
    )


def test_refuses_an_intermediate_that_tp_does_not_divide(tmp_path):
    full = decoder(tmp_path / "m" / "full", moe="moe", experts_inter=31)
    refused(
        full,
        tmp_path / "out",
        2,
        r"^--tp 2 does not divide the 31 expert intermediate columns of '/MoE_\d+'$",
    )


def test_refuses_a_qmoe_whose_rank_share_is_not_whole_blocks(tmp_path):
    full = decoder(tmp_path / "m" / "full", moe="qmoe-block", experts_inter=48)
    refused(
        full,
        tmp_path / "out",
        2,
        r"^--tp 2 does not divide the 3 K blocks \(block_size 16\) of the experts' fc2 of '/QMoE_\d+'$",
    )


def _edit_moe(tmp_path: Path, moe: str, edit) -> Path:
    full = decoder(tmp_path / "m" / "full", moe=moe)
    model = load(full)
    edit(_first(model, ("MoE", "QMoE")), model)
    onnx.save(model, full, save_as_external_data=True, location="model.onnx.data")
    return full


def _first(model: onnx.ModelProto, ops) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type in ops)


@pytest.mark.parametrize(
    ("moe", "edit", "message"),
    [
        (
            "qmoe",
            lambda n, m: n.attribute.append(onnx.helper.make_attribute("quant_type", "fp4")),
            r"QMoE quant_type 'fp4' is not split \(integer quantization only\)",
        ),
        (
            "qmoe",
            lambda n, m: n.attribute.append(onnx.helper.make_attribute("weights_prepacked", 1)),
            r"QMoE weights_prepacked: an execution provider's own layout cannot be split",
        ),
        (
            "moe",
            lambda n, m: next(a for a in n.attribute if a.name == "swiglu_fusion").__setattr__("i", 0),
            (
                r"fc1's 64 rows are neither its 32 intermediate columns nor a fused pair of them "
                r"\(swiglu_fusion 0\)"
            ),
        ),
        (
            "moe",
            lambda n, m: (
                m.graph.node.insert(
                    0, onnx.helper.make_node("Identity", [n.input[4]], ["fc2_copy"], name="copy")
                ),
                n.input.__setitem__(4, "fc2_copy"),
            ),
            r"its input 4 \('fc2_copy'\) is not an initializer",
        ),
    ],
    ids=["fp4", "prepacked", "fusion", "computed-weight"],
)
def test_refuses_moe_layouts_it_cannot_split(moe, edit, message, tmp_path):
    full = _edit_moe(tmp_path, moe, edit)
    refused(full, tmp_path / "out", 2, rf"^unrecognised layer structure at node '/(Q?MoE)_\d+': {message}$")


# -- hybrid layers -----------------------------------------------------------------------------------


def test_a_state_layer_between_its_own_projections_is_computed_whole_on_every_rank(tmp_path):
    """Gated DeltaNet's shape: in-projection -> CausalConvWithState (conv state in and out) ->
    out-projection, added to the residual stream. Its state cannot be split by heads; replicating the
    layer is exact (same input on every rank, same output): weights and state whole, no AllReduce."""
    full = decoder(tmp_path / "full", state_layer="enclosed")
    assert cli_shard(full, tmp_path / "tp2").startswith(
        "done: 2 rank models (10 column-parallel and 4 row-parallel linears, 2 state layers computed whole "
        "on every rank, 4 AllReduce per rank), "
    )
    rank = load(tmp_path / "tp2" / "model_01.onnx")
    (conv, _) = node_of(rank, "CausalConvWithState")
    source = values(full)
    mine = values(tmp_path / "tp2" / "model_01.onnx")
    made = {o: n for n in rank.graph.node for o in n.output}
    read = {i: n for n in rank.graph.node for i in n.input}
    in_proj = made[made[conv.input[0]].input[0]]  # MatMul -> Transpose -> the op
    out_proj = read[read[conv.output[0]].output[0]]  # the op -> Transpose -> MatMul
    projections = [in_proj, out_proj]
    assert [n.op_type for n in projections] == ["MatMul", "MatMul"]
    assert all(mine[n.input[1]].shape == (H, H) for n in projections)
    assert all(np.array_equal(mine[n.input[1]], source[n.input[1]]) for n in projections)
    state = {
        vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
        for vi in rank.graph.input
    }
    assert state["past_conv.0"] == ["batch_size", H, 3]
    assert [n.op_type for n in rank.graph.node].count("AllReduce") == 4  # o_proj and down_proj only
    assert_twin(tmp_path / "tp2", full)


def test_refuses_a_state_layer_without_projections_of_its_own(tmp_path):
    full = decoder(tmp_path / "m" / "full", state_layer="bare")
    refused(
        full,
        tmp_path / "out",
        2,
        r"^cannot shard the layer at node '/CausalConvWithState_\d+' \(CausalConvWithState\): it carries "
        r"state from graph input 'past_conv.0' to graph output 'present_conv.0' \(a recurrent, SSM or "
        r"convolution state\), and no projections of its own enclose it to compute it whole on every rank$",
    )
