import pytest

from preserve_onnx.errors import PreserveError
from preserve_onnx.passes import CheckOrderPass
from tests.builders import G, two_layer_mlp


def test_sorted_graph_passes_unchanged():
    m = two_layer_mlp()
    result = CheckOrderPass()(m)
    assert not result.modified and result.model is m


def test_unsorted_graph_is_refused_not_reordered():
    m = two_layer_mlp()
    nodes = list(m.graph.node)
    nodes[0], nodes[1] = nodes[1], nodes[0]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    with pytest.raises(
        PreserveError,
        match="node 0 'ar0' reads 'h0' before it is produced: the graph is not in topological order",
    ):
        CheckOrderPass()(m)


def test_cycle_is_named():
    g = G()
    g.input("x", ["batch", 8])
    g.node("Add", ["x", "b"], ["a"], name="first")
    g.node("Relu", ["a"], ["b"], name="second")
    g.output("b")
    with pytest.raises(PreserveError, match="the graph has a cycle \\(through node 'first'\\)"):
        CheckOrderPass()(g.model())


def test_dangling_input_is_named():
    g = G()
    g.input("x", ["batch", 8])
    g.node("Add", ["x", "ghost"], ["y"], name="add")
    g.output("y")
    with pytest.raises(PreserveError, match="reads 'ghost', which no node, input or initializer provides"):
        CheckOrderPass()(g.model())
