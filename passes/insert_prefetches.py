"""Pass `insert-prefetches`: put a chain of Prefetch nodes on each collective's input path.

Invariant: values never change; only the node list and the cache hints do. For a collective C with
input A and planned tensors X1..Xn the pass writes, immediately before C in the node list::

    A1 = Prefetch(A, X1) ; A2 = Prefetch(A1, X2) ; ... ; C(An)

Consumers keep reading X directly, so X stays a constant to every runtime (prepacking, constant
folding and quantization fusions are unaffected). Refuses a model that already has Prefetch nodes
(run `strip-prefetches` first, which is what ``--replan`` does).
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.errors import PreserveError
from preserve_onnx.passes._graph import graph_by_path, iter_scopes
from preserve_onnx.passes.plan_prefetches import Plan, WindowPlan, plan_prefetches
from preserve_onnx.pipeline import Pass, PassResult


def count_prefetches(model: onnx.ModelProto, naming) -> int:
    return sum(1 for s in iter_scopes(model) for n in s.graph.node if naming.matches(n))


class InsertPrefetchesPass(Pass):
    name = "insert-prefetches"
    summary = "plan each collective's window and insert the Prefetch chain before the collective"

    def __init__(self, config: OptimizeConfig, ranks: int = 1):
        self.config = config
        self.ranks = ranks

    def run(self, model: onnx.ModelProto) -> PassResult:
        naming = self.config.naming
        existing = count_prefetches(model, naming)
        if existing:
            # Planning on top of old prefetches would double every chain and break strip(optimize(m)) == m.
            raise PreserveError(f"the model already contains {existing} {naming.domain}::{naming.op_type} "
                                f"nodes; pass --replan to strip them and plan again")
        plan = plan_prefetches(model, self.config, self.ranks)
        if plan.prefetch_count == 0:
            return PassResult(model, False, plan)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        by_graph: dict[str, dict[int, WindowPlan]] = defaultdict(dict)
        for wp in plan.windows:
            if wp.prefetches:
                by_graph[wp.window.graph][wp.window.index] = wp
        for path, at in by_graph.items():
            _rewrite(graph_by_path(out, path), at, self.config)
        _ensure_opset(out, naming.domain, naming.version)
        return PassResult(out, True, plan)


def _rewrite(graph: onnx.GraphProto, at: dict[int, WindowPlan], config: OptimizeConfig) -> None:
    naming = config.naming
    nodes = list(graph.node)
    new_nodes = []
    for index, node in enumerate(nodes):
        wp = at.get(index)
        if wp is not None:
            current = wp.window.anchor
            for p in wp.prefetches:
                new_nodes.append(helper.make_node(
                    naming.op_type, [current, p.tensor], [p.output], name=p.node, domain=naming.domain,
                    **{naming.max_size: p.max_size, naming.offset: p.offset,
                       naming.collective: wp.window.collective}))
                current = p.output
            node = onnx.NodeProto()
            node.CopyFrom(nodes[index])
            node.input[0] = current
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)


def _ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for op in model.opset_import:
        if op.domain == domain:
            if op.version != version:
                raise PreserveError(f"the model imports domain '{domain}' at version {op.version}, "
                                    f"not {version}; choose another --prefetch-domain")
            return
    model.opset_import.append(helper.make_opsetid(domain, version))
