"""Analysis `collect-candidates`: the weights and KV-cache that a window's operators read.

Rule (docs/design.md §2, §4.2): consumers are the window's operators listed in ``CONSUMERS``; each input slot
named there is resolved to what is read from HBM:

* an initializer (own or outer scope) is a weight;
* a tensor made by constant-only operators (DequantizeLinear, Cast, Transpose, Reshape, ...) from
  initializers resolves to those root initializers, wherever the chain sits in the node list;
* a main-graph input in a KV slot is KV-cache; so is a structural KV-cache input (a graph input that
  reaches a graph output through a ``Concat`` with only layout operators between, docs/design.md §2),
  whose consumer is the window's first operator that reads its bytes or a layout copy of them
  (``Shape``/``Size`` read none: skipped with that reason). KV-cache is sized from ``--dim``,
  ``batch``/``context`` and the dims the graph fixes (``_dims``).

Refused, each with a reason that ``-v`` shows: activations (anything computed from a graph input),
the scale of a DequantizeLinear (onnxruntime fuses DQ+MatMul into a quantized kernel only while the
scale has no other reader), the quantized weight and the zero point of a DequantizeLinear unless
``qdq_weights`` (measured: onnxruntime 1.32 rewrites DQ+MatMul into MatMulNBits only while the weight
has no other reader, so a Prefetch reading it changes the logits; vendor toolchains that do not fuse
can opt in), outputs of ``Constant`` nodes (exporters put weights in initializers), the collective's
own input, and a tensor already covered in the window. Candidates come in order of first use (node
order, then input index). Nothing here reads weight bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from preserve_onnx.graph.dims import Sizing
from preserve_onnx.graph.index import (
    MS_DOMAIN,
    Scope,
    attr,
    initializer_nbytes,
    is_default_domain,
    node_label,
)
from preserve_onnx.graph.structure import (
    KvCachePath,
    Slots,
    consumer_slots,  # noqa: F401
    kv_cache_paths,
    reads_bytes,
)
from preserve_onnx.passes._live import EXPERT_SHARE, expert_min_tokens, expert_share, kv_buffer, kv_window
from preserve_onnx.passes.build_windows import Window

_NO_SLOTS = Slots()  # an operator that reads no weights or KV-cache through its slots

# Constant-only operators a weight may pass through; value = input indices that carry the weight
# (the others must be constant too, but are not prefetch targets).
CONSTANT_OPS: dict[str, tuple[int, ...]] = {
    "DequantizeLinear": (0, 2),
    "Cast": (0,),
    "CastLike": (0,),
    "Transpose": (0,),
    "Reshape": (0,),
    "Flatten": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Identity": (0,),
}


@dataclass(frozen=True)
class Candidate:
    """A tensor worth prefetching in a window."""

    tensor: str
    kind: str  # "weight" | "kv_cache"
    consumer: str
    slot: int
    nbytes: int  # bytes a whole link fetches: live bytes with ``lengths``, else the tensor's bytes
    # The live range of a KV link (docs/design.md §3 "Live ranges"): the tensor wired as L ("" = the
    # two-input form), X's sequence axis and the window (0 = every valid position).
    lengths: str = ""
    seq_axis: int | None = None
    window: int = 0
    # Expert banks (docs/design.md §4.8): the smallest tokens per step at which the hint pays off, and the
    # share of the bank a step reads at the planning point (1.0 for everything else).
    min_tokens: int = 0
    read_share: float = 1.0
    note: str = ""  # why a KV link keeps the two-input form, for -v


@dataclass(frozen=True)
class Skipped:
    """A consumer input that is not prefetched, and why."""

    tensor: str
    consumer: str
    slot: int
    reason: str


@dataclass(frozen=True)
class WindowCandidates:
    window: Window
    candidates: tuple[Candidate, ...]
    skipped: tuple[Skipped, ...]


def collect_candidates(
    scope: Scope,
    window: Window,
    *,
    batch: int = 8,
    context: int = 16384,
    kv: bool = True,
    qdq_weights: bool = False,
    sizing: Sizing | None = None,
    kv_paths: Mapping[str, KvCachePath] | None = None,
    static_kv: bool = False,
    positions: Mapping[str, int] | None = None,
) -> WindowCandidates:
    """Candidates of ``window`` (which lives in ``scope``), in first-use order; expert banks that a step
    reads less than half of at the planning point (``--batch`` tokens) come after everything else.

    ``sizing`` binds KV-cache dims (default: ``batch``/``context`` and nothing else); ``kv_paths`` are
    the main graph's structural KV-cache inputs (default: found here when ``scope`` is the main graph);
    ``static_kv`` keeps every KV link in the two-input form; ``positions``: tensor -> index of the node of
    ``scope.graph`` that makes it (default: worked out here), to tell whether a length input exists
    where the Prefetch goes.
    """
    sizing = sizing or Sizing(batch, context)
    if kv_paths is None:
        kv_paths = kv_cache_paths(scope.graph) if not scope.path else {}
    # Tensor -> the structural KV input whose bytes it carries (the input and its layout copies).
    kv_alias = {
        alias: path
        for path in kv_paths.values()
        for alias in path.aliases
        if path.input not in scope.local_inputs
    }
    nodes = scope.graph.node
    in_window = {out for i in window.nodes for out in nodes[i].output if out}
    # Every input of the collective (input 0 is the anchor; AllReduce is variadic): never a target.
    collective_inputs = set(nodes[window.index].input) - {""}
    candidates: list[Candidate] = []
    deferred: list[Candidate] = []  # expert banks read less than half at the planning point
    skipped: list[Skipped] = []
    seen: dict[str, str] = {}
    for i in window.nodes:
        node = nodes[i]
        slots = consumer_slots(node) or _NO_SLOTS
        structural = {slot for slot, name in enumerate(node.input) if name in kv_alias} if kv_alias else ()
        if not slots.weights and not slots.kv and not structural:
            continue
        consumer = node_label(node, i)
        for slot in sorted({*slots.weights, *slots.kv, *structural}):
            if slot >= len(node.input) or not node.input[slot]:
                continue  # optional input not given
            name = node.input[slot]

            def skip(reason: str, tensor: str = name) -> None:
                skipped.append(Skipped(tensor, consumer, slot, reason))

            if name in collective_inputs:
                skip("the collective's own input")
                continue
            if slot in structural:  # plain-operator KV-cache (docs/design.md §2, way 2)
                path = kv_alias[name]
                if not reads_bytes(node):
                    skip(
                        f"{node.op_type} reads only the KV-cache's shape, not its bytes: not a consumer",
                        path.input,
                    )
                    continue
                if not kv:
                    skip("KV-cache excluded by --no-kv", path.input)
                    continue
                found = [
                    (
                        path.input,
                        sizing.kv_bytes(
                            scope.main_inputs[path.input],
                            structural_kv_axes(path, scope.main_inputs[path.input]),
                        ),
                    )
                ]
                kind = "kv_cache"
                live = {}
            elif (
                slot in slots.kv
                and name in scope.main_inputs
                and name not in scope.initializers
                and name not in scope.local_inputs
            ):  # a Loop's carried state may reuse a KV name
                if not kv:
                    skip("KV-cache excluded by --no-kv")
                    continue
                live = _kv_live(scope, window, node, name, slots.kv_axes, sizing, static_kv, positions)
                found = [(name, live.pop("nbytes"))]
                kind = "kv_cache"
            elif slot in slots.weights:
                res = resolve_roots(scope, name, in_window, qdq_weights=qdq_weights)
                if res.reason:
                    skip(res.reason)
                    continue
                for tensor, why in res.excluded:
                    skip(why, tensor)
                found = []
                for root in res.roots:
                    if root in collective_inputs:
                        skip("the collective's own input (through a constant-only chain)", root)
                    elif root in scope.dq_scales:  # read here directly, but a DequantizeLinear's scale too
                        skip(DQ_SCALE, root)
                    elif root in scope.dq_weights and not qdq_weights:
                        skip(DQ_WEIGHT, root)
                    elif root in scope.dq_zero_points and not qdq_weights:
                        skip(DQ_ZERO_POINT, root)
                    else:
                        found.append((root, initializer_nbytes(scope.initializers[root])))
                kind = "weight"
                live = {}
            else:
                skip(
                    "KV slot not fed by a graph input"
                    if name not in scope.initializers
                    else "KV slot fed by an initializer"
                )
                continue
            for tensor, size in found:
                if tensor in seen:
                    skip(f"already covered in this window (first read by {seen[tensor]})", tensor)
                    continue
                seen[tensor] = consumer
                extra = (
                    _bank(node, slot, slots, scope.initializers[tensor], sizing.batch)
                    if kind == "weight"
                    else live
                )
                cand = Candidate(tensor, kind, consumer, slot, size, **extra)
                (deferred if cand.min_tokens and cand.read_share < EXPERT_SHARE else candidates).append(cand)
    return WindowCandidates(window, tuple(candidates + deferred), tuple(skipped))


def _kv_live(
    scope: Scope,
    window: Window,
    node: onnx.NodeProto,
    name: str,
    axes: tuple[int, int],
    sizing: Sizing,
    static_kv: bool,
    positions: Mapping[str, int] | None,
) -> dict:
    """A KV slot's link (docs/design.md §3 "Live ranges"): GroupQueryAttention's carry L = its
    ``seqlens_k`` (in[5]), ``seq_axis`` and ``window``, sized in live bytes; other attention ops (whose
    past holds exactly the valid positions) and ``static_kv`` keep the two-input form over the tensor's
    bytes. A ``seqlens_k`` not yet computed where the Prefetch goes also keeps it, with a note."""
    vi = scope.main_inputs[name]
    raw = sizing.kv_bytes(vi, axes)
    if node.domain != MS_DOMAIN or node.op_type != "GroupQueryAttention":
        return {"nbytes": raw}
    buffer = kv_buffer(node, vi, axes[1], sizing, raw)
    raw = buffer.nbytes  # a window cache holds its window, not --context
    if static_kv:
        return {"nbytes": raw}
    lengths = node.input[5] if len(node.input) > 5 else ""
    if not lengths:
        return {"nbytes": raw, "note": "two-input form: the GroupQueryAttention node has no seqlens_k"}
    where = _visible(scope, window, lengths, positions)
    if where:
        return {"nbytes": raw, "note": f"two-input form: seqlens_k '{lengths}' {where}"}
    return {"nbytes": buffer.live_bytes, "lengths": lengths, "seq_axis": axes[1], "window": kv_window(node)}


def _visible(scope: Scope, window: Window, tensor: str, positions: Mapping[str, int] | None) -> str:
    """An empty string when ``tensor`` exists where the window's Prefetch chain goes (before the
    collective), else why not."""
    if (
        tensor in scope.initializers
        or tensor in scope.local_inputs
        or (not scope.path and tensor in scope.main_inputs)
    ):
        return ""
    if positions is None:
        positions = producer_positions(scope.graph)
    if tensor in positions:
        if positions[tensor] < window.index:
            return ""
        index = positions[tensor]
        return (
            f"is made by {node_label(scope.graph.node[index], index)} (node {index}), after the collective "
            f"{window.collective}: the Prefetch would read it before it exists"
        )
    if scope.path and (tensor in scope.producers or tensor in scope.main_inputs):
        return ""  # made in an outer graph: in scope throughout this subgraph
    return "has no producer in scope"


def producer_positions(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor -> index of the node of ``graph`` that makes it."""
    return {out: i for i, n in enumerate(graph.node) for out in n.output if out}


