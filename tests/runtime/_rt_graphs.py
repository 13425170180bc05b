"""Small hand-built rank models for the runtime tests (onnx.helper, readable over clever)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSETS = [
    helper.make_opsetid("", 17),
    helper.make_opsetid("com.microsoft", 1),
    helper.make_opsetid("preserve", 1),
]


def model(nodes, inputs, outputs, initializers=(), opsets=OPSETS) -> onnx.ModelProto:
    """A model with IR version 8 (accepted by every onnxruntime this project supports)."""
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    m = helper.make_model(graph, opset_imports=list(opsets))
    m.ir_version = 8
    return m


def vi(name, elem_type, shape):
    return helper.make_tensor_value_info(name, elem_type, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def prefetch(anchor, x, out, *, domain="preserve", op="Prefetch", max_size=0, offset=0, collective="ar"):
    return helper.make_node(op, [anchor, x], [out], name=f"prefetch_{out}", domain=domain,
                            max_size=max_size, offset=offset, collective=collective)


def allreduce(inp, out, name="ar"):
    return helper.make_node("AllReduce", [inp], [out], name=name, domain="com.microsoft")


def tp_mlp(w1, w2, *, with_prefetch=False, domain="preserve", op="Prefetch", elem=TensorProto.FLOAT):
    """Row-parallel MLP rank: mm = x @ w1, ar = AllReduce(mm), y = Relu(ar) @ w2.

    With ``with_prefetch`` the AllReduce reads the chain mm -> Prefetch(mm, w2) (two chunks) ->
    Prefetch(..., w1), the shape the optimizer produces. Outputs: mm, ar, y.
    """
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["mm"], name="mm")]
    anchor = "mm"
    if with_prefetch:
        half = int(np.asarray(w2).nbytes // 2)
        nodes += [
            prefetch("mm", "w2", "mm_p0", domain=domain, op=op, max_size=half, offset=0),
            prefetch("mm_p0", "w2", "mm_p1", domain=domain, op=op, max_size=half, offset=half),
            prefetch("mm_p1", "w1", "mm_p2", domain=domain, op=op),
        ]
        anchor = "mm_p2"
    nodes += [
        allreduce(anchor, "ar"),
        helper.make_node("Relu", ["ar"], ["relu"], name="relu"),
        helper.make_node("MatMul", ["relu", "w2"], ["y"], name="down"),
    ]
    opsets = list(OPSETS)
    if domain != "preserve":
        opsets.append(helper.make_opsetid(domain, 1))
    return model(
        nodes,
        [vi("x", elem, ["batch", w1.shape[0]])],
        [vi("mm", elem, None), vi("ar", elem, None), vi("y", elem, None)],
        [init("w1", w1), init("w2", w2)],
        opsets,
    )
