"""Rendering for review and CI: `inspect` tables and JSON, `diff` as text, JSON and Markdown.

The library (``inspection``, ``diffing``) returns frozen data; this module only turns it into
something people read in a terminal or a pull request, or machines parse. Output is deterministic
(no timestamps, no absolute paths beyond the ones given), so it diffs cleanly in CI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.diffing import Diff, Entry, ModelDiff
from preserve_onnx.hardware import format_size
from preserve_onnx.inspection import Inspection
from preserve_onnx.report import (
    counted,
    live_label,
    plan_key,
    report_dict,
    same_plan_groups,
    same_plan_line,
    skipped_table,
)

DIFF_SCHEMA = 1
MARKDOWN_ROWS = 200  # per model
MARKDOWN_CHARS = 60_000  # in all, with room for the closing lines: a PR comment holds at most 65536

_NOUNS = {  # kind -> (singular, plural)
    "model": ("model field set", "model field sets"),
    "opset": ("opset import", "opset imports"),
    "metadata": ("metadata entry", "metadata entries"),
    "function": ("function", "functions"),
    "graph": ("graph header", "graph headers"),
    "input": ("graph input", "graph inputs"),
    "output": ("graph output", "graph outputs"),
    "initializer": ("initializer", "initializers"),
    "value_info": ("value_info entry", "value_info entries"),
    "node": ("node", "nodes"),
}
_MARK = {"added": "+", "removed": "-", "changed": "~"}
_STYLE = {"added": "green", "removed": "red", "changed": "yellow"}


# -- inspect -----------------------------------------------------------------------------------


def inspection_dict(inspections: Sequence[Inspection], config: OptimizeConfig) -> dict:
    """The report (schema 1, as ``optimize --report``) plus, per model, every collective and the
    Prefetch nodes the model already has."""
    data = report_dict([i.outcome for i in inspections], config)
    for model, ins in zip(data["models"], inspections):
        model["collectives"] = [
            {
                "graph": w.graph,
                "collective": w.collective,
                "op_type": w.op_type,
                "selected": w.selected,
                "message_bytes": w.message_bytes,
                "window_nodes": len(w.nodes),
            }
            for w in ins.collectives
        ]
        model["existing_prefetches"] = [dataclasses.asdict(p) for p in ins.prefetches]
        model["stale_prefetches"] = stale_dict(ins.stale)
    return data


def stale_dict(stale) -> dict | None:
    """A model's stale Prefetch links for JSON (None when the model has no Prefetch node)."""
    if stale is None:
        return None
    return {
        "total": stale.total,
        "stale": [dataclasses.asdict(s) for s in stale.stale],
        "prefetch_only_initializers": list(stale.prefetch_only),
    }


def stale_line(name: str, stale) -> str | None:
    """``model_00.onnx: 9 of 13 Prefetch links are stale: ...; run optimize --replan`` (None: none stale)."""
    return f"{name}: {stale.describe()}" if stale is not None and stale.stale else None


def _where(graph: str, name: str) -> str:
    """``graph/node``; exporters' node names often start with ``/`` already (``/model/layers.0/...``)."""
    if not graph:
        return name
    return f"{graph}{name}" if name.startswith("/") else f"{graph}/{name}"


# Columns of the collectives table a narrow terminal leaves out, in this order, until the collective
# names get their 24 columns: the op (the name ends in it), the window's operator count, the budget's
# share (planned / budget), the candidate count, the validity range.
NARROW_DROPS = ("op", "ops", "used", "tensors", "max tokens")
COLLECTIVE_MIN_WIDTH = 24


