"""Pass `insert-prefetches`: put a chain of Prefetch nodes on each collective's input path.

Invariant: values never change; only the node list and the cache hints do. For a collective C with
input A and planned tensors X1..Xn the pass writes, immediately before C in the node list::

    A1 = Prefetch(A, X1) ; A2 = Prefetch(A1, X2) ; ... ; C(An)

Every node carries ``max_size``, ``offset`` and ``collective``, and ``max_tokens`` when the window has a
validity range (the tokens per step past which the prefetch saves nothing; ``passes/_roofline.py``). A
GroupQueryAttention KV link also reads its node's ``seqlens_k`` as a third input L, with ``seq_axis`` and
``window`` (``Prefetch(A, X, L)``: offset and max_size count live bytes); an expert-bank link carries
``min_tokens`` (docs/design.md §3 "Live ranges", §4.7-4.8).

Consumers keep reading X directly, so X stays a constant to every runtime (prepacking, constant
folding and quantization fusions are unaffected). Refuses a model that already has Prefetch nodes
or a local function of the Prefetch's name (run `strip-prefetches` first, which is what ``--replan``
does).

The model also gets Prefetch's definition as a model-local function (``prefetch_function``: body
``Y = Identity(A)``), so every tool that infers shapes (ONNX shape inference, onnxruntime's symbolic
shape inference, the transformer optimizer) types each output like its A. A runtime that registers
the op runs its kernel instead (docs/design.md, "Chain safety"). Models below IR version 8 cannot
hold local functions and get none.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper

from preserve_onnx.config import PREFETCH_ATTRIBUTES, OptimizeConfig, PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.index import iter_graphs
from preserve_onnx.passes.plan_prefetches import Plan, WindowPlan
from preserve_onnx.passes.plan_prefetches import plan_prefetches as plan_model
from preserve_onnx.pipeline import Pass, PassResult


def count_prefetches(model: onnx.ModelProto, naming) -> int:
    return sum(1 for _, g in iter_graphs(model) for n in g.node if naming.matches(n))


class InsertPrefetchesPass(Pass):
    name = "insert-prefetches"
    summary = "insert each window's planned Prefetch chain before its collective"
    requires = ("plan-prefetches",)

    def __init__(self, config: OptimizeConfig, ranks: int = 1):
        self.config = config
        self.ranks = ranks

    def run(self, model: onnx.ModelProto, plan_prefetches: Plan | None = None) -> PassResult:
        """``plan_prefetches``: the plan-prefetches analysis's Plan (made here when the pass runs alone)."""
        plan = plan_prefetches
        naming = self.config.naming
        existing = count_prefetches(model, naming)
        if existing:
            # Planning on top of old prefetches would double every chain and break strip(optimize(m)) == m.
            raise PreserveError(
                f"the model already contains {existing} {naming.domain}::{naming.op_type} "
                f"nodes; pass --replan to strip them and plan again"
            )
        if prefetch_functions(model, naming):
            # strip removes the definition with the nodes: a foreign one would be lost.
            raise PreserveError(
                f"the model already defines a function {naming.domain}::{naming.op_type}; "
                f"pass --replan to remove it, or choose another --prefetch-domain"
            )
        in_use = any(n.domain == naming.domain for _, g in iter_graphs(model) for n in g.node)
        if plan is None:
            plan = plan_model(model, self.config, self.ranks)
        if plan.prefetch_count == 0:
            return PassResult(model, False, plan)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        by_graph: dict[str, dict[int, WindowPlan]] = defaultdict(dict)
        for wp in plan.windows:
            if wp.prefetches:
                by_graph[wp.window.graph][wp.window.index] = wp
        # Paths are taken before any edit, and inner graphs are edited before the graphs that hold them.
        for path, graph in reversed(list(iter_graphs(out))):
            if path in by_graph:
                _rewrite(graph, by_graph[path], self.config)
        _ensure_opset(out, naming.domain, naming.version, in_use)
        add_prefetch_function(out, naming)
        return PassResult(out, True, plan)


def _rewrite(graph: onnx.GraphProto, at: dict[int, WindowPlan], config: OptimizeConfig) -> None:
    """Insert each window's chain before its collective, last window first so indices stay valid."""
    naming = config.naming
    for index in sorted(at, reverse=True):
        wp = at[index]
        current = wp.window.anchor
        chain = []
        for p in wp.prefetches:
            chain.append(_prefetch_node(naming, current, p, wp.window.collective, wp.max_tokens))
            current = p.output
        graph.node[index].input[0] = current
        for node in reversed(chain):
            graph.node.insert(index, node)


