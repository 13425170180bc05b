"""The graph index every command shares: graphs and their scopes (:class:`Scope`, for the passes and the
cost model), tensor sizes, the one attribute reader (:func:`attr`), op matching, and :class:`GraphIndex`
(producers, consumers, small constants and linear layers of one graph, for ``shard``).

Nothing here reads weight bytes: sizes come from TensorProto dims and data_type only, so a model
loaded with ``load_external_data=False`` costs no more than its graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto, numpy_helper

from preserve_onnx.config import COLLECTIVE_OPS, MS_DOMAIN  # noqa: F401 - re-exported
from preserve_onnx.errors import PreserveError

# Bits per element for every TensorProto data type we can size; sub-byte types pack.
_BITS = {
    TensorProto.FLOAT: 32,
    TensorProto.UINT8: 8,
    TensorProto.INT8: 8,
    TensorProto.UINT16: 16,
    TensorProto.INT16: 16,
    TensorProto.INT32: 32,
    TensorProto.INT64: 64,
    TensorProto.BOOL: 8,
    TensorProto.FLOAT16: 16,
    TensorProto.DOUBLE: 64,
    TensorProto.UINT32: 32,
    TensorProto.UINT64: 64,
    TensorProto.COMPLEX64: 64,
    TensorProto.COMPLEX128: 128,
    TensorProto.BFLOAT16: 16,
    TensorProto.FLOAT8E4M3FN: 8,
    TensorProto.FLOAT8E4M3FNUZ: 8,
    TensorProto.FLOAT8E5M2: 8,
    TensorProto.FLOAT8E5M2FNUZ: 8,
    TensorProto.UINT4: 4,
    TensorProto.INT4: 4,
}
for _name, _bits in (("FLOAT4E2M1", 4), ("FLOAT8E8M0", 8), ("UINT2", 2), ("INT2", 2)):
    if hasattr(TensorProto, _name):
        _BITS[getattr(TensorProto, _name)] = _bits


def dtype_bits(data_type: int, what: str) -> int:
    """Bits per element of ``data_type``; PreserveError naming ``what`` for unknown or string types."""
    if data_type not in _BITS:
        name = (
            TensorProto.DataType.Name(data_type) if data_type in TensorProto.DataType.values() else data_type
        )
        raise PreserveError(f"{what}: unsupported element type {name}")
    return _BITS[data_type]


def nbytes(shape: tuple[int, ...], data_type: int, what: str) -> int:
    """Bytes of a dense tensor of ``shape`` (sub-byte types round up)."""
    count = 1
    for d in shape:
        count *= d
    return (count * dtype_bits(data_type, what) + 7) // 8


def initializer_nbytes(t: TensorProto) -> int:
    """Bytes of an initializer from its metadata (dims, data_type), never from its data."""
    return nbytes(tuple(t.dims), t.data_type, f"initializer '{t.name}'")


def is_default_domain(domain: str) -> bool:
    return domain in ("", "ai.onnx")


def is_collective(node: NodeProto) -> bool:
    return node.domain == MS_DOMAIN and node.op_type in COLLECTIVE_OPS


def node_label(node: NodeProto, index: int) -> str:
    """A node's name, or a deterministic stand-in for an unnamed one."""
    return node.name or f"{node.op_type}_{index}"


@dataclass
class Scope:
    """One graph with everything visible from it: own and outer initializers, producers, graph inputs.

    ``path`` is "" for the main graph and ``<node>/<attribute>`` (nested with '/') for subgraphs.
    ``main_inputs`` are the main graph's inputs (KV-cache lives there); the formal inputs of this
    subgraph and of the subgraphs around it (Loop/Scan state) are activations, even when they share a
    main input's name (``local_inputs``). ``dq_scales`` / ``dq_weights`` / ``dq_zero_points``: the tensors
    visible here that a DequantizeLinear reads as its scale / its quantized input / its zero point (never,
    or only on request, targets: docs/design.md §2).
    """

    path: str
    graph: GraphProto
    initializers: dict[str, TensorProto]
    producers: dict[str, NodeProto]
    main_inputs: dict[str, onnx.ValueInfoProto]
    local_inputs: frozenset[str] = field(default_factory=frozenset)
    dq_scales: frozenset[str] = field(default_factory=frozenset)
    dq_weights: frozenset[str] = field(default_factory=frozenset)
    dq_zero_points: frozenset[str] = field(default_factory=frozenset)


def producer_index(graph: GraphProto) -> dict[str, int]:
    """Tensor name -> the index of the node of ``graph`` that produces it (this graph's own nodes only):
    the one producer map the structure finders, check-order and :class:`GraphIndex` build on."""
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def iter_graphs(model: onnx.ModelProto) -> tuple[tuple[str, GraphProto], ...]:
    """``(path, graph)`` for every graph, in the same order as :func:`iter_scopes`, without building
    scopes (cheap: for walks that only look at nodes). Kept for the last model asked for, as
    :func:`iter_scopes` keeps its scopes: the graphs are the model's own objects, so edits inside them
    stay visible; a change of the main graph's node or initializer count walks it again."""
    key = (len(model.graph.node), len(model.graph.initializer))
    if _last_graphs[0] is model and _last_graphs[1] == key:
        return _last_graphs[2]
    graphs = tuple(_walk_graphs(model.graph, ""))
    _last_graphs[:] = [model, key, graphs]
    return graphs


