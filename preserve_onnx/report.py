"""Rendering: the JSON report (schema 1) and rich tables. Passes only return data; this turns it
into something people read or machines parse."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from preserve_onnx.config import PREFETCH_ATTRIBUTES, OptimizeConfig
from preserve_onnx.hardware import HardwareProfile, format_size
from preserve_onnx.model_io import write_bytes_atomic
from preserve_onnx.optimizer import RankOutcome
from preserve_onnx.passes import Plan, WindowPlan

SCHEMA = 1


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 window``, ``0 windows``, ``2 prefetches`` (``plural`` where an added s is wrong): never
    "1 ranks"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def hardware_dict(hw: HardwareProfile) -> dict:
    data = dataclasses.asdict(hw)
    data["collective_alphas"] = dict(hw.collective_alphas)  # implementation -> seconds
    data["sources"] = dict(sorted(hw.sources.items()))
    return data


def window_dict(wp: WindowPlan, verbose: bool = True) -> dict:
    w = wp.window
    data = {
        "graph": w.graph,
        "collective": w.collective,
        "op_type": w.op_type,
        "message_bytes": w.message_bytes,
        "budget_bytes": wp.budget,
        "prefetched_bytes": wp.prefetched_bytes,
        "max_tokens": wp.max_tokens,  # the validity range (docs/design.md §3); 0 = no limit
        "prefetches": [
            {
                "node": p.node,
                "tensor": p.tensor,
                "kind": p.kind,
                "consumer": p.consumer,
                "offset": p.offset,
                "max_size": p.max_size,
                "bytes": p.nbytes,
                # The live range (docs/design.md §3): L's tensor (null = two inputs; offset, max_size and
                # bytes then count live bytes), X's sequence axis and the window; expert banks' min_tokens.
                "lengths": p.lengths or None,
                "seq_axis": p.seq_axis,
                "window": p.window,
                "min_tokens": p.min_tokens,
            }
            for p in wp.prefetches
        ],
    }
    if verbose:
        data["candidates"] = [dataclasses.asdict(c) for c in wp.candidates]
        data["skipped"] = [dataclasses.asdict(s) for s in wp.skipped]
    return data


def plan_dict(plan: Plan) -> dict:
    return {
        "ranks": plan.ranks,
        "prefetch_count": plan.prefetch_count,
        "prefetched_bytes": plan.prefetched_bytes,
        "windows": [window_dict(wp) for wp in plan.windows],
    }


def report_dict(outcomes: Sequence[RankOutcome], config: OptimizeConfig) -> dict:
    """The `--report` / `inspect --json` document (schema 1); deterministic for the same input."""
    return {
        "schema": SCHEMA,
        "hardware": hardware_dict(config.hardware),
        "budget": config.budget,
        "budget_rule": outcomes[0].plan.budget_rule if outcomes else None,
        "settings": {
            "l2_fraction": config.l2_fraction,
            "batch": config.batch,
            "context": config.context,
            "kv": config.kv,
            "static_kv": config.static_kv,
            "qdq_weights": config.qdq_weights,
            "collectives": list(config.collectives),
            "min_chunk": config.min_chunk,
            "prefetch_domain": config.naming.domain,
            "prefetch_op": config.naming.op_type,
            "prefetch_version": config.naming.version,
            "prefetch_attributes": {a: getattr(config.naming, a) for a in PREFETCH_ATTRIBUTES},
        },
        "models": [
            {
                "source": str(o.source) if o.source else None,
                "output": str(o.output) if o.output else None,
                **plan_dict(o.plan),
                **replan_dict(o),
            }
            for o in outcomes
        ],
    }


def replan_dict(o: RankOutcome) -> dict:
    """``--replan`` on a model with stale links (docs/design.md §9): what was stale and what was dropped."""
    if o.stale is None or not o.stale.stale:
        return {}
    dropped = o.dropped.names if o.dropped is not None else ()
    return {
        "replan": {
            "prefetch_links": o.stale.total,
            "stale_links": len(o.stale.stale),
            "dropped_initializers": list(dropped),
            "dropped_bytes": o.dropped.nbytes if o.dropped is not None else 0,
            "data_bytes_left_out": o.compacted,
        }
    }


def replan_line(o: RankOutcome) -> str | None:
    """``model_00.onnx: 11 of 13 Prefetch links were stale; re-planned on the new weights, dropped 11
    initializers only they read (308.0 KiB), data file 248.0 KiB smaller`` (None: nothing was stale)."""
    if o.stale is None or not o.stale.stale:
        return None
    name = o.source.name if o.source else "model"
    n = len(o.dropped.names) if o.dropped is not None else 0
    line = (
        f"{name}: {len(o.stale.stale)} of {o.stale.total} Prefetch links were stale; re-planned on the new "
        f"weights, dropped {counted(n, 'initializer')} only they read"
    )
    if n:
        line += f" ({format_size(o.dropped.nbytes)})"
    if o.compacted:
        line += f", data files {format_size(o.compacted)} smaller"
    return line


def write_json(path: Path, data: dict) -> None:
    write_bytes_atomic(Path(path), (json.dumps(data, indent=2) + "\n").encode())


def plan_table(outcome: RankOutcome, title: str) -> Table:
    """One row per window: what its Prefetch chain brings in, against the window's budget."""
    table = Table(title=title, title_justify="left")
    table.add_column("collective", overflow="fold", ratio=3)
    table.add_column("tensors", justify="right")
    table.add_column("weights", justify="right", no_wrap=True)
    table.add_column("KV-cache", justify="right", no_wrap=True)
    table.add_column("budget", justify="right", no_wrap=True)
    table.add_column("used", justify="right", no_wrap=True)
    table.add_column("max tokens", justify="right", no_wrap=True)
    for wp in outcome.plan.windows:
        weights = sum(p.nbytes for p in wp.prefetches if p.kind == "weight")
        kv = sum(p.nbytes for p in wp.prefetches if p.kind == "kv_cache")
        pct = f"{100 * wp.prefetched_bytes / wp.budget:.0f}%" if wp.budget else "-"
        name = wp.window.collective if not wp.window.graph else f"{wp.window.graph}/{wp.window.collective}"
        table.add_row(
            name,
            str(len({p.tensor for p in wp.prefetches})),
            format_size(weights),
            format_size(kv),
            format_size(wp.budget),
            pct,
            str(wp.max_tokens) if wp.max_tokens else "-",
        )
    return table


