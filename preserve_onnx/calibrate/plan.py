"""What `calibrate` runs: sweep points, launch geometry and byte ranges (pure functions, no GPU).

Every number a kernel launch uses comes from here, so the geometry can be checked without a device:
the streaming read's grid, the prefetch's chunks and grid, the GEMV shapes and the sweep points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIB = 1 << 20
VECTOR_BYTES = 16  # the streaming read loads one uint4 (16 B) per thread per step
STREAM_BLOCK = 512  # threads per block of the streaming read
STREAM_BLOCKS_PER_SM = 4  # 4 x 512 = 2048 threads: a Hopper SM's maximum
STREAM_UNROLL = 4  # independent 16-byte loads in flight per thread before their first use
L2_LINE = 128  # bytes per L2 line: the fallback prefetch and the demotion work line by line
BULK_PREFETCH_CHUNK = 16 * 1024  # bytes per cp.async.bulk.prefetch.L2 instruction (sm_90)
PREFETCH_BLOCK = 32  # one warp per block: the prefetch issues instructions, it does not compute
LINE_BLOCK = 256  # threads per block of the line-by-line kernels (fallback prefetch, demotion)
GEMV_K = 4096  # the GEMV's input features (a 7-8B model's hidden size); N follows from the weight size
SPIN_THREADS = 32  # the stand-in collective: one block of one warp


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``grid`` blocks of ``block`` threads."""

    grid: int
    block: int


@dataclass(frozen=True)
class Chunking:
    """A prefetch of ``nbytes`` as ``count`` instructions of ``chunk`` bytes (the last one ``last`` bytes)."""

    chunk: int
    count: int
    last: int


@dataclass(frozen=True)
class Settings:
    """The sweep `calibrate` runs; the defaults fit a lent GPU's 8 minutes with room to spare."""

    tokens: tuple[int, ...] = (1, 16, 128, 512)  # prefetch cases
    weights_mib: tuple[int, ...] = (4, 16, 64)
    alphas_us: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0)
    max_tokens_sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
    repeats: int = 30  # timed pairs per prefetch case (median of the paired differences)
    bandwidth_repeats: int = 15  # timed launches per bandwidth point
    compute_tolerance: float = 0.10  # a GEMV is compute-bound once it takes this much longer than at 1 token
    flag_share: float = 0.25  # the comparison flags a case whose prediction misses by more than this share


def stream_launch(nbytes: int, sm_count: int) -> Launch:
    """The streaming read's grid over ``nbytes``: enough blocks to fill every SM (4 x 512 threads each),
    no more than there are 16-byte vectors to read (a 1 MiB working set still spreads over 128 blocks)."""
    if nbytes <= 0 or nbytes % VECTOR_BYTES:
        raise ValueError(
            f"the streaming read needs a positive multiple of {VECTOR_BYTES} bytes, got {nbytes}"
        )
    if sm_count < 1:
        raise ValueError("sm_count must be at least 1")
    vectors = nbytes // VECTOR_BYTES
    return Launch(min(sm_count * STREAM_BLOCKS_PER_SM, math.ceil(vectors / STREAM_BLOCK)), STREAM_BLOCK)


def hbm_bytes(l2_bytes: int) -> int:
    """The streaming read's buffer for HBM bandwidth: at least 4x the L2 and at least 1 GiB, whole MiB."""
    return max(math.ceil(4 * l2_bytes / MIB), 1024) * MIB


def flush_bytes(l2_bytes: int) -> int:
    """What the L2 flush reads before each timed run: 4x the L2, at least 256 MiB (~85 us at 3 TB/s,
    time for the host to queue the runs behind it), whole MiB."""
    return max(math.ceil(4 * l2_bytes / MIB), 256) * MIB


def working_sets(l2_bytes: int) -> tuple[int, ...]:
    """Working sets of the read-bandwidth sweep, 1-256 MiB: powers of two plus every 4 MiB from half
    the L2 to 1.5x it, where the bandwidth falls from L2's to HBM's."""
    points = {1 << i for i in range(9)}  # 1 .. 256 MiB
    low, high = l2_bytes // 2 // MIB, math.ceil(1.5 * l2_bytes / MIB)
    points |= {m for m in range(4 * math.ceil(low / 4), high + 1, 4) if 1 <= m <= 256}
    return tuple(m * MIB for m in sorted(points))


