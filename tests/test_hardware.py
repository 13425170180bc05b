"""Hardware profiles: the built-in file, and users' TOML files refused clearly when a figure is wrong."""

import pytest

from preserve_onnx.errors import PreserveError, UsageError
from preserve_onnx.hardware import builtin_profiles, load_profile

FIGURES = {
    "l2_bytes": 1 << 20,
    "hbm_bw": 1e12,
    "l2_bw": 4e12,
    "link_bw": 1e11,
    "collective_alpha": 1e-5,
    "peak_flops": 1e14,
    "launch_overhead": 0,
    "max_prefetch_bytes": 0,
}


def toml(tmp_path, name="mine", **figures):
    lines = [f"[{name}]"] + [f"{k} = {v}" for k, v in {**FIGURES, **figures}.items()]
    path = tmp_path / "hw.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_builtin_profiles_have_every_figure_positive_where_divided_by():
    profiles = builtin_profiles()
    assert {"ascend-910b", "h100-sxm", "h200"} <= set(profiles)
    for hw in profiles.values():
        assert hw.hbm_bw > 0 and hw.l2_bw > 0 and hw.link_bw > 0 and hw.peak_flops > 0


def test_a_user_file_with_one_profile_and_picking_one_of_several(tmp_path):
    hw = load_profile(str(toml(tmp_path, description='"test chip"', link_bw_source='"datasheet"')))
    assert (hw.name, hw.description, hw.link_bw, hw.sources) == (
        "mine",
        "test chip",
        1e11,
        {"link_bw": "datasheet"},
    )
    path = tmp_path / "two.toml"
    path.write_text(toml(tmp_path, name="a").read_text() + toml(tmp_path, name="b", l2_bytes=7).read_text())
    assert load_profile(f"{path}:b").l2_bytes == 7
    with pytest.raises(PreserveError, match=r"two\.toml holds 2 profiles; name one as .*two\.toml:NAME$"):
        load_profile(str(path))
    with pytest.raises(PreserveError, match=r"has no profile 'c' \(has: a, b\)$"):
        load_profile(f"{path}:c")


@pytest.mark.parametrize(
    "figures, message",
    [
        ({"link_bw": 0}, "link_bw must be greater than 0"),
        ({"hbm_bw": 0}, "hbm_bw must be greater than 0"),
        ({"peak_flops": 0}, "peak_flops must be greater than 0"),
        ({"l2_bw": "nan"}, "l2_bw must be a finite non-negative number"),
        ({"link_bw": "inf"}, "link_bw must be a finite non-negative number"),
        ({"collective_alpha": -1}, "collective_alpha must be a finite non-negative number"),
        ({"l2_bytes": '"big"'}, "l2_bytes must be a finite non-negative number"),
        ({"die_mm": 600}, "unknown key 'die_mm'"),
    ],
)
def test_bad_figures_are_refused(tmp_path, figures, message):
    with pytest.raises(PreserveError, match=f"profile 'mine': {message}"):
        load_profile(str(toml(tmp_path, **figures)))


def test_missing_figure_empty_file_and_not_toml(tmp_path):
    path = toml(tmp_path)
    path.write_text(path.read_text().replace("peak_flops = 100000000000000.0\n", ""))
    with pytest.raises(PreserveError, match="profile 'mine' lacks peak_flops$"):
        load_profile(str(path))
    path.write_text("")
    with pytest.raises(PreserveError, match=r"hw\.toml holds no hardware profile"):
        load_profile(str(path))
    path.write_text("[broken\n")
    with pytest.raises(PreserveError, match="not a valid TOML hardware file"):
        load_profile(str(path))
    with pytest.raises(PreserveError, match="cannot read hardware file"):
        load_profile(str(tmp_path / "absent.toml"))


def test_unknown_builtin_name_is_a_usage_error():
    with pytest.raises(UsageError, match=r"^unknown hardware 'tpu-v9' \(known: "):
        load_profile("tpu-v9")


def test_every_builtin_figure_cites_a_source_or_says_estimate():
    cited = (
        "datasheet",
        "whitepaper",
        "paper",
        "documentation",
        "issue",
        "PR ",
        "gpu-benches",
        "spec",
        "brief",
        "CSET",
        "TSMC",
        "ISSCC",
        "docs/design.md",
        "hiascend",
        "arthurchiao",
        "policy",
        "one ",
        "four ",
        "onnxruntime",
        "HCCL",
        "XLA",
    )
    for hw in builtin_profiles().values():
        for figure, source in hw.sources.items():
            assert source.startswith("estimate") or "estimate" in source or any(c in source for c in cited), (
                hw.name,
                figure,
                source,
            )


def test_calibrated_figures_of_the_paper_platform():
    hw = load_profile("ascend-910b")
    # HCCS 56 GB/s is bidirectional: 28 GB/s per direction is what one ring step uses.
    assert (hw.link_bw, hw.collective, hw.collective_alpha) == (28e9, "hccl", 25e-6)
    assert hw.effective_hbm_bw == pytest.approx(1.6e12 * 0.85)
    assert hw.usable_l2_bytes == int(192 * 2**20 * 0.85)
    # 120 MiB is a policy (CANN GE's default length when max_size is 0), kept as the chain-link size.
    assert hw.max_prefetch_bytes == 120 * 2**20 and hw.sources["max_prefetch_bytes"].startswith("policy")


