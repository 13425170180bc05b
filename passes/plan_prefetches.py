"""Analysis `plan-prefetches`: decide, per window, which bytes to prefetch and name the nodes.

Rule (docs/design.md §4.3-4.4): each window gets a byte budget, ``--budget`` when given, else
``min(l2_fraction * usable L2, achieved hbm_bw * t_collective)`` from the hardware profile
(``HardwareProfile.window_budget``). Candidates are taken in first-use order while they fit whole. The
first one that does not fit is prefetched partially (``max_size`` = remaining budget) when the
remainder is at least ``min_chunk``, and planning for the window stops there. A span larger than the
profile's prefetch chunk (a policy) becomes several links of the chain with the same tensor and
increasing offsets. Each window also gets its validity range ``max_tokens`` (``_roofline.py``: the
tokens per step past which its prefetches save nothing; 0 = no limit). KV links of GroupQueryAttention
carry a length input and count live bytes (budget, offsets and sizes alike); expert-bank links carry
``min_tokens`` (``_live.py``, docs/design.md §4.7-4.8). Names are derived from the
collective and the tensor, made unique against every name in the model, so the same input always
gives the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.graph.dims import Sizing
from preserve_onnx.graph.index import all_names, iter_scopes
from preserve_onnx.graph.structure import kv_cache_paths
from preserve_onnx.passes._roofline import window_max_tokens
from preserve_onnx.passes.build_windows import Window, build_windows
from preserve_onnx.passes.collect_candidates import (
    Candidate,
    Skipped,
    WindowCandidates,
    collect_candidates,
    producer_positions,
)
from preserve_onnx.pipeline import Pass, PassResult


@dataclass(frozen=True)
class PlannedPrefetch:
    """One Prefetch node: ``output = Prefetch(input, tensor)`` over bytes [offset, offset+max_size)."""

    node: str
    output: str
    tensor: str
    kind: str
    consumer: str
    offset: int  # bytes; of the live bytes when ``lengths`` is set (docs/design.md §3 "Live ranges")
    max_size: int  # 0 = the whole tensor (all of its live bytes with ``lengths``)
    nbytes: int  # bytes this node brings in
    lengths: str = ""  # the length input L ("" = two inputs), with X's sequence axis and the window
    seq_axis: int | None = None
    window: int = 0
    min_tokens: int = 0  # expert banks: the hint is skipped below this many tokens per step (0 = no limit)


@dataclass(frozen=True)
class WindowPlan:
    window: Window
    budget: int
    candidates: tuple[Candidate, ...]
    skipped: tuple[Skipped, ...]
    prefetches: tuple[PlannedPrefetch, ...]
    max_tokens: int = 0  # largest tokens per step at which the prefetches still save time; 0 = no limit

    @property
    def prefetched_bytes(self) -> int:
        return sum(p.nbytes for p in self.prefetches)


@dataclass(frozen=True)
class Plan:
    """The whole model's plan: one WindowPlan per selected collective."""

    hardware: str
    budget_rule: str
    ranks: int
    windows: tuple[WindowPlan, ...]

    @property
    def prefetch_count(self) -> int:
        return sum(len(w.prefetches) for w in self.windows)

    @property
    def prefetched_bytes(self) -> int:
        return sum(w.prefetched_bytes for w in self.windows)


def plan_prefetches(model: onnx.ModelProto, config: OptimizeConfig, ranks: int = 1) -> Plan:
    """Plan every selected collective of ``model``: the three analyses in a row (``build-windows``,
    ``collect-candidates``, ``plan-prefetches``), as the pipeline runs them."""
    windows = build_windows(model, config.collectives, config.batch)
    return plan_windows(model, config, ranks, collect_all(model, config, windows))


def collect_all(
    model: onnx.ModelProto, config: OptimizeConfig, windows: tuple[Window, ...]
) -> tuple[WindowCandidates, ...]:
    """The candidates of every selected window (analysis ``collect-candidates``)."""
    scope_list = list(iter_scopes(model))
    scopes = {s.path: s for s in scope_list}
    kv_paths = kv_cache_paths(model.graph)
    sizing = Sizing.for_model(model, config.batch, config.context, config.dims, scope_list, kv_paths)
    positions: dict[str, dict[str, int]] = {}  # per graph, made on first need: where each tensor is made
    found = []
    for window in windows:
        if not window.selected:
            continue
        scope = scopes[window.graph]
        if window.graph not in positions:
            positions[window.graph] = producer_positions(scope.graph)
        found.append(
            collect_candidates(
                scope,
                window,
                kv=config.kv,
                qdq_weights=config.qdq_weights,
                sizing=sizing,
                kv_paths=kv_paths,
                static_kv=config.static_kv,
                positions=positions[window.graph],
            )
        )
    return tuple(found)


