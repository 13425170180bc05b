"""Write a hardware profile as TOML in ``hardware.toml``'s format (``--hardware FILE.toml`` loads it back).

Every figure is written with ``repr``, which round-trips a float exactly, and with its ``_source``.
A calibrated profile's header lists the measured figures beside the published ones.
"""

from __future__ import annotations

import json
import re

from preserve_onnx.hardware import AREA_COST_FIELDS, CALIBRATION_FIELDS, HardwareProfile

_TIMING = ("l2_bytes", "hbm_bw", "l2_bw", "link_bw", "peak_flops", "launch_overhead", "max_prefetch_bytes")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)  # TOML basic strings take JSON's escapes
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"not a profile figure: {v!r}")
    return repr(v)


def profile_toml(hw: HardwareProfile) -> str:
    """``hw`` as one ``[name]`` table: timing figures, calibration, collective latency, area and cost."""
    lines = [f"[{_key(hw.name)}]", f"description = {_value(hw.description)}"]

    def put(field: str, text: str) -> None:
        lines.append(f"{field} = {text}")
        if field in hw.sources:
            lines.append(f"{field}_source = {_value(hw.sources[field])}")

    for field in (*_TIMING, *CALIBRATION_FIELDS):
        put(field, _value(getattr(hw, field)))
    if hw.collective_alphas:
        lines.append(f"collective = {_value(hw.collective)}")
        if "collective" in hw.sources:
            lines.append(f"collective_source = {_value(hw.sources['collective'])}")
        put(
            "collective_alpha",
            "{ " + ", ".join(f"{_key(i)} = {_value(a)}" for i, a in hw.collective_alphas) + " }",
        )
    else:
        put("collective_alpha", _value(hw.collective_alpha))
    if hw.has_area_cost:
        for field in AREA_COST_FIELDS:
            put(field, _value(getattr(hw, field)))
    return "\n".join(lines) + "\n"


def calibrated_toml(profile: HardwareProfile, published: HardwareProfile, fields: tuple[str, ...]) -> str:
    """The file to write: a header of the measured ``fields`` beside the published ones, then the profile."""
    head = [
        f"# {profile.name}: calibrated by `preserve-onnx calibrate` (docs/calibrate.md).",
        "# The measured figures below replace the published ones; each <field>_source says how it was",
        "# measured and keeps the published figure and its source.",
        "# field: measured (published)",
    ]
    head += [f"#   {f}: {getattr(profile, f)!r} ({getattr(published, f)!r})" for f in fields]
    return "\n".join(head) + "\n\n" + profile_toml(profile)
