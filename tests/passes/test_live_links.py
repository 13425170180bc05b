"""Live ranges and expert banks in the plan (docs/design.md §4.7-4.8): GroupQueryAttention KV links carry
L = the node's seqlens_k, seq_axis and window and count live bytes; --static-kv keeps two inputs; an
L computed after the collective falls back with a note; expert banks carry min_tokens and wait behind
the rest of the window while a step reads less than half of them; the reference runtime hints exactly
the live bytes computed here by hand.

The GroupQueryAttention graphs: batch B, query 2 heads and 1 KV head of 16 floats, so a KV position of
one (batch, head) block is 16 x 4 = 64 bytes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.errors import PreserveError
from preserve_onnx.hardware import load_profile
from preserve_onnx.optimizer import optimize, strip
from preserve_onnx.passes import VerifyPrefetchesPass, plan_prefetches
from preserve_onnx.passes._live import KvLayout, expert_min_tokens, expert_share, live_positions
from tests.builders import MS, G

HEAD, HEADS, KV_HEADS = 16, 2, 1
POSITION = HEAD * 4  # bytes of one position of one (batch, head) block


def gqa_model(
    *, window=-1, window_cache=None, seqlens_after=False, past="past", static_dims=None
) -> onnx.ModelProto:
    """x -> MatMul(w0) -> AllReduce -> MatMul(wqkv) -> GroupQueryAttention(past k/v, seqlens_k) -> MatMul(wo).

    seqlens_k = Cast(ReduceSum(mask) - 1) is made before the collective (after it with ``seqlens_after``).
    """
    g = G()
    hidden = HEADS * HEAD
    g.input("x", ["batch", 1, hidden])
    g.input("attention_mask", ["batch", "total"], TensorProto.INT64)
    past_shape = ["batch", KV_HEADS, past, HEAD] if static_dims is None else static_dims
    g.input("past_key", past_shape)
    g.input("past_value", past_shape)
    g.inits += [
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]

    def lengths():
        g.node("ReduceSum", ["attention_mask", "axes"], ["mask_sum"], name="sum", keepdims=0)
        g.node("Sub", ["mask_sum", "one"], ["mask_sub"], name="sub")
        g.node("Cast", ["mask_sub"], ["seqlens_k"], name="cast", to=TensorProto.INT32)
        g.node("Shape", ["attention_mask"], ["mask_shape"], name="shape")
        g.node("Gather", ["mask_shape", "one"], ["total64"], name="gather", axis=0)
        g.node("Cast", ["total64"], ["total_len"], name="cast_total", to=TensorProto.INT32)

    if not seqlens_after:
        lengths()
    g.node("MatMul", ["x", g.weight("w0", (hidden, hidden))], ["mm0"], name="mm0")
    g.allreduce("mm0", "ar", name="ar")
    if seqlens_after:
        lengths()
    g.node("MatMul", ["ar", g.weight("wqkv", (hidden, hidden + 2 * KV_HEADS * HEAD))], ["qkv"], name="qkv")
    attrs = {"num_heads": HEADS, "kv_num_heads": KV_HEADS, "local_window_size": window}
    if window_cache is not None:
        attrs["sliding_window_cache"] = window_cache
    g.node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_len"],
        ["attn", "present_key", "present_value"],
        name="gqa",
        domain=MS,
        **attrs,
    )
    g.node("MatMul", ["attn", g.weight("wo", (hidden, hidden))], ["y"], name="wo")
    g.output("y", ["batch", 1, hidden])
    g.output("present_key", ["batch", KV_HEADS, "total", HEAD])
    g.output("present_value", ["batch", KV_HEADS, "total", HEAD])
    return g.model()


def kv_links(plan):
    return {p.tensor: p for w in plan.windows for p in w.prefetches if p.kind == "kv_cache"}


def kv_candidates(plan):
    return {c.tensor: c for w in plan.windows for c in w.candidates if c.kind == "kv_cache"}


# -- the plan ---------------------------------------------------------------------------------------


def test_gqa_kv_links_carry_seqlens_k_and_count_live_bytes():
    plan = plan_prefetches(gqa_model(), OptimizeConfig(batch=2, context=100, budget=1 << 20))
    links = kv_links(plan)
    assert set(links) == {"past_key", "past_value"}
    for p in links.values():
        assert (p.lengths, p.seq_axis, p.window, p.min_tokens) == ("seqlens_k", 2, 0, 0)
        assert (p.offset, p.max_size, p.nbytes) == (0, 0, 2 * 100 * POSITION)


def test_a_sliding_window_layer_on_a_full_length_buffer_gets_its_window_and_min_context_w_bytes():
    plan = plan_prefetches(gqa_model(window=32), OptimizeConfig(batch=2, context=100, budget=1 << 20))
    for p in kv_links(plan).values():
        assert (p.lengths, p.seq_axis, p.window) == ("seqlens_k", 2, 32)
        assert p.nbytes == 2 * 32 * POSITION  # min(context, W) positions of each of the 2 blocks
    # Below the window every position is live.
    plan = plan_prefetches(gqa_model(window=32), OptimizeConfig(batch=2, context=20, budget=1 << 20))
    assert {p.nbytes for p in kv_links(plan).values()} == {2 * 20 * POSITION}


def test_a_window_cache_node_gets_window_0_and_its_buffer_capacity():
    # gpt-oss's builder export: a window-sized, cache-relative buffer (here fixed at 32 positions).
    model = gqa_model(window=32, window_cache=1, static_dims=["batch", KV_HEADS, 32, HEAD])
    plan = plan_prefetches(model, OptimizeConfig(batch=2, context=100, budget=1 << 20))
    for p in kv_links(plan).values():
        assert (p.lengths, p.seq_axis, p.window, p.nbytes) == ("seqlens_k", 2, 0, 2 * 32 * POSITION)
    # Its buffer holds fewer tokens than its capacity early on: the live bytes follow --context.
    plan = plan_prefetches(model, OptimizeConfig(batch=2, context=10, budget=1 << 20))
    assert {p.nbytes for p in kv_links(plan).values()} == {2 * 10 * POSITION}
    # A capacity the graph leaves symbolic (the builder's past_sliding_length) is the window, unless --dim
    # says otherwise.
    model = gqa_model(window=32, window_cache=1, past="past_sliding_length")
    plan = plan_prefetches(model, OptimizeConfig(batch=2, context=100, budget=1 << 20))
    assert {(p.window, p.nbytes) for p in kv_links(plan).values()} == {(0, 2 * 32 * POSITION)}
    static = plan_prefetches(model, OptimizeConfig(batch=2, context=100, budget=1 << 20, static_kv=True))
    assert {(p.lengths, p.nbytes) for p in kv_links(static).values()} == {("", 2 * 32 * POSITION)}
    plan = plan_prefetches(
        model, OptimizeConfig(batch=2, context=100, budget=1 << 20, dims={"past_sliding_length": 64})
    )
    assert {p.nbytes for p in kv_links(plan).values()} == {2 * 64 * POSITION}


def test_a_dim_bound_buffer_longer_than_the_context_counts_only_the_live_positions():
    # A shared max_length buffer of 1024 positions, 100 of them holding tokens.
    plan = plan_prefetches(
        gqa_model(), OptimizeConfig(batch=2, context=100, dims={"past": 1024}, budget=1 << 20)
    )
    assert {p.nbytes for p in kv_links(plan).values()} == {2 * 100 * POSITION}
    static = plan_prefetches(
        gqa_model(), OptimizeConfig(batch=2, context=100, dims={"past": 1024}, budget=1 << 20, static_kv=True)
    )
    assert {p.nbytes for p in kv_links(static).values()} == {2 * 1024 * POSITION}


def test_static_kv_keeps_the_two_input_form():
    plan = plan_prefetches(
        gqa_model(window=32), OptimizeConfig(batch=2, context=100, budget=1 << 20, static_kv=True)
    )
    for p in kv_links(plan).values():
        assert (p.lengths, p.seq_axis, p.window, p.nbytes) == ("", None, 0, 2 * 100 * POSITION)
    out, _ = optimize(
        gqa_model(window=32), OptimizeConfig(batch=2, context=100, budget=1 << 20, static_kv=True)
    )
    assert {len(n.input) for n in out.graph.node if n.op_type == "Prefetch"} == {2}


def test_seqlens_k_made_after_the_collective_falls_back_to_two_inputs_with_a_note():
    plan = plan_prefetches(
        gqa_model(seqlens_after=True), OptimizeConfig(batch=2, context=100, budget=1 << 20)
    )
    for c in kv_candidates(plan).values():
        assert (c.lengths, c.nbytes) == ("", 2 * 100 * POSITION)
        assert c.note == (
            "two-input form: seqlens_k 'seqlens_k' is made by cast (node 4), after the collective ar: "
            "the Prefetch would read it before it exists"
        )


def test_split_and_cut_links_count_offsets_in_live_bytes():
    # Budget: the qkv weight (8 KiB), then 2.5 KiB of past_key's 4 KiB of live bytes (W = 32 positions of
    # 2 blocks); a 1 KiB chunk limit splits them.
    hw = dataclasses.replace(load_profile("ascend-910b"), max_prefetch_bytes=1024)
    cfg = OptimizeConfig(batch=2, context=100, hardware=hw, budget=32 * 64 * 4 + 2560, min_chunk=1)
    plan = plan_prefetches(gqa_model(window=32), cfg)
    (window,) = plan.windows
    kv = [p for p in window.prefetches if p.tensor == "past_key"]
    assert [(p.offset, p.max_size, p.nbytes, p.lengths, p.window) for p in kv] == [
        (0, 1024, 1024, "seqlens_k", 32),
        (1024, 1024, 1024, "seqlens_k", 32),
        (2048, 512, 512, "seqlens_k", 32),
    ]
    assert [p.tensor for p in window.prefetches].count("wqkv") == 8


def test_the_inserted_node_wires_l_and_the_attributes():
    out, _ = optimize(gqa_model(window=32), OptimizeConfig(batch=2, context=100, budget=1 << 20))
    nodes = {n.input[1]: n for n in out.graph.node if n.op_type == "Prefetch"}
    for name in ("past_key", "past_value"):
        node = nodes[name]
        assert list(node.input)[1:] == [name, "seqlens_k"]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["seq_axis"], attrs["window"], attrs["max_size"], attrs["offset"]) == (2, 32, 0, 0)
        assert "min_tokens" not in attrs
    assert all(len(n.input) == 2 for x, n in nodes.items() if x not in ("past_key", "past_value"))


# -- expert banks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, experts, want",
    [(4, 32, 6), (8, 256, 22), (4, 128, 22), (8, 128, 11), (1, 2, 1), (2, 4, 1), (1, 1, 1)],
)
def test_min_tokens_is_the_smallest_t_with_half_the_bank_read(k, experts, want):
    assert expert_min_tokens(k, experts) == want
    assert expert_share(k, experts, want) >= 0.5
    assert want == 1 or expert_share(k, experts, want - 1) < 0.5


def test_expert_share_by_hand():
    assert expert_share(4, 32, 1) == 4 / 32
    assert expert_share(4, 32, 2) == 1 - (28 / 32) ** 2
    assert (
        expert_share(4, 128, 8) == 1 - (124 / 128) ** 8 == pytest.approx(0.2243, abs=1e-4)
    )  # "about a fifth"


def moe_model(experts=32, k=4) -> onnx.ModelProto:
    """x -> AllReduce -> MoE(router logits from a gate MatMul; fc1/fc2 banks) -> MatMul(shared)."""
    g = G()
    hidden, inner = 16, 32
    g.input("x", ["batch", hidden])
    g.allreduce("x", "ar", name="ar")
    g.node("MatMul", ["ar", g.weight("gate", (hidden, experts))], ["logits"], name="gate")
    g.node(
        "MoE",
        [
            "ar",
            "logits",
            g.weight("fc1", (experts, inner, hidden)),
            "",
            g.weight("fc2", (experts, hidden, inner)),
        ],
        ["moe"],
        name="moe",
        domain=MS,
        k=k,
        activation_type="relu",
    )
    g.node("MatMul", ["moe", g.weight("shared", (hidden, hidden))], ["y"], name="shared")
    g.output("y", ["batch", hidden])
    return g.model()


def test_banks_read_less_than_half_wait_behind_the_rest_of_the_window():
    # batch 2, top-4 of 32: f(2) = 0.234 < 0.5: gate, shared first, then fc1, fc2; min_tokens 6 on the banks.
    plan = plan_prefetches(moe_model(), OptimizeConfig(batch=2, budget=1 << 20))
    (window,) = plan.windows
    assert [(c.tensor, c.min_tokens) for c in window.candidates] == [
        ("gate", 0),
        ("shared", 0),
        ("fc1", 6),
        ("fc2", 6),
    ]
    assert [c.read_share for c in window.candidates] == [
        1.0,
        1.0,
        expert_share(4, 32, 2),
        expert_share(4, 32, 2),
    ]
    assert [(p.tensor, p.min_tokens) for p in window.prefetches] == [
        ("gate", 0),
        ("shared", 0),
        ("fc1", 6),
        ("fc2", 6),
    ]


def test_banks_read_at_least_half_stay_in_first_use_order():
    plan = plan_prefetches(moe_model(), OptimizeConfig(batch=6, budget=1 << 20))
    (window,) = plan.windows
    assert [(c.tensor, c.min_tokens) for c in window.candidates] == [
        ("gate", 0),
        ("fc1", 6),
        ("fc2", 6),
        ("shared", 0),
    ]


def test_a_tight_budget_goes_to_the_router_and_the_shared_expert_first():
    budget = (16 * 32 + 16 * 16) * 4  # gate + shared
    plan = plan_prefetches(moe_model(), OptimizeConfig(batch=2, budget=budget))
    assert [p.tensor for p in plan.windows[0].prefetches] == ["gate", "shared"]


def test_bank_links_carry_min_tokens():
    out, _ = optimize(moe_model(), OptimizeConfig(batch=2, budget=1 << 20))
    got = {
        n.input[1]: {a.name: a.i for a in n.attribute if a.name == "min_tokens"}
        for n in out.graph.node
        if n.op_type == "Prefetch"
    }
    assert got == {"gate": {}, "shared": {}, "fc1": {"min_tokens": 6}, "fc2": {"min_tokens": 6}}


# -- live bytes of a raw range (what a static link fetches that a step reads) -----------------------


def test_live_in_raw_by_hand():
    # The numbers: max_length 16k, head size 128, fp16, 2k live tokens: a (batch, head) block is
    # 4 MiB, 0.5 MiB of it live; a 64 MiB static link covers sixteen blocks, 8 MiB of them live.
    start, end = live_positions(16384, 2048, 0)
    layout = KvLayout(blocks=64, length=16384, position_bytes=128 * 2, start=start, end=end)
    assert 16384 * 256 == 4 << 20 and layout.live_in_raw(0, 64 << 20) == 16 * (512 << 10)
    # A window: the last 512 of 2048 live positions.
    start, end = live_positions(16384, 2048, 512)
    windowed = KvLayout(blocks=64, length=16384, position_bytes=256, start=start, end=end)
    assert (start, end) == (1536, 2048)
    assert windowed.live_in_raw(0, 1536 * 256) == 0 and windowed.live_in_raw(0, 4 << 20) == 512 * 256
    # Across a block boundary: the last 100 live bytes of block 0 and the first 50 of block 1.
    assert layout.live_in_raw((512 << 10) - 100, (4 << 20) - (512 << 10) + 150) == 150


# -- the reference runtime hints exactly the live bytes ---------------------------------------------


@pytest.mark.parametrize("window, live_positions_per_block", [(-1, (5, 10)), (4, (4, 4)), (8, (5, 8))])
def test_the_runtime_hints_the_live_bytes_computed_by_hand(window, live_positions_per_block):
    """Batch 2 with 10 past positions; sequence 0 holds 5 valid ones (seqlens_k 5), sequence 1 all 10.
    The hinted bytes: both weights whole, then per KV link the live positions of the 2 blocks x 64 bytes."""
    from preserve_onnx.runtime import RankSession
    from preserve_onnx.runtime.library import prefetch_counters, recording_prefetch_ranges

    model = gqa_model(window=window)
    out, plan = optimize(model, OptimizeConfig(batch=2, context=10, budget=1 << 20))
    assert [p.tensor for p in plan.windows[0].prefetches] == ["wqkv", "past_key", "past_value", "wo"]
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((2, 1, HEADS * HEAD)).astype(np.float32),
        "attention_mask": np.array([[1] * 6 + [0] * 5, [1] * 11], np.int64),
        "past_key": rng.standard_normal((2, KV_HEADS, 10, HEAD)).astype(np.float32),
        "past_value": rng.standard_normal((2, KV_HEADS, 10, HEAD)).astype(np.float32),
    }
    original = RankSession(model).run(feeds)[0]
    session = RankSession(out)
    before = prefetch_counters()
    with recording_prefetch_ranges() as ranges:
        optimized = session.run(feeds)[0]
    counters = prefetch_counters() - before
    assert all(optimized[k].tobytes() == original[k].tobytes() for k in original)
    weights = (32 * 64 + 32 * 32) * 4
    live = sum(live_positions_per_block) * POSITION
    assert (counters.issued, counters.skipped_above, counters.skipped_below) == (4, 0, 0)
    assert counters.bytes == weights + 2 * live
    # In chain order: wqkv whole, past_key, past_value (block b spans X's bytes [640 b, 640 (b + 1)); its
    # live positions end at L_b = 5, 10), wo whole.
    first, second = live_positions_per_block
    kv = [((5 - first) * POSITION, 5 * POSITION), (640 + (10 - second) * POSITION, 1280)]
    assert ranges == [(0, 32 * 64 * 4), *kv, *kv, (0, 32 * 32 * 4)]


# -- verify and strip know L ------------------------------------------------------------------------


def _optimized_gqa(**kw):
    model = gqa_model(**kw)
    out, _ = optimize(model, OptimizeConfig(batch=2, context=100, budget=1 << 20))
    return model, out


def _kv_node(out):
    return next(n for n in out.graph.node if n.op_type == "Prefetch" and len(n.input) == 3)


def _set(node, name, value):
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + ([helper.make_attribute(name, value)] if value is not None else []))


def test_verify_passes_links_with_l():
    model, out = _optimized_gqa(window=32)
    assert VerifyPrefetchesPass(model)(out).stats.prefetches == 4


def test_verify_refuses_an_l_that_is_not_an_int_tensor():
    model, out = _optimized_gqa()
    _kv_node(out).input[2] = "mask_sum_f"
    out.graph.node.insert(
        3, helper.make_node("Cast", ["mask_sum"], ["mask_sum_f"], name="to_float", to=TensorProto.FLOAT)
    )
    with pytest.raises(
        PreserveError,
        match=r"^Prefetch node 'ar/Prefetch/past_key': its length input 'mask_sum_f' "
        r"is FLOAT, not an int32/int64 tensor$",
    ):
        VerifyPrefetchesPass(model)(out)


def test_verify_refuses_an_l_of_unknown_type():
    model, out = _optimized_gqa()
    _kv_node(out).input[2] = "mask_sub"  # Sub's output: no declaration, not a Cast, no GQA reads it
    with pytest.raises(
        PreserveError, match=r"its length input 'mask_sub' is of unknown type, not an int32/int64"
    ):
        VerifyPrefetchesPass(model)(out)


@pytest.mark.parametrize(
    "value, message",
    [
        (None, r"has a length input but no integer 'seq_axis'"),
        ("two", r"has a length input but no integer 'seq_axis'"),
        (4, r"'seq_axis' 4 is not an axis of 'past_key' \(rank 4\)"),
        (-5, r"'seq_axis' -5 is not an axis of 'past_key' \(rank 4\)"),
    ],
)
def test_verify_refuses_a_bad_seq_axis(value, message):
    model, out = _optimized_gqa()
    _set(_kv_node(out), "seq_axis", value)
    with pytest.raises(PreserveError, match=message):
        VerifyPrefetchesPass(model)(out)


def test_verify_accepts_a_negative_seq_axis_within_the_rank():
    model, out = _optimized_gqa()
    _set(_kv_node(out), "seq_axis", -2)
    assert VerifyPrefetchesPass(model)(out).stats.prefetches == 4


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("window", -1, r"'window' must be a non-negative integer \(0 = every valid position\)"),
        ("window", 1.5, r"'window' must be a non-negative integer \(0 = every valid position\)"),
        ("min_tokens", -3, r"'min_tokens' must be a non-negative integer \(0 = no limit\)"),
    ],
)
def test_verify_refuses_a_bad_window_or_min_tokens(name, value, message):
    model, out = _optimized_gqa()
    _set(_kv_node(out), name, value)
    with pytest.raises(PreserveError, match=message):
        VerifyPrefetchesPass(model)(out)


def test_verify_refuses_four_inputs():
    model, out = _optimized_gqa()
    _kv_node(out).input.append("seqlens_k")
    with pytest.raises(PreserveError, match=r"must have 2 or 3 inputs and 1 output"):
        VerifyPrefetchesPass(model)(out)


def test_strip_removes_links_with_l_and_gives_the_original_back():
    model, out = _optimized_gqa(window=32)
    back = strip(out)
    assert back.SerializeToString() == model.SerializeToString()


def test_an_l_made_in_the_outer_graph_is_visible_in_a_branch():
    """A merged decoder: seqlens_k made in the main graph, the collective and the attention in an If
    branch."""
    flat = gqa_model(window=32)
    lengths = {"sum", "sub", "cast", "shape", "gather", "cast_total"}
    outer = [n for n in flat.graph.node if n.name in lengths]
    inner = [n for n in flat.graph.node if n.name not in lengths]
    branches = [helper.make_graph(inner, name, [], list(flat.graph.output)) for name in ("then", "else")]
    main = helper.make_graph(
        outer
        + [
            helper.make_node(
                "If",
                ["cond"],
                [o.name for o in flat.graph.output],
                name="if",
                then_branch=branches[0],
                else_branch=branches[1],
            )
        ],
        "merged",
        [*flat.graph.input, helper.make_tensor_value_info("cond", TensorProto.BOOL, [1])],
        list(flat.graph.output),
        list(flat.graph.initializer),
    )
    model = helper.make_model(main, ir_version=9, opset_imports=list(flat.opset_import))
    plan = plan_prefetches(model, OptimizeConfig(batch=2, context=100, budget=1 << 20))
    assert {
        (w.window.graph, p.tensor, p.lengths, p.window)
        for w in plan.windows
        for p in w.prefetches
        if p.kind == "kv_cache"
    } == {
        (f"if:{b}_branch", t, "seqlens_k", 32) for b in ("then", "else") for t in ("past_key", "past_value")
    }
