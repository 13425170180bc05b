"""The cost model: hand-computed timelines, and the properties every estimate must keep."""

import dataclasses
import math

import pytest

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.cost.analysis import analyze
from preserve_onnx.cost.estimate import evaluate, plan_chains
from preserve_onnx.cost.explore import MIB, device_cost, explore_path
from preserve_onnx.cost.sweep import parse_sweep
from preserve_onnx.errors import PreserveError
from preserve_onnx.hardware import HardwareProfile, builtin_profiles, load_profile
from preserve_onnx.model_io import load_model
from preserve_onnx.passes import plan_prefetches
from tests.builders import G
from tests.conftest import SAMPLE_VARIANTS, SAMPLES

# Round numbers so every figure below can be checked by hand.
TOY = HardwareProfile(
    name="toy",
    description="hand-computable",
    l2_bytes=1_000_000,
    hbm_bw=1e9,
    l2_bw=4e9,
    link_bw=1e9,
    collective_alpha=1e-6,
    peak_flops=1e12,
    launch_overhead=0.0,
    max_prefetch_bytes=0,
)


def allreduce_then_matmul():
    """x[batch,16] -> AllReduce -> MatMul(w[16,32]) -> y."""
    g = G()
    g.input("x", ["batch", 16])
    g.allreduce("x", "a", name="ar")
    g.node("MatMul", ["a", g.weight("w", (16, 32))], ["y"], name="mm")
    g.output("y", ["batch", 32])
    return g.model()


def toy_estimate(hw=TOY, budget=None, ranks=2, min_chunk=1):
    config = OptimizeConfig(hardware=hw, batch=1, min_chunk=min_chunk, budget=budget)
    return evaluate(analyze(allreduce_then_matmul(), config, model_ranks=2), hw, ranks, budget)


def test_hand_computed_timeline():
    est = toy_estimate()
    t_coll = 1e-6 + 2 * (2 - 1) / 2 * 64 / 1e9  # message: 1 x 16 float32 = 64 B
    # MatMul: 2048 B of weight from HBM; activations 64 B in + 128 B out fit in L2 (192 <= 0.5 * 1 MB).
    matmul = max(2 * 16 * 32 / 1e12, 2048 / 1e9 + 192 / 4e9)
    assert est.baseline_s == pytest.approx(t_coll + matmul, rel=1e-12)
    # Budget min(0.5 * L2, hbm_bw * t_coll) = 1064 B: the prefetch streams exactly that during the
    # AllReduce; the MatMul reads those bytes from L2 and the remaining 984 B from HBM.
    (w,) = est.windows
    assert (w.budget_bytes, w.planned_bytes, w.overlapped_bytes) == (1064, 1064, 1064)
    matmul_plan = 984 / 1e9 + (1064 + 192) / 4e9
    assert est.preserve_s == pytest.approx(t_coll + matmul_plan, rel=1e-12)
    assert w.saved_s == pytest.approx(matmul - matmul_plan, rel=1e-12)
    assert est.speedup == pytest.approx((t_coll + matmul) / (t_coll + matmul_plan), rel=1e-12)
    # The upper bound also only has t_coll to stream in: here it equals the plan.
    assert (w.upper_bound_bytes, est.upper_bound_s) == (1064, est.preserve_s)
    assert est.share_of_upper_bound == 1.0


def test_hand_computed_resharding_and_collective():
    # At 4 ranks the export's 2-rank weights halve: 1024 B; the ring term becomes 2 * 3/4 * 64 B.
    est = toy_estimate(ranks=4)
    t_coll = 1e-6 + 2 * 3 / 4 * 64 / 1e9
    assert est.windows[0].collective_s == pytest.approx(t_coll, rel=1e-12)
    assert est.baseline_s == pytest.approx(t_coll + 1024 / 1e9 + 192 / 4e9, rel=1e-12)
    assert est.windows[0].planned_bytes == 1024  # all of it fits in the 1096 B budget


def test_timeline_tracks():
    est = toy_estimate()
    by_track = {
        t: [e for e in est.preserve.events if e.track == t] for t in ("compute", "communication", "prefetch")
    }
    (coll,), (pf,), (mm,) = by_track["communication"], by_track["prefetch"], by_track["compute"]
    assert (coll.name, coll.start) == ("ar", 0.0)
    assert pf.start == coll.start and pf.duration == pytest.approx(1064 / 1e9)
    assert mm.start == pytest.approx(coll.duration)  # the consumer waits for the AllReduce


def test_zero_budget_is_exactly_the_baseline():
    for variant in SAMPLE_VARIANTS:
        model = load_model(SAMPLES / variant / "tp2" / "model_00.onnx")
        config = OptimizeConfig(budget=0)
        est = evaluate(analyze(model, config, 2), config.hardware, 2, budget=0)
        assert est.preserve_s == est.baseline_s
        assert est.preserve.durations == est.baseline.durations
        assert all(w.planned_bytes == w.overlapped_bytes == 0 for w in est.windows)


