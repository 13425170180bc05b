import pytest

from preserve_onnx.config import OptimizeConfig, PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.passes import InsertPrefetchesPass, StripPrefetchesPass
from tests.builders import G, two_layer_mlp
from tests.passes.test_insert_prefetches import if_model


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
    assert StripPrefetchesPass(naming)(optimized).model.SerializeToString() == two_layer_mlp().SerializeToString()


def test_prefetch_feeding_a_graph_output_is_refused():
    g = G()
    g.input("x", ["batch", 8])
    g.node("Prefetch", ["x", g.weight("w", (8, 8))], ["y"], name="p", domain="preserve")
    g.output("y")
    with pytest.raises(PreserveError, match="Prefetch output 'y' is a graph output"):
        StripPrefetchesPass()(g.model())
