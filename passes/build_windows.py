"""Analysis `build-windows`: find every collective and the window of operators it can overlap.

Rule (docs/design.md §4.1): a collective's window is the operators after it in its graph's node order, up to
(not including) the next collective of *any* kind in the same graph. Collectives in If/Loop/Scan
bodies get windows inside their own body. Following reachability instead would make every window
reach the end of the model through the residual stream (SkipSimplifiedLayerNormalization output 3),
so plans would grow as O(layers^2).

Also derives each collective's message size (bytes of its input for one decode step), which the
budget rule needs: from value_info when the exporter wrote it, else from the weight of the
MatMul/Gemm/MatMulNBits that produces the message (row-parallel linear -> AllReduce).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import onnx
from onnx import NodeProto, TensorProto

from preserve_onnx.passes._graph import Scope, is_collective, iter_scopes, nbytes, node_label

_PASS_THROUGH = {"Add", "Mul", "Sub", "Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze"}
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


@dataclass(frozen=True)
class Window:
    """One collective and the operators after it, up to the next collective."""

    graph: str  # scope path: "" for the main graph
    index: int  # node index of the collective in its graph
    collective: str  # the collective's name (or a deterministic stand-in)
    op_type: str
    anchor: str  # the collective's input 0: what the Prefetch chain hangs off
    selected: bool  # op_type chosen by --collectives; unselected ones still bound windows
    nodes: tuple[int, ...]  # node indices in the window
    message_bytes: int  # bytes of the collective's input for one decode step (0 = unknown)


def build_windows(model: onnx.ModelProto, collectives: tuple[str, ...] = ("AllReduce",),
                  batch: int = 8, scopes: Sequence[Scope] | None = None) -> tuple[Window, ...]:
    """All collectives of the model with their windows, main graph first, then subgraphs."""
    windows = []
    for scope in scopes if scopes is not None else iter_scopes(model):
        nodes = scope.graph.node
        positions = [i for i, n in enumerate(nodes) if is_collective(n)]
        declared = _declared(scope.graph) if positions else {}
        for k, index in enumerate(positions):
            node = nodes[index]
            end = positions[k + 1] if k + 1 < len(positions) else len(nodes)
            anchor = node.input[0] if node.input else ""
            windows.append(Window(
                graph=scope.path,
                index=index,
                collective=node_label(node, index),
                op_type=node.op_type,
                anchor=anchor,
                selected=node.op_type in collectives,
                nodes=tuple(range(index + 1, end)),
                message_bytes=message_bytes(scope, anchor, batch, declared),
            ))
    return tuple(windows)


def message_bytes(scope: Scope, tensor: str, batch: int,
                  declared: dict[str, onnx.ValueInfoProto] | None = None) -> int:
    """Bytes of ``tensor`` in one decode step (sequence length 1, batch ``batch``); 0 when unknown."""
    vi = (declared if declared is not None else _declared(scope.graph)).get(tensor)
    size = _declared_bytes(vi, batch) if vi is not None else None
    if size is not None:
        return size
    return _bytes_from_producer(scope, tensor, batch, depth=0)


def _declared(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    """Tensor name -> the exporter's type declaration (value_info, graph outputs, graph inputs)."""
    found: dict[str, onnx.ValueInfoProto] = {}
    for vi in (*graph.value_info, *graph.output, *graph.input):
        found.setdefault(vi.name, vi)
    return found


def _declared_bytes(vi: onnx.ValueInfoProto, batch: int) -> int | None:
    tensor = vi.name
    if vi.type.HasField("tensor_type"):
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or tt.elem_type not in _FLOAT_TYPES:
            return None
        dims = []
        for axis, d in enumerate(tt.shape.dim):
            # Symbolic dims: the first is the batch, the others (sequence) are 1 in a decode step.
            dims.append(d.dim_value if d.HasField("dim_value") else (batch if axis == 0 else 1))
        return nbytes(tuple(dims), tt.elem_type, tensor)
    return None


def _bytes_from_producer(scope: Scope, tensor: str, batch: int, depth: int) -> int:
    width, dtype = producer_width(scope, tensor)
    return nbytes((batch, width), dtype, tensor) if width else 0


def producer_width(scope: Scope, tensor: str, depth: int = 0) -> tuple[int, int]:
    """(last-axis width, element type) of ``tensor`` when a linear layer with a constant weight makes
    it (through elementwise/layout operators such as a bias Add), else (0, 0)."""
    node: NodeProto | None = scope.producers.get(tensor)
    if node is None or depth > 8:
        return 0, 0
    width, dtype = _linear_output(scope, node)
    if width:
        return width, dtype
    if node.op_type in _PASS_THROUGH:
        for name in node.input:
            if name and name not in scope.initializers:
                return producer_width(scope, name, depth + 1)
    return 0, 0


def _linear_output(scope: Scope, node: NodeProto) -> tuple[int, int]:
    """(output width, element type) of a linear layer with a constant weight, else (0, 0)."""
    inits = scope.initializers
    if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
        w = inits[node.input[1]]
        if w.dims and w.data_type in _FLOAT_TYPES:
            return int(w.dims[-1]), w.data_type
    if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits:
        w = inits[node.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        if len(w.dims) == 2 and w.data_type in _FLOAT_TYPES:
            return int(w.dims[0] if trans_b else w.dims[1]), w.data_type
    if node.op_type == "MatMulNBits":
        n = next((a.i for a in node.attribute if a.name == "N"), 0)
        scales = inits.get(node.input[2]) if len(node.input) > 2 else None
        return int(n), (scales.data_type if scales is not None else TensorProto.FLOAT)
    return 0, 0