_last_graphs: list = [None, None, ()]  # [model, (nodes, initializers), its graphs]


def _walk_graphs(graph: GraphProto, path: str) -> Iterator[tuple[str, GraphProto]]:
    yield path, graph
    for index, node in enumerate(graph.node):
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                subs = [(attr.name, attr.g)]
            elif attr.type == AttributeProto.GRAPHS:
                subs = [(f"{attr.name}[{i}]", g) for i, g in enumerate(attr.graphs)]
            else:
                continue
            for attr_name, sub in subs:
                label = f"{node_label(node, index)}:{attr_name}"
                yield from _walk_graphs(sub, f"{path}/{label}" if path else label)


def iter_scopes(model: onnx.ModelProto) -> tuple[Scope, ...]:
    """Every graph of the model (main first, then subgraphs depth-first in node order).

    The scopes of the last model asked for are kept (the model itself, so its id stays its own, with its
    node and initializer counts): the analyses of one pipeline ask for the same unchanged model in turn
    (passes never change the model they are given), and each walk of a 70B rank's graph costs ~10 ms.
    """
    key = (len(model.graph.node), len(model.graph.initializer))
    if _last_scopes[0] is model and _last_scopes[1] == key:
        return _last_scopes[2]
    main = model.graph
    main_inputs = {vi.name: vi for vi in main.input}
    scopes = tuple(
        _walk(
            main, "", {}, {}, main_inputs, frozenset(), frozenset(), (frozenset(), frozenset(), frozenset())
        )
    )
    _last_scopes[:] = [model, key, scopes]
    return scopes


_last_scopes: list = [None, None, ()]  # [model, (nodes, initializers), its scopes]


def _walk(graph, path, outer_inits, outer_producers, main_inputs, own_inputs, outer_locals, outer_dq):
    inits = dict(outer_inits)
    producers = dict(outer_producers)
    for name in own_inputs:
        # A subgraph's formal input shadows an outer tensor of the same name.
        inits.pop(name, None)
        producers.pop(name, None)
    for t in graph.initializer:
        inits[t.name] = t
        producers.pop(t.name, None)
    scales, quantized, zero_points = set(outer_dq[0]), set(outer_dq[1]), set(outer_dq[2])
    for node in graph.node:
        for out in node.output:
            if out:
                producers[out] = node
                inits.pop(out, None)
        if node.op_type == "DequantizeLinear" and is_default_domain(node.domain):
            quantized.add(node.input[0])
            if len(node.input) > 1:
                scales.add(node.input[1])
            if len(node.input) > 2 and node.input[2]:
                zero_points.add(node.input[2])
    local_inputs = outer_locals | own_inputs
    dq = (frozenset(scales), frozenset(quantized), frozenset(zero_points))
    yield Scope(path, graph, inits, producers, main_inputs, local_inputs, *dq)
    for index, node in enumerate(graph.node):
        for attr in node.attribute:
            subs = []
            if attr.type == AttributeProto.GRAPH:
                subs = [(attr.name, attr.g)]
            elif attr.type == AttributeProto.GRAPHS:
                subs = [(f"{attr.name}[{i}]", g) for i, g in enumerate(attr.graphs)]
            for attr_name, sub in subs:
                sub_path = (
                    f"{path}/{node_label(node, index)}:{attr_name}"
                    if path
                    else f"{node_label(node, index)}:{attr_name}"
                )
                sub_inputs = frozenset(vi.name for vi in sub.input)
                yield from _walk(sub, sub_path, inits, producers, main_inputs, sub_inputs, local_inputs, dq)


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every node and tensor name in every graph: what new names must not collide with."""
    names: set[str] = set()
    for _, g in iter_graphs(model):
        names.update(vi.name for vi in g.input)
        names.update(vi.name for vi in g.output)
        names.update(vi.name for vi in g.value_info)
        names.update(t.name for t in g.initializer)
        for node in g.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


def graph_by_path(model: onnx.ModelProto, path: str) -> GraphProto:
    """The (mutable) GraphProto at ``path`` in ``model``."""
    for graph_path, graph in iter_graphs(model):
        if graph_path == path:
            return graph
    raise PreserveError(f"internal: no graph at path '{path}'")  # pragma: no cover


def declared_types(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    """Tensor name -> the exporter's type declaration (value_info, graph outputs, graph inputs)."""
    found: dict[str, onnx.ValueInfoProto] = {}
    for vi in (*graph.value_info, *graph.output, *graph.input):
        found.setdefault(vi.name, vi)
    return found


# -- attributes, op matching and the node-level index (shard, the cost model, dim binding) ------------


def attr(node: NodeProto, name: str, default=None):
    """The value of ``node``'s attribute ``name`` (ints, floats, lists, TensorProto, bytes as onnx.helper
    returns them), else ``default``. The one attribute reader of the project."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
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
        self.producer: dict[str, int] = producer_index(graph)
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
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
            if isinstance(value, TensorProto):
                return numpy_helper.to_array(value)
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
