"""Rendering of the cost model: rich tables for `estimate`, its sweep grid and `explore`; the estimate and
sweep as JSON and the timelines as a Chrome/Perfetto trace."""

from __future__ import annotations

import dataclasses

from rich.table import Table

from preserve_onnx.cost.analysis import TRACKS
from preserve_onnx.cost.estimate import Estimate
from preserve_onnx.cost.explore import MIB, Exploration
from preserve_onnx.cost.sweep import SweepPoint
from preserve_onnx.hardware import format_size
from preserve_onnx.report import counted


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} us"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.3f} ms"


def estimate_table(est: Estimate, limit: int | None = 12) -> Table:
    """One row per window: collective time, planned and overlapped bytes, time saved, validity range."""
    title = (
        f"{est.source}: {est.hardware}, batch {est.batch}, context {est.context}, "
        f"{counted(est.ranks, 'rank')}"
        + (f" (export: {est.model_ranks})" if est.ranks != est.model_ranks else "")
    )
    table = Table(title=title, title_justify="left")
    table.add_column("collective", overflow="fold", ratio=3)
    for col in ("t_coll", "planned", "in L2", "saved", "upper bound", "max tokens"):
        table.add_column(col, justify="right", no_wrap=True)
    rows = est.windows if limit is None or len(est.windows) <= limit else est.windows[:limit]
    for w in rows:
        name = w.collective if not w.graph else f"{w.graph}/{w.collective}"
        table.add_row(
            name,
            _us(w.collective_s),
            format_size(w.planned_bytes),
            format_size(w.overlapped_bytes),
            _us(w.saved_s),
            _us(w.upper_bound_saved_s),
            _max_tokens(w.max_tokens, w.tokens),
        )
    if len(rows) < len(est.windows):
        rest = est.windows[len(rows) :]
        table.add_row(
            f"... {len(rest)} more windows",
            "",
            format_size(sum(w.planned_bytes for w in rest)),
            format_size(sum(w.overlapped_bytes for w in rest)),
            _us(sum(w.saved_s for w in rest)),
            _us(sum(w.upper_bound_saved_s for w in rest)),
            "",
        )
    return table


def _max_tokens(limit: int, tokens: int) -> str:
    """The validity range; marked when this step is past it (the runtime skips the hints)."""
    if not limit:
        return "-"
    return f"{limit} (skipped)" if tokens > limit else str(limit)


def estimate_summary(est: Estimate) -> str:
    return (
        f"step: baseline {_ms(est.baseline_s)}, with prefetches {_ms(est.preserve_s)} "
        f"([bold]{est.speedup:.3f}x[/bold]), upper bound {_ms(est.upper_bound_s)} "
        f"({est.upper_bound_speedup:.3f}x); the plan reaches {100 * est.share_of_upper_bound:.0f}% "
        f"of the upper bound's saving"
    )


def sweep_title(source: object, hardware: str) -> str:
    """The sweep grid's title: its cells are ``SweepPoint.speedup``, the baseline's step time over the
    plan's."""
    return f"{source}: speedup on {hardware} (baseline / plan step time)"


def sweep_table(points: tuple[SweepPoint, ...], source: object, hardware: str) -> Table:
    """The speedup grid: one row per (batch, context), one column per rank count, then what the step reads
    of the KV-cache and what the plan hints at the first rank count (docs/design.md §4.7-4.8: windowed
    layers read the same past their window, expert banks are hinted from their min_tokens on)."""
    ranks = sorted({p.ranks for p in points})
    table = Table(title=sweep_title(source, hardware), title_justify="left")
    table.add_column("batch", justify="right")
    table.add_column("context", justify="right")
    for r in ranks:
        table.add_column(counted(r, "rank"), justify="right", no_wrap=True)
    table.add_column(
        f"KV read ({counted(ranks[0], 'rank')})" if len(ranks) > 1 else "KV read",
        justify="right",
        no_wrap=True,
    )
    table.add_column("hinted", justify="right", no_wrap=True)
    cells: dict[tuple[int, int], dict[int, SweepPoint]] = {}
    for p in points:
        cells.setdefault((p.batch, p.context), {})[p.ranks] = p
    best = max(points, key=lambda p: p.speedup)
    for (batch, context), row in cells.items():
        values = []
        for r in ranks:
            p = row.get(r)
            text = f"{p.speedup:.2f}x" if p else "-"
            values.append(f"[bold]{text}[/bold]" if p is best else text)
        first = row.get(ranks[0])
        reads = (format_size(first.kv_read_bytes), format_size(first.hinted_bytes)) if first else ("-", "-")
        table.add_row(str(batch), _context(context), *values, *reads)
    return table


