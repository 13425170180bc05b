"""The estimate: a decode step without prefetches, with the plan and with every window filled, on one
hardware profile (docs/design.md §6; the model's equations: :mod:`preserve_onnx.cost`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.cost.analysis import Analysis, Link, analyze
from preserve_onnx.cost.timeline import Timeline, simulate
from preserve_onnx.errors import PreserveError
from preserve_onnx.hardware import HardwareProfile
from preserve_onnx.model_io import load_model, resolve_ranks
from preserve_onnx.passes.plan_prefetches import fill_window  # the planner's own rule


@dataclass(frozen=True)
class WindowEstimate:
    graph: str
    collective: str
    collective_s: float
    budget_bytes: int
    planned_bytes: int
    overlapped_bytes: int  # of the planned bytes, those in L2 when the consumers start
    saved_s: float
    upper_bound_bytes: int
    upper_bound_saved_s: float
    max_tokens: int = 0  # the window's validity range (0 = no limit)
    tokens: int = 1  # tokens per step in this estimate (above max_tokens the plan's hints are skipped)
    hinted_bytes: int = 0  # of the planned bytes, those the runtime hints at this step (max/min_tokens)


class _Speedups:
    """Speedups from ``baseline_s``, ``preserve_s`` and ``upper_bound_s`` (fields or properties)."""

    baseline_s: float
    preserve_s: float
    upper_bound_s: float

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.preserve_s if self.preserve_s else 1.0

    @property
    def upper_bound_speedup(self) -> float:
        return self.baseline_s / self.upper_bound_s if self.upper_bound_s else 1.0


@dataclass(frozen=True)
class Estimate(_Speedups):
    source: str
    hardware: str
    batch: int
    context: int
    ranks: int
    model_ranks: int
    baseline: Timeline
    preserve: Timeline
    upper: Timeline
    windows: tuple[WindowEstimate, ...]
    kv_read_bytes: int = 0  # KV-cache bytes the step reads (live bytes; docs/design.md §4.7)

    @property
    def hinted_bytes(self) -> int:
        return sum(w.hinted_bytes for w in self.windows)

    @property
    def baseline_s(self) -> float:
        return self.baseline.step_s

    @property
    def preserve_s(self) -> float:
        return self.preserve.step_s

    @property
    def upper_bound_s(self) -> float:
        return self.upper.step_s

    @property
    def share_of_upper_bound(self) -> float:
        """Fraction of the upper bound's time saving that the plan reaches (1.0 when nothing can be saved)."""
        possible = self.baseline_s - self.upper_bound_s
        return (self.baseline_s - self.preserve_s) / possible if possible > 0 else 1.0


def plan_chains(
    analysis: Analysis, hw: HardwareProfile, ranks: int, budget: int | None = None, l2_fraction: float = 0.5
) -> tuple[tuple[Link, ...], ...]:
    """Each window's planned chain at ``ranks``: the planner's fill rule over re-sharded candidates."""
    scale = analysis.model_ranks / ranks
    chains = []
    for w in analysis.windows:
        cands = tuple(dataclasses.replace(c, nbytes=int(c.nbytes * scale)) for c in w.candidates)
        limit = budget if budget is not None else hw.window_budget(w.message_bytes, ranks, l2_fraction)
        prefetches, _ = fill_window(w.window, cands, limit, analysis.config.min_chunk, 0, set())
        chains.append(
            tuple(
                Link(
                    p.tensor,
                    p.nbytes,
                    analysis.useful(p.tensor, p.offset, p.nbytes, bool(p.lengths), scale),
                    p.min_tokens,
                )
                for p in prefetches
            )
        )
    return tuple(chains)


def every_chain(analysis: Analysis, ranks: int) -> tuple[tuple[Link, ...], ...]:
    """The upper bound's chains: every candidate of every window, whole, at ``ranks``."""
    scale = analysis.model_ranks / ranks
    return tuple(
        tuple(
            Link(
                c.tensor,
                int(c.nbytes * scale),
                analysis.useful(c.tensor, 0, int(c.nbytes * scale), bool(c.lengths), scale),
            )
            for c in w.candidates
        )
        for w in analysis.windows
    )


def budgets(
    analysis: Analysis, hw: HardwareProfile, ranks: int, budget: int | None, l2_fraction: float
) -> tuple[int, ...]:
    return tuple(
        budget if budget is not None else hw.window_budget(w.message_bytes, ranks, l2_fraction)
        for w in analysis.windows
    )


def evaluate(
    analysis: Analysis,
    hw: HardwareProfile,
    ranks: int | None = None,
    budget: int | None = None,
    l2_fraction: float = 0.5,
) -> Estimate:
    """Baseline, plan and upper-bound timelines of ``analysis`` on ``hw`` at ``ranks`` ranks."""
    ranks = ranks or analysis.model_ranks
    if ranks < 1:
        raise PreserveError("ranks must be at least 1")
    none = tuple(() for _ in analysis.windows)
    planned = plan_chains(analysis, hw, ranks, budget, l2_fraction)
    every = every_chain(analysis, ranks)
    base = simulate(analysis, hw, none, ranks, l2_fraction, "baseline")
    pres = simulate(analysis, hw, planned, ranks, l2_fraction, "preserve")
    upper = simulate(analysis, hw, every, ranks, l2_fraction, "upper bound")
    windows = []
    for k, (w, limit) in enumerate(zip(analysis.windows, budgets(analysis, hw, ranks, budget, l2_fraction))):

        def saved(t: Timeline) -> float:
            return sum(base.durations[p] - t.durations[p] for p in w.op_positions)

        hinted = (
            0
            if 0 < w.max_tokens < w.tokens
            else sum(link.nbytes for link in planned[k] if link.min_tokens <= w.tokens)
        )
        windows.append(
            WindowEstimate(
                w.graph,
                w.collective,
                hw.collective_time(w.message_bytes, ranks),
                limit,
                sum(link.nbytes for link in planned[k]),
                pres.moved[k],
                saved(pres),
                upper.moved[k],
                saved(upper),
                w.max_tokens,
                w.tokens,
                hinted,
            )
        )
    scale = analysis.model_ranks / ranks
    kv_read = int(sum(r.nbytes for op in analysis.ops for r in op.reads if r.kind == "kv_cache") * scale)
    return Estimate(
        analysis.source,
        hw.name,
        analysis.batch,
        analysis.context,
        ranks,
        analysis.model_ranks,
        base,
        pres,
        upper,
        tuple(windows),
        kv_read,
    )


def rank_model(path: Path, ranks: int | None = None) -> tuple[Path, int]:
    """The rank model to estimate (rank 0 of what ``path`` names) and the rank count of its export."""
    files = resolve_ranks(path)
    return files[0], ranks or len(files)


def estimate_path(
    path: Path,
    hw: HardwareProfile,
    config: OptimizeConfig,
    ranks: int | None = None,
    budget: int | None = None,
) -> Estimate:
    """Estimate one rank model (or rank 0 of a directory) as ``optimize`` with ``config`` would plan it."""
    model_path, model_ranks = rank_model(path, ranks)
    model = load_model(model_path)
    cfg = dataclasses.replace(config, hardware=hw, budget=budget)
    return evaluate(
        analyze(model, cfg, model_ranks, str(model_path)), hw, model_ranks, budget, cfg.l2_fraction
    )