def plan_windows(
    model: onnx.ModelProto, config: OptimizeConfig, ranks: int, found: tuple[WindowCandidates, ...]
) -> Plan:
    """Budgets, the fill rule, names and validity ranges for each window's candidates (analysis
    ``plan-prefetches``)."""
    hw = config.hardware
    scopes = {s.path: s for s in iter_scopes(model)}
    taken = all_names(model)
    plans = []
    for wc in found:
        window = wc.window
        budget = (
            config.budget
            if config.budget is not None
            else hw.window_budget(window.message_bytes, ranks, config.l2_fraction)
        )
        prefetches, skipped = fill_window(
            window, wc.candidates, budget, config.min_chunk, hw.max_prefetch_bytes, taken
        )
        max_tokens = window_max_tokens(scopes[window.graph], window, wc.candidates, prefetches, hw)
        plans.append(
            WindowPlan(window, budget, wc.candidates, wc.skipped + skipped, tuple(prefetches), max_tokens)
        )
    rule = (
        f"--budget {config.budget} B per window"
        if config.budget is not None
        else f"min({config.l2_fraction} x usable L2, achieved HBM BW x t_collective) on {hw.name}"
    )
    return Plan(hw.name, rule, ranks, tuple(plans))


def fill_window(
    window: Window, candidates, budget: int, min_chunk: int, max_op: int, taken: set[str]
) -> tuple[list[PlannedPrefetch], tuple[Skipped, ...]]:
    """The fill rule for one window (first use order, one partial cut, per-op split); names taken
    from ``taken`` are avoided and added to it. Shared with the cost model so both agree."""
    prefetches: list[PlannedPrefetch] = []
    skipped: list[Skipped] = []
    remaining = budget
    for i, cand in enumerate(candidates):
        if cand.nbytes <= remaining:
            span = cand.nbytes
        elif remaining > 0 and remaining >= min_chunk:  # max_size 0 would mean the whole tensor
            span = remaining
        else:
            why = (
                f"budget exhausted ({remaining} B left < min chunk {min_chunk} B)"
                if remaining > 0
                else "budget exhausted (0 B left)"
            )
            for rest in candidates[i:]:
                skipped.append(Skipped(rest.tensor, rest.consumer, rest.slot, why))
            break
        whole = span == cand.nbytes
        pieces = _split(span, max_op)
        for k, (offset, size) in enumerate(pieces):
            base = f"{window.collective}/Prefetch/{cand.tensor}" + (f"/{k}" if len(pieces) > 1 else "")
            node = _unique(base, taken)
            output = _unique(f"{base}/out", taken)
            max_size = 0 if whole and len(pieces) == 1 else size
            prefetches.append(
                PlannedPrefetch(
                    node,
                    output,
                    cand.tensor,
                    cand.kind,
                    cand.consumer,
                    offset,
                    max_size,
                    size,
                    cand.lengths,
                    cand.seq_axis,
                    cand.window,
                    cand.min_tokens,
                )
            )
        remaining -= span
        if not whole:
            for rest in candidates[i + 1 :]:
                skipped.append(
                    Skipped(
                        rest.tensor,
                        rest.consumer,
                        rest.slot,
                        f"budget exhausted after partial prefetch of {cand.tensor}",
                    )
                )
            break
    return prefetches, tuple(skipped)


def _split(span: int, max_op: int) -> list[tuple[int, int]]:
    """[(offset, size)] covering ``span`` bytes in pieces of at most ``max_op`` (0 = no limit)."""
    if max_op <= 0 or span <= max_op:
        return [(0, span)]
    return [(off, min(max_op, span - off)) for off in range(0, span, max_op)]


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        candidate = f"{name}_{n}"
        n += 1
    taken.add(candidate)
    return candidate


class BuildWindowsPass(Pass):
    """Analysis: every collective and its window (docs/design.md §4.1); stats: the windows."""

    name = "build-windows"
    kind = "analysis"
    summary = "find every collective and the operators up to the next collective"

    def __init__(self, config: OptimizeConfig):
        self.config = config

    def run(self, model: onnx.ModelProto) -> PassResult:
        return PassResult(model, False, build_windows(model, self.config.collectives, self.config.batch))


class CollectCandidatesPass(Pass):
    """Analysis: what each selected window's operators read (docs/design.md §2, §4.2); stats: one
    WindowCandidates per selected window."""

    name = "collect-candidates"
    kind = "analysis"
    summary = "weights (through constant-only chains) and KV-cache each window reads"
    requires = ("build-windows",)

    def __init__(self, config: OptimizeConfig):
        self.config = config

    def run(self, model: onnx.ModelProto, build_windows: tuple[Window, ...]) -> PassResult:
        return PassResult(model, False, collect_all(model, self.config, build_windows))


class PlanPrefetchesPass(Pass):
    """Analysis: fit each window's candidates into its budget, cut, split and name them (docs/design.md
    §4.3-4.8); stats: the Plan."""

    name = "plan-prefetches"
    kind = "analysis"
    summary = "fit candidates into each window's budget; split, cut and name them"
    requires = ("collect-candidates",)

    def __init__(self, config: OptimizeConfig, ranks: int = 1):
        self.config = config
        self.ranks = ranks

    def run(self, model: onnx.ModelProto, collect_candidates: tuple[WindowCandidates, ...]) -> PassResult:
        return PassResult(model, False, plan_windows(model, self.config, self.ranks, collect_candidates))


def planning_passes(config: OptimizeConfig, ranks: int = 1) -> list[Pass]:
    """The three analyses that make a Plan, in pipeline order (optimize, inspect and the cost model run
    these same passes)."""
    return [BuildWindowsPass(config), CollectCandidatesPass(config), PlanPrefetchesPass(config, ranks)]