def _prefetch_node(naming, anchor: str, p, collective: str, max_tokens: int = 0) -> onnx.NodeProto:
    """``p.output = Prefetch(anchor, p.tensor[, p.lengths])`` with attributes in name order (as onnx.helper
    does); ``max_tokens`` / ``min_tokens`` only when there is a limit (absent = no limit), ``seq_axis`` and
    ``window`` with the length input (docs/design.md §3)."""
    inputs = [anchor, p.tensor] + ([p.lengths] if p.lengths else [])
    node = onnx.NodeProto(
        op_type=naming.op_type, domain=naming.domain, name=p.node, input=inputs, output=[p.output]
    )
    attrs = [
        onnx.AttributeProto(name=naming.max_size, type=onnx.AttributeProto.INT, i=p.max_size),
        onnx.AttributeProto(name=naming.offset, type=onnx.AttributeProto.INT, i=p.offset),
        onnx.AttributeProto(name=naming.collective, type=onnx.AttributeProto.STRING, s=collective.encode()),
    ]
    if max_tokens > 0:
        attrs.append(onnx.AttributeProto(name=naming.max_tokens, type=onnx.AttributeProto.INT, i=max_tokens))
    if p.min_tokens > 0:
        attrs.append(
            onnx.AttributeProto(name=naming.min_tokens, type=onnx.AttributeProto.INT, i=p.min_tokens)
        )
    if p.lengths:
        attrs.append(onnx.AttributeProto(name=naming.seq_axis, type=onnx.AttributeProto.INT, i=p.seq_axis))
        attrs.append(onnx.AttributeProto(name=naming.window, type=onnx.AttributeProto.INT, i=p.window))
    node.attribute.extend(sorted(attrs, key=lambda a: a.name))
    return node


def _ensure_opset(model: onnx.ModelProto, domain: str, version: int, in_use: bool) -> None:
    """Import ``domain`` at ``version``. An import at another version that no node of the input used is
    kept as it is (onnxruntime's offline optimization imports every registered custom domain, ``preserve``
    at 1000): strip keeps it too, so strip(optimize(m)) == m."""
    for op in model.opset_import:
        if op.domain == domain:
            if op.version != version and in_use:
                raise PreserveError(
                    f"the model imports domain '{domain}' at version {op.version}, "
                    f"not {version}; choose another --prefetch-domain"
                )
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


# Functions need IR version 8 (onnx 1.10); an older model stays without one (its outputs untyped).
FUNCTION_IR_VERSION = 8


def prefetch_function(model: onnx.ModelProto, naming: PrefetchNaming) -> onnx.FunctionProto:
    """Prefetch's definition as a model-local function: ``Y = Identity(A)``, inputs ``A, X, L`` (L, the
    optional length input, and X only hint the cache), attributes as ``naming`` spells them.

    The body uses the model's own default-domain opset (the checker refuses any other version).
    """
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    return onnx.FunctionProto(
        name=naming.op_type,
        domain=naming.domain,
        input=["A", "X", "L"],
        output=["Y"],
        attribute=[getattr(naming, a) for a in PREFETCH_ATTRIBUTES],
        node=[onnx.NodeProto(op_type="Identity", input=["A"], output=["Y"])],
        opset_import=[helper.make_opsetid("", version)],
        doc_string="Y = A; X (and L's live range) are only a cache hint. For tools that infer shapes: a "
        "runtime that registers this op runs its own kernel.",
    )


def prefetch_functions(model: onnx.ModelProto, naming: PrefetchNaming) -> list[onnx.FunctionProto]:
    """The model-local functions spelled like Prefetch (any overload): what strip removes."""
    return [f for f in model.functions if f.domain == naming.domain and f.name == naming.op_type]


def add_prefetch_function(model: onnx.ModelProto, naming: PrefetchNaming) -> bool:
    """Append :func:`prefetch_function` to ``model`` (in place); False for a model below IR version 8."""
    if model.ir_version < FUNCTION_IR_VERSION:
        return False
    model.functions.append(prefetch_function(model, naming))
    return True
