"""`calibrate` without a GPU: launch geometry and byte ranges, the analysis of measurements, the profile
writer, the comparison with the cost model, and the command's errors (docs/calibrate.md)."""

import dataclasses
import json
import re
import sys
import types

import onnx
import pytest
from typer.testing import CliRunner

from preserve_onnx.calibrate import Settings, calibrated_toml, evaluate_measurements, plan, profile_toml
from preserve_onnx.calibrate.analysis import (
    calibrated_profile,
    compare,
    compute_bound_tokens,
    flagged,
    predict,
    published_profile,
    usable_l2,
)
from preserve_onnx.calibrate.kernels import KERNELS, SOURCE
from preserve_onnx.calibrate.render import calibration_dict
from preserve_onnx.calibrate.results import BandwidthPoint, Measurements, PrefetchCase, Provenance, TokenPoint
from preserve_onnx.cli import app
from preserve_onnx.errors import PreserveError, UsageError
from preserve_onnx.hardware import _parse_profiles, builtin_profiles, load_profile
from tests.test_cost_model import TOY, allreduce_then_matmul  # TOY: round numbers, checkable by hand

MIB = 1 << 20
runner = CliRunner()

PROV = Provenance(
    "NVIDIA H100 80GB HBM3",
    "9.0",
    "580.159.04",
    "CUDA runtime 13.0, CuPy 14.2.0",
    "2026-12-07T14:00:00+00:00",
    "preserve-onnx calibrate --device cuda:0",
)
SWEEP = tuple(
    BandwidthPoint(w * MIB, 4, 1.0, bw)
    for w, bw in [(1, 8e12), (16, 1e13), (32, 9.8e12), (44, 9.2e12), (48, 7e12), (52, 9.5e12), (64, 3e12)]
)
TOKENS = tuple(
    TokenPoint(t, s) for t, s in [(1, 2.0e-5), (64, 2.1e-5), (128, 2.2e-5), (256, 2.3e-5), (512, 4e-5)]
)


def measurements(cases=(), hbm_bps=2.98e12, tokens=TOKENS) -> Measurements:
    return Measurements(
        PROV,
        132,
        50 * MIB,
        plan.prefetch_instruction(9, 0),
        BandwidthPoint(1 << 30, 1, (1 << 30) / hbm_bps, hbm_bps),
        SWEEP,
        7.5e14,
        (4096, 8192),
        tokens,
        cases,
    )


def case(
    saved_s: float, noise_s: float = 1e-8, tokens: int = 1, k: int = 16, n: int = 32, alpha_s: float = 1e-6
) -> PrefetchCase:
    """A k x n fp16 weight (default 16x32: 1024 B) after a spin of ``alpha_s``, all of it prefetched."""
    return PrefetchCase(
        tokens, 2 * k * n, k, n, alpha_s, alpha_s, 2 * k * n, 3e-5, 3e-5 - saved_s, saved_s, noise_s
    )


# ------------------------------------------------------------------------------ geometry and byte ranges


def test_stream_launch_fills_the_sms_but_not_more_than_the_vectors():
    assert plan.stream_launch(1 << 30, 132) == plan.Launch(528, 512)  # 4 blocks of 512 per SM
    assert plan.stream_launch(1 * MIB, 132) == plan.Launch(128, 512)  # 65536 vectors / 512
    assert plan.stream_launch(16, 132) == plan.Launch(1, 512)


@pytest.mark.parametrize("nbytes, sms", [(0, 132), (24, 132), (1024, 0)])
def test_stream_launch_refuses_a_range_it_cannot_read(nbytes, sms):
    with pytest.raises(ValueError):
        plan.stream_launch(nbytes, sms)


def test_buffer_sizes():
    assert plan.hbm_bytes(50 * MIB) == 1024 * MIB  # 4x L2 is 200 MiB: 1 GiB is the floor
    assert plan.hbm_bytes(300 * MIB) == 1200 * MIB
    assert plan.flush_bytes(50 * MIB) == 256 * MIB
    assert plan.flush_bytes(126 * MIB) == 504 * MIB
    assert plan.flush_bytes(64 * MIB + 1) == 257 * MIB  # whole MiB, rounded up


