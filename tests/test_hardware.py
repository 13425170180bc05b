"""Hardware profiles: the built-in file, and users' TOML files refused clearly when a figure is wrong."""

import pytest

from preserve_onnx.errors import PreserveError, UsageError
from preserve_onnx.hardware import builtin_profiles, load_profile

FIGURES = {"l2_bytes": 1 << 20, "hbm_bw": 1e12, "l2_bw": 4e12, "link_bw": 1e11, "collective_alpha": 1e-5,
           "peak_flops": 1e14, "launch_overhead": 0, "max_prefetch_bytes": 0}


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
    assert (hw.name, hw.description, hw.link_bw, hw.sources) == ("mine", "test chip", 1e11, {"link_bw": "datasheet"})
    path = tmp_path / "two.toml"
    path.write_text(toml(tmp_path, name="a").read_text() + toml(tmp_path, name="b", l2_bytes=7).read_text())
    assert load_profile(f"{path}:b").l2_bytes == 7
    with pytest.raises(PreserveError, match=r"two\.toml holds 2 profiles; name one as .*two\.toml:NAME$"):
        load_profile(str(path))
    with pytest.raises(PreserveError, match=r"has no profile 'c' \(has: a, b\)$"):
        load_profile(f"{path}:c")


@pytest.mark.parametrize("figures, message", [
    ({"link_bw": 0}, "link_bw must be greater than 0"),
    ({"hbm_bw": 0}, "hbm_bw must be greater than 0"),
    ({"peak_flops": 0}, "peak_flops must be greater than 0"),
    ({"l2_bw": "nan"}, "l2_bw must be a finite non-negative number"),
    ({"link_bw": "inf"}, "link_bw must be a finite non-negative number"),
    ({"collective_alpha": -1}, "collective_alpha must be a finite non-negative number"),
    ({"l2_bytes": '"big"'}, "l2_bytes must be a finite non-negative number"),
    ({"die_mm": 600}, "unknown key 'die_mm'"),
])
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
