import onnx
import pytest

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.errors import PreserveError
from preserve_onnx.passes import InsertPrefetchesPass, VerifyPrefetchesPass
from tests.builders import G, two_layer_mlp


def optimized():
    m = two_layer_mlp()
    return m, InsertPrefetchesPass(OptimizeConfig(budget=10_000))(m).model


def test_verify_passes_a_correct_rewrite():
    m, out = optimized()
    result = VerifyPrefetchesPass(m)(out)
    assert not result.modified
    assert (result.stats.graphs, result.stats.prefetches, result.stats.checker) == (1, 3, "clean")


def test_out_of_order_graph_is_refused():
    m, out = optimized()
    nodes = list(out.graph.node)
    nodes[0], nodes[1] = nodes[1], nodes[0]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    with pytest.raises(PreserveError, match="reads 'h0' before it is produced"):
        VerifyPrefetchesPass(m)(out)


def test_prefetch_past_the_end_of_its_tensor_is_refused():
    m, out = optimized()
    for a in out.graph.node[1].attribute:
        if a.name == "offset":
            a.i = 10_000
    with pytest.raises(PreserveError, match="covers bytes past the end of 'w1'"):
        VerifyPrefetchesPass(m)(out)


@pytest.mark.parametrize("value", [-1, "many", 2.5])
def test_a_max_tokens_that_is_not_a_non_negative_integer_is_refused(value):
    m, out = optimized()
    node = out.graph.node[1]
    kept = [a for a in node.attribute if a.name != "max_tokens"]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute("max_tokens", value)])
    with pytest.raises(PreserveError, match=r"'max_tokens' must be a non-negative integer \(0 = no limit\)"):
        VerifyPrefetchesPass(m)(out)


def test_a_prefetch_without_max_tokens_is_valid():
    m, out = optimized()
    for node in out.graph.node:
        kept = [a for a in node.attribute if a.name != "max_tokens"]
        del node.attribute[:]
        node.attribute.extend(kept)
    assert VerifyPrefetchesPass(m)(out).stats.prefetches == 3


def test_prefetch_of_an_activation_is_refused():
    m, out = optimized()
    out.graph.node[1].input[1] = "x"
    VerifyPrefetchesPass(m)(out)  # x is a graph input: allowed (KV-cache)
    out.graph.node[1].input[1] = "h0"
    with pytest.raises(PreserveError, match="neither an initializer nor a graph input"):
        VerifyPrefetchesPass(m)(out)


def test_chain_not_ending_at_a_collective_is_refused():
    g = G()
    g.input("x", ["batch", 8])
    g.node(
        "Prefetch",
        ["x", g.weight("w", (8, 8))],
        ["p"],
        name="p",
        domain="preserve",
        max_size=0,
        offset=0,
        collective="ar",
    )
    g.node("Relu", ["p"], ["y"], name="relu")
    g.output("y")
    with pytest.raises(PreserveError, match="its chain ends at Relu, not a collective"):
        VerifyPrefetchesPass(g.model())(g.model())


def test_new_checker_complaint_is_refused_but_an_old_one_is_tolerated():
    m, out = optimized()
    bad = onnx.ModelProto()
    bad.CopyFrom(out)
    bad.graph.node[0].op_type = "NoSuchOp"  # the rewrite "broke" the model
    with pytest.raises(PreserveError, match="onnx checker"):
        VerifyPrefetchesPass(m)(bad)
    base = onnx.ModelProto()
    base.CopyFrom(m)
    base.graph.node[0].op_type = "NoSuchOp"  # the input already had this complaint
    assert VerifyPrefetchesPass(base)(bad).stats.checker.startswith("same complaint as the input")


def test_checker_is_not_masked_by_external_data_outside_the_current_directory(tmp_path, monkeypatch):
    """With external weights, the checker used to stop at 'data file not found' (relative to the
    current directory) on both sides, hiding any new complaint about the nodes."""
    from preserve_onnx.model_io import load_model
    from tests.conftest import SAMPLES

    monkeypatch.chdir(tmp_path)  # the data files are not here
    m = load_model(SAMPLES / "gpt-attention" / "tp2" / "model_00.onnx")
    result = InsertPrefetchesPass(OptimizeConfig(budget=1 << 20))(m)
    assert result.modified
    out = result.model
    assert VerifyPrefetchesPass(m)(out).stats.checker == "clean"
    out.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(PreserveError, match="onnx checker: No Op registered for NoSuchOp"):
        VerifyPrefetchesPass(m)(out)
