"""Pass `verify-prefetches`: prove the rewritten model is still a valid graph. Changes nothing.

Checks: every graph is in topological order (subgraphs see their outer scope); every Prefetch has
two inputs and one output, reads an initializer or a graph input as X, carries non-negative
``max_size``/``offset`` within X's size, a ``collective`` name and, when present, a non-negative
integer ``max_tokens``, and its chain ends at that
collective; and the onnx checker reports no complaint that the input model did not already have
(real exports fail the checker before we touch them, e.g. contrib ops in the default domain).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from preserve_onnx.config import PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.passes.check_order import check_topological
from preserve_onnx.graph.index import initializer_nbytes, is_collective, iter_scopes
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


class VerifyPrefetchesPass(Pass):
    name = "verify-prefetches"
    summary = "check topological order, Prefetch well-formedness and no new onnx checker complaint"

    def __init__(self, baseline: onnx.ModelProto, naming: PrefetchNaming = PrefetchNaming()):
        self.baseline = baseline
        self.naming = naming

    def run(self, model: onnx.ModelProto) -> PassResult:
        check_topological(model.graph, frozenset(), "")
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
        if len(node.input) != 2 or len(node.output) != 1:
            raise PreserveError(f"{label} must have 2 inputs and 1 output")
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
        limit = attrs.get(n.max_tokens)  # optional validity range: a runtime would misread anything else
        if limit is not None and (limit.type != onnx.AttributeProto.INT or limit.i < 0):
            raise PreserveError(f"{label}: '{n.max_tokens}' must be a non-negative integer (0 = no limit)")
        if x in scope.initializers and offset + max_size > initializer_nbytes(scope.initializers[x]):
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
