import pytest

from preserve_onnx.config import OptimizeConfig, PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.passes import InsertPrefetchesPass, StripPrefetchesPass
from tests.builders import G, if_model, two_layer_mlp


@pytest.mark.parametrize("make", [two_layer_mlp, if_model])
def test_strip_of_optimize_is_the_original(make):
    m = make()
    optimized = InsertPrefetchesPass(OptimizeConfig(budget=10_000))(m).model
    result = StripPrefetchesPass()(optimized)
    assert result.modified and result.stats == (3 if make is two_layer_mlp else 2)
    assert result.model.SerializeToString() == m.SerializeToString()


def test_strip_without_prefetches_is_a_no_op():
    m = two_layer_mlp()
    result = StripPrefetchesPass()(m)
    assert not result.modified and result.model is m


def test_strip_honours_vendor_naming_and_ignores_other_domains():
    naming = PrefetchNaming(domain="v", op_type="P")
    optimized = InsertPrefetchesPass(OptimizeConfig(budget=10_000, naming=naming))(two_layer_mlp()).model
    assert not StripPrefetchesPass()(optimized).modified  # default naming sees nothing
    assert (
        StripPrefetchesPass(naming)(optimized).model.SerializeToString()
        == two_layer_mlp().SerializeToString()
    )


def test_prefetch_feeding_a_graph_output_is_refused():
    g = G()
    g.input("x", ["batch", 8])
    g.node("Prefetch", ["x", g.weight("w", (8, 8))], ["y"], name="p", domain="preserve")
    g.output("y")
    with pytest.raises(PreserveError, match="Prefetch output 'y' is a graph output"):
        StripPrefetchesPass()(g.model())


def test_strip_reaches_subgraphs_below_a_graph_that_also_had_prefetches():
    """Found by the property tests: rebuilding the outer node list first detached the If branch."""
    from onnx import TensorProto

    then = G("then")
    then.allreduce("h0", "a1", name="ar1")
    then.node("MatMul", ["a1", "w1"], ["y_then"], name="mm1")
    then.output("y_then")
    other = G("else")
    other.node("Identity", ["h0"], ["y_else"], name="id")
    other.output("y_else")
    g = G()
    g.input("x", ["batch", 8])
    g.input("cond", [], TensorProto.BOOL)
    g.weight("w1", (8, 8))
    g.allreduce("x", "a0", name="ar0")
    g.node("MatMul", ["a0", g.weight("w0", (8, 8))], ["h0"], name="mm0")
    g.node("If", ["cond"], ["y"], name="if", then_branch=then.graph(), else_branch=other.graph())
    g.output("y")
    m = g.model()
    optimized = InsertPrefetchesPass(OptimizeConfig(budget=1 << 20))(m).model
    assert sum(n.op_type == "Prefetch" for n in optimized.graph.node) == 1
    then_g = next(a.g for a in optimized.graph.node[-1].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_g.node] == ["Prefetch", "AllReduce", "MatMul"]
    assert StripPrefetchesPass()(optimized).model.SerializeToString() == m.SerializeToString()


def test_strip_removes_the_prefetch_function():
    optimized = InsertPrefetchesPass(OptimizeConfig(budget=10_000))(two_layer_mlp()).model
    assert [f.name for f in optimized.functions] == ["Prefetch"]
    assert len(StripPrefetchesPass()(optimized).model.functions) == 0


def test_strip_removes_a_function_left_without_its_nodes_and_keeps_other_functions():
    from onnx import helper

    optimized = InsertPrefetchesPass(OptimizeConfig(budget=10_000))(two_layer_mlp()).model
    own = helper.make_function(
        "custom",
        "Twice",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    orphan = StripPrefetchesPass()(optimized).model
    orphan.functions.extend([optimized.functions[0], own])
    result = StripPrefetchesPass()(orphan)
    assert result.modified and result.stats == 0
    assert [(f.domain, f.name) for f in result.model.functions] == [("custom", "Twice")]
