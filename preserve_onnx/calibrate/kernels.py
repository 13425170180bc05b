"""The CUDA kernels `calibrate` times, as CuPy RawModule source, and the lazy CuPy import.

CuPy is imported here only, when a calibration starts: the package needs no GPU to install or test.
The kernels (launch geometry in ``plan.py``):

- ``read_stream``: every thread reads 16-byte vectors with ``ld.global.cg`` (cached in L2 only, so a
  small working set is not served from L1), four loads in flight before their first use, ``passes``
  times over the buffer; the XOR of what it read goes to ``sink`` only on an impossible value, so no
  load is dead code. HBM bandwidth over a buffer >= 4x L2; L2 bandwidth over repeated passes of a
  smaller working set; the L2 flush.
- ``spin``: the stand-in collective. One warp of one block waits on ``%globaltimer`` for ``ns``
  nanoseconds; the rest of the GPU and HBM stay idle, as during an all-reduce's latency.
- ``prefetch_l2``: the PRESERVE hint. On sm_90 one ``cp.async.bulk.prefetch.L2.global`` per ``chunk``
  bytes with an ``evict_last`` cache policy (``createpolicy.fractional``); on sm_80-89 one
  ``prefetch.global.L2::evict_last`` per 128-byte line; before sm_80 ``prefetch.global.L2``. The
  kernel only issues: the copy engine / L2 fills the lines while the kernel has long finished.
- ``demote_l2``: ``applypriority.global.L2::evict_normal`` over a range, so that lines a prefetch
  marked ``evict_last`` do not survive the next flush and turn the next baseline into an L2 hit.
"""

from __future__ import annotations

from preserve_onnx.errors import PreserveError

SOURCE = r"""
extern "C" {

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ uint4 load_cg(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__global__ void read_stream(const uint4* __restrict__ data, unsigned long long vectors, unsigned int passes,
                            unsigned int* sink) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long first = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int acc = 0;
    for (unsigned int pass = 0; pass < passes; ++pass) {
        for (unsigned long long i = first; i < vectors; i += 4 * stride) {
            uint4 v0 = load_cg(data + i);
            uint4 v1 = make_uint4(0, 0, 0, 0), v2 = v1, v3 = v1;
            if (i + stride < vectors) v1 = load_cg(data + i + stride);
            if (i + 2 * stride < vectors) v2 = load_cg(data + i + 2 * stride);
            if (i + 3 * stride < vectors) v3 = load_cg(data + i + 3 * stride);
            acc ^= v0.x ^ v0.y ^ v0.z ^ v0.w ^ v1.x ^ v1.y ^ v1.z ^ v1.w;
            acc ^= v2.x ^ v2.y ^ v2.z ^ v2.w ^ v3.x ^ v3.y ^ v3.z ^ v3.w;
        }
        acc += pass;
    }
    if (acc == 0x9E3779B9u) sink[0] = acc;  // keeps every load without writing in practice
}

__global__ void spin(unsigned long long ns) {
    if (threadIdx.x != 0) return;
    const unsigned long long start = global_ns();
    while (global_ns() - start < ns) {
    }
}

__global__ void prefetch_l2(const char* __restrict__ base, unsigned long long nbytes, unsigned int chunk) {
    const unsigned long long count = (nbytes + chunk - 1) / chunk;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
#if __CUDA_ARCH__ >= 900
    unsigned long long policy;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
#endif
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += stride) {
        const unsigned long long offset = i * chunk;
#if __CUDA_ARCH__ >= 900
        const unsigned int size = (unsigned int)(nbytes - offset < chunk ? nbytes - offset : chunk);
        asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;"
                     :: "l"(base + offset), "r"(size), "l"(policy) : "memory");
#elif __CUDA_ARCH__ >= 800
        asm volatile("prefetch.global.L2::evict_last [%0];" :: "l"(base + offset) : "memory");
#else
        asm volatile("prefetch.global.L2 [%0];" :: "l"(base + offset) : "memory");
#endif
    }
}

__global__ void demote_l2(const char* __restrict__ base, unsigned long long nbytes) {
#if __CUDA_ARCH__ >= 800
    const unsigned long long lines = (nbytes + 127) / 128;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < lines;
         i += stride) {
        asm volatile("applypriority.global.L2::evict_normal [%0], 128;" :: "l"(base + i * 128) : "memory");
    }
#endif
}

}
"""

KERNELS = ("read_stream", "spin", "prefetch_l2", "demote_l2")

CUPY_HINT = "pip install cupy-cuda12x (or cupy-cuda13x, matching the driver's CUDA)"


def load_cupy():
    """CuPy, imported now; a PreserveError naming what is missing when it cannot be."""
    try:
        import cupy
    except ImportError as exc:
        raise PreserveError(
            f"calibrate needs CuPy and a CUDA GPU; CuPy is not importable ({exc}): {CUPY_HINT}"
        ) from None
    return cupy


def compile_kernels(cp, major: int, minor: int) -> dict:
    """The kernels above, compiled by NVRTC for the current device (CuPy passes its architecture,
    ``compute_MAJOR MINOR``, so ``__CUDA_ARCH__`` picks the sm_90 branch on Hopper); call it inside
    ``with cupy.cuda.Device(index)``."""
    try:
        module = cp.RawModule(code=SOURCE, options=("-std=c++17",))
        return {name: module.get_function(name) for name in KERNELS}
    except Exception as exc:  # noqa: BLE001 - NVRTC's and the driver's errors alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PreserveError(
            f"the calibration kernels did not compile for sm_{major}{minor}: {first}"
        ) from None
