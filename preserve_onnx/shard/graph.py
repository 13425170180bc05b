"""A read-only index of one graph for the sharder: producers, consumers, constants, linear layers.

A *linear* is an operator that multiplies an activation by a stored weight: ``MatMul`` whose input 1 is
an initializer or a ``DequantizeLinear`` of initializers, ``com.microsoft::MatMulNBits``, and
``com.microsoft::Attention`` (its fused q|k|v weight in input 1). Found by structure, never by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, numpy_helper

from preserve_onnx.config import MS_DOMAIN
from preserve_onnx.passes._graph import is_default_domain, node_label


def attr(node: NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            if a.type == a.INT:
                return int(a.i)
            if a.type == a.INTS:
                return [int(v) for v in a.ints]
            if a.type == a.FLOAT:
                return float(a.f)
            return a
    return default


def is_op(node: NodeProto, op: str, domain: str = "") -> bool:
    if domain:
        return node.domain == domain and node.op_type == op
    return is_default_domain(node.domain) and node.op_type == op


@dataclass(frozen=True)
class Linear:
    """A weight-bearing operator. ``kind``: matmul, qdq (MatMul of a DequantizeLinear), nbits, attention."""

    index: int
    name: str
    kind: str
    weight: str  # the initializer holding the (quantized) weight
    depth: int  # K: the rows of the weight
    width: int  # N: the output columns
    dq: int | None = None  # the DequantizeLinear node of a qdq weight


class GraphIndex:
    """Producers, consumers and constants of ``graph`` (Constant nodes count as constants)."""

    def __init__(
        self,
        graph: GraphProto,
        outer: GraphIndex | None = None,
        read: Callable[[TensorProto], np.ndarray] | None = None,
    ) -> None:
        """``outer``: the main graph's index, for an If branch that captures its weights and inputs;
        ``read``: the values of an external initializer (exporters put even shape constants there)."""
        self.graph = graph
        self.read = read or (outer.read if outer else None)
        self.nodes = list(graph.node)
        self.inits = dict(outer.inits) if outer else {}
        self.inits.update((t.name, t) for t in graph.initializer)
        self.inputs = dict(outer.inputs) if outer else {}
        self.inputs.update((vi.name, vi) for vi in graph.input if vi.name not in self.inits)
        self.outputs = {vi.name: vi for vi in graph.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for name in dict.fromkeys(node.input):
                if name:
                    self.consumers.setdefault(name, []).append(i)
        self.linears: dict[int, Linear] = {}
        for i, node in enumerate(self.nodes):
            lin = self._linear(i, node)
            if lin is not None:
                self.linears[i] = lin

    def label(self, index: int) -> str:
        return node_label(self.nodes[index], index)

    def producer_node(self, tensor: str) -> NodeProto | None:
        i = self.producer.get(tensor)
        return None if i is None else self.nodes[i]

    def constant(self, tensor: str) -> np.ndarray | None:
        """The value of a small constant (inline initializer or Constant node), else None."""
        t = self.inits.get(tensor)
        if t is not None and t.data_location == TensorProto.EXTERNAL:
            small = len(t.dims) <= 1 and (not t.dims or t.dims[0] <= 64)  # shapes, split sizes, slice bounds
            return np.array(self.read(t)) if self.read is not None and small else None
        if t is not None:
            return numpy_helper.to_array(t)
        node = self.producer_node(tensor)
        if node is not None and is_op(node, "Constant"):
            value = attr(node, "value")
            if value is not None and not isinstance(value, (int, float, list)):
                return numpy_helper.to_array(value.t)
            ints = attr(node, "value_ints")
            if isinstance(ints, list):
                return np.asarray(ints, np.int64)
            one = attr(node, "value_int")
            if isinstance(one, int):
                return np.asarray(one, np.int64)
        return None

    def is_constant(self, tensor: str) -> bool:
        node = self.producer_node(tensor)
        return tensor in self.inits or (node is not None and is_op(node, "Constant"))

    def _linear(self, i: int, node: NodeProto) -> Linear | None:
        label = node_label(node, i)
        if is_op(node, "MatMul") and len(node.input) == 2:
            w = node.input[1]
            if w in self.inits and len(self.inits[w].dims) == 2:
                dims = self.inits[w].dims
                return Linear(i, label, "matmul", w, int(dims[0]), int(dims[1]))
            dq = self.producer.get(w)
            if dq is not None and is_op(self.nodes[dq], "DequantizeLinear"):
                q = self.nodes[dq].input[0]
                if (
                    q in self.inits
                    and len(self.inits[q].dims) == 2
                    and all(x in self.inits or not x for x in self.nodes[dq].input)
                ):
                    dims = self.inits[q].dims
                    return Linear(i, label, "qdq", q, int(dims[0]), int(dims[1]), dq)
        if is_op(node, "MatMulNBits", MS_DOMAIN) and len(node.input) > 1 and node.input[1] in self.inits:
            return Linear(i, label, "nbits", node.input[1], attr(node, "K", 0), attr(node, "N", 0))
        if is_op(node, "Attention", MS_DOMAIN) and len(node.input) > 1 and node.input[1] in self.inits:
            dims = self.inits[node.input[1]].dims
            if len(dims) == 2:
                return Linear(i, label, "attention", node.input[1], int(dims[0]), int(dims[1]))
        return None
