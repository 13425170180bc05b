"""From measurements to a profile and to the cost model's check (pure: no GPU, no CuPy).

The comparison replays each measured case through the cost model itself (``cost.analysis.analyze`` and
``cost.timeline.simulate`` on a one-GEMV model: AllReduce -> MatMul), with the calibrated profile and the
spin's measured time as the collective latency, so the prediction is the formula every `estimate`
uses, not a second one. The case prefetches the whole weight beside the spin, which is the model's
``upper bound`` scenario (every candidate, no budget, no ``max_tokens`` skip: the physics, not the
policy).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from preserve_onnx.calibrate.plan import Settings
from preserve_onnx.calibrate.results import BandwidthPoint, Measurements, PrefetchCase, TokenPoint
from preserve_onnx.config import OptimizeConfig
from preserve_onnx.cost.analysis import analyze
from preserve_onnx.cost.timeline import simulate
from preserve_onnx.errors import PreserveError
from preserve_onnx.hardware import HardwareProfile, builtin_profiles, format_size, load_profile

WEIGHT = "w"
L2_PLATEAU_SHARE = 0.9  # the usable L2 ends where read bandwidth falls below 90% of the L2 plateau
# The figures a calibration measures (hbm_bw too when a streaming read beats the nominal figure).
MEASURED_FIELDS = ("hbm_efficiency", "l2_bytes", "l2_bw", "l2_usable_fraction", "peak_flops")
# Published profiles by the name the driver gives the GPU (the first match wins).
DEVICE_PROFILES = (("H200", "h200"), ("H100 80GB HBM3", "h100-sxm"), ("H100 SXM", "h100-sxm"))


@dataclass(frozen=True)
class ComparisonRow:
    """One measured case next to the cost model's prediction for it."""

    tokens: int
    weight_bytes: int
    alpha_s: float  # the spin's measured time: the collective latency the model gets
    prefetch_bytes: int
    measured_baseline_s: float
    predicted_baseline_s: float
    measured_saving_s: float
    predicted_saving_s: float
    predicted_moved_bytes: int  # what the model says reaches L2 before the GEMV starts
    noise_s: float
    difference: float | None  # predicted / measured - 1 (None when nothing was measured to be saved)
    flagged: bool  # the prediction misses by more than the share (and by more than the noise)


@dataclass(frozen=True)
class MaxTokens:
    """Tokens per step at which the fp16 GEMV turns compute-bound: measured and the model's roofline."""

    k: int
    n: int
    measured: int
    swept_to: int  # the largest token count swept (measured == swept_to: no rise seen)
    predicted: float
    difference: float
    flagged: bool


@dataclass(frozen=True)
class Calibration:
    measurements: Measurements
    published: HardwareProfile
    profile: HardwareProfile  # the published profile with the measured figures
    comparison: tuple[ComparisonRow, ...]
    max_tokens: MaxTokens
    settings: Settings

    @property
    def measured_fields(self) -> tuple[str, ...]:
        extra = ("hbm_bw",) if self.profile.hbm_bw != self.published.hbm_bw else ()
        return (*extra, *MEASURED_FIELDS)


def published_profile(device: str, name: str | None) -> HardwareProfile:
    """The published profile a calibration starts from: ``name`` (a built-in, FILE.toml, ...), or the
    built-in one the device's name matches."""
    if name is not None:
        return load_profile(name)
    for needle, profile in DEVICE_PROFILES:
        if needle.lower() in device.lower():
            return builtin_profiles()[profile]
    raise PreserveError(
        f"no published profile matches '{device}': pass --name with the profile to start from "
        f"(built in: {', '.join(builtin_profiles())})"
    )