def _bank(node: onnx.NodeProto, slot: int, slots: Slots, tensor: onnx.TensorProto, tokens: int) -> dict:
    """An expert bank's ``min_tokens`` and read share at ``tokens`` tokens per step (docs/design.md §4.8;
    uniform routing): ``k`` is the op's attribute, E the bank's axis 0."""
    if slot not in slots.experts:
        return {}
    dims = tensor.dims
    experts = int(dims[0]) if len(dims) else 0
    k = int(attr(node, "k", 1))
    return {"min_tokens": expert_min_tokens(k, experts), "read_share": expert_share(k, experts, tokens)}


# Constant inputs that are read but never prefetch targets, and why (``-v`` shows these).
DQ_SCALE = (
    "scale of DequantizeLinear: never a target (onnxruntime fuses DequantizeLinear+MatMul into a "
    "quantized kernel only while the scale has no other reader)"
)
DQ_WEIGHT = (
    "quantized weight of DequantizeLinear: not a target unless --qdq-weights (onnxruntime 1.32 "
    "rewrites DequantizeLinear+MatMul into MatMulNBits only while the weight has no other reader; "
    "a Prefetch reader changes its numerics)"
)
DQ_ZERO_POINT = (
    "zero point of DequantizeLinear: not a target unless --qdq-weights (it follows the quantized "
    "weight: onnxruntime's DequantizeLinear+MatMul fusion strands a zero point that another node reads)"
)


