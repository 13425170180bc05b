"""Hardware profiles: the figures the budget rule and the cost model need, each with its source.

Profiles live in ``hardware.toml`` inside the package; users can pass their own TOML file with the
same keys (one table per profile). Every numeric field ``f`` has a companion ``f_source`` string.

Calibration (docs/design.md §6): nominal figures come from spec sheets; ``hbm_efficiency`` (the share of
nominal HBM bandwidth that streaming kernels reach) and ``l2_usable_fraction`` (the share of the L2 that
holds a working set before hit rates collapse) turn them into what a decode step sees. The collective
latency depends on the library, so ``collective_alpha`` may be a table of implementations
(``{ nccl = 2.2e-5, oneshot = 7e-6 }``) with ``collective`` naming the one a user of the platform gets;
``NAME@IMPL`` (``h100-sxm@oneshot``, ``FILE.toml:NAME@IMPL``) picks another.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from dataclasses import dataclass, field, replace
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

# Calibration (optional, default 1.0 = the nominal figure is what a decode step gets), each in (0, 1].
CALIBRATION_FIELDS = ("hbm_efficiency", "l2_usable_fraction")

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
_KNOWN_KEYS = ("description", "collective", *_NUMERIC_FIELDS, *CALIBRATION_FIELDS, *AREA_COST_FIELDS)


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
    max_prefetch_bytes: int  # policy: chain links cover at most this many bytes each; 0 = no split
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    hbm_efficiency: float = 1.0  # achieved / nominal HBM bandwidth
    l2_usable_fraction: float = 1.0  # share of l2_bytes a working set can hold
    collective: str = ""  # the implementation collective_alpha belongs to ("" = the profile's only one)
    collective_alphas: tuple[tuple[str, float], ...] = ()  # every implementation the profile knows
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

    @property
    def effective_hbm_bw(self) -> float:
        """The HBM bandwidth a streaming kernel reaches: ``hbm_bw * hbm_efficiency``."""
        return self.hbm_bw * self.hbm_efficiency

    @property
    def usable_l2_bytes(self) -> int:
        """The L2 a working set can hold before hit rates collapse: ``l2_bytes * l2_usable_fraction``."""
        return int(self.l2_bytes * self.l2_usable_fraction)

    def with_collective(self, implementation: str) -> HardwareProfile:
        """This profile with the latency of another collective implementation, named ``NAME@IMPL``."""
        alphas = dict(self.collective_alphas)
        if implementation not in alphas:
            known = ", ".join(alphas) if alphas else "none besides its single collective_alpha"
            raise UsageError(
                f"hardware '{self.name}' has no collective implementation '{implementation}' (known: {known})"
            )
        base = self.name.partition("@")[0]
        return replace(
            self,
            name=f"{base}@{implementation}",
            collective=implementation,
            collective_alpha=alphas[implementation],
        )

    def collective_time(self, message_bytes: int, ranks: int) -> float:
        """Ring collective time ``alpha + 2 (p-1)/p * bytes / link_bw`` (docs/design.md §6)."""
        if ranks <= 1:
            return self.collective_alpha
        return self.collective_alpha + 2.0 * (ranks - 1) / ranks * message_bytes / self.link_bw

    def window_budget(self, message_bytes: int, ranks: int, l2_fraction: float) -> int:
        """docs/design.md §4.3: ``min(l2_fraction * usable L2, achieved HBM bw * t_collective)`` in bytes."""
        by_cache = l2_fraction * self.usable_l2_bytes
        by_time = self.effective_hbm_bw * self.collective_time(message_bytes, ranks)
        return int(min(by_cache, by_time))

    def roofline_tokens(self, weight_bytes: float, flops_per_token: float) -> float:
        """The tokens per step up to which a consumer that reads ``weight_bytes`` of weights and does
        ``flops_per_token`` FLOP per token stays memory-bound: ``peak_flops * W / (F * achieved HBM bw)``.

        Past it the consumer is compute-bound, so weights found in L2 no longer shorten it: a prefetch
        for it saves nothing. For a linear layer (``F = 2 x weight elements``) this is
        ``peak_flops * bytes_per_weight / (2 * achieved HBM bw)``. ``inf`` when the consumer does no
        FLOP per token (it never becomes compute-bound).
        """
        if flops_per_token <= 0:
            return math.inf
        return self.peak_flops * weight_bytes / (flops_per_token * self.effective_hbm_bw)


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
            raise PreserveError(
                f"{origin}: profile '{name}': unknown key '{unknown[0]}' (known: "
                f"{', '.join(_KNOWN_KEYS)}, and NAME_source for a figure's source)"
            )
        missing = [f for f in _NUMERIC_FIELDS if f not in table]
        if missing:
            raise PreserveError(f"{origin}: profile '{name}' lacks {', '.join(missing)}")
        table = dict(table)
        implementation, alphas = _collectives(table, origin, name)
        table["collective_alpha"] = dict(alphas)[implementation] if alphas else table["collective_alpha"]
        values = {}
        for f in (*_NUMERIC_FIELDS, *(f for f in (*CALIBRATION_FIELDS, *AREA_COST_FIELDS) if f in table)):
            v = table[f]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise PreserveError(f"{origin}: profile '{name}': {f} must be a finite non-negative number")
            if f in _POSITIVE_FIELDS and v == 0:  # rates the cost model divides by
                raise PreserveError(f"{origin}: profile '{name}': {f} must be greater than 0")
            if f in CALIBRATION_FIELDS and not 0 < v <= 1:  # a share of a nominal figure
                raise PreserveError(f"{origin}: profile '{name}': {f} must be in (0, 1], got {v}")
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
            hbm_efficiency=float(values.get("hbm_efficiency", 1.0)),
            l2_usable_fraction=float(values.get("l2_usable_fraction", 1.0)),
            collective=implementation,
            collective_alphas=alphas,
            **{
                f: (int(values[f]) if f == "dies" else float(values[f]))
                for f in AREA_COST_FIELDS
                if f in values
            },
        )
    return profiles


def _collectives(table: dict, origin: str, name: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """``(default implementation, ((implementation, alpha), ...))`` from ``collective_alpha`` (a number, or
    a table of implementations) and ``collective`` (the default's name; required with several)."""
    alpha, chosen = table["collective_alpha"], table.get("collective")
    where = f"{origin}: profile '{name}'"
    if chosen is not None and (not isinstance(chosen, str) or not chosen):
        raise PreserveError(f"{where}: collective must name a collective_alpha implementation")
    if not isinstance(alpha, dict):
        if chosen is not None:
            raise PreserveError(
                f"{where}: collective = '{chosen}' needs collective_alpha as a table of "
                f"implementations ({{ {chosen} = SECONDS, ... }})"
            )
        return "", ()
    if not alpha:
        raise PreserveError(f"{where}: collective_alpha is an empty table")
    for impl, v in alpha.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise PreserveError(f"{where}: collective_alpha.{impl} must be a finite non-negative number")
    if chosen is None:
        if len(alpha) > 1:
            raise PreserveError(
                f"{where}: collective_alpha has {len(alpha)} implementations; name the "
                f'default with collective = "..." (one of {", ".join(alpha)})'
            )
        chosen = next(iter(alpha))
    if chosen not in alpha:
        raise PreserveError(
            f"{where}: collective = '{chosen}' is not in collective_alpha ({', '.join(alpha)})"
        )
    return chosen, tuple((impl, float(v)) for impl, v in alpha.items())


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
    ``FILE.toml:NAME`` picks one profile of a file with several). ``@IMPL`` after any of them picks
    the collective implementation (``h100-sxm@oneshot``)."""
    base, at, implementation = name_or_file.rpartition("@")
    if at and "/" not in implementation and not implementation.endswith(".toml"):  # not a path with an @
        if not implementation or not base:
            raise UsageError(f"hardware '{name_or_file}': expected NAME@IMPLEMENTATION")
        return load_profile(base).with_collective(implementation)
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
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "ki": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "mi": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "gi": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
    "ti": 1024**4,
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