def usable_l2(
    points: tuple[BandwidthPoint, ...], l2_bytes: int, share: float = L2_PLATEAU_SHARE
) -> tuple[float, int]:
    """``(L2 bandwidth, usable L2 bytes)`` from the read-bandwidth sweep: the plateau is the best
    bandwidth up to half the L2; the usable L2 is the largest working set from the plateau on whose
    bandwidth stays within ``share`` of it (the first one below ends the search)."""
    inside = [p for p in points if p.working_set <= l2_bytes // 2] or list(points)
    if not inside:
        raise PreserveError("the read-bandwidth sweep measured no working set")
    best = max(inside, key=lambda p: p.bytes_per_s)
    usable = best.working_set
    for p in sorted(points, key=lambda p: p.working_set):
        if p.working_set <= best.working_set:
            continue
        if p.bytes_per_s < share * best.bytes_per_s:
            break
        usable = p.working_set
    return best.bytes_per_s, usable


def compute_bound_tokens(points: tuple[TokenPoint, ...], tolerance: float) -> int:
    """The largest token count before the GEMV first takes more than ``1 + tolerance`` times its time at
    the fewest tokens (up to there it is memory-bound: more tokens cost nothing)."""
    ordered = sorted(points, key=lambda p: p.tokens)
    if not ordered:
        raise PreserveError("the GEMV token sweep measured nothing")
    last = ordered[0].tokens
    for p in ordered[1:]:
        if p.seconds > (1 + tolerance) * ordered[0].seconds:
            break
        last = p.tokens
    return last


def calibrated_profile(published: HardwareProfile, m: Measurements) -> HardwareProfile:
    """``published`` with the measured figures (HBM efficiency, L2 size, bandwidth and usable share,
    peak FLOP/s), each source naming the measurement and keeping the published figure beside it."""
    where = m.provenance.cite()
    hbm_bw = max(published.hbm_bw, m.hbm.bytes_per_s)  # a nominal figure below a measured one is wrong
    l2_bw, usable = usable_l2(m.l2_sweep, m.l2_bytes)
    fraction = min(1.0, usable / m.l2_bytes)
    sources = dict(published.sources)

    def cite(field: str, shown: str, how: str) -> None:
        before = published.sources.get(field, "no source")
        sources[field] = f"measured on {where}: {how}; published: {shown} ({before})"

    if hbm_bw != published.hbm_bw:
        cite(
            "hbm_bw",
            f"{published.hbm_bw:g}",
            f"a streaming read reached {m.hbm.bytes_per_s:g} B/s, above "
            f"the nominal figure, which it replaces",
        )
    cite(
        "hbm_efficiency",
        f"{published.hbm_efficiency:g}",
        f"streaming read of {format_size(m.hbm.working_set)} (>= 4x L2) at {m.hbm.bytes_per_s:.4g} B/s "
        f"= {m.hbm.bytes_per_s / hbm_bw:.3f} of {hbm_bw:g}",
    )
    cite("l2_bytes", f"{published.l2_bytes}", "the device's cudaDevAttrL2CacheSize")
    cite(
        "l2_bw",
        f"{published.l2_bw:g}",
        "best read bandwidth over working sets up to half the L2 (ld.global.cg, repeated passes)",
    )
    cite(
        "l2_usable_fraction",
        f"{published.l2_usable_fraction:g}",
        f"read bandwidth stays within {L2_PLATEAU_SHARE:.0%} of the L2's up to {format_size(usable)} "
        f"of {format_size(m.l2_bytes)}",
    )
    cite(
        "peak_flops", f"{published.peak_flops:g}", "cuBLAS fp16 product 8192x8192x8192 (random data), median"
    )
    return dataclasses.replace(
        published,
        description=f"{published.description}; calibrated on {m.provenance.device}",
        l2_bytes=m.l2_bytes,
        hbm_bw=hbm_bw,
        hbm_efficiency=m.hbm.bytes_per_s / hbm_bw,
        l2_bw=l2_bw,
        l2_usable_fraction=fraction,
        peak_flops=m.peak_flops,
        sources=sources,
    )


def gemv_model(tokens: int, k: int, n: int) -> onnx.ModelProto:
    """x[tokens, k] -> AllReduce -> MatMul(w[k, n] fp16) -> y: the measured case as the cost model sees
    it. The weight is an external-data stub: the model holds its shape, never its bytes."""
    w = TensorProto(
        name=WEIGHT, data_type=TensorProto.FLOAT16, dims=[k, n], data_location=TensorProto.EXTERNAL
    )
    w.external_data.add(key="location", value="calibrate-weight.bin")
    nodes = [
        helper.make_node("AllReduce", ["x"], ["a"], name="collective", domain="com.microsoft"),
        helper.make_node("MatMul", ["a", WEIGHT], ["y"], name="gemv"),
    ]
    graph = helper.make_graph(
        nodes,
        "calibrate",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [tokens, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [tokens, n])],
        [w],
    )
    return helper.make_model(
        graph,
        ir_version=9,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )


def predict(
    profile: HardwareProfile,
    tokens: int,
    k: int,
    n: int,
    alpha_s: float,
    prefetch_bytes: int,
    l2_fraction: float = 0.5,
) -> tuple[float, float, int]:
    """The cost model on one case: ``(baseline step s, saving s, bytes in L2 when the GEMV starts)``."""
    hw = dataclasses.replace(profile, collective_alpha=alpha_s, collective="", collective_alphas=())
    analysis = analyze(
        gemv_model(tokens, k, n),
        OptimizeConfig(hardware=hw, batch=1, l2_fraction=l2_fraction),
        model_ranks=1,
        source="calibrate",
    )
    base = simulate(analysis, hw, ((),), 1, l2_fraction, "baseline")
    full = simulate(analysis, hw, (((WEIGHT, prefetch_bytes),),), 1, l2_fraction, "upper bound")
    return base.step_s, base.step_s - full.step_s, full.moved[0]


def flagged(measured: float, predicted: float, noise: float, share: float) -> bool:
    """A prediction that misses the measurement by more than ``share`` of it and by more than the noise."""
    miss = abs(predicted - measured)
    return miss > share * abs(measured) and miss > noise


def compare(
    profile: HardwareProfile, cases: tuple[PrefetchCase, ...], share: float
) -> tuple[ComparisonRow, ...]:
    rows = []
    for c in cases:
        base, saved, moved = predict(profile, c.tokens, c.k, c.n, c.alpha_s, c.prefetch_bytes)
        rows.append(
            ComparisonRow(
                c.tokens,
                c.weight_bytes,
                c.alpha_s,
                c.prefetch_bytes,
                c.baseline_s,
                base,
                c.saved_s,
                saved,
                moved,
                c.noise_s,
                saved / c.saved_s - 1 if c.saved_s else None,
                flagged(c.saved_s, saved, c.noise_s, share),
            )
        )
    return tuple(rows)


def max_tokens(profile: HardwareProfile, m: Measurements, settings: Settings) -> MaxTokens:
    k, n = m.token_weight
    measured = compute_bound_tokens(m.token_sweep, settings.compute_tolerance)
    predicted = profile.roofline_tokens(2.0 * k * n, 2.0 * k * n)  # fp16: 2 B and 2 FLOP per weight
    swept = max(p.tokens for p in m.token_sweep)
    if measured == swept:  # no rise seen: the measurement is a lower bound, only a lower prediction misses
        miss = predicted < (1 - settings.flag_share) * measured
    else:
        miss = abs(predicted - measured) > settings.flag_share * measured
    return MaxTokens(k, n, measured, swept, predicted, predicted / measured - 1, miss)


def evaluate_measurements(m: Measurements, published: HardwareProfile, settings: Settings) -> Calibration:
    """The calibrated profile and the comparison, from measurements (pure: this is what the tests run)."""
    profile = calibrated_profile(published, m)
    if not math.isfinite(profile.peak_flops) or profile.peak_flops <= 0:
        raise PreserveError(f"measured peak FLOP/s is {profile.peak_flops}: the fp16 product did not run")
    return Calibration(
        m,
        published,
        profile,
        compare(profile, m.cases, settings.flag_share),
        max_tokens(profile, m, settings),
        settings,
    )
