"""Pass `drop-stale-weights`: remove initializers that only stale Prefetch links read (``--replan``).

Runs after `strip-prefetches` in ``optimize --replan``. A quantizer or converter run after ``optimize``
replaces the weights its consumers read, and the old ones stay in the file only because a Prefetch
link still names them (docs/design.md §9). The pipeline finds them on the input model
(``verify_prefetches.stale_links``: read by Prefetch nodes and by nothing else) and hands their names
to this pass.

Invariant: values never change: a tensor is dropped only when, after the strip, no node of any graph
reads it and it is no graph input or output (an unread initializer of the input model that no
Prefetch read is not named, so it stays). Its value_info entries go with it. Reads metadata only,
never weight bytes; the data files are compacted when the model is written (``optimizer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from preserve_onnx.graph.index import initializer_nbytes, iter_graphs
from preserve_onnx.model_io import external_info
from preserve_onnx.pipeline import Pass, PassResult


@dataclass(frozen=True)
class Dropped:
    names: tuple[str, ...]  # in initializer order
    nbytes: int  # their size from dims and element type
    locations: tuple[str, ...] = ()  # external-data files that held some of them (to compact)


class DropStaleWeightsPass(Pass):
    name = "drop-stale-weights"
    summary = "remove initializers that only stale Prefetch links read"

    def __init__(self, names: tuple[str, ...] = ()):
        self.names = frozenset(names)

    def run(self, model: onnx.ModelProto) -> PassResult:
        if not self.names:
            return PassResult(model, False, Dropped((), 0))
        read: set[str] = set()
        for _, graph in iter_graphs(model):
            read.update(vi.name for vi in graph.output)
            read.update(vi.name for vi in graph.input)
            for node in graph.node:
                read.update(node.input)
        drop = self.names - read
        if not drop:
            return PassResult(model, False, Dropped((), 0))
        out = onnx.ModelProto()
        out.CopyFrom(model)
        names: list[str] = []
        locations: dict[str, None] = {}
        size = 0
        for _, graph in iter_graphs(out):
            gone = [t for t in graph.initializer if t.name in drop]
            for t in gone:
                names.append(t.name)
                size += initializer_nbytes(t)
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    locations[external_info(t).get("location", "")] = None
                graph.initializer.remove(t)
            for vi in [vi for vi in graph.value_info if vi.name in drop]:
                graph.value_info.remove(vi)
        return PassResult(out, bool(names), Dropped(tuple(names), size, tuple(locations)))