def sweep_passes(nbytes: int, target_bytes: int = 4 << 30) -> int:
    """Passes over a working set in one timed launch: about ``target_bytes`` read in all, at least 2."""
    return max(2, math.ceil(target_bytes / nbytes))


def prefetch_chunks(nbytes: int, bulk: bool, chunk: int = BULK_PREFETCH_CHUNK) -> Chunking:
    """The instructions a prefetch of ``nbytes`` issues: ``cp.async.bulk.prefetch.L2`` takes ``chunk``
    bytes at a time (a multiple of 16, from a 16-byte aligned address); ``prefetch.global.L2`` one line."""
    size = chunk if bulk else L2_LINE
    if nbytes <= 0 or nbytes % VECTOR_BYTES:
        raise ValueError(f"a prefetch spans a positive multiple of {VECTOR_BYTES} bytes, got {nbytes}")
    if size <= 0 or size % VECTOR_BYTES:
        raise ValueError(f"a prefetch chunk is a positive multiple of {VECTOR_BYTES} bytes, got {size}")
    count = math.ceil(nbytes / size)
    return Chunking(size, count, nbytes - (count - 1) * size)


def chunk_ranges(chunking: Chunking) -> tuple[tuple[int, int], ...]:
    """``(offset, size)`` of every instruction of ``chunking``, in issue order (what the kernel computes)."""
    return tuple(
        (i * chunking.chunk, chunking.chunk if i < chunking.count - 1 else chunking.last)
        for i in range(chunking.count)
    )


def prefetch_launch(chunking: Chunking, sm_count: int) -> Launch:
    """The prefetch kernel's grid: one thread per instruction, spread over at most one block per SM
    (bulk: warps of 32; line by line: blocks of 256); threads stride when there are more instructions."""
    block = PREFETCH_BLOCK if chunking.chunk > L2_LINE else LINE_BLOCK
    return Launch(max(1, min(sm_count, math.ceil(chunking.count / block))), block)


def line_launch(nbytes: int, sm_count: int) -> Launch:
    """Grid of the demotion kernel (one thread per 128-byte L2 line, striding, at most 4 blocks per SM)."""
    lines = math.ceil(nbytes / L2_LINE)
    return Launch(max(1, min(sm_count * 4, math.ceil(lines / LINE_BLOCK))), LINE_BLOCK)


def gemv_shape(weight_bytes: int, k: int = GEMV_K, element_bytes: int = 2) -> tuple[int, int]:
    """``(K, N)`` of an fp16 weight of ``weight_bytes``: K input features, N = bytes / (2 K) outputs."""
    if weight_bytes <= 0 or weight_bytes % (k * element_bytes):
        raise ValueError(f"a {weight_bytes}-byte weight is not a whole number of {k}-element fp16 columns")
    return k, weight_bytes // (k * element_bytes)


def prefetch_instruction(major: int, minor: int) -> str:
    """The instruction the prefetch kernel compiles to on compute capability ``major.minor``."""
    if major >= 9:
        return "cp.async.bulk.prefetch.L2.global.L2::cache_hint (evict_last)"
    if major >= 8:
        return "prefetch.global.L2::evict_last"
    return "prefetch.global.L2"


def cases(settings: Settings) -> tuple[tuple[int, int, float], ...]:
    """The prefetch cases as ``(tokens, weight bytes, alpha seconds)``, weight-major."""
    return tuple(
        (t, w * MIB, a / 1e6)
        for w in settings.weights_mib
        for a in settings.alphas_us
        for t in settings.tokens
    )


def device_index(text: str) -> int:
    """``cuda:N`` (or ``cuda``, ``N``) -> N; a PreserveError for anything else."""
    from preserve_onnx.errors import PreserveError

    spec = text.strip().lower()
    index = spec[len("cuda:") :] if spec.startswith("cuda:") else "0" if spec == "cuda" else spec
    if not (index.isascii() and index.isdigit()):
        raise PreserveError(f"--device '{text}': expected cuda:N (a CUDA device index, e.g. cuda:0)")
    return int(index)
