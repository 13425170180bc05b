"""The whole model's plan: a layout per graph that holds layers (the main graph, or the branches of an
``If`` such as onnxruntime's merged decoders, whose weights and KV-cache live in the main graph), the
rank graph, and one cut per weight. Reads no weight bytes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from preserve_onnx.config import MS_DOMAIN
from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.index import GraphIndex, is_collective, iter_graphs, node_label
from preserve_onnx.shard.layout import Layout, find_layout
from preserve_onnx.shard.rewrite import Cut, Rewriter, divide_head_axis

LAYER_OPS = frozenset(
    {"MatMul", "MatMulNBits", "GroupQueryAttention", "MultiHeadAttention", "Attention", "Softmax"}
)
BRANCHES = ("then_branch", "else_branch")


@dataclass(frozen=True)
class ShardPlan:
    """``model``: the rank graph (same on every rank; its initializers still describe the source's
    tensors); ``cuts``: how each changed initializer becomes a rank's; ``layouts``: one per graph."""

    model: onnx.ModelProto
    cuts: dict[str, Cut]
    layouts: tuple[Layout, ...]


def _check_collectives(model: onnx.ModelProto) -> None:
    for _, graph in iter_graphs(model):
        for i, node in enumerate(graph.node):
            if is_collective(node):
                raise PreserveError(
                    f"the model already has collectives ({node.op_type} '{node_label(node, i)}'): "
                    f"it is sharded already"
                )


def _layer_graphs(model: onnx.ModelProto) -> list[tuple[int | None, onnx.GraphProto]]:
    """(owning If node's index or None, graph) for each graph holding layers, If branches first (the main
    graph's rewrite copies its nodes, and the branches with them)."""
    branches = {
        f"{node_label(n, i)}:{a.name}"
        for i, n in enumerate(model.graph.node)
        for a in n.attribute
        if a.name in BRANCHES and a.type == onnx.AttributeProto.GRAPH
    }
    for path, graph in iter_graphs(model):
        layers = [n for n in graph.node if n.op_type in LAYER_OPS]
        if layers and path and path not in branches:
            raise PreserveError(
                f"unrecognised layer structure at node '{layers[0].name}' in {path}: layers "
                f"inside Loop/Scan bodies or nested subgraphs are not supported"
            )
    found: list[tuple[int | None, onnx.GraphProto]] = []
    for index, node in enumerate(model.graph.node):
        for a in node.attribute:
            if (
                a.name in BRANCHES
                and a.type == onnx.AttributeProto.GRAPH
                and any(n.op_type in LAYER_OPS for n in a.g.node)
            ):
                found.append((index, a.g))
    if any(n.op_type in LAYER_OPS for n in model.graph.node):
        found.append((None, model.graph))
    return found


def _main_io(
    model: onnx.ModelProto,
    branch_layouts: dict[int, list[tuple[onnx.GraphProto, Layout]]],
    main: Layout | None,
    world: int,
) -> None:
    """Main-graph KV-cache inputs read in If branches, and the If outputs their present caches become."""
    graph = model.graph
    names = set()
    for index, pairs in branch_layouts.items():
        node = graph.node[index]
        for branch, layout in pairs:
            names |= layout.kv_inputs
            names |= {node.output[j] for j, vi in enumerate(branch.output) if vi.name in layout.sharded}
    done = main.sharded if main else set()
    for vi in list(graph.input) + list(graph.output):
        if vi.name in names and vi.name not in done:
            divide_head_axis(vi, world)
    keep = [vi for vi in graph.value_info if vi.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def inferred_dims(model: onnx.ModelProto, read=None) -> dict[str, tuple[int | None, ...]]:
    """Dims of every tensor that ONNX shape inference can tell; small external integer constants (shapes)
    are inlined for it first, the weights never read."""
    graph_only = onnx.ModelProto()
    graph_only.CopyFrom(model)
    for _, graph in iter_graphs(graph_only) if read is not None else ():
        for t in graph.initializer:
            if (
                t.data_location == onnx.TensorProto.EXTERNAL
                and t.data_type == onnx.TensorProto.INT64
                and len(t.dims) <= 1
                and (not t.dims or t.dims[0] <= 64)
            ):
                t.CopyFrom(numpy_helper.from_array(np.array(read(t)), t.name))
    try:
        inferred = onnx.shape_inference.infer_shapes(graph_only, strict_mode=False)
    except Exception:  # noqa: BLE001 - a graph it cannot infer: every dim unknown, nothing is guessed
        return {}
    dims = {}
    for _, graph in iter_graphs(inferred):
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                dims[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return dims


def plan_shards(
    model: onnx.ModelProto,
    world: int,
    *,
    vocab_parallel: bool = False,
    dims: dict[str, int] | None = None,
    read: Callable[[onnx.TensorProto], np.ndarray] | None = None,
) -> ShardPlan:
    """Find the layout of every graph with layers and rewrite a copy of ``model`` into the rank graph.
    ``read`` gives the values of small external initializers (shape constants); no weight is read."""
    _check_collectives(model)
    shapes = inferred_dims(model, read)
    rank_model = copy.deepcopy(model)
    main_ix = GraphIndex(rank_model.graph, read=read)
    cuts: dict[str, Cut] = {}
    layouts, branch_layouts, main_layout = [], {}, None
    graphs = _layer_graphs(rank_model)
    if not graphs:
        raise PreserveError(
            "unrecognised layer structure: no attention found (GroupQueryAttention, "
            "MultiHeadAttention, Attention, or MatMul -> Softmax -> MatMul)"
        )
    for owner, graph in graphs:
        ix = main_ix if owner is None else GraphIndex(graph, outer=main_ix)
        layout = find_layout(ix, world, vocab_parallel=vocab_parallel, dims=dims)
        Rewriter(graph, ix, layout, world, cuts, shapes).apply(vocab_parallel)
        layouts.append(layout)
        if owner is None:
            main_layout = layout
        else:
            branch_layouts.setdefault(owner, []).append((graph, layout))
    if branch_layouts:
        _main_io(rank_model, branch_layouts, main_layout, world)
    if not any(o.domain == MS_DOMAIN for o in rank_model.opset_import):
        rank_model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return ShardPlan(rank_model, cuts, tuple(layouts))
