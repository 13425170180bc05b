"""Pass `strip-prefetches`: remove every Prefetch node and reconnect its readers to its input 0.

Invariant: values never change. ``strip(optimize(m))`` equals ``m`` as a graph: the collective gets
its original input back, value_info entries of removed tensors go, the Prefetch domain's opset
import (at the naming's version) is dropped once no node uses it, and so is Prefetch's model-local
function (what insert-prefetches adds for tools that infer shapes; also when a tool removed the nodes
and left it).
Handles subgraphs (a reader inside an If branch of an outer Prefetch output is reconnected too).
Refuses a Prefetch whose output is a graph output (removing it would rename a model output) or that
has no input.
"""

from __future__ import annotations

import onnx

from preserve_onnx.config import PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.index import iter_graphs
from preserve_onnx.passes.insert_prefetches import prefetch_functions
from preserve_onnx.pipeline import Pass, PassResult


class StripPrefetchesPass(Pass):
    name = "strip-prefetches"
    summary = "remove Prefetch nodes and reconnect each collective to its original input"

    def __init__(self, naming: PrefetchNaming = PrefetchNaming()):
        self.naming = naming

    def run(self, model: onnx.ModelProto) -> PassResult:
        if not any(
            self.naming.matches(n) for _, g in iter_graphs(model) for n in g.node
        ) and not prefetch_functions(model, self.naming):
            return PassResult(model, False, 0)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        replaced: dict[str, str] = {}
        graphs = [g for _, g in iter_graphs(out)]
        for g in graphs:
            for node in g.node:
                if self.naming.matches(node):
                    if len(node.input) not in (2, 3) or len(node.output) != 1 or not node.input[0]:
                        # Not ours: removing it (an op the naming options happen to match) would change
                        # what the model computes. A third input is the length input L (removed with it).
                        raise PreserveError(
                            f"node '{node.name}' ({node.domain}::{node.op_type}) is not a Prefetch (2 or 3 "
                            f"inputs, 1 output); check the Prefetch naming options; nothing was stripped"
                        )
                    replaced[node.output[0]] = node.input[0]

        def source(name: str) -> str:
            seen = 0
            while name in replaced:
                name = replaced[name]
                seen += 1
                if seen > len(replaced):
                    raise PreserveError("Prefetch nodes form a cycle; cannot strip them")
            return name

        removed = 0
        # Innermost graphs first: rebuilding an outer node list copies its nodes, which would detach
        # subgraphs not yet edited.
        for g in reversed(graphs):
            for vi in g.output:
                if vi.name in replaced:
                    raise PreserveError(f"Prefetch output '{vi.name}' is a graph output; cannot strip it")
            kept = [n for n in g.node if not self.naming.matches(n)]
            removed += len(g.node) - len(kept)
            if len(kept) != len(g.node):
                del g.node[:]
                g.node.extend(kept)
            for node in g.node:
                for i, name in enumerate(node.input):
                    if name in replaced:
                        node.input[i] = source(name)
            stale = [vi for vi in g.value_info if vi.name in replaced]
            for vi in stale:
                g.value_info.remove(vi)
        if not any(n.domain == self.naming.domain for g in graphs for n in g.node):
            for op in list(out.opset_import):
                # An import at another version was the input's own (insert-prefetches keeps it): stays.
                if op.domain == self.naming.domain and op.version == self.naming.version:
                    out.opset_import.remove(op)
        for fn in prefetch_functions(out, self.naming):
            out.functions.remove(fn)
        return PassResult(out, True, removed)