def collectives_table(ins: Inspection, title: str, width: int | None = None) -> Table:
    """One row per collective: operators in its window, candidate tensors and bytes, the plan. ``width``: the
    terminal's; columns of :data:`NARROW_DROPS` are left out (and named in the caption) where the collective
    names would otherwise get fewer than :data:`COLLECTIVE_MIN_WIDTH` columns."""
    header = ("collective", "op", "ops", "tensors", "bytes", "budget", "planned", "used", "max tokens")
    plans = {(wp.window.graph, wp.window.index): wp for wp in ins.plan.windows}
    rows = []
    for w in ins.collectives:
        wp = plans.get((w.graph, w.index))
        if wp is None:
            rows.append(
                (
                    _where(w.graph, w.collective),
                    w.op_type,
                    str(len(w.nodes)),
                    "-",
                    "-",
                    "not selected",
                    "-",
                    "-",
                    "-",
                )
            )
            continue
        pct = f"{100 * wp.prefetched_bytes / wp.budget:.0f}%" if wp.budget else "-"
        rows.append(
            (
                _where(w.graph, w.collective),
                w.op_type,
                str(len(w.nodes)),
                str(len(wp.candidates)),
                format_size(sum(c.nbytes for c in wp.candidates)),
                format_size(wp.budget),
                format_size(wp.prefetched_bytes),
                pct,
                str(wp.max_tokens) if wp.max_tokens else "-",
            )
        )
    keep = list(range(len(header)))
    dropped = []

    def left_for_names() -> int:  # each column: its widest cell, one space each side, one border
        others = sum(max([cell_len(header[c]), *(cell_len(r[c]) for r in rows)]) + 3 for c in keep[1:])
        return width - others - 4

    for name in NARROW_DROPS if width is not None else ():
        if left_for_names() >= COLLECTIVE_MIN_WIDTH:
            break
        keep.remove(header.index(name))
        dropped.append(name)
    table = Table(
        title=title,
        title_justify="left",
        caption=f"({', '.join(dropped)} left out at {width} columns)" if dropped else None,
        caption_justify="left",
    )
    table.add_column("collective", overflow="fold", min_width=COLLECTIVE_MIN_WIDTH)
    for c in keep[1:]:
        table.add_column(header[c], justify="left" if header[c] == "op" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(escape(r[c]) if c == 0 else r[c] for c in keep))
    return table


def candidates_table(ins: Inspection) -> Table:
    """One row per candidate tensor of each window, with what the plan does with it."""
    table = Table(title="candidates (first use order)", title_justify="left")
    for col in ("collective", "tensor", "kind", "bytes", "consumer", "plan", "live range"):
        table.add_column(
            col,
            overflow="fold",
            justify="right" if col == "bytes" else "left",
            no_wrap=col in ("kind", "bytes"),
        )
    for wp in ins.plan.windows:
        if not wp.candidates:
            continue
        if table.row_count:
            table.add_section()
        for k, c in enumerate(wp.candidates):
            links = [p for p in wp.prefetches if p.tensor == c.tensor]
            covered = sum(p.nbytes for p in links)
            if covered >= c.nbytes:
                plan = "whole" + (f" ({len(links)} links)" if len(links) > 1 else "")
            elif covered:
                plan = f"first {format_size(covered)}"
            else:
                plan = "-"
            table.add_row(
                escape(wp.window.collective) if k == 0 else "",
                escape(c.tensor),
                c.kind,
                format_size(c.nbytes),
                escape(f"{c.consumer}[{c.slot}]"),
                plan,
                escape(live_label(c)),
            )
    return table


def existing_table(ins: Inspection) -> Table:
    table = Table(title="Prefetch nodes already in the model", title_justify="left")
    for col in ("collective", "tensor", "range", "max tokens", "live range"):
        table.add_column(col, overflow="fold")
    for p in ins.prefetches:
        span = "whole" if p.max_size == 0 else f"[{p.offset}, {p.offset + p.max_size})"
        table.add_row(
            escape(_where(p.graph, p.collective)),
            escape(p.tensor),
            span,
            str(p.max_tokens) if p.max_tokens else "-",
            escape(live_label(p)),
        )
    return table


def inspection_key(ins: Inspection) -> tuple:
    """What makes two ranks' inspections the same: the plan (``plan_key``), every collective with its
    window, every window's candidates, the Prefetch nodes already there and their stale count."""
    collectives = tuple(
        (w.graph, w.collective, w.op_type, w.selected, len(w.nodes), w.message_bytes) for w in ins.collectives
    )
    candidates = tuple(
        tuple((c.tensor, c.kind, c.consumer, c.nbytes) for c in wp.candidates) for wp in ins.plan.windows
    )
    stale = (len(ins.stale.stale), ins.stale.total) if ins.stale is not None else None
    return plan_key(ins.outcome), collectives, candidates, ins.prefetches, stale


