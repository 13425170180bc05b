"""Rendering: the JSON report (schema 1) and rich tables. Passes only return data; this turns it
into something people read or machines parse."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.hardware import HardwareProfile, format_size
from preserve_onnx.model_io import write_bytes_atomic
from preserve_onnx.optimizer import RankOutcome
from preserve_onnx.passes import Plan, WindowPlan

SCHEMA = 1


def hardware_dict(hw: HardwareProfile) -> dict:
    data = dataclasses.asdict(hw)
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
        "prefetches": [
            {"node": p.node, "tensor": p.tensor, "kind": p.kind, "consumer": p.consumer,
             "offset": p.offset, "max_size": p.max_size, "bytes": p.nbytes}
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
            "l2_fraction": config.l2_fraction, "batch": config.batch, "context": config.context,
            "kv": config.kv, "collectives": list(config.collectives), "min_chunk": config.min_chunk,
            "prefetch_domain": config.naming.domain, "prefetch_op": config.naming.op_type,
        },
        "models": [
            {"source": str(o.source) if o.source else None, "output": str(o.output) if o.output else None,
             **plan_dict(o.plan)}
            for o in outcomes
        ],
    }


def write_json(path: Path, data: dict) -> None:
    write_bytes_atomic(Path(path), (json.dumps(data, indent=2) + "\n").encode())


def plan_table(outcome: RankOutcome, title: str) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("collective", overflow="fold")
    table.add_column("graph", overflow="fold")
    table.add_column("prefetched tensors", overflow="fold")
    table.add_column("bytes", justify="right")
    table.add_column("budget", justify="right")
    table.add_column("% of budget", justify="right")
    for wp in outcome.plan.windows:
        tensors = ", ".join(_prefetch_label(p) for p in wp.prefetches) or "[dim]-[/dim]"
        pct = f"{100 * wp.prefetched_bytes / wp.budget:.0f}%" if wp.budget else "-"
        table.add_row(wp.window.collective, wp.window.graph or "main", tensors,
                      format_size(wp.prefetched_bytes), format_size(wp.budget), pct)
    return table


def _prefetch_label(p) -> str:
    tag = " (kv)" if p.kind == "kv_cache" else ""
    if p.max_size:
        return f"{p.tensor}{tag} [{p.offset}:+{p.max_size}]"
    return p.tensor + tag


def skipped_table(outcome: RankOutcome) -> Table:
    table = Table(title="not prefetched", title_justify="left")
    table.add_column("collective", overflow="fold")
    table.add_column("tensor", overflow="fold")
    table.add_column("consumer", overflow="fold")
    table.add_column("why", overflow="fold")
    for wp in outcome.plan.windows:
        for s in wp.skipped:
            table.add_row(wp.window.collective, s.tensor, f"{s.consumer}[{s.slot}]", s.reason)
    return table


def render_outcomes(console: Console, outcomes: Sequence[RankOutcome], verbose: int) -> None:
    for o in outcomes:
        name = o.source.name if o.source else "model"
        console.print(plan_table(o, f"{name}: {len(o.plan.windows)} windows, {o.plan.prefetch_count} "
                                    f"prefetches, {format_size(o.plan.prefetched_bytes)}"))
        if verbose:
            console.print(skipped_table(o))
        if o.verification is not None and verbose:
            console.print(f"[dim]verify: {o.verification.graphs} graphs, {o.verification.prefetches} "
                          f"prefetches, onnx checker {o.verification.checker}[/dim]")
