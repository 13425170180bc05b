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

from preserve_onnx.graph.dims import declared_types, message_bytes
from preserve_onnx.graph.index import Scope, is_collective, iter_scopes, node_label


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


def build_windows(
    model: onnx.ModelProto,
    collectives: tuple[str, ...] = ("AllReduce",),
    batch: int = 8,
    scopes: Sequence[Scope] | None = None,
) -> tuple[Window, ...]:
    """All collectives of the model with their windows, main graph first, then subgraphs."""
    windows = []
    for scope in scopes if scopes is not None else iter_scopes(model):
        nodes = scope.graph.node
        positions = [i for i, n in enumerate(nodes) if is_collective(n)]
        declared = declared_types(scope.graph) if positions else {}
        for k, index in enumerate(positions):
            node = nodes[index]
            end = positions[k + 1] if k + 1 < len(positions) else len(nodes)
            anchor = node.input[0] if node.input else ""
            windows.append(
                Window(
                    graph=scope.path,
                    index=index,
                    collective=node_label(node, index),
                    op_type=node.op_type,
                    anchor=anchor,
                    selected=node.op_type in collectives,
                    nodes=tuple(range(index + 1, end)),
                    message_bytes=message_bytes(scope, anchor, batch, declared),
                )
            )
    return tuple(windows)
