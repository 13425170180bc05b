import dataclasses

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.hardware import load_profile
from preserve_onnx.passes import plan_prefetches
from tests.builders import G, two_layer_mlp


def plan(model, **kw):
    return plan_prefetches(model, OptimizeConfig(**kw))


def spans(wp):
    return [(p.tensor, p.offset, p.max_size, p.nbytes) for p in wp.prefetches]


def test_everything_fits():
    p = plan(two_layer_mlp(16, 32), budget=10_000)
    assert [spans(w) for w in p.windows] == [
        [("w1", 0, 0, 2048), ("w2", 0, 0, 2048)],
        [("w3", 0, 0, 1024)],
    ]
    assert p.windows[0].prefetches[0].node == "ar0/Prefetch/w1"
    assert p.windows[0].prefetches[0].output == "ar0/Prefetch/w1/out"


def test_budget_cuts_a_tensor_in_two():
    p = plan(two_layer_mlp(16, 32), budget=3000, min_chunk=512)
    assert spans(p.windows[0]) == [("w1", 0, 0, 2048), ("w2", 0, 952, 952)]
    assert p.windows[0].prefetched_bytes == 3000


def test_remainder_below_min_chunk_stops_planning():
    p = plan(two_layer_mlp(16, 32), budget=3000, min_chunk=1024)
    assert spans(p.windows[0]) == [("w1", 0, 0, 2048)]
    assert [s.reason for s in p.windows[0].skipped if s.tensor == "w2"] == [
        "budget exhausted (952 B left < min chunk 1024 B)"
    ]


def test_no_budget_left_plans_nothing_even_with_min_chunk_zero():
    # A partial link of 0 bytes would be written as max_size 0, which means the whole tensor.
    assert spans(plan(two_layer_mlp(16, 32), budget=0, min_chunk=0).windows[0]) == []
    p = plan(two_layer_mlp(16, 32), budget=2048, min_chunk=0)
    assert spans(p.windows[0]) == [("w1", 0, 0, 2048)]
    assert [s.reason for s in p.windows[0].skipped if s.tensor == "w2"] == ["budget exhausted (0 B left)"]


def test_partial_prefetch_ends_the_window():
    g = G()
    g.input("x", ["batch", 16])
    g.allreduce("x", "a", name="ar")
    g.node("MatMul", ["a", g.weight("big", (16, 64))], ["h"], name="mm1")  # 4096 B
    g.node("MatMul", ["h", g.weight("small", (64, 1))], ["y"], name="mm2")  # 256 B
    g.output("y")
    p = plan(g.model(), budget=3000, min_chunk=1000)
    assert spans(p.windows[0]) == [("big", 0, 3000, 3000)]  # small would fit in 0 B left: not taken


def test_per_operation_limit_splits_into_a_chain():
    hw = dataclasses.replace(load_profile("ascend-910b"), max_prefetch_bytes=1000)
    p = plan(two_layer_mlp(16, 32), hardware=hw, budget=10_000)
    assert spans(p.windows[0]) == [
        ("w1", 0, 1000, 1000),
        ("w1", 1000, 1000, 1000),
        ("w1", 2000, 48, 48),
        ("w2", 0, 1000, 1000),
        ("w2", 1000, 1000, 1000),
        ("w2", 2000, 48, 48),
    ]
    assert [pf.node for pf in p.windows[0].prefetches[:3]] == [
        "ar0/Prefetch/w1/0",
        "ar0/Prefetch/w1/1",
        "ar0/Prefetch/w1/2",
    ]


def test_budget_rule_from_hardware_profile():
    hw = load_profile("ascend-910b")
    p = plan(two_layer_mlp(16, 32), batch=8)
    message = 8 * 16 * 4
    t = hw.collective_alpha  # one rank: latency only
    # Calibrated: usable L2 (0.85 x 192 MiB) and achieved HBM (0.85 x 1.6 TB/s): 1.36e12 x 25 us = 34 MB.
    assert p.windows[0].budget == int(min(0.5 * 0.85 * hw.l2_bytes, 0.85 * hw.hbm_bw * t)) == 34_000_000
    p2 = plan_prefetches(two_layer_mlp(16, 32), OptimizeConfig(batch=8), ranks=8)
    t8 = hw.collective_alpha + 2 * 7 / 8 * message / hw.link_bw
    assert p2.windows[0].budget == int(min(0.5 * 0.85 * hw.l2_bytes, 0.85 * hw.hbm_bw * t8))
    assert p2.ranks == 8


def test_l2_fraction_caps_the_budget():
    hw = dataclasses.replace(load_profile("h100-sxm"), l2_bytes=1000)
    p = plan(two_layer_mlp(16, 32), hardware=hw, l2_fraction=0.5)
    assert p.windows[0].budget == int(0.5 * int(1000 * 0.86)) == 430  # half of the usable 86%


def test_zero_budget_plans_nothing():
    p = plan(two_layer_mlp(), budget=0)
    assert p.prefetch_count == 0


def test_names_avoid_existing_names():
    g = G()
    g.input("x", ["batch", 8])
    g.allreduce("x", "a", name="ar")
    g.node("Relu", ["a"], ["ar/Prefetch/w"], name="ar/Prefetch/w/out")  # squats both names
    g.node("MatMul", ["ar/Prefetch/w", g.weight("w", (8, 8))], ["y"], name="mm")
    g.output("y")
    (pf,) = plan(g.model(), budget=10_000).windows[0].prefetches
    assert (pf.node, pf.output) == ("ar/Prefetch/w_1", "ar/Prefetch/w/out_1")


def test_unselected_collectives_are_not_planned():
    p = plan(two_layer_mlp(), collectives=("AllGather",), budget=10_000)
    assert p.windows == ()
