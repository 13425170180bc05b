"""Walks along a graph that the layout finder shares: readers through layout operators, producers back to
the linears, the widths and fused parts of a linear's output. Structure only; no weight bytes.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from onnx import NodeProto

from preserve_onnx.graph.index import GraphIndex, Linear, attr, is_op
from preserve_onnx.graph.structure import LAYOUT_OPS, consumer_slots

# Operators that add a bias (input 1) to a linear's output.
BIAS_OPS = ("Add", "FastGelu", "BiasGelu", "BiasAdd")


def readers_through_layout(ix: GraphIndex, tensor: str) -> list[tuple[int, str]]:
    """(node, tensor it reads) for every non-layout, non-metadata reader reached via layout operators."""
    found, todo, seen = [], [tensor], set()
    while todo:
        t = todo.pop()
        for i in ix.consumers.get(t, ()):
            node = ix.nodes[i]
            if is_op(node, "Shape") or is_op(node, "Size"):
                continue
            if node.op_type in LAYOUT_OPS and node.input[0] == t:
                if node.output[0] not in seen:
                    seen.add(node.output[0])
                    todo.append(node.output[0])
            else:
                found.append((i, t))
    return found


def root_input(ix: GraphIndex, tensor: str) -> str | None:
    """The graph input behind ``tensor`` through layout operators, if any."""
    for _ in range(16):
        if tensor in ix.inputs:
            return tensor
        node = ix.producer_node(tensor)
        if node is None or node.op_type not in LAYOUT_OPS:
            return None
        tensor = node.input[0]
    return None


def walk_back(ix: GraphIndex, tensor: str, allowed=None) -> tuple[set[int], set[int], bool]:
    """Walk producers back from ``tensor``, stopping at linears, constants, graph inputs and Shape/Size.

    Returns (nodes passed, linears reached, ok); ok is False when ``allowed`` is given and a node
    outside it was met."""
    region, linears, todo, seen = set(), set(), [tensor], set()
    while todo:
        t = todo.pop()
        if not t or t in seen or ix.is_constant(t) or t in ix.inputs:
            continue
        seen.add(t)
        i = ix.producer.get(t)
        if i is None:
            continue  # captured from an outer scope
        node = ix.nodes[i]
        if i in ix.linears and t == node.output[0]:
            linears.add(i)
            continue
        if is_op(node, "Shape") or is_op(node, "Size"):
            continue
        if allowed is not None and node.op_type not in allowed:
            return region, linears, False
        region.add(i)
        reads = node.input[:1] if is_op(node, "CastLike") else node.input
        todo.extend(reads)
    return region, linears, True


def fused_parts(ix: GraphIndex, lin: Linear, tensor: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(part widths, cutting nodes) when ``tensor`` (a linear's output) is cut by Split/Slice on its last
    axis; ((width,), ()) otherwise."""
    readers = [i for i in ix.consumers.get(tensor, ()) if not is_op(ix.nodes[i], "Shape")]
    if len(readers) == 1 and is_op(ix.nodes[readers[0]], "Split"):
        node = ix.nodes[readers[0]]
        sizes = ix.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "split")
        if sizes is None:
            sizes = [lin.width // len(node.output)] * len(node.output)
        return tuple(int(s) for s in np.asarray(sizes).reshape(-1)), (readers[0],)
    if readers and all(is_op(ix.nodes[i], "Slice") for i in readers):
        bounds = []
        for i in readers:
            node = ix.nodes[i]
            starts, ends = ix.constant(node.input[1]), ix.constant(node.input[2])
            axes = ix.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if (
                starts is None
                or ends is None
                or starts.size != 1
                or (axes is not None and int(axes.reshape(-1)[0]) not in (-1, 2))
            ):
                return (lin.width,), ()
            bounds.append((int(starts.reshape(-1)[0]), min(int(ends.reshape(-1)[0]), lin.width)))
        bounds = sorted(set(bounds))
        if (
            bounds[0][0] == 0
            and bounds[-1][1] == lin.width
            and all(a[1] == b[0] for a, b in pairwise(bounds))
        ):
            return tuple(b - a for a, b in bounds), tuple(sorted(readers))
    return (lin.width,), ()


def bias_after(ix: GraphIndex, lin: Linear) -> tuple[tuple[str, ...], str]:
    """1-D constants of the linear's width added to its output right after it; and the tensor after them."""
    tensor = ix.nodes[lin.index].output[0]
    readers = ix.consumers.get(tensor, ())
    if len(readers) == 1:
        node = ix.nodes[readers[0]]
        if node.op_type in BIAS_OPS and len(node.input) == 2:
            other = node.input[1] if node.input[0] == tensor else node.input[0]
            t = ix.inits.get(other)
            if t is not None and list(t.dims) == [lin.width]:
                return (other,), node.output[0]
    return (), tensor


def width_of(ix: GraphIndex, tensor: str) -> int:
    """The last-axis width of ``tensor``, read back through bias Adds, layout operators and a Split or
    Slice to the linear that makes it (0 when unknown)."""
    for _ in range(16):
        i = ix.producer.get(tensor)
        if i is None:
            return 0
        node = ix.nodes[i]
        if i in ix.linears and tensor == node.output[0]:
            return ix.linears[i].width
        if is_op(node, "Split"):
            sizes = (
                ix.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "split")
            )
            if sizes is None:
                return width_of(ix, node.input[0]) // len(node.output)
            return int(np.asarray(sizes).reshape(-1)[list(node.output).index(tensor)])
        if is_op(node, "Slice"):
            starts, ends = ix.constant(node.input[1]), ix.constant(node.input[2])
            if starts is None or ends is None:
                return 0
            return min(int(ends.reshape(-1)[0]), width_of(ix, node.input[0])) - int(starts.reshape(-1)[0])
        if is_op(node, "Reshape"):  # a constant target's last entry (the builder's q/k norm: [0, -1, width])
            shape = ix.constant(node.input[1]) if len(node.input) > 1 else None
            last = int(shape.reshape(-1)[-1]) if shape is not None and shape.size else -1
            return max(0, last)
        if node.op_type in BIAS_OPS and not ix.is_constant(node.input[0]):
            tensor = node.input[0]
        elif node.op_type in BIAS_OPS:
            tensor = node.input[1]
        elif node.op_type in ("Cast", "Identity", "RotaryEmbedding", "MRotaryEmbedding"):
            tensor = node.input[0]
        else:
            return 0
    return 0


# Element-wise operators between an LM head and the logits: a bias, logit soft-capping (tanh(x/c)*c).
LOGIT_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Tanh"})


def reaches_output(ix: GraphIndex, tensor: str) -> bool:
    """Whether ``tensor`` becomes a graph output through layout and element-wise operators."""
    for _ in range(16):
        if tensor in ix.outputs:
            return True
        readers = [ix.nodes[i] for i in ix.consumers.get(tensor, ())]
        nxt = [n for n in readers if n.op_type in LAYOUT_OPS or n.op_type in LOGIT_OPS]
        if len(nxt) != 1:
            return False
        tensor = nxt[0].output[0]
    return False


def kv_slot_inputs(node: NodeProto) -> list[str]:
    """The KV-cache inputs of an attention operator (the planner's table, docs/design.md §2)."""
    slots = consumer_slots(node)
    picks = slots.kv if slots is not None else ()
    return [node.input[s] for s in picks if s < len(node.input) and node.input[s]]
