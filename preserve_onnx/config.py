"""The optimizer's settings as one frozen value, passed explicitly to every pass that needs it."""

from __future__ import annotations

from dataclasses import dataclass, field

from preserve_onnx.hardware import DEFAULT_PROFILE, HardwareProfile, load_profile

PREFETCH_ATTRIBUTES = ("max_size", "offset", "collective")


@dataclass(frozen=True)
class PrefetchNaming:
    """How Prefetch nodes are spelled in the graph, for vendor toolchains (SPEC §3)."""

    domain: str = "preserve"
    op_type: str = "Prefetch"
    version: int = 1
    # Our attribute name -> the name written into the graph.
    max_size: str = "max_size"
    offset: str = "offset"
    collective: str = "collective"

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
    kv: bool = True
    qdq_weights: bool = False  # also prefetch DequantizeLinear's quantized weights (blocks ORT's fusion)
    collectives: tuple[str, ...] = ("AllReduce",)
    naming: PrefetchNaming = PrefetchNaming()
    min_chunk: int = 64 * 1024
    ranks: int | None = None  # None: from the rank directory / sibling rank files, else 1
    replan: bool = False
    disabled: tuple[str, ...] = ()