def test_working_sets_are_dense_around_the_l2():
    assert [w // MIB for w in plan.working_sets(50 * MIB)] == [
        1,
        2,
        4,
        8,
        16,
        28,
        32,
        36,
        40,
        44,
        48,
        52,
        56,
        60,
        64,
        68,
        72,
        128,
        256,
    ]
    assert [w // MIB for w in plan.working_sets(256 * MIB)][-3:] == [248, 252, 256]  # capped at 256 MiB


def test_sweep_passes_read_about_4_gib():
    assert (plan.sweep_passes(1 * MIB), plan.sweep_passes(256 * MIB), plan.sweep_passes(8 << 30)) == (
        4096,
        16,
        2,
    )


def test_bulk_prefetch_chunks():
    c = plan.prefetch_chunks(64 * MIB, bulk=True)
    assert c == plan.Chunking(16384, 4096, 16384)
    assert plan.prefetch_launch(c, 132) == plan.Launch(128, 32)  # 4096 instructions, one per thread
    c = plan.prefetch_chunks(40000, bulk=True)
    assert c == plan.Chunking(16384, 3, 7232)
    assert plan.chunk_ranges(c) == ((0, 16384), (16384, 16384), (32768, 7232))
    assert plan.prefetch_launch(plan.prefetch_chunks(4 * MIB, bulk=True), 132) == plan.Launch(8, 32)
    assert plan.prefetch_launch(plan.prefetch_chunks(1 << 30, bulk=True), 132) == plan.Launch(132, 32)


def test_line_prefetch_and_demotion_work_line_by_line():
    c = plan.prefetch_chunks(4 * MIB, bulk=False)
    assert c == plan.Chunking(128, 32768, 128)
    assert plan.prefetch_launch(c, 132) == plan.Launch(128, 256)
    assert plan.line_launch(64 * MIB, 132) == plan.Launch(528, 256)
    assert plan.line_launch(128, 132) == plan.Launch(1, 256)


@pytest.mark.parametrize("nbytes, chunk", [(0, 16384), (40008, 16384), (4096, 1000), (4096, 0)])
def test_prefetch_chunks_refuse_unaligned_ranges(nbytes, chunk):
    with pytest.raises(ValueError):
        plan.prefetch_chunks(nbytes, bulk=True, chunk=chunk)


def test_gemv_shapes():
    assert [plan.gemv_shape(m * MIB) for m in (4, 16, 64)] == [(4096, 512), (4096, 2048), (4096, 8192)]
    with pytest.raises(ValueError):
        plan.gemv_shape(3 * 4096)  # 1.5 columns


def test_prefetch_instruction_by_architecture():
    assert plan.prefetch_instruction(9, 0) == "cp.async.bulk.prefetch.L2.global.L2::cache_hint (evict_last)"
    assert plan.prefetch_instruction(8, 9) == "prefetch.global.L2::evict_last"
    assert plan.prefetch_instruction(7, 5) == "prefetch.global.L2"


def test_cases_cover_tokens_weights_and_alphas():
    got = plan.cases(Settings())
    assert len(got) == 4 * 3 * 4
    assert got[:5] == (
        (1, 4 * MIB, 5e-6),
        (16, 4 * MIB, 5e-6),
        (128, 4 * MIB, 5e-6),
        (512, 4 * MIB, 5e-6),
        (1, 4 * MIB, 1e-5),
    )
    assert got[-1] == (512, 64 * MIB, 4e-5)


def test_kernel_source_defines_every_kernel_the_bench_launches():
    defined = re.findall(r"__global__ void (\w+)\(", SOURCE)
    assert sorted(defined) == sorted(KERNELS)
    assert "cp.async.bulk.prefetch.L2.global.L2::cache_hint" in SOURCE
    assert "createpolicy.fractional.L2::evict_last.b64" in SOURCE


@pytest.mark.parametrize(
    "text, index", [("cuda:0", 0), ("cuda:3", 3), ("CUDA", 0), ("2", 2), (" cuda:1 ", 1)]
)
def test_device_index(text, index):
    assert plan.device_index(text) == index


@pytest.mark.parametrize("text", ["cpu", "cuda:", "cuda:-1", "cuda:x", "cuda:\u00b2", "gpu0", ""])
def test_device_index_refuses(text):
    with pytest.raises(PreserveError, match=r"expected cuda:N"):
        plan.device_index(text)


# ------------------------------------------------------------------------------- analysis of measurements


def test_usable_l2_ends_at_the_first_drop():
    bw, usable = usable_l2(SWEEP, 50 * MIB)
    # Plateau: the best up to 25 MiB (16 MiB, 10 TB/s); 32 and 44 MiB stay above 9 TB/s, 48 MiB drops.
    # 52 MiB's 9.5 TB/s comes after the drop and does not count.
    assert (bw, usable) == (1e13, 44 * MIB)


def test_usable_l2_when_every_set_is_past_half_the_l2():
    points = (BandwidthPoint(40 * MIB, 2, 1.0, 5e12), BandwidthPoint(80 * MIB, 2, 1.0, 2e12))
    assert usable_l2(points, 50 * MIB) == (5e12, 40 * MIB)
    with pytest.raises(PreserveError):
        usable_l2((), 50 * MIB)


def test_compute_bound_tokens():
    assert compute_bound_tokens(TOKENS, 0.10) == 128  # 256 takes 1.15x the 1-token time
    assert compute_bound_tokens(TOKENS, 0.20) == 256
    assert compute_bound_tokens(TOKENS[:1], 0.10) == 1
    with pytest.raises(PreserveError):
        compute_bound_tokens((), 0.1)


def test_calibrated_profile_keeps_the_published_figures_in_the_sources():
    pub = builtin_profiles()["h100-sxm"]
    hw = calibrated_profile(pub, measurements())
    assert (hw.hbm_bw, hw.hbm_efficiency) == (3.35e12, 2.98e12 / 3.35e12)
    assert (hw.l2_bytes, hw.l2_bw, hw.l2_usable_fraction, hw.peak_flops) == (50 * MIB, 1e13, 0.88, 7.5e14)
    # Not measured: kept as published.
    assert (hw.link_bw, hw.collective_alphas, hw.launch_overhead) == (
        pub.link_bw,
        pub.collective_alphas,
        pub.launch_overhead,
    )
    assert hw.sources["link_bw"] == pub.sources["link_bw"]
    assert hw.sources["l2_usable_fraction"] == (
        "measured on NVIDIA H100 80GB HBM3 (sm 9.0, driver 580.159.04, CUDA runtime 13.0, CuPy 14.2.0), "
        "2026-12-07T14:00:00+00:00, `preserve-onnx calibrate --device cuda:0`: read bandwidth stays within "
        "90% of the L2's up to 44.0 MiB of 50.0 MiB; published: 0.86 ("
        + pub.sources["l2_usable_fraction"]
        + ")"
    )
    assert hw.sources["peak_flops"].endswith(
        "median; published: 9.89e+14 (" + pub.sources["peak_flops"] + ")"
    )
    assert hw.description == pub.description + "; calibrated on NVIDIA H100 80GB HBM3"


def test_a_streaming_read_above_the_nominal_figure_replaces_it():
    pub = builtin_profiles()["h100-sxm"]
    cal = evaluate_measurements(measurements(hbm_bps=3.5e12), pub, Settings())
    assert (cal.profile.hbm_bw, cal.profile.hbm_efficiency) == (3.5e12, 1.0)
    assert cal.measured_fields == (
        "hbm_bw",
        "hbm_efficiency",
        "l2_bytes",
        "l2_bw",
        "l2_usable_fraction",
        "peak_flops",
    )
    assert cal.profile.sources["hbm_bw"].startswith("measured on NVIDIA H100")
    assert evaluate_measurements(measurements(), pub, Settings()).measured_fields[0] == "hbm_efficiency"


@pytest.mark.parametrize(
    "device, profile",
    [("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H200", "h200"), ("NVIDIA H200 NVL", "h200")],
)
def test_published_profile_by_device_name(device, profile):
    assert published_profile(device, None).name == profile


def test_published_profile_by_name_and_refusals():
    assert published_profile("NVIDIA H100 80GB HBM3", "h200").name == "h200"
    with pytest.raises(PreserveError, match=r"^no published profile matches 'NVIDIA H100 PCIe': pass --name"):
        published_profile("NVIDIA H100 PCIe", None)
    with pytest.raises(UsageError, match="unknown hardware 'nope'"):
        published_profile("NVIDIA H200", "nope")


# -------------------------------------------------------------------------------- the cost model's check


def test_prediction_is_the_cost_models_timeline_by_hand():
    base, saved, moved = predict(TOY, tokens=1, k=16, n=32, alpha_s=1e-6, prefetch_bytes=1024)
    # Collective: alpha (one rank, no ring term). GEMV: 1024 B of weight from HBM, activations 32 B in and
    # 64 B out from L2: max(1024 FLOP / 1e12, 1024 / 1e9 + 96 / 4e9) = 1.048 us.
    assert base == pytest.approx(1e-6 + 1.048e-6, rel=1e-12)
    # The spin lasts 1 us: 1000 of the 1024 B reach L2 (hbm_bw x alpha), the GEMV reads 24 B from HBM.
    assert moved == 1000
    assert saved == pytest.approx(1.048e-6 - (24 / 1e9 + (1000 + 96) / 4e9), rel=1e-12)  # 0.75 us
    _, saved_half, moved_half = predict(TOY, 1, 16, 32, 1e-6, 512)
    assert (moved_half, saved_half) == (512, pytest.approx(512 / 1e9 - 512 / 4e9, rel=1e-12))


def test_compare_flags_a_miss_of_more_than_a_quarter():
    rows = compare(TOY, (case(5e-7), case(7e-7), case(0.0), case(6.5e-7, noise_s=2e-7)), share=0.25)
    assert [r.predicted_saving_s for r in rows] == [pytest.approx(7.5e-7, rel=1e-12)] * 4
    assert [r.difference for r in rows] == [
        pytest.approx(0.5),
        pytest.approx(7.5 / 7 - 1),
        None,
        pytest.approx(7.5 / 6.5 - 1),
    ]
    # 0.75 vs 0.5 us: 50% off, flagged; vs 0.7 us: 7%, not; vs nothing saved: flagged; vs 0.65 us: 15% off.
    assert [r.flagged for r in rows] == [True, False, True, False]
    r = rows[0]
    assert (r.tokens, r.weight_bytes, r.alpha_s, r.prefetch_bytes, r.predicted_moved_bytes, r.noise_s) == (
        1,
        1024,
        1e-6,
        1024,
        1000,
        1e-8,
    )
    assert (r.measured_baseline_s, r.predicted_baseline_s) == (3e-5, pytest.approx(2.048e-6, rel=1e-12))


def test_flagged_needs_both_the_share_and_the_noise():
    assert flagged(1.0, 1.3, 0.1, 0.25)
    assert not flagged(1.0, 1.2, 0.1, 0.25)  # within the share
    assert not flagged(1.0, 1.3, 0.5, 0.25)  # within the noise
    assert flagged(-1.0, 0.0, 0.1, 0.25)  # a prefetch that cost time, predicted to cost nothing
    assert not flagged(0.0, 0.0, 0.0, 0.25)


def test_max_tokens_measured_against_the_roofline():
    pub = builtin_profiles()["h100-sxm"]
    cal = evaluate_measurements(measurements(), pub, Settings())
    t = cal.max_tokens
    predicted = 7.5e14 / 2.98e12  # peak / achieved HBM bandwidth, for 2 B and 2 FLOP per weight
    assert (t.k, t.n, t.measured, t.swept_to) == (4096, 8192, 128, 512)
    assert t.predicted == pytest.approx(predicted, rel=1e-12)
    assert t.difference == pytest.approx(predicted / 128 - 1, rel=1e-12)
    assert t.flagged  # 252 predicted vs 128 measured


def test_max_tokens_when_no_rise_was_seen_is_a_lower_bound():
    flat = tuple(TokenPoint(t, 2e-5) for t in (1, 64, 128))
    pub = builtin_profiles()["h100-sxm"]
    t = evaluate_measurements(measurements(tokens=flat), pub, Settings()).max_tokens
    assert (t.measured, t.swept_to, t.flagged) == (128, 128, False)  # 252 predicted >= 128: consistent
    low = dataclasses.replace(measurements(tokens=flat), peak_flops=1.5e14)  # roofline 50 tokens < 0.75 x 128
    assert evaluate_measurements(low, pub, Settings()).max_tokens.flagged


# ------------------------------------------------------------------------------------ the profile writer


def test_calibrated_profile_round_trips_through_the_loader(tmp_path):
    pub = builtin_profiles()["h100-sxm"]
    cal = evaluate_measurements(measurements((case(5e-7),)), pub, Settings())
    path = tmp_path / "h100.toml"
    path.write_text(calibrated_toml(cal.profile, cal.published, cal.measured_fields), encoding="utf-8")
    back = load_profile(str(path))
    assert back == cal.profile  # every figure, exactly
    assert back.sources == cal.profile.sources
    assert back.hbm_efficiency == 2.98e12 / 3.35e12 and back.collective_alphas == (
        ("nccl", 2.2e-5),
        ("oneshot", 7e-6),
    )
    assert load_profile(f"{path}@oneshot").collective_alpha == 7e-6
    head = path.read_text(encoding="utf-8").split("\n\n")[0].splitlines()
    assert head[-5:] == [
        "#   hbm_efficiency: 0.8895522388059701 (0.9)",
        "#   l2_bytes: 52428800 (52428800)",
        "#   l2_bw: 10000000000000.0 (10000000000000.0)",
        "#   l2_usable_fraction: 0.88 (0.86)",
        "#   peak_flops: 750000000000000.0 (989000000000000.0)",
    ]


def test_profile_toml_without_collective_table_or_area(tmp_path):
    hw = dataclasses.replace(
        TOY,
        name="my.gpu",
        description='quote " and \\ and é',
        hbm_efficiency=0.75,
        sources={"hbm_bw": "line one\nline two"},
    )
    (back,) = _parse_profiles(profile_toml(hw), "x").values()
    assert back == hw and back.sources == hw.sources and back.description == hw.description
    assert profile_toml(hw).splitlines()[0] == '["my.gpu"]'
    assert "die_mm2" not in profile_toml(hw)


def test_every_builtin_profile_round_trips():
    for hw in builtin_profiles().values():
        (back,) = _parse_profiles(profile_toml(hw), "x").values()
        assert back == hw and back.sources == hw.sources, hw.name


# ------------------------------------------------------------------------------------------- the command


def cli(*args):
    return runner.invoke(app, ["calibrate", *map(str, args)])


def one_line_error(result, code=1) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def fake_cupy(monkeypatch, count=1, name=b"NVIDIA H100 80GB HBM3", error=None):
    def get_count():
        if error is not None:
            raise error
        return count

    runtime = types.SimpleNamespace(
        getDeviceCount=get_count, getDeviceProperties=lambda i: {"name": name, "major": 9, "minor": 0}
    )
    monkeypatch.setitem(
        sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    )


def test_without_cupy(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    line = one_line_error(cli("--out", tmp_path / "p.toml"))
    assert line.startswith("error: calibrate needs CuPy and a CUDA GPU; CuPy is not importable (")
    assert line.endswith("): pip install cupy-cuda12x (or cupy-cuda13x, matching the driver's CUDA)")
    assert not (tmp_path / "p.toml").exists()


@pytest.mark.parametrize("device", ["cpu", "cuda:x", "gpu:0"])
def test_bad_device(monkeypatch, device):
    monkeypatch.setitem(sys.modules, "cupy", None)  # refused before CuPy is needed
    assert (
        one_line_error(cli("--device", device))
        == f"error: --device '{device}': expected cuda:N (a CUDA device index, e.g. cuda:0)"
    )


def test_device_beyond_the_machines(monkeypatch):
    fake_cupy(monkeypatch, count=1)
    assert (
        one_line_error(cli("--device", "cuda:2"))
        == "error: --device cuda:2: this machine has 1 CUDA device (cuda:0)"
    )
    fake_cupy(monkeypatch, count=2)
    assert (
        one_line_error(cli("--device", "cuda:2"))
        == "error: --device cuda:2: this machine has 2 CUDA devices (cuda:0..cuda:1)"
    )


def test_no_cuda_device(monkeypatch):
    fake_cupy(monkeypatch, error=RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected"))
    assert (
        one_line_error(cli()) == "error: calibrate needs a CUDA GPU; CUDA found none "
        "(cudaErrorNoDevice: no CUDA-capable device is detected)"
    )
    fake_cupy(monkeypatch, count=0)
    assert one_line_error(cli()) == "error: calibrate needs a CUDA GPU; CUDA found none"


def test_unknown_gpu_is_refused_before_measuring(monkeypatch):
    fake_cupy(monkeypatch, name=b"NVIDIA A100-SXM4-80GB")
    line = one_line_error(cli())
    assert line.startswith(
        "error: no published profile matches 'NVIDIA A100-SXM4-80GB': pass --name with the "
        "profile to start from (built in: ascend-910b, h100-sxm, h200"
    )


def test_bad_out(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert (
        one_line_error(cli("--out", tmp_path / "nope" / "p.toml"))
        == f"error: cannot write {tmp_path / 'nope' / 'p.toml'}: folder {tmp_path / 'nope'} does not exist"
    )
    assert one_line_error(cli("--out", tmp_path)) == f"error: cannot write {tmp_path}: it is a directory"


def test_unknown_name_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert one_line_error(cli("--name", "nope"), code=2).startswith("error: unknown hardware 'nope' (known: ")


@pytest.fixture
def measured(monkeypatch):
    """The command with CuPy and the measurements replaced: what the CLI renders and writes."""
    import preserve_onnx.calibrate.measure as measure_module

    fake_cupy(monkeypatch)
    # Under the calibrated H100 profile the cost model predicts p for case(); measured 2p is flagged, p is
    # not.
    p = predict(
        calibrated_profile(builtin_profiles()["h100-sxm"], measurements()), 1, 4096, 512, 5e-6, 4 * MIB
    )[1]
    got = measurements((case(2 * p, k=4096, n=512, alpha_s=5e-6), case(p, k=4096, n=512, alpha_s=5e-6)))
    seen = {"predicted": p}

    def fake_measure(index, settings, command, log):
        seen.update(index=index, command=command)
        log("fake measurement")
        return got

    monkeypatch.setattr(measure_module, "measure", fake_measure)
    return seen


def test_command_writes_a_profile_estimate_loads(tmp_path, measured):
    out = tmp_path / "h100.toml"
    result = cli("--device", "cuda:0", "--out", out)
    assert result.exit_code == 0, result.output
    assert measured["index"] == 0
    assert "calibrate: fake measurement" in result.output
    rows = [line for line in result.output.splitlines() if "│ 4.0 MiB │" in line]
    p = measured["predicted"] * 1e6
    assert (
        len(rows) == 2
        and rows[0].rstrip(" │").endswith("0.50x │ !")
        and rows[1].rstrip(" │").endswith("1.00x")
    )
    cells = [[c.strip() for c in row.strip("│ ").split("│")] for row in rows]
    assert cells[0] == [
        "1",
        "4.0 MiB",
        "5.00",
        "30.00",
        cells[0][4],
        f"{2 * p:.2f}",
        "0.01",
        f"{p:.2f}",
        "4.0 MiB",
        "0.50x",
        "!",
    ]
    assert cells[1][5:] == [f"{p:.2f}", "0.01", f"{p:.2f}", "4.0 MiB", "1.00x"]  # no flag
    assert "compute-bound from 128 tokens per step measured, 252 predicted (max_tokens) !" in result.output
    assert "1 of 2 cases differ from the cost model" in result.output
    assert load_profile(str(out)).l2_usable_fraction == 0.88
    onnx.save(allreduce_then_matmul(), tmp_path / "m.onnx")
    est = runner.invoke(app, ["estimate", str(tmp_path / "m.onnx"), "--hardware", str(out), "--ranks", "2"])
    assert est.exit_code == 0, est.output
    assert "h100-sxm" in est.output


def test_command_json(tmp_path, measured):
    out = tmp_path / "p.toml"
    result = runner.invoke(app, ["calibrate", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{") :])
    assert data["schema"] == 1 and data["profile"] == "h100-sxm" and data["written"] == str(out)
    assert data["figures"]["l2_usable_fraction"] == {"measured": 0.88, "published": 0.86}
    assert [r["flagged"] for r in data["comparison"]] == [True, False]
    assert [r["predicted_saving_s"] for r in data["comparison"]] == [measured["predicted"]] * 2
    assert [r["measured_saving_s"] for r in data["comparison"]] == [
        2 * measured["predicted"],
        measured["predicted"],
    ]
    assert data["max_tokens"]["measured"] == 128
    assert data["provenance"]["driver"] == "580.159.04"
    assert (
        calibration_dict(evaluate_measurements(measurements(), builtin_profiles()["h100-sxm"], Settings()))[
            "cases"
        ]
        == []
    )


def test_command_default_out_is_named_after_the_profile(tmp_path, measured, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("--name", "h200")
    assert result.exit_code == 0, result.output
    assert load_profile(str(tmp_path / "h200-calibrated.toml")).name == "h200"
