"""The runtime tests' rank models, through tests/builders.py (onnx.helper, readable over clever)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.builders import MS, PRESERVE, RUNTIME_OPSETS, G, allreduce, init, opsets, prefetch, vi

OPSETS = RUNTIME_OPSETS
__all__ = ["OPSETS", "allreduce", "init", "model", "prefetch", "tp_mlp", "vi"]


def model(nodes, inputs, outputs, initializers=(), opsets=OPSETS) -> onnx.ModelProto:
    """A model with IR version 8 (accepted by every onnxruntime this project supports)."""
    return G(nodes=nodes, inputs=inputs, outputs=outputs, inits=initializers).runtime_model(opsets)


def tp_mlp(w1, w2, *, with_prefetch=False, domain=PRESERVE, op="Prefetch", elem=TensorProto.FLOAT):
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
    extra = () if domain == PRESERVE else (domain,)
    return model(
        nodes,
        [vi("x", elem, ["batch", w1.shape[0]])],
        [vi("mm", elem, None), vi("ar", elem, None), vi("y", elem, None)],
        [init("w1", w1), init("w2", w2)],
        opsets(17, MS, PRESERVE, *extra),
    )
