import numpy as np
import pytest
from onnx import TensorProto, helper

from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.index import iter_scopes
from preserve_onnx.passes import build_windows, collect_candidates
from preserve_onnx.passes.collect_candidates import DQ_SCALE, DQ_WEIGHT, DQ_ZERO_POINT
from tests.builders import MS, G, two_layer_mlp


def collect(model, index=0, **kw):
    kw.setdefault("batch", 8)
    kw.setdefault("context", 1024)
    window = [w for w in build_windows(model) if w.selected][index]
    scope = {s.path: s for s in iter_scopes(model)}[window.graph]
    return collect_candidates(scope, window, **kw)


def test_weights_in_first_use_order_with_sizes():
    found = collect(two_layer_mlp(hidden=16, inner=32))
    assert [(c.tensor, c.kind, c.consumer, c.slot, c.nbytes) for c in found.candidates] == [
        ("w1", "weight", "mm1", 1, 16 * 32 * 4),
        ("w2", "weight", "mm2", 1, 32 * 16 * 4),
    ]


def test_activation_is_never_a_candidate():
    found = collect(two_layer_mlp())
    assert [(s.tensor, s.reason) for s in found.skipped] == [
        ("a0", "activation (computed by AllReduce outside the window)"),
        ("h1", "activation (computed by MatMul in the window)"),
    ]


def test_window_with_nothing_to_prefetch():
    g = G()
    g.input("x", ["batch", 8])
    g.allreduce("x", "a", name="ar")
    g.node("Relu", ["a"], ["y"], name="relu")
    g.output("y")
    found = collect(g.model())
    assert found.candidates == () and found.skipped == ()


def test_constant_chain_resolves_to_root_and_skips_dq_scale():
    g = G()
    g.input("x", ["batch", 8])
    g.allreduce("x", "a", name="ar")
    # The chain's nodes sit *after* their consumer's collective and out of order on purpose.
    g.node("DequantizeLinear", ["wq", "wq_scale", "wq_zp"], ["wdq"], name="dq", axis=1)
    g.node("Transpose", ["wdq"], ["wt"], name="tr", perm=[1, 0])
    g.node("MatMul", ["a", "wt"], ["y"], name="mm")
    g.weight("wq", (8, 8), dtype=np.int8)
    g.inits.append(helper.make_tensor("wq_scale", TensorProto.FLOAT, [8], [0.1] * 8))
    g.inits.append(helper.make_tensor("wq_zp", TensorProto.INT8, [8], [0] * 8))
    g.output("y")
    found = collect(g.model(), qdq_weights=True)
    assert [(c.tensor, c.consumer, c.nbytes) for c in found.candidates] == [
        ("wq", "mm", 64),
        ("wq_zp", "mm", 8),
    ]
    assert [(s.tensor, s.reason) for s in found.skipped if s.tensor.startswith("wq")] == [
        ("wq_scale", DQ_SCALE)
    ]


def _dq_matmul(zero_point: TensorProto) -> G:
    """x -> AllReduce -> MatMul(a, DequantizeLinear(wq, wq_scale, wq_zp)) -> y, int8 wq [8, 8]."""
    g = G()
    g.input("x", ["batch", 8])
    g.allreduce("x", "a", name="ar")
    g.node("DequantizeLinear", ["wq", "wq_scale", "wq_zp"], ["wdq"], name="dq")
    g.node("MatMul", ["a", "wdq"], ["y"], name="mm")
    g.weight("wq", (8, 8), dtype=np.int8)
    g.inits.append(helper.make_tensor("wq_scale", TensorProto.FLOAT, [], [0.1]))
    g.inits.append(zero_point)
    return g


def test_dq_quantized_weight_is_not_a_target_by_default():
    g = _dq_matmul(helper.make_tensor("wq_zp", TensorProto.INT8, [], [0]))
    g.output("y")
    found = collect(g.model())
    assert found.candidates == ()  # the zero point follows the quantized weight (docs/design.md §2)
    assert [(s.tensor, s.reason) for s in found.skipped if s.tensor.startswith("wq")] == [
        ("wq", DQ_WEIGHT),
        ("wq_scale", DQ_SCALE),
        ("wq_zp", DQ_ZERO_POINT),
    ]


