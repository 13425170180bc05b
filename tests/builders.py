"""The tests' one graph builder: :class:`G` names everything explicitly, plus the free-standing pieces
(typed value info, an initializer from an array, Prefetch and collective nodes, opset imports).

The other test graph modules are thin uses of it: ``tests/runtime/_rt_graphs.py`` (runtime rank
models), ``tests/exporter_graphs.py`` (real exporter structures), ``tests/strategies.py`` (the
property tests' random graphs) and ``tests/shard/_models.py`` (the shard tests' single-device
decoders)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
PRESERVE = "preserve"
# IR version 8 is accepted by every onnxruntime this project supports: the runtime tests' models use it.
RUNTIME_IR = 8


def opsets(default: int = 17, *domains: str) -> list[onnx.OperatorSetIdProto]:
    """Opset imports: the default domain at ``default``, then each of ``domains`` at version 1."""
    return [helper.make_opsetid("", default)] + [helper.make_opsetid(d, 1) for d in domains]


# What the runtime loads: the default domain, com.microsoft's collectives and our Prefetch.
RUNTIME_OPSETS = opsets(17, MS, PRESERVE)


def vi(name: str, elem_type: int, shape) -> onnx.ValueInfoProto:
    """A typed value: ``shape`` a list of ints / names / None per axis, or None for no shape at all."""
    return helper.make_tensor_value_info(name, elem_type, shape)


def init(name: str, array) -> TensorProto:
    """An initializer holding ``array`` (anything numpy takes)."""
    return numpy_helper.from_array(np.asarray(array), name)


def prefetch(
    anchor: str,
    x: str,
    out: str,
    *,
    domain: str = PRESERVE,
    op: str = "Prefetch",
    max_size: int = 0,
    offset: int = 0,
    collective: str = "ar",
    name: str | None = None,
) -> onnx.NodeProto:
    """A Prefetch node ``out = Prefetch(anchor, x)``, named ``prefetch_<out>`` unless ``name`` is given."""
    return helper.make_node(
        op,
        [anchor, x],
        [out],
        name=name or f"prefetch_{out}",
        domain=domain,
        max_size=max_size,
        offset=offset,
        collective=collective,
    )


def collective(op: str, x: str, out: str, name: str, **attrs) -> onnx.NodeProto:
    """A com.microsoft collective (``AllReduce``, ``AllGather`` with ``axis``/``group_size``) of one input."""
    return helper.make_node(op, [x], [out], name=name, domain=MS, **attrs)


def allreduce(x: str, out: str, name: str = "ar") -> onnx.NodeProto:
    return collective("AllReduce", x, out, name)


class G:
    """Build a graph node by node: ``g.node("MatMul", ["x", "w"], ["y"])``; weights via ``g.weight``.

    Parts made elsewhere go in through the constructor (``G(nodes=..., inputs=..., ...)``) or the
    lists themselves (``g.nodes``, ``g.inits``, ``g.inputs``, ``g.outputs``, ``g.value_info``).
    """

    def __init__(
        self,
        name: str = "g",
        *,
        nodes: Iterable[onnx.NodeProto] = (),
        inputs: Iterable[onnx.ValueInfoProto] = (),
        outputs: Iterable[onnx.ValueInfoProto] = (),
        inits: Iterable[TensorProto] = (),
        value_info: Iterable[onnx.ValueInfoProto] = (),
    ):
        self.name = name
        self.nodes: list[onnx.NodeProto] = list(nodes)
        self.inits: list[TensorProto] = list(inits)
        self.inputs: list[onnx.ValueInfoProto] = list(inputs)
        self.outputs: list[onnx.ValueInfoProto] = list(outputs)
        self.value_info: list[onnx.ValueInfoProto] = list(value_info)

    # -- values ------------------------------------------------------------------------------------
    def input(self, name, shape, dtype=TensorProto.FLOAT):
        self.inputs.append(vi(name, dtype, shape))
        return name

    def output(self, name, shape=None, dtype=TensorProto.FLOAT):
        self.outputs.append(vi(name, dtype, shape))
        return name

    def declare(self, name, shape, dtype=TensorProto.FLOAT):
        """Declare an intermediate value's type in the graph's value_info."""
        self.value_info.append(vi(name, dtype, shape))
        return name

    def init(self, name, array):
        """An initializer from an array."""
        self.inits.append(init(name, array))
        return name

    def weight(self, name, shape, dtype=np.float32, seed=0):
        """A random initializer (normal floats, integers in [-8, 8)), seeded by ``seed`` and its position."""
        rng = np.random.default_rng(seed + len(self.inits))
        arr = (
            rng.standard_normal(shape).astype(dtype)
            if np.issubdtype(dtype, np.floating)
            else rng.integers(-8, 8, shape).astype(dtype)
        )
        return self.init(name, arr)

    # -- nodes -------------------------------------------------------------------------------------
    def add(self, node: onnx.NodeProto) -> onnx.NodeProto:
        self.nodes.append(node)
        return node

    def node(self, op, inputs, outputs, name=None, domain="", **attrs):
        """A node named ``<first output>_node`` unless ``name`` is given."""
        name = name if name is not None else outputs[0] + "_node"
        return self.add(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))

    def constant(self, name, value, tensor_name=None):
        """A ``Constant`` node writing ``value`` to ``name``, its tensor named ``tensor_name`` or ``name``."""
        self.node("Constant", [], [name], value=init(tensor_name or name, value))
        return name

    def allreduce(self, x, y, name=None):
        return self.add(allreduce(x, y, name=name or f"ar_{y}"))

    # -- results -----------------------------------------------------------------------------------
    def graph(self) -> onnx.GraphProto:
        return helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, self.inits, value_info=self.value_info
        )

    def model(
        self, opset=17, *, ir_version=9, imports: Sequence[onnx.OperatorSetIdProto] | None = None
    ) -> onnx.ModelProto:
        """The model; opset ``imports``, by default the default domain at ``opset`` and com.microsoft."""
        imports = list(imports) if imports is not None else opsets(opset, MS)
        return helper.make_model(self.graph(), ir_version=ir_version, opset_imports=imports)

    def runtime_model(self, imports: Sequence[onnx.OperatorSetIdProto] = RUNTIME_OPSETS) -> onnx.ModelProto:
        """The model as the runtime tests write it: IR version 8, the runtime's opsets."""
        return self.model(ir_version=RUNTIME_IR, imports=imports)


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
