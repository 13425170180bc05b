"""``estimate --sweep``: the estimate over a grid of batch, context and rank counts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.cost.analysis import analyze
from preserve_onnx.cost.estimate import _Speedups, evaluate, rank_model
from preserve_onnx.errors import UsageError
from preserve_onnx.hardware import HardwareProfile
from preserve_onnx.model_io import load_model


@dataclass(frozen=True)
class SweepPoint(_Speedups):
    batch: int
    context: int
    ranks: int
    baseline_s: float
    preserve_s: float
    upper_bound_s: float
    kv_read_bytes: int = 0  # KV-cache bytes the step reads (flat past W on windowed layers)
    hinted_bytes: int = 0  # bytes the plan's hints move at this point (expert banks from min_tokens on)


SWEEP_KEYS = ("batch", "context", "ranks")


def parse_sweep(groups: list[str]) -> dict[str, tuple[int, ...]]:
    """``["batch=1,8,32", "context=1k,16k", "ranks=2,4,8"]`` -> values per key (context: k = 1024)."""
    out: dict[str, tuple[int, ...]] = {}
    for group in groups:
        for part in group.replace(";", " ").split():
            key, sep, values = part.partition("=")
            if not sep or key not in SWEEP_KEYS:
                raise UsageError(
                    f"--sweep: expected key=v1,v2,... with key in {', '.join(SWEEP_KEYS)}; got '{part}'"
                )
            if key in out:
                raise UsageError(f"--sweep: '{key}' given twice")
            try:
                parsed = tuple(_sweep_int(v) for v in values.split(",") if v.strip())
            except ValueError:
                raise UsageError(f"--sweep: '{part}' holds a value that is not a whole number") from None
            if not parsed or min(parsed) < 1:
                raise UsageError(f"--sweep: '{part}' needs values of at least 1")
            if len(set(parsed)) != len(parsed):  # one point per value: a repeat would be counted twice
                raise UsageError(f"--sweep: '{part}' repeats a value")
            out[key] = parsed
    return out


def _sweep_int(text: str) -> int:
    text = text.strip().lower()
    if text.endswith("k"):
        return int(float(text[:-1]) * 1024)
    return int(text)


def sweep_path(
    path: Path,
    hw: HardwareProfile,
    config: OptimizeConfig,
    grid: dict[str, tuple[int, ...]],
    ranks: int | None = None,
    budget: int | None = None,
) -> tuple[SweepPoint, ...]:
    """Speedups over the batch x context x ranks grid (missing keys: the single configured value)."""
    model_path, model_ranks = rank_model(path, ranks)
    model = load_model(model_path)
    points = []
    for batch in grid.get("batch", (config.batch,)):
        for context in grid.get("context", (config.context,)):
            cfg = dataclasses.replace(config, hardware=hw, budget=budget, batch=batch, context=context)
            analysis = analyze(model, cfg, model_ranks, str(model_path))
            for p in grid.get("ranks", (model_ranks,)):
                est = evaluate(analysis, hw, p, budget, cfg.l2_fraction)
                points.append(
                    SweepPoint(
                        batch,
                        context,
                        p,
                        est.baseline_s,
                        est.preserve_s,
                        est.upper_bound_s,
                        est.kv_read_bytes,
                        est.hinted_bytes,
                    )
                )
    return tuple(points)
