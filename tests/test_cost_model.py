"""The cost model: hand-computed timelines, and the properties every estimate must keep."""

import dataclasses
import math

import pytest

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.cost_model import analyze, evaluate, parse_sweep, plan_chains
from preserve_onnx.errors import PreserveError
from preserve_onnx.explore import MIB, device_cost, explore_path
from preserve_onnx.hardware import HardwareProfile, builtin_profiles, load_profile
from preserve_onnx.model_io import load_model
from preserve_onnx.passes import plan_prefetches
from tests.builders import G
from tests.conftest import SAMPLE_VARIANTS, SAMPLES

# Round numbers so every figure below can be checked by hand.
TOY = HardwareProfile(name="toy", description="hand-computable", l2_bytes=1_000_000, hbm_bw=1e9, l2_bw=4e9,
                      link_bw=1e9, collective_alpha=1e-6, peak_flops=1e12, launch_overhead=0.0,
                      max_prefetch_bytes=0)


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
    by_track = {t: [e for e in est.preserve.events if e.track == t] for t in ("compute", "communication", "prefetch")}
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
        plan = {(w.window.graph, w.window.collective): w.prefetched_bytes
                for w in plan_prefetches(model, config, 2).windows}
        chains = plan_chains(analysis, config.hardware, 2, config.budget)
        assert [sum(b for _, b in c) for c in chains] == \
            [plan[(w.graph, w.collective)] for w in analysis.windows]


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
    results = [evaluate(analysis, dataclasses.replace(hw, link_bw=bw), 8) for bw in (1e9, 10e9, 30e9, 56e9,
                                                                                       200e9, 1e12)]
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
        "batch": (1, 8, 32), "context": (1024, 16384, 131072), "ranks": (2, 4, 8)}
    for bad, message in (("heads=2", "key in batch"), ("batch=x", "not a whole number"),
                         ("batch=0", "at least 1"), ("batch=1 batch=2", "given twice")):
        with pytest.raises(PreserveError, match=message):
            parse_sweep([bad])


def test_every_profile_has_sources_for_every_figure():
    for hw in builtin_profiles().values():
        for f in ("l2_bytes", "hbm_bw", "l2_bw", "link_bw", "collective_alpha", "peak_flops", "launch_overhead",
                  "max_prefetch_bytes", "die_mm2", "hbm_gb", "sram_mm2_per_mb", "wafer_cost_per_mm2"):
            assert len(hw.sources.get(f, "")) > 10, (hw.name, f)
    assert set(builtin_profiles()) == {"ascend-910b", "h100-sxm", "h200", "b200", "mi300x", "tpu-v5e"}


def test_budget_rule_uses_the_cost_models_collective_time():
    hw = load_profile("ascend-910b")
    msg, ranks = 8 * 8192 * 2, 8
    t = hw.collective_alpha + 2 * (ranks - 1) / ranks * msg / hw.link_bw
    assert hw.collective_time(msg, ranks) == t
    assert hw.window_budget(msg, ranks, 0.5) == int(min(0.5 * hw.l2_bytes, hw.hbm_bw * t))
