"""Pass `verify-prefetches`: prove the rewritten model is still a valid graph. Changes nothing.

Checks: every graph is in topological order (subgraphs see their outer scope); every Prefetch has
two inputs (or three: the length input L) and one output, reads an initializer or a graph input as X,
carries non-negative ``max_size``/``offset`` within X's size, a ``collective`` name and, when present,
non-negative integers ``max_tokens`` / ``min_tokens``; with L, L is an int32/int64 tensor, ``seq_axis``
an axis of X and ``window`` a non-negative integer (docs/design.md §3 "Live ranges"); its chain ends at
that collective; and the onnx checker reports no complaint that the input model did not already have
(real exports fail the checker before we touch them, e.g. contrib ops in the default domain).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from preserve_onnx.config import PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.index import (
    MS_DOMAIN,
    attr,
    declared_types,
    initializer_nbytes,
    is_collective,
    is_default_domain,
    iter_graphs,
    iter_scopes,
)
from preserve_onnx.passes.check_order import check_topological
from preserve_onnx.pipeline import Pass, PassResult


@dataclass(frozen=True)
class Verification:
    graphs: int
    prefetches: int
    checker: str  # "clean" or "same complaint as the input: ..."


def checker_complaint(model: onnx.ModelProto) -> str | None:
    """The onnx checker's first complaint about ``model``'s graph (one line), or None.

    The checker sees the graph with the main graph's external initializers declared as graph inputs:
    given a ModelProto it would otherwise look for their data files relative to the current directory
    and stop at the first missing one, which would hide every complaint about the nodes (and make the
    verdict depend on where the command runs). model_io has already validated the data locations.
    """
    try:
        onnx.checker.check_model(_graph_only(model))
    except (onnx.checker.ValidationError, Exception) as exc:  # noqa: BLE001 - the checker raises several types
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def _graph_only(model: onnx.ModelProto) -> onnx.ModelProto:
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = {t.name for t in external}
    kept = [t for t in out.graph.initializer if t.name not in names]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    declared = {vi.name for vi in out.graph.input}
    for t in external:
        if t.name not in declared:
            # What onnx.helper.make_tensor_value_info builds, without its per-call checks (1000s here).
            vi = out.graph.input.add()
            vi.name = t.name
            tensor_type = vi.type.tensor_type
            tensor_type.elem_type = t.data_type
            tensor_type.shape.SetInParent()
            for d in t.dims:
                tensor_type.shape.dim.add().dim_value = d
    return out


@dataclass(frozen=True)
class StaleLink:
    graph: str  # scope path: "" for the main graph
    node: str
    tensor: str  # X
    reason: str = "unread"  # "unread": no node other than a Prefetch reads X; "computed": a node now makes X


@dataclass(frozen=True)
class StaleLinks:
    """The Prefetch links a tool run after ``optimize`` left behind (docs/design.md §9): X is read by no
    other node (a quantizer replaced the weight; the link still hints the old bytes), or X is computed by
    a node now (a float16 converter put a Cast between a graph input and every reader, the link too), no
    longer the weight or graph input that optimize targets."""

    total: int  # Prefetch nodes in the model
    stale: tuple[StaleLink, ...]
    # Initializers that only Prefetch nodes read (stale X kept in the file only by the links): what
    # ``optimize --replan`` drops. A graph input or output is never among them.
    prefetch_only: tuple[str, ...]

    def describe(self) -> str:
        """One line: ``9 of 13 Prefetch links are stale: ...; run optimize --replan``."""
        n = len(self.stale)
        parts = []
        for reason, phrase in (("unread", "no other node reads"), ("computed", "a node now computes")):
            names = [s.tensor for s in self.stale if s.reason == reason]
            if names:
                more = ", ..." if len(names) > 3 else ""
                parts.append(f"{phrase} " + ", ".join(f"'{t}'" for t in names[:3]) + more)
        return (
            f"{n} of {self.total} Prefetch link{'s' if self.total != 1 else ''} "
            f"{'are' if n != 1 else 'is'} stale: {'; '.join(parts)} (a quantizer or converter "
            f"changed the model after optimize); run optimize --replan"
        )


def stale_links(model: onnx.ModelProto, naming: PrefetchNaming = PrefetchNaming()) -> StaleLinks:
    """Every Prefetch whose X is read by no other node of any graph (nor is a graph output), or is the
    output of a node (not an initializer or graph input any more).

    Reads the graph only (names, never weight bytes); subgraphs count as readers of outer tensors.
    """
    read: set[str] = set()
    produced: set[str] = set()
    links: list[tuple[str, onnx.NodeProto]] = []
    initializers: set[str] = set()
    for path, graph in iter_graphs(model):
        read.update(vi.name for vi in graph.output)
        initializers.update(t.name for t in graph.initializer)
        for node in graph.node:
            if naming.matches(node):
                links.append((path, node))
                read.add(node.input[0] if node.input else "")
                read.update(node.input[2:])  # L is the attention node's own input: still read
            else:
                read.update(node.input)
                produced.update(node.output)
    interface = {vi.name for vi in model.graph.input}
    stale = []
    for path, node in links:
        x = node.input[1] if len(node.input) > 1 else ""
        if x and x not in read:
            stale.append(StaleLink(path, node.name, x))
        elif x in produced and x not in initializers and x not in interface:
            stale.append(StaleLink(path, node.name, x, "computed"))
    stale = tuple(stale)
    droppable = initializers - interface
    only = tuple(dict.fromkeys(s.tensor for s in stale if s.reason == "unread" and s.tensor in droppable))
    return StaleLinks(len(links), stale, only)


class VerifyPrefetchesPass(Pass):
    name = "verify-prefetches"
    kind = "check"
    summary = "check topological order, Prefetch well-formedness and no new onnx checker complaint"

    def __init__(self, baseline: onnx.ModelProto, naming: PrefetchNaming = PrefetchNaming()):
        self.baseline = baseline
        self.naming = naming

    def run(self, model: onnx.ModelProto) -> PassResult:
        check_topological(model.graph, frozenset(), "")
        self._main_graph = model.graph
        self._declared_cache = {}
        prefetches = 0
        graphs = 0
        for scope in iter_scopes(model):
            graphs += 1
            found = [n for n in scope.graph.node if self.naming.matches(n)]
            if not found:
                continue
            outputs = {n.output[0] for n in found if n.output}
            readers: dict[str, list[onnx.NodeProto]] = {}
            for node in scope.graph.node:
                for name in node.input:
                    if name in outputs:
                        readers.setdefault(name, []).append(node)
            for node in found:
                prefetches += 1
                self._check_prefetch(node, scope, readers)
        complaint = checker_complaint(model) if model is not self.baseline else None
        if complaint is not None:
            before = self._baseline_complaint()
            # A new complaint means the rewrite broke something the input had right.
            if before != complaint:
                raise PreserveError(f"onnx checker: {complaint}")
            verdict = f"same complaint as the input: {complaint}"
        else:
            verdict = "clean"
        return PassResult(model, False, Verification(graphs, prefetches, verdict))

    def _baseline_complaint(self) -> str | None:
        if not hasattr(self, "_baseline_result"):
            self._baseline_result = checker_complaint(self.baseline)
        return self._baseline_result

    def _check_prefetch(self, node, scope, readers) -> None:
        n = self.naming
        label = f"Prefetch node '{node.name}'"
        if len(node.input) not in (2, 3) or len(node.output) != 1:
            raise PreserveError(f"{label} must have 2 or 3 inputs and 1 output")
        x = node.input[1]
        if x not in scope.initializers and x not in scope.main_inputs:
            raise PreserveError(f"{label} reads '{x}', which is neither an initializer nor a graph input")
        attrs = {a.name: a for a in node.attribute}
        for key in (n.max_size, n.offset, n.collective):
            if key not in attrs:
                raise PreserveError(f"{label} lacks attribute '{key}'")
        max_size, offset = attrs[n.max_size].i, attrs[n.offset].i
        if max_size < 0 or offset < 0:
            raise PreserveError(f"{label} has a negative max_size or offset")
        # Optional validity ranges: a runtime would misread anything else.
        for key in (n.max_tokens, n.min_tokens):
            limit = attrs.get(key)
            if limit is not None and (limit.type != onnx.AttributeProto.INT or limit.i < 0):
                raise PreserveError(f"{label}: '{key}' must be a non-negative integer (0 = no limit)")
        lengths = node.input[2] if len(node.input) == 3 else ""
        if lengths:
            self._check_lengths(label, node, attrs, scope)
        elif x in scope.initializers and offset + max_size > initializer_nbytes(scope.initializers[x]):
            # With L, offset and max_size count live bytes, which the runtime clamps at every step.
            raise PreserveError(f"{label} covers bytes past the end of '{x}'")
        # Walk the chain: each output must feed exactly one node, ending at the named collective.
        current = node
        while True:
            users = readers.get(current.output[0], [])
            if len(users) != 1:
                raise PreserveError(f"{label}: its chain output feeds {len(users)} nodes, not 1")
            current = users[0]
            if not n.matches(current):
                break
        want = attrs[n.collective].s.decode()
        if not is_collective(current):
            raise PreserveError(f"{label}: its chain ends at {current.op_type}, not a collective")
        if current.name and current.name != want:
            raise PreserveError(f"{label} names collective '{want}' but feeds '{current.name}'")

    def _check_lengths(self, label: str, node, attrs, scope) -> None:
        """The length input L and its attributes: L an int32/int64 tensor, ``seq_axis`` an axis of X,
        ``window`` a non-negative integer."""
        n = self.naming
        lengths, x = node.input[2], node.input[1]
        dtype = _elem_type(scope, lengths, self._declared(scope))
        if dtype not in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
            what = onnx.TensorProto.DataType.Name(dtype) if dtype else "of unknown type"
            raise PreserveError(f"{label}: its length input '{lengths}' is {what}, not an int32/int64 tensor")
        axis = attrs.get(n.seq_axis)
        rank = _rank(scope, x)
        if axis is None or axis.type != onnx.AttributeProto.INT:
            raise PreserveError(f"{label} has a length input but no integer '{n.seq_axis}'")
        if rank is not None and not -rank <= axis.i < rank:
            raise PreserveError(f"{label}: '{n.seq_axis}' {axis.i} is not an axis of '{x}' (rank {rank})")
        window = attrs.get(n.window)
        if window is not None and (window.type != onnx.AttributeProto.INT or window.i < 0):
            raise PreserveError(
                f"{label}: '{n.window}' must be a non-negative integer (0 = every valid position)"
            )

    def _declared(self, scope) -> dict:
        """Declared types visible in ``scope`` (the main graph's, then the scope's own), once per scope."""
        if scope.path not in self._declared_cache:
            self._declared_cache[scope.path] = {
                **declared_types(self._main_graph),
                **declared_types(scope.graph),
            }
        return self._declared_cache[scope.path]


def _elem_type(scope, tensor: str, declared: dict) -> int:
    """``tensor``'s element type from its declaration, its initializer, the Cast that makes it, or a
    GroupQueryAttention reading it as ``seqlens_k`` (int32 by its schema); 0 when none says."""
    vi = declared.get(tensor)
    if vi is not None and vi.type.tensor_type.elem_type:
        return vi.type.tensor_type.elem_type
    if tensor in scope.initializers:
        return scope.initializers[tensor].data_type
    producer = scope.producers.get(tensor)
    if producer is not None and producer.op_type == "Cast" and is_default_domain(producer.domain):
        return int(attr(producer, "to", 0))
    if any(
        node.op_type == "GroupQueryAttention"
        and node.domain == MS_DOMAIN
        and len(node.input) > 5
        and node.input[5] == tensor
        for node in scope.graph.node
    ):
        return onnx.TensorProto.INT32
    return 0


def _rank(scope, tensor: str) -> int | None:
    if tensor in scope.initializers:
        return len(scope.initializers[tensor].dims)
    vi = scope.main_inputs.get(tensor)
    if vi is not None and vi.type.tensor_type.HasField("shape"):
        return len(vi.type.tensor_type.shape.dim)
    return None
