"""The optimizer's settings as one frozen value, passed explicitly to every pass that needs it.

Both dataclasses check themselves when built, so the Python API refuses what the command line refuses
(a PreserveError naming the field) instead of writing an invalid model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from preserve_onnx.errors import UsageError
from preserve_onnx.hardware import DEFAULT_PROFILE, HardwareProfile, load_profile

PREFETCH_ATTRIBUTES = ("max_size", "offset", "collective", "max_tokens", "min_tokens", "seq_axis", "window")
MS_DOMAIN = "com.microsoft"
COLLECTIVE_OPS = ("AllReduce", "AllGather", "AllToAll")


@dataclass(frozen=True)
class PrefetchNaming:
    """How Prefetch nodes are spelled in the graph, for vendor toolchains (docs/design.md §3)."""

    domain: str = "preserve"
    op_type: str = "Prefetch"
    version: int = 1
    # Our attribute name -> the name written into the graph.
    max_size: str = "max_size"
    offset: str = "offset"
    collective: str = "collective"
    max_tokens: str = "max_tokens"  # optional: absent = no limit (docs/design.md §3)
    min_tokens: str = "min_tokens"  # optional: absent = no limit (expert banks, docs/design.md §4.8)
    seq_axis: str = "seq_axis"  # with the length input L (docs/design.md §3 "Live ranges")
    window: str = "window"

    def __post_init__(self) -> None:
        if not self.domain or not self.op_type:
            raise UsageError("the Prefetch domain and op type must not be empty")
        if self.domain == MS_DOMAIN and self.op_type in COLLECTIVE_OPS:
            # strip/--replan would delete the model's collectives as if they were prefetches
            raise UsageError(
                f"the Prefetch op cannot be spelled {MS_DOMAIN}::{self.op_type}: that is a collective"
            )
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise UsageError(
                f"the Prefetch opset version must be an integer of at least 1, got {self.version!r}"
            )
        names = [getattr(self, a) for a in PREFETCH_ATTRIBUTES]
        if not all(isinstance(n, str) and n.isidentifier() for n in names):
            raise UsageError(f"Prefetch attribute names must be identifiers, got {names}")
        if len(set(names)) != len(names):
            raise UsageError(
                f"two Prefetch attributes would share a name ({dict(zip(PREFETCH_ATTRIBUTES, names))})"
            )

    def matches(self, node) -> bool:
        return node.op_type == self.op_type and node.domain == self.domain


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything `optimize` needs. ``budget`` (bytes) overrides the hardware budget rule."""

    hardware: HardwareProfile = field(default_factory=lambda: load_profile(DEFAULT_PROFILE))
    budget: int | None = None
    l2_fraction: float = 0.5
    batch: int = 8
    context: int = 16384
    dims: tuple[tuple[str, int], ...] = ()  # --dim NAME=N: symbolic dims bound first (docs/design.md §2)
    kv: bool = True
    static_kv: bool = False  # KV links in the two-input form, no length input (docs/design.md §4.7)
    qdq_weights: bool = False  # also prefetch DequantizeLinear's quantized weights (blocks ORT's fusion)
    collectives: tuple[str, ...] = ("AllReduce",)
    naming: PrefetchNaming = PrefetchNaming()
    min_chunk: int = 64 * 1024
    ranks: int | None = None  # None: from the rank directory / sibling rank files, else 1
    replan: bool = False
    disabled: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.hardware, str):  # a profile name or FILE.toml, as on the command line
            object.__setattr__(self, "hardware", load_profile(self.hardware))
        if not isinstance(self.hardware, HardwareProfile):
            raise UsageError(f"hardware must be a HardwareProfile or a profile name, got {self.hardware!r}")
        if not isinstance(self.naming, PrefetchNaming):
            raise UsageError(f"naming must be a PrefetchNaming, got {self.naming!r}")
        for name in ("batch", "context"):
            _check_int(name, getattr(self, name), 1)
        object.__setattr__(self, "dims", check_dims(self.dims))
        for name in ("budget", "min_chunk"):
            _check_int(name, getattr(self, name), 0)
        _check_int("ranks", self.ranks, 1)
        if not (isinstance(self.l2_fraction, (int, float)) and 0 < self.l2_fraction <= 1):
            raise UsageError(f"l2_fraction must be in (0, 1], got {self.l2_fraction!r}")
        unknown = [c for c in self.collectives if c not in COLLECTIVE_OPS]
        if unknown or not self.collectives or isinstance(self.collectives, str):
            raise UsageError(
                f"collectives must be a tuple drawn from {', '.join(COLLECTIVE_OPS)}, "
                f"got {self.collectives!r}"
            )


def check_dims(dims: object) -> tuple[tuple[str, int], ...]:
    """``dims`` as the API takes it (a mapping or pairs), checked: names non-empty, values >= 1."""
    pairs = tuple(dims.items()) if isinstance(dims, Mapping) else tuple(dims)  # type: ignore[arg-type]
    for pair in pairs:
        if not (
            isinstance(pair, tuple)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and pair[0]
            and isinstance(pair[1], int)
            and not isinstance(pair[1], bool)
            and pair[1] >= 1
        ):
            raise UsageError(f"dims must be (name, positive int) pairs, got {pair!r}")
    return pairs


def _check_int(name: str, value: object, least: int) -> None:
    if value is None and name in ("budget", "ranks"):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UsageError(f"{name} must be an integer of at least {least}, got {value!r}")