def render_inspections(console: Console, inspections: Sequence[Inspection], verbose: int) -> None:
    """A set of tables per rank; ranks whose inspection is the same as an earlier rank's get one line
    instead (every rank's tables with ``-v``), as ``optimize`` prints its plans."""
    groups = [(i, []) for i in inspections] if verbose else same_plan_groups(inspections, inspection_key)
    for ins, same in groups:
        _render_inspection(console, ins, verbose)
        if same:
            console.print(escape(same_plan_line(ins, same, inspections)), highlight=False, soft_wrap=True)


def _render_inspection(console: Console, ins: Inspection, verbose: int) -> None:
    name = ins.source.name if ins.source else "model"
    plan = ins.plan
    title = (
        f"{name}: {counted(len(ins.collectives), 'collective')}, {len(plan.windows)} planned, "
        f"{counted(plan.prefetch_count, 'prefetch', 'prefetches')}, {format_size(plan.prefetched_bytes)} "
        f"({plan.budget_rule}, {ins.ranks} rank(s))"
    )
    console.print(collectives_table(ins, title, console.width))
    if any(wp.candidates for wp in plan.windows):
        console.print(candidates_table(ins))
    if ins.prefetches:
        console.print(existing_table(ins))
    warning = stale_line(name, ins.stale)
    if warning:
        console.print(f"[yellow]{escape(warning)}[/yellow]", highlight=False, soft_wrap=True)
    if verbose:
        console.print(skipped_table(ins.outcome, verbose))


# -- diff --------------------------------------------------------------------------------------


def _count(n: int, kind: str) -> str:
    singular, plural = _NOUNS.get(kind, (kind, kind + "s"))
    return f"{n} {singular if n == 1 else plural}"


def summary_phrases(m: ModelDiff) -> list[str]:
    """``["15 Prefetch nodes added", "4 collectives rewired", "1 opset import added"]``."""
    phrases = []
    special = set()
    for label, entries in (("added", m.prefetches_added), ("removed", m.prefetches_removed)):
        if entries:
            phrases.append(f"{counted(len(entries), 'Prefetch node')} {label}")
            special.update(map(id, entries))
    if m.rewired_collectives:
        n = len(m.rewired_collectives)
        phrases.append(f"{counted(n, 'collective')} rewired")
        special.update(map(id, m.rewired_collectives))
    counts: dict[tuple[str, str], int] = {}
    for e in m.entries:
        if id(e) not in special:
            counts[(e.kind, e.status)] = counts.get((e.kind, e.status), 0) + 1
    phrases += [f"{_count(n, kind)} {status}" for (kind, status), n in counts.items()]
    return phrases


def diff_dict(diff: Diff) -> dict:
    """``diff --json``: every entry with its changes; ``equal`` is what the exit status says."""
    return {
        "schema": DIFF_SCHEMA,
        "a": diff.a,
        "b": diff.b,
        "equal": diff.equal,
        "only_a": list(diff.only_a),
        "only_b": list(diff.only_b),
        "models": [
            {
                "a": m.a,
                "b": m.b,
                "equal": m.equal,
                "summary": summary_phrases(m),
                "counts": m.counts(),
                "stale_prefetches": {"a": stale_dict(m.stale_a), "b": stale_dict(m.stale_b)},
                "entries": [
                    {**dataclasses.asdict(e), "changes": [dataclasses.asdict(c) for c in e.changes]}
                    for e in m.entries
                ],
            }
            for m in diff.models
        ],
    }


def _headline(diff: Diff) -> str:
    if diff.equal:
        return "no differences"
    differing = sum(1 for m in diff.models if not m.equal)
    parts = [f"{differing} of {len(diff.models)} model(s) differ"]
    if diff.only_a:
        parts.append(f"only in A: {', '.join(diff.only_a)}")
    if diff.only_b:
        parts.append(f"only in B: {', '.join(diff.only_b)}")
    return "; ".join(parts)


def _change_text(e: Entry) -> str:
    return "; ".join(
        f"{c.field}: {c.before if c.before is not None else '(none)'} -> "
        f"{c.after if c.after is not None else '(none)'}"
        for c in e.changes
    )


def diff_stale_lines(m: ModelDiff) -> list[str]:
    """One line per side of ``m`` that has stale Prefetch links (A first)."""
    return [line for line in (stale_line(m.a, m.stale_a), stale_line(m.b, m.stale_b)) if line]


