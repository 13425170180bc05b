"""`calibrate`'s tables and JSON (the CLI prints what these return)."""

from __future__ import annotations

import dataclasses

from rich.table import Table

from preserve_onnx.calibrate.analysis import Calibration
from preserve_onnx.hardware import format_size

_UNITS = {"hbm_bw": (1e12, "TB/s"), "l2_bw": (1e12, "TB/s"), "peak_flops": (1e12, "TFLOP/s")}


def _figure(field: str, value: float) -> str:
    if field == "l2_bytes":
        return format_size(value)
    if field in _UNITS:
        scale, unit = _UNITS[field]
        return f"{value / scale:.2f} {unit}"
    return f"{value:.3f}"


def figures_table(cal: Calibration) -> Table:
    """The measured figures beside the published ones."""
    table = Table(
        title=f"{cal.profile.name}: measured on {cal.measurements.provenance.device} (published beside)",
        title_justify="left",
    )
    for col in ("figure", "measured", "published"):
        table.add_column(col, justify="left" if col == "figure" else "right", no_wrap=True)
    for field in cal.measured_fields:
        table.add_row(
            field, _figure(field, getattr(cal.profile, field)), _figure(field, getattr(cal.published, field))
        )
    m = cal.measurements
    table.add_row(
        "HBM streaming read",
        f"{m.hbm.bytes_per_s / 1e12:.2f} TB/s",
        f"{cal.published.effective_hbm_bw / 1e12:.2f} TB/s",
    )
    table.add_row(
        "usable L2", format_size(cal.profile.usable_l2_bytes), format_size(cal.published.usable_l2_bytes)
    )
    return table


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f}"


def comparison_table(cal: Calibration) -> Table:
    """Per case: what the prefetch saved, measured and predicted by the cost model."""
    share = f"{cal.settings.flag_share:.0%}"
    table = Table(
        title="prefetch beside a stand-in collective: saving per step, measured vs cost model (us); "
        f"! = differs by more than {share} and more than the noise",
        title_justify="left",
    )
    for col in (
        "tokens",
        "weight",
        "alpha",
        "baseline",
        "model baseline",
        "saved",
        "+-",
        "model saved",
        "model in L2",
        "model/measured",
        "",
    ):
        table.add_column(col, justify="right", no_wrap=True)
    for r in cal.comparison:
        ratio = f"{r.difference + 1:.2f}x" if r.difference is not None else "-"
        table.add_row(
            str(r.tokens),
            format_size(r.weight_bytes),
            _us(r.alpha_s),
            _us(r.measured_baseline_s),
            _us(r.predicted_baseline_s),
            _us(r.measured_saving_s),
            _us(r.noise_s),
            _us(r.predicted_saving_s),
            format_size(r.predicted_moved_bytes),
            ratio,
            "!" if r.flagged else "",
        )
    return table


def summary(cal: Calibration) -> str:
    """The closing lines: max_tokens measured vs predicted, and the count of flagged cases."""
    t = cal.max_tokens
    measured = f">= {t.measured}" if t.measured == t.swept_to else str(t.measured)
    flagged = sum(r.flagged for r in cal.comparison)
    return (
        f"fp16 GEMV {t.k}x{t.n}: compute-bound from {measured} tokens per step measured, {t.predicted:.0f} "
        f"predicted (max_tokens){' !' if t.flagged else ''}\n"
        f"{flagged} of {len(cal.comparison)} cases differ from the cost model by more than the threshold; "
        f"prefetch instruction: {cal.measurements.prefetch_instruction}"
    )


def calibration_dict(cal: Calibration) -> dict:
    """Everything measured and compared, for ``--json`` (the profile itself is the written TOML)."""
    m = cal.measurements
    return {
        "schema": 1,
        "profile": cal.profile.name,
        "published": cal.published.name,
        "provenance": dataclasses.asdict(m.provenance),
        "figures": {
            f: {"measured": getattr(cal.profile, f), "published": getattr(cal.published, f)}
            for f in cal.measured_fields
        },
        "sm_count": m.sm_count,
        "prefetch_instruction": m.prefetch_instruction,
        "hbm": dataclasses.asdict(m.hbm),
        "l2_sweep": [dataclasses.asdict(p) for p in m.l2_sweep],
        "peak_flops": m.peak_flops,
        "token_sweep": [dataclasses.asdict(p) for p in m.token_sweep],
        "max_tokens": dataclasses.asdict(cal.max_tokens),
        "cases": [dataclasses.asdict(c) for c in m.cases],
        "comparison": [dataclasses.asdict(r) for r in cal.comparison],
    }