def _context(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def explore_table(ex: Exploration) -> Table:
    norm = ex.best("baseline").perf_per_cost_baseline
    table = Table(
        title=f"{ex.source}: L2 sweep on {ex.hardware}, batch {ex.batch}, context {ex.context}, "
        f"{counted(ex.ranks, 'rank')} (perf/cost relative to the baseline's best)",
        title_justify="left",
    )
    for col in ("L2", "area", "cost", "step baseline", "step plan", "perf/cost base", "perf/cost plan"):
        table.add_column(col, justify="right", no_wrap=True)
    best_b, best_p = ex.best("baseline"), ex.best("preserve")
    for p in ex.points:
        b = f"{p.perf_per_cost_baseline / norm:.3f}"
        q = f"{p.perf_per_cost_preserve / norm:.3f}"
        table.add_row(
            f"{p.l2_bytes // MIB} MiB",
            f"{p.area_mm2:.0f} mm2",
            f"${p.cost:,.0f}",
            _ms(p.baseline_s),
            _ms(p.preserve_s),
            f"[bold]{b}[/bold]" if p is best_b else b,
            f"[bold]{q}[/bold]" if p is best_p else q,
        )
    return table


def explore_summary(ex: Exploration) -> str:
    return (
        f"best L2: {ex.best('baseline').l2_bytes // MIB} MiB without prefetching, "
        f"{ex.best('preserve').l2_bytes // MIB} MiB with it; best perf/cost "
        f"[bold]{ex.gain:.3f}x[/bold] higher with prefetching"
    )


def chrome_trace(estimate: Estimate) -> dict:
    """Both timelines (and the upper bound) as a Chrome/Perfetto trace: one process per scenario, one
    thread per track; timestamps in microseconds."""
    events: list[dict] = []
    for pid, timeline in enumerate((estimate.baseline, estimate.preserve, estimate.upper), start=1):
        label = f"{timeline.scenario} ({timeline.step_s * 1e3:.3f} ms)"
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": label}})
        events.append(
            {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}
        )
        for tid, track in enumerate(TRACKS, start=1):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": track}})
        for e in timeline.events:
            events.append(
                {
                    "name": e.name,
                    "cat": e.category,
                    "ph": "X",
                    "pid": pid,
                    "tid": TRACKS.index(e.track) + 1,
                    "ts": e.start * 1e6,
                    "dur": e.duration * 1e6,
                    "args": dict(e.args),
                }
            )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ns",
        "otherData": {
            "hardware": estimate.hardware,
            "source": estimate.source,
            "batch": estimate.batch,
            "context": estimate.context,
            "ranks": estimate.ranks,
            "baseline_s": estimate.baseline_s,
            "preserve_s": estimate.preserve_s,
        },
    }


# ------------------------------------------------------------------------------------------ to JSON


def _json_head(result: Estimate | Exploration) -> dict:
    """What every cost-model JSON document starts with: schema, source, hardware and the planning point."""
    return {
        "schema": 1,
        "source": result.source,
        "hardware": result.hardware,
        "batch": result.batch,
        "context": result.context,
        "ranks": result.ranks,
    }


def estimate_dict(est: Estimate) -> dict:
    """The ``estimate --json`` document."""
    return {
        **_json_head(est),
        "model_ranks": est.model_ranks,
        "baseline_s": est.baseline_s,
        "preserve_s": est.preserve_s,
        "upper_bound_s": est.upper_bound_s,
        "speedup": est.speedup,
        "upper_bound_speedup": est.upper_bound_speedup,
        "share_of_upper_bound": est.share_of_upper_bound,
        "kv_read_bytes": est.kv_read_bytes,
        "hinted_bytes": est.hinted_bytes,
        "windows": [dataclasses.asdict(w) for w in est.windows],
    }


def sweep_list(points: tuple[SweepPoint, ...]) -> list[dict]:
    """The ``estimate --sweep --json`` document: a list of points."""
    return [
        {
            "batch": p.batch,
            "context": p.context,
            "ranks": p.ranks,
            "speedup": p.speedup,
            "upper_bound_speedup": p.upper_bound_speedup,
            "baseline_s": p.baseline_s,
            "preserve_s": p.preserve_s,
            "kv_read_bytes": p.kv_read_bytes,
            "hinted_bytes": p.hinted_bytes,
        }
        for p in points
    ]


def exploration_dict(ex: Exploration) -> dict:
    """The ``explore --json`` document."""
    return {
        **_json_head(ex),
        "points": [dataclasses.asdict(p) for p in ex.points],
        "best_l2_baseline_bytes": ex.best("baseline").l2_bytes,
        "best_l2_preserve_bytes": ex.best("preserve").l2_bytes,
        "perf_per_cost_gain": ex.gain,
    }
