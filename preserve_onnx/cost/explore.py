"""Design-space exploration over the L2 size: performance per cost with and without prefetching.

For every L2 size the decode step is re-evaluated with the cost model (``cost.estimate.evaluate``; the
budget rule re-plans each window for that L2) and the device is re-priced with an area and cost model
whose figures live, with their sources, in ``hardware.toml``::

    area(L2)  = die_mm2 - L2_profile * sram_mm2_per_mb + L2 * sram_mm2_per_mb     (logic area kept)
    yield     = exp(-defect_density_per_mm2 * area / dies)                        (Poisson, per die)
    cost(L2)  = area * wafer_cost_per_mm2 / yield + hbm_gb * hbm_cost_per_gb + package_cost
    perf      = batch / step_s / ranks                    tokens per second per device
    perf_per_cost = perf / cost(L2)                       tokens per second per dollar

The best L2 size is the one with the highest perf_per_cost, separately for the baseline and the plan.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.cost.analysis import analyze
from preserve_onnx.cost.estimate import evaluate, rank_model
from preserve_onnx.errors import PreserveError, UsageError
from preserve_onnx.hardware import HardwareProfile
from preserve_onnx.model_io import load_model, write_bytes_atomic

MIB = 1 << 20
L2_SWEEP_MIB = (0, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 104, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256)


@dataclass(frozen=True)
class CostPoint:
    l2_bytes: int
    area_mm2: float
    cost: float
    baseline_s: float
    preserve_s: float
    perf_per_cost_baseline: float
    perf_per_cost_preserve: float


@dataclass(frozen=True)
class Exploration:
    source: str
    hardware: str
    batch: int
    context: int
    ranks: int
    points: tuple[CostPoint, ...]

    def best(self, which: str) -> CostPoint:
        key = "perf_per_cost_" + which
        return max(self.points, key=lambda p: (getattr(p, key), -p.l2_bytes))

    @property
    def gain(self) -> float:
        """Best perf/cost with prefetching over best perf/cost without (the paper's 1.25x)."""
        return self.best("preserve").perf_per_cost_preserve / self.best("baseline").perf_per_cost_baseline


def device_cost(hw: HardwareProfile, l2_bytes: int) -> tuple[float, float]:
    """(area mm^2, cost $) of ``hw`` rebuilt with ``l2_bytes`` of L2."""
    if not hw.has_area_cost:
        raise PreserveError(
            f"hardware '{hw.name}' has no area/cost figures (die_mm2, sram_mm2_per_mb, "
            f"wafer_cost_per_mm2, ...); add them to its TOML table to explore it"
        )
    logic = hw.die_mm2 - hw.l2_bytes / MIB * hw.sram_mm2_per_mb
    if logic <= 0:
        raise PreserveError(f"hardware '{hw.name}': die_mm2 is smaller than its L2's area")
    area = logic + l2_bytes / MIB * hw.sram_mm2_per_mb
    die_yield = math.exp(-hw.defect_density_per_mm2 * area / max(1, hw.dies))
    return area, area * hw.wafer_cost_per_mm2 / die_yield + hw.hbm_gb * hw.hbm_cost_per_gb + hw.package_cost


def explore_path(
    path: Path,
    hw: HardwareProfile,
    config: OptimizeConfig,
    ranks: int | None = None,
    sizes_mib: tuple[int, ...] = L2_SWEEP_MIB,
) -> Exploration:
    """Sweep the L2 size of ``hw`` for one rank model (rank 0 of a directory)."""
    device_cost(hw, 0)  # refuse a profile without figures before any work
    model_path, model_ranks = rank_model(path, ranks)
    cfg = dataclasses.replace(config, hardware=hw, budget=None)
    analysis = analyze(load_model(model_path), cfg, model_ranks, str(model_path))
    points = []
    for mib in sizes_mib:
        variant = dataclasses.replace(hw, l2_bytes=mib * MIB)
        est = evaluate(analysis, variant, model_ranks, None, cfg.l2_fraction)
        area, cost = device_cost(hw, mib * MIB)

        def ppc(step: float) -> float:
            return cfg.batch / step / model_ranks / cost

        points.append(
            CostPoint(
                mib * MIB,
                area,
                cost,
                est.baseline_s,
                est.preserve_s,
                ppc(est.baseline_s),
                ppc(est.preserve_s),
            )
        )
    return Exploration(str(model_path), hw.name, cfg.batch, cfg.context, model_ranks, tuple(points))


CSV_COLUMNS = (
    "l2_bytes",
    "area_mm2",
    "cost",
    "baseline_s",
    "preserve_s",
    "perf_per_cost_baseline",
    "perf_per_cost_preserve",
)


def write_csv(path: Path, ex: Exploration) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in ex.points:
        writer.writerow([getattr(p, c) for c in CSV_COLUMNS])
    write_bytes_atomic(Path(path), buf.getvalue().encode())


PLOT_FORMATS = ("png", "svg", "pdf")


def plot_format(path: Path) -> str:
    """The plot format named by ``path``'s suffix; refuses others (before any work is done)."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise UsageError(f"--plot {path}: the name must end in {', '.join('.' + f for f in PLOT_FORMATS)}")
    return fmt


def write_plot(path: Path, ex: Exploration) -> None:
    """Plot of perf/cost against L2 size, both normalized to the baseline's best (needs matplotlib); the
    format follows the suffix: ``.png``, ``.svg`` or ``.pdf``."""
    fmt = plot_format(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PreserveError("--plot needs matplotlib: pip install 'preserve-onnx[plot]'") from None
    norm = ex.best("baseline").perf_per_cost_baseline
    x = [p.l2_bytes / MIB for p in ex.points]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(x, [p.perf_per_cost_baseline / norm for p in ex.points], "o-", label="baseline (no prefetch)")
    ax.plot(x, [p.perf_per_cost_preserve / norm for p in ex.points], "s-", label="PRESERVE plan")
    for which, style in (("baseline", "C0"), ("preserve", "C1")):
        best = ex.best(which)
        ax.axvline(best.l2_bytes / MIB, color=style, linestyle=":", linewidth=1)
    ax.set_xlabel("L2 size (MiB)")
    ax.set_ylabel("performance per cost (baseline best = 1)")
    ax.set_title(
        f"{Path(ex.source).name} on {ex.hardware}: batch {ex.batch}, context {ex.context}, "
        f"{ex.ranks} rank{'s' if ex.ranks != 1 else ''}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    plt.close(fig)
    write_bytes_atomic(Path(path), buf.getvalue())