def test_dq_zero_point_read_directly_elsewhere_is_not_a_target_by_default():
    g = _dq_matmul(helper.make_tensor("wq_zp", TensorProto.FLOAT, [8], [0.0] * 8))
    g.node("Gemm", ["y", "w2", "wq_zp"], ["z"], name="gemm")  # reads the zero point as its C
    g.weight("w2", (8, 8))
    g.output("z")
    assert [c.tensor for c in collect(g.model()).candidates] == ["w2"]
    assert [c.tensor for c in collect(g.model(), qdq_weights=True).candidates] == ["wq", "wq_zp", "w2"]


def test_constant_node_output_is_not_a_target():
    g = G()
    g.input("x", ["batch", 8])
    g.allreduce("x", "a", name="ar")
    g.node(
        "Constant",
        [],
        ["c"],
        name="const",
        value=helper.make_tensor("v", TensorProto.FLOAT, [8, 8], [0.0] * 64),
    )
    g.node("MatMul", ["a", "c"], ["y"], name="mm")
    g.output("y")
    found = collect(g.model())
    assert found.candidates == ()
    assert [s.reason for s in found.skipped if s.tensor == "c"] == [
        "output of a Constant node (exporters keep weights in initializers)"
    ]


def test_weight_shared_with_consumer_outside_the_window_is_prefetched_once_inside():
    g = G()
    g.input("x", ["batch", 8])
    g.weight("w_shared", (8, 8))
    g.node("MatMul", ["x", "w_shared"], ["h"], name="mm_before")  # outside every window
    g.allreduce("h", "a", name="ar")
    g.node("MatMul", ["a", "w_shared"], ["h2"], name="mm_in")
    g.node("MatMul", ["h2", "w_shared"], ["y"], name="mm_in_again")
    g.output("y")
    found = collect(g.model())
    assert [(c.tensor, c.consumer) for c in found.candidates] == [("w_shared", "mm_in")]
    assert ("w_shared", "already covered in this window (first read by mm_in)") in [
        (s.tensor, s.reason) for s in found.skipped
    ]


def gqa_model(past_shape):
    g = G()
    g.input("x", ["batch", 1, 32])
    g.input("past_key_values.0.key", past_shape)
    g.input("past_key_values.0.value", past_shape)
    g.input("seqlens_k", ["batch"], TensorProto.INT32)
    g.input("total_seq", [], TensorProto.INT32)
    g.allreduce("x", "a", name="ar")
    g.node(
        "GroupQueryAttention",
        [
            "a",
            "a",
            "a",
            "past_key_values.0.key",
            "past_key_values.0.value",
            "seqlens_k",
            "total_seq",
            g.weight("cos", (64, 8)),
            g.weight("sin", (64, 8)),
        ],
        ["o", "present.0.key", "present.0.value"],
        name="gqa",
        domain=MS,
        num_heads=2,
        kv_num_heads=2,
    )
    g.output("o")
    return g.model()


def test_kv_cache_sized_from_batch_and_context():
    found = collect(gqa_model(["batch_size", 2, "past_sequence_length", 16]), batch=4, context=100)
    assert [(c.tensor, c.kind, c.slot, c.nbytes) for c in found.candidates] == [
        ("past_key_values.0.key", "kv_cache", 3, 4 * 2 * 100 * 16 * 4),
        ("past_key_values.0.value", "kv_cache", 4, 4 * 2 * 100 * 16 * 4),
        ("cos", "weight", 7, 64 * 8 * 4),
        ("sin", "weight", 8, 64 * 8 * 4),
    ]


def test_no_kv_skips_kv_cache():
    found = collect(gqa_model(["batch", 2, "past", 16]), kv=False)
    assert [c.tensor for c in found.candidates] == ["cos", "sin"]
    assert [s.reason for s in found.skipped][:2] == ["KV-cache excluded by --no-kv"] * 2


def test_unbindable_symbolic_dim_is_a_clear_error():
    with pytest.raises(PreserveError, match="cannot bind symbolic dimension 'heads' \\(axis 1\\)"):
        collect(gqa_model(["batch", "heads", "past", 16]))


def test_collective_input_is_never_prefetched():
    g = G()
    g.input("x", ["batch", 8])
    g.node("MatMul", ["x", g.weight("w", (8, 8))], ["h"], name="mm")
    g.allreduce("h", "a", name="ar")
    g.node("Add", ["a", "h"], ["y"], name="add")
    g.node("MatMul", ["y", "h"], ["z"], name="mm2")
    g.output("z")
    found = collect(g.model())
    assert found.candidates == ()
    assert ("h", "the collective's own input") in [(s.tensor, s.reason) for s in found.skipped]