@pytest.mark.parametrize("variant", SAMPLE_VARIANTS)
def test_estimate_prefetches_what_optimize_plans(variant):
    model = load_model(SAMPLES / variant / "tp2" / "model_00.onnx")
    for config in (OptimizeConfig(), OptimizeConfig(budget=40 << 10), OptimizeConfig(batch=1, context=128)):
        analysis = analyze(model, config, 2)
        plan = {
            (w.window.graph, w.window.collective): w.prefetched_bytes
            for w in plan_prefetches(model, config, 2).windows
        }
        chains = plan_chains(analysis, config.hardware, 2, config.budget)
        assert [sum(link.nbytes for link in c) for c in chains] == [
            plan[(w.graph, w.collective)] for w in analysis.windows
        ]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A Llama-3-70B-shaped 8-rank export cut to 4 layers (shape-only, seconds)."""
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from make_big_model import make_big_model

    out = tmp_path_factory.mktemp("big")
    return make_big_model(out, "llama3-70b", ranks=8, layers=4)[0]


def test_plan_never_beats_the_upper_bound(big_model):
    model = load_model(big_model)
    for batch, context in ((1, 1024), (8, 16384), (32, 131072)):
        config = OptimizeConfig(batch=batch, context=context)
        analysis = analyze(model, config, 8)
        for hw in builtin_profiles().values():
            for ranks in (2, 8, 16):
                est = evaluate(analysis, hw, ranks)
                assert est.upper_bound_s <= est.preserve_s <= est.baseline_s
                for w in est.windows:
                    assert w.overlapped_bytes <= w.upper_bound_bytes


def test_faster_link_never_increases_the_saving(big_model):
    """The time saved shrinks with t_collective in every regime; the speedup does too while the windows
    are time-limited (hbm_bw * t_collective < l2_fraction * L2), which is the case from 30 GB/s up."""
    model = load_model(big_model)
    analysis = analyze(model, OptimizeConfig(), 8)
    hw = load_profile("ascend-910b")
    results = [
        evaluate(analysis, dataclasses.replace(hw, link_bw=bw), 8)
        for bw in (1e9, 10e9, 30e9, 56e9, 200e9, 1e12)
    ]
    saved = [e.baseline_s - e.preserve_s for e in results]
    assert saved == sorted(saved, reverse=True)
    speedups = [e.speedup for e in results[2:]]
    assert speedups == sorted(speedups, reverse=True)


def test_more_l2_never_slows_the_plan(big_model):
    hw = load_profile("ascend-910b")
    ex = explore_path(big_model, hw, OptimizeConfig())
    steps = [p.preserve_s for p in ex.points]
    assert steps == sorted(steps, reverse=True)
    assert all(p.preserve_s <= p.baseline_s for p in ex.points)


def test_device_cost_by_hand():
    hw = load_profile("ascend-910b")
    area, cost = device_cost(hw, 0)
    logic = 660.0 - 192 * 0.64
    assert area == pytest.approx(logic)
    assert cost == pytest.approx(logic * 0.132 / math.exp(-0.001 * logic) + 64 * 15 + 150)
    area192, _ = device_cost(hw, 192 * MIB)
    assert area192 == pytest.approx(660.0)
    with pytest.raises(PreserveError, match="no area/cost figures"):
        device_cost(TOY, 0)


def test_explore_moves_the_best_l2_up(big_model):
    ex = explore_path(big_model, load_profile("ascend-910b"), OptimizeConfig())
    assert [p.l2_bytes // MIB for p in ex.points][:4] == [0, 2, 4, 8]
    assert ex.best("baseline").l2_bytes < ex.best("preserve").l2_bytes
    assert ex.gain > 1.0


def test_parse_sweep():
    assert parse_sweep(["batch=1,8,32", "context=1k,16k,128k ranks=2,4,8"]) == {
        "batch": (1, 8, 32),
        "context": (1024, 16384, 131072),
        "ranks": (2, 4, 8),
    }
    for bad, message in (
        ("heads=2", "key in batch"),
        ("batch=x", "not a whole number"),
        ("batch=0", "at least 1"),
        ("batch=1 batch=2", "given twice"),
    ):
        with pytest.raises(PreserveError, match=message):
            parse_sweep([bad])


def test_every_profile_has_sources_for_every_figure():
    for hw in builtin_profiles().values():
        for f in (
            "l2_bytes",
            "hbm_bw",
            "l2_bw",
            "link_bw",
            "collective_alpha",
            "peak_flops",
            "launch_overhead",
            "max_prefetch_bytes",
            "die_mm2",
            "hbm_gb",
            "sram_mm2_per_mb",
            "wafer_cost_per_mm2",
            "hbm_efficiency",
            "l2_usable_fraction",
            "collective",
        ):
            assert len(hw.sources.get(f, "")) > 10, (hw.name, f)
    assert set(builtin_profiles()) == {"ascend-910b", "h100-sxm", "h200", "b200", "mi300x", "tpu-v5e"}


def test_budget_rule_uses_the_cost_models_collective_time():
    hw = load_profile("ascend-910b")
    msg, ranks = 8 * 8192 * 2, 8
    t = hw.collective_alpha + 2 * (ranks - 1) / ranks * msg / hw.link_bw
    assert hw.collective_time(msg, ranks) == t
    # 8 ranks, 128 KiB: 25 us of HCCL latency + 2 * 7/8 * 131072 B / 28 GB/s per direction = 33.19 us.
    assert t == pytest.approx(25e-6 + 1.75 * 131072 / 28e9, rel=1e-12)
    # Calibrated: 0.5 x (0.85 x 192 MiB) vs 0.85 x 1.6 TB/s x 33.19 us = 45.14 MB: the time bound wins.
    assert hw.window_budget(msg, ranks, 0.5) == int(min(0.5 * hw.l2_bytes * 0.85, 1.6e12 * 0.85 * t))
    assert hw.window_budget(msg, ranks, 0.5) == 45_141_120


def fp16_mlp(hidden=512, inner=2048):
    """x[batch,hidden] fp16 -> o_proj -> AllReduce -> up -> Relu -> down -> AllReduce: a weights-only
    window."""
    import numpy as np
    from onnx import TensorProto

    g = G()
    g.input("x", ["batch", hidden], TensorProto.FLOAT16)
    g.node("MatMul", ["x", g.weight("w_o", (hidden, hidden), np.float16)], ["h0"], name="o_proj")
    g.allreduce("h0", "a0", name="ar0")
    g.node("MatMul", ["a0", g.weight("w_up", (hidden, inner), np.float16)], ["h1"], name="up")
    g.node("Relu", ["h1"], ["r1"], name="relu")
    g.node("MatMul", ["r1", g.weight("w_down", (inner, hidden), np.float16)], ["h2"], name="down")
    g.allreduce("h2", "a1", name="ar1")
    g.output("a1", ["batch", hidden], TensorProto.FLOAT16)
    return g.model()


def h100_estimate(batch, hw=None):
    hw = hw or load_profile("h100-sxm")
    return evaluate(analyze(fp16_mlp(), OptimizeConfig(hardware=hw, batch=batch), model_ranks=2), hw, 2)


def test_roofline_threshold_of_a_weights_only_window_on_h100_fp16():
    # peak_flops / (2 x achieved HBM bw / bytes per weight) = 989e12 / (2 x 0.9 x 3.35e12 / 2) = 328.0
    by_hand = 989e12 / (2 * 0.9 * 3.35e12 / 2)
    est = h100_estimate(8)
    first, last = est.windows
    assert (first.max_tokens, first.tokens, first.planned_bytes) == (328, 8, 2 * 512 * 2048 * 2)
    assert by_hand / 2 <= first.max_tokens <= by_hand * 2 and first.max_tokens == int(by_hand)
    assert (last.max_tokens, last.planned_bytes) == (0, 0)  # nothing after the last AllReduce: no limit
    # The same window at 4-bit weights would stop paying four times sooner; on H200 (0.81 x 4.8 TB/s)
    # at 989e12 / (0.81 x 4.8e12) = 254 tokens.
    assert h100_estimate(8, load_profile("h200")).windows[0].max_tokens == int(989e12 / (0.81 * 4.8e12))


def test_the_roofline_limit_agrees_with_the_simulated_physics():
    # The upper bound ignores max_tokens: its saving is the physics. It still saves at max_tokens and has
    # vanished by 2 x max_tokens (activations, which the limit leaves out, keep the consumers memory-bound a
    # little longer: about 435 tokens here).
    at_limit, past = h100_estimate(328).windows[0], h100_estimate(656).windows[0]
    assert at_limit.upper_bound_saved_s > 0 and past.upper_bound_saved_s == 0


def test_above_max_tokens_the_plan_saves_nothing_because_the_hints_are_skipped():
    below, above = h100_estimate(328), h100_estimate(329)
    assert below.windows[0].saved_s > 0 and below.speedup > 1.0
    assert (above.windows[0].tokens, above.windows[0].max_tokens) == (329, 328)
    assert (above.windows[0].overlapped_bytes, above.windows[0].saved_s) == (0, 0.0)
    assert above.preserve_s == above.baseline_s and above.speedup == 1.0
    assert above.upper_bound_speedup > 1.0  # the physics still had a little to gain


def test_a_window_that_prefetches_kv_cache_has_no_limit():
    est = evaluate(
        analyze(
            load_model(SAMPLES / "llama-gqa" / "tp2" / "model_00.onnx"),
            OptimizeConfig(hardware=load_profile("h100-sxm")),
            2,
        ),
        load_profile("h100-sxm"),
        2,
    )
    # After o_proj: MLP weights only (fp32 here, 4 B per weight); after layer 0's down_proj: q/k/v weights
    # and the KV-cache (memory-bound at any batch); after the last down_proj: the LM head.
    fp32 = int(989e12 * 4 / (2 * 0.9 * 3.35e12))
    assert [w.max_tokens for w in est.windows] == [fp32, 0, fp32, fp32] and fp32 == 656
