from onnx import TensorProto, helper

from preserve_onnx.passes import build_windows
from tests.builders import MS, G, if_model, two_layer_mlp


def test_windows_run_from_collective_to_next_collective():
    windows = build_windows(two_layer_mlp())
    assert [(w.collective, w.index, w.nodes, w.anchor) for w in windows] == [
        ("ar0", 1, (2, 3), "h0"),
        ("ar1", 4, (5,), "h2"),
    ]


def test_window_stops_at_unselected_collective():
    g = G()
    g.input("x", ["batch", 8])
    g.allreduce("x", "a0", name="ar0")
    g.node("MatMul", ["a0", g.weight("w1", (8, 8))], ["h1"], name="mm1")
    g.node("AllGather", ["h1"], ["g1"], name="ag", domain=MS, group_size=2, axis=0)
    g.node("MatMul", ["g1", g.weight("w2", (8, 8))], ["y"], name="mm2")
    g.output("y")
    windows = build_windows(g.model(), collectives=("AllReduce",))
    assert [(w.collective, w.selected, w.nodes) for w in windows] == [
        ("ar0", True, (1,)),
        ("ag", False, (3,)),
    ]


def test_no_collectives_no_windows():
    g = G()
    g.input("x", ["batch", 8])
    g.node("MatMul", ["x", g.weight("w", (8, 8))], ["y"], name="mm")
    g.output("y")
    assert build_windows(g.model()) == ()


def test_message_bytes_from_producing_linear_and_from_value_info():
    windows = build_windows(two_layer_mlp(hidden=16, inner=32), batch=4)
    assert [w.message_bytes for w in windows] == [4 * 16 * 4, 4 * 16 * 4]
    g = G()
    g.input("x", ["batch", 1, 64])
    g.node("Relu", ["x"], ["r"], name="relu")
    g.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT16, ["batch", "seq", 64]))
    g.allreduce("r", "y", name="ar")
    g.output("y")
    (w,) = build_windows(g.model(), batch=3)
    assert w.message_bytes == 3 * 1 * 64 * 2  # symbolic batch -> 3, sequence -> 1 (decode)


def test_unknown_message_size_is_zero():
    g = G()
    g.input("x", ["batch", 8])
    g.node("Relu", ["x"], ["r"], name="relu")
    g.allreduce("r", "y", name="ar")
    g.output("y")
    (w,) = build_windows(g.model())
    assert w.message_bytes == 0


def test_collective_inside_if_branch_gets_its_own_window():
    windows = build_windows(if_model())
    assert [(w.graph, w.collective, w.index, w.nodes) for w in windows] == [
        ("if:else_branch", "ar_else", 0, (1,)),  # onnx.helper writes attributes in name order
        ("if:then_branch", "ar_then", 0, (1,)),
    ]
