"""The cost model's tables say what their cells are: the sweep grid's title names the ratio it shows."""

from __future__ import annotations

from rich.console import Console
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.cost.sweep import SweepPoint
from preserve_onnx.report_cost import sweep_table, sweep_title
from tests.conftest import SAMPLES


def _render(table) -> list[str]:
    console = Console(width=120, record=True, color_system=None)
    console.print(table)
    return console.export_text().splitlines()


def _title(lines: list[str]) -> str:
    """The title as printed above the table (rich wraps it to the table's width)."""
    return " ".join(
        line.strip() for line in lines[: next(i for i, line in enumerate(lines) if line.startswith("┏"))]
    )


def test_sweep_title_names_baseline_over_plan():
    assert (
        sweep_title("big70b", "ascend-910b") == "big70b: speedup on ascend-910b (baseline / plan step time)"
    )


def test_sweep_cells_are_baseline_over_plan_as_the_title_says():
    # baseline 3 ms, plan 2 ms: the cell is 1.50x (baseline / plan), not 0.67x (plan / baseline).
    points = (
        SweepPoint(batch=8, context=16384, ranks=2, baseline_s=3e-3, preserve_s=2e-3, upper_bound_s=1.5e-3),
        SweepPoint(batch=8, context=16384, ranks=8, baseline_s=4e-3, preserve_s=5e-3, upper_bound_s=4e-3),
    )
    table = sweep_table(points, "m", "h200")
    assert table.title == "m: speedup on h200 (baseline / plan step time)"
    lines = _render(table)
    assert _title(lines) == "m: speedup on h200 (baseline / plan step time)"
    row = next(line for line in lines if "16k" in line)
    # Then what the step reads of the KV-cache and what the plan hints, at the first rank count (none
    # given: 0 B).
    assert [cell.strip() for cell in row.strip("│ ").split("│")] == [
        "8",
        "16k",
        "1.50x",
        "0.80x",
        "0 B",
        "0 B",
    ]


def test_estimate_sweep_prints_the_title():
    model = SAMPLES / "llama-gqa" / "tp2"
    r = CliRunner().invoke(app, ["estimate", str(model), "--sweep", "batch=1,8", "ranks=2"])
    assert r.exit_code == 0, r.output
    assert _title(r.output.splitlines()) == f"{model}: speedup on ascend-910b (baseline / plan step time)"
    assert "plan / baseline" not in r.output
