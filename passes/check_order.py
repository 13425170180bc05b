"""Check `check-order`: every graph lists its nodes in topological order, as ONNX requires.

Windows are defined by node order (docs/design.md §4.1), so an unsorted graph would give wrong windows and a
cyclic one cannot run at all. Refused with a message that says which: a cycle (names a node on it)
or a sortable graph in the wrong order (names the first node that reads a tensor too early). The
pass never reorders: sorting would change the graph that `strip` must give back. Subgraphs see the
names of their outer scopes.
"""

from __future__ import annotations

from collections import deque

import onnx
from onnx import AttributeProto

from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.index import producer_index
from preserve_onnx.pipeline import Pass, PassResult


def check_topological(graph: onnx.GraphProto, outer: frozenset[str] = frozenset(), where: str = "") -> None:
    """Raise PreserveError naming the first node that reads a tensor not yet produced."""
    available = set(outer)
    available.update(vi.name for vi in graph.input)
    available.update(t.name for t in graph.initializer)
    available.add("")
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name not in available:
                raise PreserveError(_order_error(graph, outer, where, index, name))
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                subs = [attr.g]
            elif attr.type == AttributeProto.GRAPHS:
                subs = list(attr.graphs)
            else:
                continue
            for sub in subs:
                check_topological(sub, frozenset(available), f"{where}{node.name or node.op_type}/")
        available.update(node.output)


def _order_error(graph: onnx.GraphProto, outer: frozenset[str], where: str, index: int, name: str) -> str:
    node = graph.node[index]
    label = f"{where}node {index} '{node.name or node.op_type}'"
    produced = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    if name not in produced:
        return f"{label} reads '{name}', which no node, input or initializer provides"
    stuck = _cycle_member(graph, outer)
    if stuck is not None:
        return f"the graph has a cycle (through node '{stuck}'); it cannot be optimized or run"
    return (
        f"{label} reads '{name}' before it is produced: the graph is not in topological order, "
        f"which ONNX requires (sort it first, e.g. with onnx-graphsurgeon's toposort)"
    )


def _cycle_member(graph: onnx.GraphProto, outer: frozenset[str]) -> str | None:
    """Kahn's algorithm over the graph's own edges; a node left over lies on (or behind) a cycle."""
    producer = producer_index(graph)
    deps = [{producer[x] for x in n.input if x in producer} for n in graph.node]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    waiting = [len(d) for d in deps]
    ready = deque(i for i, w in enumerate(waiting) if w == 0)
    done = 0
    while ready:
        i = ready.popleft()
        done += 1
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if done == len(graph.node):
        return None
    stuck = next(i for i, w in enumerate(waiting) if w > 0)
    return graph.node[stuck].name or graph.node[stuck].op_type


class CheckOrderPass(Pass):
    name = "check-order"
    kind = "check"
    summary = "refuse graphs whose nodes are not in topological order (or have a cycle)"

    def run(self, model: onnx.ModelProto) -> PassResult:
        check_topological(model.graph)
        return PassResult(model, False, None)
