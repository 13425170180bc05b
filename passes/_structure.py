"""Structure recognition shared by the planner, the cost model and ``shard``: found by graph shape,
never by names (docs/design.md §2).

The structural KV-cache rule: attention written in plain operators (TorchScript / dynamo exports, Olive's
tensor-parallel ranks, vendor toolchains' input) has no Attention op whose slot says "this is the cache".
Its cache is recognised by what the decoder does with it: a main-graph input that reaches a main-graph
output through a ``Concat`` (past -> present), with only layout operators between them. Everything the
input is turned into on its way to that Concat (the input itself, the layout operators' outputs) reads
the cache's bytes; ``Shape`` and ``Size`` read none.

Linear in the graph: one consumer map, then a walk along layout-operator chains only.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import GraphProto, NodeProto

from preserve_onnx.passes._graph import is_default_domain

# Operators that only move or relabel a tensor's elements (their other inputs are shapes/perms).
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Cast", "Unsqueeze", "Squeeze", "Identity"})
# Operators that read a tensor's metadata, not its bytes.
METADATA_OPS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class KvCachePath:
    """A plain-operator KV-cache: ``input`` -> layout ops -> ``Concat`` -> layout ops -> ``output``.

    ``aliases`` are the tensors that carry the input's bytes on the way to the Concat (the input first);
    ``seq_axis`` is the input's axis that the Concat grows (the sequence), or None when layout operators
    in between make it unknowable; ``concat`` is the Concat node's index in the main graph.
    """

    input: str
    output: str
    concat: int
    aliases: tuple[str, ...]
    seq_axis: int | None


def _consumers(graph: GraphProto) -> dict[str, list[int]]:
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in dict.fromkeys(node.input):
            if name:
                readers.setdefault(name, []).append(index)
    return readers


def _is_layout(node: NodeProto, tensor: str) -> bool:
    """Whether ``node`` only relabels ``tensor``'s elements (tensor must be its data input)."""
    return is_default_domain(node.domain) and node.op_type in LAYOUT_OPS and node.input[0] == tensor


def _is_concat(node: NodeProto) -> bool:
    return is_default_domain(node.domain) and node.op_type == "Concat"


def kv_cache_paths(graph: GraphProto) -> dict[str, KvCachePath]:
    """Main-graph input name -> its KV-cache path, for every input that follows the structural rule."""
    readers = _consumers(graph)
    outputs = {vi.name for vi in graph.output}
    initializers = {t.name for t in graph.initializer}
    reaches_output: dict[str, str | None] = {}  # memo: tensor -> graph output reached by layout ops

    def output_of(tensor: str, depth: int = 0) -> str | None:
        if tensor in reaches_output:
            return reaches_output[tensor]
        found = tensor if tensor in outputs else None
        if found is None and depth < 16:
            for i in readers.get(tensor, ()):
                node = graph.node[i]
                if _is_layout(node, tensor) and node.output and node.output[0]:
                    found = output_of(node.output[0], depth + 1)
                    if found:
                        break
        reaches_output[tensor] = found
        return found

    paths: dict[str, KvCachePath] = {}
    for vi in graph.input:
        if vi.name in initializers:
            continue  # an input with a default value is a constant to every runtime
        rank = len(vi.type.tensor_type.shape.dim) if vi.type.tensor_type.HasField("shape") else None
        # Walk the layout chain from the input; the first Concat whose output reaches an output wins.
        # axes: for each axis of the current tensor, the input's axis it came from (None: lost).
        frontier = [(vi.name, (vi.name,), tuple(range(rank)) if rank else None)]
        while frontier and vi.name not in paths:
            tensor, aliases, axes = frontier.pop(0)
            for i in readers.get(tensor, ()):
                node = graph.node[i]
                if _is_concat(node):
                    out = output_of(node.output[0]) if node.output and node.output[0] else None
                    if out is not None:
                        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
                        seq = None
                        if axes is not None and axis is not None and -len(axes) <= axis < len(axes):
                            seq = axes[axis % len(axes)]
                        paths[vi.name] = KvCachePath(vi.name, out, i, aliases, seq)
                        break
                elif _is_layout(node, tensor) and node.output and node.output[0] and len(aliases) < 16:
                    frontier.append((node.output[0], (*aliases, node.output[0]), _follow_axes(node, axes)))
    return paths


def _follow_axes(node: NodeProto, axes: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The input axes behind ``node``'s output axes (Cast/Identity keep them, Transpose permutes them)."""
    if axes is None or node.op_type in ("Cast", "Identity"):
        return axes
    if node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        perm = perm or list(reversed(range(len(axes))))
        return tuple(axes[p] for p in perm) if sorted(perm) == list(range(len(axes))) else None
    return None  # Reshape/Squeeze/Unsqueeze: the sequence axis can no longer be told


def reads_bytes(node: NodeProto) -> bool:
    """Whether ``node`` reads its inputs' values (``Shape``/``Size`` read only metadata)."""
    return not (is_default_domain(node.domain) and node.op_type in METADATA_OPS)
