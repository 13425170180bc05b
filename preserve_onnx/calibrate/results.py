"""What a calibration measured, as plain frozen data (seconds, bytes, bytes/s, FLOP/s)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Provenance:
    """Where and how the figures were measured; every measured figure's source names it."""

    device: str  # the GPU's name as the driver reports it
    compute_capability: str  # "9.0"
    driver: str  # the driver version (nvidia-smi's, else the CUDA driver API's)
    cuda: str  # the CUDA runtime CuPy runs on, and CuPy's version
    date: str  # UTC, ISO 8601
    command: str  # the command line that ran the calibration

    def cite(self) -> str:
        return (
            f"{self.device} (sm {self.compute_capability}, driver {self.driver}, {self.cuda}), {self.date}, "
            f"`{self.command}`"
        )


@dataclass(frozen=True)
class BandwidthPoint:
    """Read bandwidth over a working set read ``passes`` times in one launch."""

    working_set: int
    passes: int
    seconds: float  # median launch time
    bytes_per_s: float


@dataclass(frozen=True)
class TokenPoint:
    """One fp16 GEMV (cuBLAS, cold L2) at ``tokens`` rows."""

    tokens: int
    seconds: float  # median


@dataclass(frozen=True)
class PrefetchCase:
    """A stand-in collective (spin of ``alpha_s``) then a GEMV, with and without a prefetch beside the spin.

    Each repeat times one pair (the order alternating), L2 flushed before each run; ``saved_s`` is the
    median of the pairs' differences and ``noise_s`` half their interquartile range.
    """

    tokens: int
    weight_bytes: int
    k: int
    n: int
    alpha_target_s: float  # what the spin kernel was asked to wait
    alpha_s: float  # what the spin alone measured (the collective time the cost model gets)
    prefetch_bytes: int
    baseline_s: float  # spin + GEMV, median
    prefetched_s: float  # spin beside the prefetch + GEMV, median
    saved_s: float
    noise_s: float


@dataclass(frozen=True)
class Measurements:
    provenance: Provenance
    sm_count: int
    l2_bytes: int  # the device's own figure (cudaDevAttrL2CacheSize)
    prefetch_instruction: str
    hbm: BandwidthPoint  # streaming read over >= 4x L2
    l2_sweep: tuple[BandwidthPoint, ...]
    peak_flops: float  # cuBLAS fp16 8192^3 product
    token_weight: tuple[int, int]  # (K, N) of the max_tokens sweep's weight
    token_sweep: tuple[TokenPoint, ...]
    cases: tuple[PrefetchCase, ...]