def test_collective_implementations_default_and_pick():
    hw = load_profile("h100-sxm")
    assert (hw.name, hw.collective, hw.collective_alpha) == ("h100-sxm", "nccl", 22e-6)
    assert hw.collective_alphas == (("nccl", 22e-6), ("oneshot", 7e-6))
    fast = load_profile("h100-sxm@oneshot")
    assert (fast.name, fast.collective, fast.collective_alpha) == ("h100-sxm@oneshot", "oneshot", 7e-6)
    assert fast.collective_time(65536, 8) == pytest.approx(7e-6 + 2 * 7 / 8 * 65536 / 450e9, rel=1e-12)
    assert load_profile("mi300x@quickreduce").collective_alpha == 7.5e-6
    with pytest.raises(
        UsageError,
        match=r"^hardware 'h100-sxm' has no collective implementation 'hccl' "
        r"\(known: nccl, oneshot\)$",
    ):
        load_profile("h100-sxm@hccl")
    with pytest.raises(UsageError, match="expected NAME@IMPLEMENTATION"):
        load_profile("h100-sxm@")


def test_a_user_file_with_collective_implementations(tmp_path):
    path = toml(
        tmp_path,
        collective_alpha="{ lib = 3e-5, fast = 5e-6 }",
        collective='"lib"',
        hbm_efficiency=0.5,
        l2_usable_fraction=0.25,
    )
    hw = load_profile(str(path))
    assert (hw.collective, hw.collective_alpha, hw.effective_hbm_bw, hw.usable_l2_bytes) == (
        "lib",
        3e-5,
        5e11,
        (1 << 20) // 4,
    )
    assert hw.window_budget(0, 1, 1.0) == int(min((1 << 20) / 4, 5e11 * 3e-5))
    assert load_profile(f"{path}@fast").collective_alpha == 5e-6
    assert load_profile(f"{path}:mine@fast").name == "mine@fast"
    plain = load_profile(str(toml(tmp_path)))  # a number: one implementation, calibration 1.0
    assert (plain.collective, plain.collective_alphas, plain.effective_hbm_bw) == ("", (), 1e12)
    with pytest.raises(UsageError, match=r"has no collective implementation 'x' \(known: none besides"):
        load_profile(f"{toml(tmp_path)}@x")


def test_a_folder_with_an_at_sign_is_a_path_not_an_implementation(tmp_path):
    folder = tmp_path / "me@host"
    folder.mkdir()
    path = folder / "hw.toml"
    path.write_text(toml(tmp_path).read_text())
    assert load_profile(str(path)).name == "mine"


@pytest.mark.parametrize(
    "figures, message",
    [
        (
            {"collective_alpha": "{ a = 1e-5, b = 2e-5 }"},
            r"collective_alpha has 2 implementations; name the default "
            r'with collective = "\.\.\." \(one of a, b\)',
        ),
        (
            {"collective_alpha": "{ a = 1e-5 }", "collective": '"b"'},
            r"collective = 'b' is not in collective_alpha \(a\)",
        ),
        (
            {"collective": '"nccl"'},
            r"collective = 'nccl' needs collective_alpha as a table of implementations",
        ),
        ({"collective_alpha": "{}"}, "collective_alpha is an empty table"),
        ({"collective_alpha": '{ a = "fast" }'}, "collective_alpha.a must be a finite non-negative number"),
        ({"collective_alpha": "{ a = -1.0 }"}, "collective_alpha.a must be a finite non-negative number"),
        ({"collective_alpha": "{ a = 1e-5 }", "collective": "3"}, "collective must name a collective_alpha"),
        ({"hbm_efficiency": 0}, r"hbm_efficiency must be in \(0, 1\], got 0"),
        ({"l2_usable_fraction": 1.5}, r"l2_usable_fraction must be in \(0, 1\], got 1.5"),
        ({"hbm_efficiency": '"high"'}, "hbm_efficiency must be a finite non-negative number"),
    ],
)
def test_bad_collectives_and_calibration_are_refused(tmp_path, figures, message):
    with pytest.raises(PreserveError, match=f"profile 'mine': {message}"):
        load_profile(str(toml(tmp_path, **figures)))


def test_roofline_tokens_by_hand():
    hw = load_profile("h100-sxm")
    # fp16 linear layer: F = 2 x elements, W = 2 B x elements -> peak x 2 / (2 x 0.9 x 3.35 TB/s) = 328.0.
    assert hw.roofline_tokens(2.0 * 4096 * 4096, 2.0 * 4096 * 4096) == pytest.approx(989e12 / (0.9 * 3.35e12))
    assert int(hw.roofline_tokens(2, 2)) == 328
    # int4 weights (half a byte each) become compute-bound four times sooner.
    assert hw.roofline_tokens(0.5, 2) == pytest.approx(hw.roofline_tokens(2, 2) / 4)
    assert hw.roofline_tokens(100, 0) == float("inf")  # no FLOP per token: never compute-bound