def prefetch_table(outcome: RankOutcome) -> Table:
    """One row per Prefetch node (``-v``); ``range`` counts live bytes on a link with a length input."""
    table = Table(title="prefetches", title_justify="left")
    for col in ("collective", "tensor", "kind", "bytes", "range", "live range"):
        table.add_column(col, overflow="fold")
    notes = {(wp.window.collective, c.tensor): c for wp in outcome.plan.windows for c in wp.candidates}
    for wp in outcome.plan.windows:
        for p in wp.prefetches:
            span = f"[{p.offset}, {p.offset + p.nbytes})" if p.max_size else "whole"
            cand = notes.get((wp.window.collective, p.tensor))
            table.add_row(
                wp.window.collective,
                p.tensor,
                p.kind,
                format_size(p.nbytes),
                span,
                live_label(cand if cand is not None else p),
            )
    return table


def live_label(item) -> str:
    """How a link's bytes follow the step (a Candidate or a PlannedPrefetch; docs/design.md §3, §4.7-4.8):
    ``L=<tensor> axis A window W`` with a length input, ``min_tokens T`` (and the read share) on an expert
    bank, a KV link's reason for the two-input form, else ""."""
    parts = []
    if item.lengths:
        parts.append(
            f"L={item.lengths} axis {item.seq_axis}" + (f" window {item.window}" if item.window else "")
        )
    if item.min_tokens:
        share = getattr(item, "read_share", None)
        parts.append(f"min_tokens {item.min_tokens}" + (f", reads {share:.0%}" if share is not None else ""))
    note = getattr(item, "note", "")
    if note:
        parts.append(note)
    return "; ".join(parts)


def skipped_table(outcome: RankOutcome, verbose: int) -> Table:
    """Consumer inputs not prefetched and why; activations only at ``-vv`` (they are never candidates)."""
    table = Table(title="not prefetched", title_justify="left")
    table.add_column("collective", overflow="fold")
    table.add_column("tensor", overflow="fold")
    table.add_column("consumer", overflow="fold")
    table.add_column("why", overflow="fold")
    for wp in outcome.plan.windows:
        for s in wp.skipped:
            if verbose < 2 and s.reason.startswith("activation"):
                continue
            table.add_row(wp.window.collective, s.tensor, f"{s.consumer}[{s.slot}]", s.reason)
    return table


def plan_key(o: RankOutcome) -> tuple:
    """What makes two ranks' plans the same: every window (collective, budget, validity range) with every
    link's tensor, kind, byte range and bytes, and what ``--replan`` found stale and dropped."""
    windows = tuple(
        (
            wp.window.graph,
            wp.window.collective,
            wp.budget,
            wp.max_tokens,
            tuple(
                (
                    p.tensor,
                    p.kind,
                    p.offset,
                    p.max_size,
                    p.nbytes,
                    p.lengths,
                    p.seq_axis,
                    p.window,
                    p.min_tokens,
                )
                for p in wp.prefetches
            ),
        )
        for wp in o.plan.windows
    )
    stale = (len(o.stale.stale), o.stale.total) if o.stale is not None else None
    dropped = (o.dropped.names, o.dropped.nbytes) if o.dropped is not None else None
    return windows, stale, dropped, o.compacted


