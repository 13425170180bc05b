"""What `optimize` would see and do, without writing anything: collectives, windows, candidates, plan.

``inspect`` reads one model (never its weight bytes) and returns an ``Inspection``: every collective
with its window (also the ones ``--collectives`` does not select, since they still bound windows), the
plan that ``optimize`` would make with the same config, and the Prefetch nodes already in the model.
An already-optimized model is planned as ``--replan`` would: on the model without its Prefetch nodes,
so inspecting a model and its optimized self shows the same plan; its stale links (X read by no other
node, docs/design.md §9) are counted.

(The module is not called ``inspect`` so that ``preserve_onnx.inspect`` stays the function.)
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from preserve_onnx.config import OptimizeConfig, PrefetchNaming
from preserve_onnx.graph.index import iter_scopes
from preserve_onnx.optimizer import RankOutcome, map_path, planning_pipeline, resolve_model
from preserve_onnx.passes import Plan, Window
from preserve_onnx.passes.verify_prefetches import StaleLinks, stale_links


@dataclass(frozen=True)
class ExistingPrefetch:
    """A Prefetch node already in the model, read back through the configured naming."""

    graph: str  # scope path: "" for the main graph
    node: str
    anchor: str  # input 0
    tensor: str  # input 1 (X)
    collective: str  # the ``collective`` attribute ("" when absent)
    offset: int
    max_size: int  # 0 = the whole tensor
    max_tokens: int = 0  # the validity range written by optimize; 0 or absent = no limit
    # The live range (docs/design.md §3): input 2, L ("" = two inputs), X's sequence axis and the window;
    # an expert bank's min_tokens (0 = no limit).
    lengths: str = ""
    seq_axis: int | None = None
    window: int = 0
    min_tokens: int = 0


@dataclass(frozen=True)
class Inspection:
    """One model's collectives, windows, candidates and plan."""

    source: Path | None
    ranks: int
    collectives: tuple[Window, ...]  # every collective, selected or not, in graph order
    plan: Plan  # what optimize would insert (windows of the selected collectives only)
    prefetches: tuple[ExistingPrefetch, ...]  # Prefetch nodes the model already has
    seconds: float
    stale: StaleLinks | None = None  # links among ``prefetches`` whose X nothing else reads (None: no links)

    @property
    def outcome(self) -> RankOutcome:
        """The plan as the optimizer's outcome (nothing written), for the JSON report."""
        return RankOutcome(self.source, None, self.ranks, False, self.plan, None, self.seconds)


def inspect(
    model: onnx.ModelProto | str | Path, config: OptimizeConfig | None = None, ranks: int | None = None
) -> Inspection:
    """Inspect one model (a ModelProto or a path to a ``.onnx`` file); nothing is changed or written.

    ``ranks`` (for the collective time in the budget rule) defaults to ``config.ranks``, else the
    number of sibling rank files of a path, else 1, exactly as in ``optimize``.
    """
    config = config or OptimizeConfig()
    start = time.perf_counter()
    model, source, ranks = resolve_model(model, config, ranks)
    existing = _existing_prefetches(model, config.naming)
    stale = stale_links(model, config.naming) if existing else None
    # optimize's own passes, dry: check-order (what optimize refuses, inspect does not plan), then with
    # Prefetch nodes present what --replan would plan (they hide each collective's original input; the
    # initializers --replan drops are read by nothing after the strip: never candidates).
    result = planning_pipeline(config, ranks, strip=bool(existing))(model)
    collectives = result.stats("build-windows")  # every collective, flagged
    return Inspection(
        source,
        ranks,
        collectives,
        result.stats("plan-prefetches"),
        existing,
        time.perf_counter() - start,
        stale,
    )


def inspect_path(
    src: str | Path, config: OptimizeConfig | None = None, *, jobs: int | None = None
) -> tuple[Inspection, ...]:
    """Inspect a model file or every rank model of a directory (rank order)."""
    config = config or OptimizeConfig()
    return map_path(functools.partial(_inspect_one, config), Path(src), None, jobs=jobs)


def _inspect_one(
    config: OptimizeConfig, progress, src: Path, dest, ranks: int | None, copy_data
) -> Inspection:
    """A ``map_path`` task (module level, so worker processes can run it); writes nothing."""
    return inspect(src, config, config.ranks or ranks)  # an explicit --ranks wins, as in optimize


def _existing_prefetches(model: onnx.ModelProto, naming: PrefetchNaming) -> tuple[ExistingPrefetch, ...]:
    found = []
    for scope in iter_scopes(model):
        for node in scope.graph.node:
            if not naming.matches(node):
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            collective = attrs.get(naming.collective, b"")
            found.append(
                ExistingPrefetch(
                    graph=scope.path,
                    node=node.name,
                    anchor=node.input[0] if len(node.input) > 0 else "",
                    tensor=node.input[1] if len(node.input) > 1 else "",
                    collective=collective.decode() if isinstance(collective, bytes) else str(collective),
                    offset=int(attrs.get(naming.offset, 0)),
                    max_size=int(attrs.get(naming.max_size, 0)),
                    max_tokens=_int_attr(attrs.get(naming.max_tokens, 0)),
                    lengths=node.input[2] if len(node.input) > 2 else "",
                    seq_axis=attrs[naming.seq_axis] if isinstance(attrs.get(naming.seq_axis), int) else None,
                    window=_int_attr(attrs.get(naming.window, 0)),
                    min_tokens=_int_attr(attrs.get(naming.min_tokens, 0)),
                )
            )
    return tuple(found)


def _int_attr(value) -> int:
    """An attribute read back as an int; anything else (a vendor's string, a float) counts as 0 = no limit."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