def render_diff(console: Console, diff: Diff, quiet: bool = False) -> None:
    """The default human summary: one header per differing model, one line per entry (``quiet``: only the
    closing line)."""
    for m in diff.models if not quiet else ():
        for warning in diff_stale_lines(m):
            console.print(f"[yellow]{escape(warning)}[/yellow]", highlight=False, soft_wrap=True)
        if m.equal:
            continue
        console.print(
            f"[bold]{escape(m.a)} -> {escape(m.b)}[/bold]: {escape(', '.join(summary_phrases(m)))}",
            highlight=False,
            soft_wrap=True,
        )
        for e in m.entries:
            where = f" [dim]in {escape(e.graph)}[/dim]" if e.graph else ""
            text = _change_text(e) if e.status == "changed" else e.detail
            console.print(
                f"  [{_STYLE[e.status]}]{_MARK[e.status]} {e.kind}[/] {escape(e.name)}{where}: "
                f"{escape(text)}",
                highlight=False,
                soft_wrap=True,
            )
    for name in diff.only_a if not quiet else ():
        console.print(
            f"  [red]- model[/] {escape(name)}: only in {escape(diff.a)}", highlight=False, soft_wrap=True
        )
    for name in diff.only_b if not quiet else ():
        console.print(
            f"  [green]+ model[/] {escape(name)}: only in {escape(diff.b)}", highlight=False, soft_wrap=True
        )
    style = "green" if diff.equal else "yellow"
    console.print(
        f"[{style}]{'equal' if diff.equal else 'different'}[/]: {escape(diff.a)} vs "
        f"{escape(diff.b)}: {_headline(diff)}",
        highlight=False,
        soft_wrap=True,
    )


def _md(text: str) -> str:
    """Inline code for a table cell: no pipes, backticks or line breaks break out of it."""
    text = (
        text.replace("|", "\\|").replace("`", "'").replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵")
    )
    return f"`{text}`" if text else ""


def diff_markdown(diff: Diff) -> str:
    """``diff --markdown``: a pull-request comment, one table per differing model."""
    lines = [f"### preserve-onnx diff: {_md(diff.a)} → {_md(diff.b)}", ""]
    if diff.equal:
        lines.append(f"**No differences** in {len(diff.models)} model(s).")
        return "\n".join(lines) + "\n"
    lines += [f"**{_headline(diff)}**", ""]
    for name in diff.only_a:
        lines.append(f"- model {_md(name)} only in A")
    for name in diff.only_b:
        lines.append(f"- model {_md(name)} only in B")
    if diff.only_a or diff.only_b:
        lines.append("")
    # GitHub refuses a comment over 65536 characters: rows stop at MARKDOWN_CHARS in all, the models
    # left over get their summary line only while there is room, then one line that counts the rest.
    size = sum(len(x) + 1 for x in lines)
    differing = [m for m in diff.models if not m.equal]
    for k, m in enumerate(differing):
        warnings = [f"> {_md(line)}" for line in diff_stale_lines(m)]
        head = [
            f"#### {_md(m.b)}",
            "",
            ", ".join(summary_phrases(m)),
            "",
            *warnings,
            *([""] if warnings else []),
        ]
        if size + sum(len(x) + 1 for x in head) > MARKDOWN_CHARS:
            lines.append(f"… {len(differing) - k} more differing model(s) (see `diff --json`)")
            break
        table = [
            "<details><summary>changes</summary>",
            "",
            "| | kind | graph | name | change |",
            "|---|---|---|---|---|",
        ]
        size += sum(len(x) + 1 for x in head + table)
        shown = 0
        for e in m.entries[:MARKDOWN_ROWS]:
            text = (
                "<br>".join(
                    f"{c.field}: {_md(c.before or '(none)')} → {_md(c.after or '(none)')}" for c in e.changes
                )
                if e.status == "changed"
                else _md(e.detail)
            )
            row = f"| {_MARK[e.status]} | {e.kind} | {_md(e.graph)} | {_md(e.name)} | {text} |"
            if size + len(row) + 1 > MARKDOWN_CHARS:
                break
            table.append(row)
            size += len(row) + 1
            shown += 1
        if shown < len(m.entries):
            table.append(f"| | | | | … {len(m.entries) - shown} more (see `diff --json`) |")
        table += ["", "</details>", ""]
        size += sum(len(x) + 1 for x in table[-4:])
        lines += head + table
    return "\n".join(lines)