def test_the_collectives_inputs_are_never_candidates_even_through_a_chain():
    g = G()
    g.input("x", ["batch", 16])
    g.weight("wc", (16, 16))
    g.allreduce("wc", "a0", name="ar0")  # a collective over a constant (odd, but legal)
    g.node("Transpose", ["wc"], ["wcT"], name="tr", perm=[1, 0])
    g.node("MatMul", ["x", "wcT"], ["h1"], name="mm1")
    g.node("MatMul", ["h1", "a0"], ["y"], name="mm2")
    g.output("y")
    found = collect(g.model())
    assert found.candidates == ()
    assert ("wc", "the collective's own input (through a constant-only chain)") in [
        (s.tensor, s.reason) for s in found.skipped
    ]
    # A variadic AllReduce: its second input is its own too.
    g = G()
    g.input("x", ["batch", 16])
    g.node("MatMul", ["x", g.weight("w0", (16, 16))], ["h0"], name="mm0")
    g.weight("wd", (16, 16))
    g.node("AllReduce", ["h0", "wd"], ["a0", "a0b"], name="ar0", domain=MS)
    g.node("MatMul", ["a0", "wd"], ["y"], name="mm1")
    g.output("y")
    g.output("a0b")
    found = collect(g.model())
    assert found.candidates == () and ("wd", "the collective's own input") in [
        (s.tensor, s.reason) for s in found.skipped
    ]


def test_a_dequantize_scale_or_weight_read_by_another_op_is_still_not_a_target():
    g = G()
    g.input("x", ["batch", 16])
    g.node("MatMul", ["x", g.weight("w0", (16, 16))], ["h0"], name="mm0")
    g.allreduce("h0", "a0", name="ar0")
    g.weight("wq", (16, 16), dtype=np.int8)
    g.weight("sc", (16,))
    g.weight("zp", (16,), dtype=np.int8)
    g.node("DequantizeLinear", ["wq", "sc", "zp"], ["wdq"], name="dq", axis=1)
    g.node("MatMul", ["a0", "wdq"], ["h1"], name="mm1")
    g.node("Gemm", ["h1", g.weight("wg", (16, 16)), "sc"], ["h2"], name="gemm")  # the scale as a bias
    g.node("Gemm", ["h2", "wq", "zp"], ["y"], name="gemm_q", transB=0)  # hypothetically: the int8 weight
    g.output("y", ["batch", 16])
    found = collect(g.model())
    assert [c.tensor for c in found.candidates] == ["wg"]
    reasons = {(s.tensor, s.consumer): s.reason for s in found.skipped}
    assert reasons[("sc", "gemm")] == DQ_SCALE and reasons[("wq", "gemm_q")] == DQ_WEIGHT
    assert reasons[("zp", "gemm_q")] == DQ_ZERO_POINT
    assert [c.tensor for c in collect(g.model(), qdq_weights=True).candidates] == ["wq", "zp", "wg"]


def test_loop_state_named_like_a_kv_input_is_an_activation():
    body = G("body")
    body.input("i", [], TensorProto.INT64)
    body.input("c", [], TensorProto.BOOL)
    body.input("past", ["batch", 2, "past", 16])  # loop-carried, shadows the main input 'past'
    body.allreduce("h", "a", name="ar_body")
    body.node(
        "MultiHeadAttention",
        ["q", "q", "q", "", "", "", "past", "past_main"],
        ["o", "pk", "pv"],
        name="mha_body",
        domain=MS,
        num_heads=2,
    )
    body.node("Identity", ["c"], ["c_out"], name="idc")
    body.node("Identity", ["past"], ["past_out"], name="idp")
    body.output("c_out", [], TensorProto.BOOL)
    body.output("past_out", ["batch", 2, "past", 16])
    body.output("a", ["batch", 32])
    g = G()
    g.input("h", ["batch", 32])
    g.input("q", ["batch", 1, 32])
    g.input("past", ["batch", 2, "past", 16])
    g.input("past_main", ["batch", 2, "past", 16])
    g.input("n", [], TensorProto.INT64)
    g.input("cond", [], TensorProto.BOOL)
    g.node("Loop", ["n", "cond", "past"], ["pfinal", "hs"], name="loop", body=body.graph())
    g.output("pfinal", ["batch", 2, "past", 16])
    g.output("hs", ["n", "batch", 32])
    found = collect(g.model(), batch=1, context=64)
    assert [(c.tensor, c.kind, c.slot) for c in found.candidates] == [("past_main", "kv_cache", 7)]
    assert ("past", "KV slot not fed by a graph input") in [(s.tensor, s.reason) for s in found.skipped]
