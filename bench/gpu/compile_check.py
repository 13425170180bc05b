"""Compile `calibrate`'s CUDA kernels without a GPU: NVRTC to PTX, then ptxas to machine code, for sm_90
(cp.async.bulk.prefetch.L2), sm_80 (prefetch.global.L2::evict_last) and sm_75 (plain prefetch).

Catches what CuPy would only report on the GPU: C++ errors, and inline PTX that ptxas rejects. Needs
NVRTC and ptxas, e.g. from the pip wheels, installed outside the project's venv:

    python3 -m pip install --target /tmp/cudatools "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-nvrtc==13.0.*"
    LD_LIBRARY_PATH=/tmp/cudatools/nvidia/cu13/lib .venv/bin/python bench/gpu/compile_check.py \
        --nvrtc /tmp/cudatools/nvidia/cu13/lib/libnvrtc.so.13 --ptxas /tmp/cudatools/nvidia/cu13/bin/ptxas

Prints each architecture's compiler messages and ptxas' resource report; exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

from preserve_onnx.calibrate.kernels import KERNELS, SOURCE

ARCHES = ("90", "80", "75")


def nvrtc_ptx(lib: ctypes.CDLL, arch: str) -> tuple[int, str, bytes]:
    """``(status, log, ptx)`` of compiling SOURCE for ``compute_ARCH`` with CuPy's options."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.encode(), b"calibrate.cu", 0, None, None):
        return 1, "nvrtcCreateProgram failed", b""
    opts = [f"--gpu-architecture=compute_{arch}".encode(), b"-std=c++17", b"-ftz=true"]
    status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = b""
    if status == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return status, log.value.decode(errors="replace").strip(), ptx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvrtc", default="libnvrtc.so", help="path of libnvrtc")
    parser.add_argument("--ptxas", default="ptxas", help="path of ptxas")
    args = parser.parse_args()
    lib = ctypes.CDLL(args.nvrtc)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHES:
            status, log, ptx = nvrtc_ptx(lib, arch)
            print(
                f"sm_{arch}: NVRTC {'ok' if status == 0 else f'failed ({status})'}{': ' + log if log else ''}"
            )
            if status or not ptx:
                return 1
            entries = {
                line.split()[2] for line in ptx.decode().splitlines() if line.startswith(".visible .entry")
            }
            missing = {f"{k}(" for k in KERNELS} - entries
            if missing:
                print(f"sm_{arch}: PTX lacks {sorted(missing)}")
                return 1
            src = Path(tmp) / f"calibrate_{arch}.ptx"
            src.write_bytes(ptx)
            done = subprocess.run(
                [args.ptxas, f"-arch=sm_{arch}", "-v", str(src), "-o", str(src.with_suffix(".cubin"))],
                capture_output=True,
                text=True,
                check=False,
            )
            verdict = "ok" if done.returncode == 0 else "failed"
            print(f"sm_{arch}: ptxas {verdict}\n{done.stdout}{done.stderr}".rstrip())
            if done.returncode:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
