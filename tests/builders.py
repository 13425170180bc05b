"""Small readable graphs for the pass tests: a builder that names everything explicitly."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"


class G:
    """Build a graph node by node: ``g.node("MatMul", ["x", "w"], ["y"])``; weights via ``g.weight``."""

    def __init__(self, name: str = "g"):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []

    def input(self, name, shape, dtype=TensorProto.FLOAT):
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name, shape=None, dtype=TensorProto.FLOAT):
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def weight(self, name, shape, dtype=np.float32, seed=0):
        rng = np.random.default_rng(seed + len(self.inits))
        arr = rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else \
            rng.integers(-8, 8, shape).astype(dtype)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(self, op, inputs, outputs, name=None, domain="", **attrs):
        n = helper.make_node(op, inputs, outputs, name=name if name is not None else outputs[0] + "_node",
                             domain=domain, **attrs)
        self.nodes.append(n)
        return n

    def allreduce(self, x, y, name=None):
        return self.node("AllReduce", [x], [y], name=name or f"ar_{y}", domain=MS)

    def graph(self) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits,
                                 value_info=self.value_info)

    def model(self, opset=17) -> onnx.ModelProto:
        return helper.make_model(self.graph(), ir_version=9,
                                 opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])


def two_layer_mlp(hidden=16, inner=32) -> onnx.ModelProto:
    """x -> MatMul(w0) -> AllReduce -> MatMul(w1) -> MatMul(w2) -> AllReduce -> MatMul(w3) -> y."""
    g = G()
    g.input("x", ["batch", hidden])
    g.node("MatMul", ["x", g.weight("w0", (hidden, hidden))], ["h0"], name="mm0")
    g.allreduce("h0", "a0", name="ar0")
    g.node("MatMul", ["a0", g.weight("w1", (hidden, inner))], ["h1"], name="mm1")
    g.node("MatMul", ["h1", g.weight("w2", (inner, hidden))], ["h2"], name="mm2")
    g.allreduce("h2", "a1", name="ar1")
    g.node("MatMul", ["a1", g.weight("w3", (hidden, hidden))], ["y"], name="mm3")
    g.output("y", ["batch", hidden])
    return g.model()


def ops(graph: onnx.GraphProto) -> list[str]:
    """The node list as 'op_type' strings, Prefetch shown with its tensor: 'Prefetch(w1)'."""
    out = []
    for n in graph.node:
        out.append(f"{n.op_type}({n.input[1]})" if n.op_type == "Prefetch" else n.op_type)
    return out


def if_model() -> onnx.ModelProto:
    """An If whose two branches each AllReduce x and MatMul it with the outer weight w_outer."""
    then = G("then")
    then.allreduce("x", "a", name="ar_then")
    then.node("MatMul", ["a", "w_outer"], ["y_then"], name="mm_then")
    then.output("y_then")
    other = G("else")
    other.allreduce("x", "b", name="ar_else")
    other.node("MatMul", ["b", "w_outer"], ["y_else"], name="mm_else")
    other.output("y_else")
    g = G()
    g.input("x", ["batch", 8])
    g.input("cond", [], TensorProto.BOOL)
    g.weight("w_outer", (8, 8))
    g.node("If", ["cond"], ["y"], name="if", then_branch=then.graph(), else_branch=other.graph())
    g.output("y")
    return g.model()