def same_plan_groups(outcomes: Sequence, key=plan_key) -> list[tuple[object, list]]:
    """``[(first rank of a plan, the later ranks with the same plan), ...]`` in rank order; ``key`` says
    what makes two ranks' results the same (``plan_key`` for optimize, ``inspection_key`` for inspect)."""
    groups: dict[tuple, tuple[object, list]] = {}
    for o in outcomes:
        first, same = groups.setdefault(key(o), (o, []))
        if first is not o:
            same.append(o)
    return list(groups.values())


def same_plan_line(first, same: Sequence, outcomes: Sequence) -> str:
    """``model_01.onnx ... model_07.onnx: same plan as model_00.onnx`` (a run of consecutive ranks as its
    ends, others listed)."""
    names = [o.source.name if o.source else "model" for o in same]
    where = [next(i for i, o in enumerate(outcomes) if o is s) for s in same]
    if len(same) > 2 and where == list(range(where[0], where[0] + len(same))):
        names = [names[0], "...", names[-1]]
    listed = " ".join(names) if "..." in names else ", ".join(names)
    return f"{listed}: same plan as {first.source.name if first.source else 'model'}"


def render_outcomes(console: Console, outcomes: Sequence[RankOutcome], verbose: int) -> None:
    """A plan table per rank; ranks whose plan is the same as an earlier rank's get one line instead (every
    table with ``-v``)."""
    groups = [(o, []) for o in outcomes] if verbose else same_plan_groups(outcomes)
    for o, same in groups:
        _render_outcome(console, o, verbose)
        if same:
            console.print(escape(same_plan_line(o, same, outcomes)), highlight=False, soft_wrap=True)


def _render_outcome(console: Console, o: RankOutcome, verbose: int) -> None:
    name = o.source.name if o.source else "model"
    console.print(
        plan_table(
            o,
            f"{name}: {counted(len(o.plan.windows), 'window')}, "
            f"{counted(o.plan.prefetch_count, 'prefetch', 'prefetches')}, "
            f"{format_size(o.plan.prefetched_bytes)}",
        )
    )
    replanned = replan_line(o)
    if replanned:
        console.print(f"[yellow]{escape(replanned)}[/yellow]", highlight=False, soft_wrap=True)
    if verbose:
        console.print(prefetch_table(o))
        console.print(skipped_table(o, verbose))
    if o.verification is not None and verbose:
        console.print(
            f"[dim]verify: {o.verification.graphs} graphs, {o.verification.prefetches} "
            f"prefetches, onnx checker {o.verification.checker}[/dim]"
        )


def passes_table(passes: dict[str, tuple[str, str]]) -> Table:
    """`preserve-onnx passes`: the registry, in pipeline order."""
    table = Table(title="optimize pipeline", title_justify="left")
    for col in ("pass", "kind", "what it does"):
        table.add_column(col)
    for name, (kind, summary) in passes.items():
        table.add_row(name, kind, summary)
    return table


def hardware_table(profiles) -> Table:
    """`preserve-onnx hardware`: each profile's usable L2, achieved HBM bandwidth and the figures the cost
    model uses."""
    table = Table(
        title="hardware profiles (usable L2, achieved HBM; --hardware NAME@IMPL picks a collective)",
        title_justify="left",
    )
    table.add_column("name", no_wrap=True)
    for col in (
        "L2",
        "HBM BW",
        "L2 BW",
        "link BW",
        "AllReduce alpha",
        "peak",
        "fp16 max tokens",
        "prefetch chunk",
    ):
        table.add_column(col, justify="right")
    for hw in profiles:
        alphas = hw.collective_alphas or ((hw.collective, hw.collective_alpha),)
        latency = ", ".join(
            f"{impl + ' ' if impl else ''}{alpha * 1e6:.1f} us"
            + ("*" if impl == hw.collective and len(alphas) > 1 else "")
            for impl, alpha in alphas
        )
        table.add_row(
            hw.name,
            f"{format_size(hw.usable_l2_bytes)} of {format_size(hw.l2_bytes)}",
            f"{hw.effective_hbm_bw / 1e12:.2f} of {hw.hbm_bw / 1e12:.2f} TB/s",
            f"{hw.l2_bw / 1e12:.1f} TB/s",
            f"{hw.link_bw / 1e9:.0f} GB/s",
            latency,
            f"{hw.peak_flops / 1e12:.0f} TF",
            f"{hw.roofline_tokens(2, 2):.0f}",
            format_size(hw.max_prefetch_bytes) if hw.max_prefetch_bytes else "none",
        )
    return table


def outputs_table(outputs: Sequence[dict], steps: int) -> Table:
    """`run`: every rank's outputs after the last step (name, dtype, shape)."""
    table = Table(title=f"{len(outputs)} rank(s), {steps} step(s)", title_justify="left")
    for col in ("rank", "output", "dtype", "shape"):
        table.add_column(col)
    for rank, named in enumerate(outputs):
        for name, value in named.items():
            table.add_row(str(rank), name, str(value.dtype), "x".join(map(str, value.shape)))
    return table