@dataclass(frozen=True)
class Resolution:
    """What a consumer input is read from: root initializers, or the reason it is not a constant."""

    roots: tuple[str, ...] = ()
    reason: str | None = None
    excluded: tuple[tuple[str, str], ...] = ()  # (initializer, why) read by the chain but not targets


def resolve_roots(
    scope: Scope, name: str, in_window: set[str] = frozenset(), *, qdq_weights: bool = False, depth: int = 0
) -> Resolution:
    """The root initializers that ``name`` is computed from by constant-only operators."""
    if name in scope.initializers:
        return Resolution((name,))
    if depth > 64:
        return Resolution(reason="constant chain deeper than 64 operators")
    node = scope.producers.get(name)
    if node is None:
        if name in scope.main_inputs or name in scope.local_inputs:
            return Resolution(reason="activation (graph input)")
        return Resolution(reason="activation (no producer in scope)")
    if node.op_type == "Constant" and is_default_domain(node.domain):
        return Resolution(reason="output of a Constant node (exporters keep weights in initializers)")
    targets = CONSTANT_OPS.get(node.op_type) if is_default_domain(node.domain) else None
    if targets is None:
        where = "in the window" if name in in_window else "outside the window"
        return Resolution(reason=f"activation (computed by {node.op_type} {where})")
    roots: list[str] = []
    excluded: list[tuple[str, str]] = []
    for index, inp in enumerate(node.input):
        if not inp:
            continue
        sub = resolve_roots(scope, inp, in_window, qdq_weights=qdq_weights, depth=depth + 1)
        if sub.reason and not (sub.reason.startswith("output of a Constant") and index not in targets):
            # Any non-constant operand makes the whole chain an activation.
            reason = (
                sub.reason if sub.reason.startswith("activation") else f"via {node.op_type}: {sub.reason}"
            )
            return Resolution(reason=reason)
        excluded.extend(sub.excluded)
        why = None
        if node.op_type == "DequantizeLinear" and index == 1:
            why = DQ_SCALE
        elif node.op_type == "DequantizeLinear" and index == 0 and not qdq_weights:
            why = DQ_WEIGHT
        elif node.op_type == "DequantizeLinear" and index == 2 and not qdq_weights:
            why = DQ_ZERO_POINT
        if why:
            excluded.extend((r, why) for r in sub.roots)
        elif index in targets:
            roots.extend(r for r in sub.roots if r not in roots)
    return Resolution(tuple(roots), None, tuple(excluded))


def structural_kv_axes(path: KvCachePath, vi: onnx.ValueInfoProto) -> tuple[int, int]:
    """(batch, sequence) axes of a plain-operator KV-cache input: batch first, the sequence the axis its
    Concat grows, else the usual ``[batch, heads, sequence, head_size]`` position (rank - 2)."""
    rank = len(vi.type.tensor_type.shape.dim)
    return 0, path.seq_axis if path.seq_axis is not None else max(0, rank - 2)
