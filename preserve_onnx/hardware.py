"""Hardware profiles: the figures the budget rule and the cost model need, each with its source.

Profiles live in ``hardware.toml`` inside the package; users can pass their own TOML file with the
same keys (one table per profile). Every numeric field ``f`` has a companion ``f_source`` string.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from preserve_onnx.errors import PreserveError, UsageError

DEFAULT_PROFILE = "ascend-910b"

_NUMERIC_FIELDS = (
    "l2_bytes",
    "hbm_bw",
    "l2_bw",
    "link_bw",
    "collective_alpha",
    "peak_flops",
    "launch_overhead",
    "max_prefetch_bytes",
)

_POSITIVE_FIELDS = ("hbm_bw", "l2_bw", "link_bw", "peak_flops")  # rates the cost model divides by

# Area and cost figures for `explore` (optional: a profile without them still plans and estimates).
AREA_COST_FIELDS = (
    "die_mm2",
    "dies",
    "hbm_gb",
    "sram_mm2_per_mb",
    "wafer_cost_per_mm2",
    "defect_density_per_mm2",
    "hbm_cost_per_gb",
    "package_cost",
)
_KNOWN_KEYS = ("description", *_NUMERIC_FIELDS, *AREA_COST_FIELDS)


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator. Units: bytes, bytes/s, seconds, FLOP/s."""

    name: str
    description: str
    l2_bytes: int
    hbm_bw: float
    l2_bw: float
    link_bw: float
    collective_alpha: float
    peak_flops: float
    launch_overhead: float
    max_prefetch_bytes: int  # per prefetch operation; 0 = unlimited
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    # Area and cost (explore); 0 = not given. See hardware.toml for the model and the sources.
    die_mm2: float = 0.0
    dies: int = 1
    hbm_gb: float = 0.0
    sram_mm2_per_mb: float = 0.0
    wafer_cost_per_mm2: float = 0.0
    defect_density_per_mm2: float = 0.0
    hbm_cost_per_gb: float = 0.0
    package_cost: float = 0.0

    @property
    def has_area_cost(self) -> bool:
        return self.die_mm2 > 0 and self.sram_mm2_per_mb > 0 and self.wafer_cost_per_mm2 > 0

    def collective_time(self, message_bytes: int, ranks: int) -> float:
        """Ring collective time ``alpha + 2 (p-1)/p * bytes / link_bw`` (SPEC §6)."""
        if ranks <= 1:
            return self.collective_alpha
        return self.collective_alpha + 2.0 * (ranks - 1) / ranks * message_bytes / self.link_bw

    def window_budget(self, message_bytes: int, ranks: int, l2_fraction: float) -> int:
        """SPEC §4.3: ``min(l2_fraction * L2, hbm_bw * t_collective)`` in bytes."""
        by_cache = l2_fraction * self.l2_bytes
        by_time = self.hbm_bw * self.collective_time(message_bytes, ranks)
        return int(min(by_cache, by_time))


def _parse_profiles(text: str, origin: str) -> dict[str, HardwareProfile]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PreserveError(f"{origin}: not a valid TOML hardware file: {exc}") from None
    profiles = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise PreserveError(f"{origin}: '{name}' is not a table of hardware figures")
        unknown = [k for k in table if k not in _KNOWN_KEYS and not k.endswith("_source")]
        if unknown:  # a misspelt figure would otherwise be dropped without a word
            raise PreserveError(f"{origin}: profile '{name}': unknown key '{unknown[0]}' (known: "
                                f"{', '.join(_KNOWN_KEYS)}, and NAME_source for a figure's source)")
        missing = [f for f in _NUMERIC_FIELDS if f not in table]
        if missing:
            raise PreserveError(f"{origin}: profile '{name}' lacks {', '.join(missing)}")
        values = {}
        for f in (*_NUMERIC_FIELDS, *(f for f in AREA_COST_FIELDS if f in table)):
            v = table[f]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise PreserveError(f"{origin}: profile '{name}': {f} must be a finite non-negative number")
            if f in _POSITIVE_FIELDS and v == 0:  # rates the cost model divides by
                raise PreserveError(f"{origin}: profile '{name}': {f} must be greater than 0")
            values[f] = v
        profiles[name] = HardwareProfile(
            name=name,
            description=str(table.get("description", name)),
            l2_bytes=int(values["l2_bytes"]),
            hbm_bw=float(values["hbm_bw"]),
            l2_bw=float(values["l2_bw"]),
            link_bw=float(values["link_bw"]),
            collective_alpha=float(values["collective_alpha"]),
            peak_flops=float(values["peak_flops"]),
            launch_overhead=float(values["launch_overhead"]),
            max_prefetch_bytes=int(values["max_prefetch_bytes"]),
            sources={k[: -len("_source")]: str(v) for k, v in table.items() if k.endswith("_source")},
            **{f: (int(values[f]) if f == "dies" else float(values[f]))
               for f in AREA_COST_FIELDS if f in values},
        )
    return profiles


def builtin_profiles() -> dict[str, HardwareProfile]:
    """The profiles shipped in the package, by name."""
    return dict(_builtin_profiles())


@functools.cache
def _builtin_profiles() -> dict[str, HardwareProfile]:
    """Parsed once per process (7 ms of TOML, on every optimize otherwise)."""
    text = (Path(__file__).parent / "hardware.toml").read_text(encoding="utf-8")
    return _parse_profiles(text, "hardware.toml")


def load_profile(name_or_file: str) -> HardwareProfile:
    """A built-in profile by name, or the single profile of a user's TOML file (``NAME`` or ``FILE.toml``;
    ``FILE.toml:NAME`` picks one profile of a file with several)."""
    path_part, _, pick = name_or_file.partition(".toml:")
    if pick:
        path_part += ".toml"
    if path_part.endswith(".toml"):
        path = Path(path_part)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PreserveError(f"cannot read hardware file {path}: {exc.strerror}") from None
        profiles = _parse_profiles(text, str(path))
        if pick:
            if pick not in profiles:
                raise PreserveError(f"{path} has no profile '{pick}' (has: {', '.join(profiles)})")
            return profiles[pick]
        if not profiles:
            raise PreserveError(f"{path} holds no hardware profile (a [NAME] table of figures)")
        if len(profiles) != 1:
            raise PreserveError(f"{path} holds {len(profiles)} profiles; name one as {path}:NAME")
        return next(iter(profiles.values()))
    profiles = builtin_profiles()
    if name_or_file not in profiles:
        raise UsageError(f"unknown hardware '{name_or_file}' (known: {', '.join(sorted(profiles))})")
    return profiles[name_or_file]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
}


def parse_size(text: str) -> int:
    """``96MiB`` -> 100663296, ``64KiB``, ``1.5GB``, ``4096``. Raises PreserveError on junk."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise PreserveError(f"not a size: '{text}' (examples: 96MiB, 64KiB, 1GB, 4096)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """Human size with binary units: 100663296 -> '96.0 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover
