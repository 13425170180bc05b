"""The measurements, on a CUDA GPU through CuPy (imported when a calibration starts, never before).

Timing: CUDA events on the measuring stream around the timed region, warm-up launches first, the
median of repeats. Every timed run of the GEMV starts from a flushed L2 (a streaming read of 4x the
L2), as a decode step finds its weights: read once per step, evicted by everything else in between.
Launch geometry and byte ranges come from ``plan.py``.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
from typing import Callable

import numpy as np

import preserve_onnx.calibrate.plan as plan
from preserve_onnx.calibrate.kernels import compile_kernels, load_cupy
from preserve_onnx.calibrate.results import BandwidthPoint, Measurements, PrefetchCase, Provenance, TokenPoint
from preserve_onnx.errors import PreserveError

PEAK_N = 8192  # the fp16 product that measures peak FLOP/s: 8192^3, 1.1 TFLOP


def open_device(cp, index: int) -> dict:
    """The device's properties; a PreserveError when CUDA has no such device."""
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - cudaErrorNoDevice, a driver too old, no driver at all
        raise PreserveError(f"calibrate needs a CUDA GPU; CUDA found none ({_first_line(exc)})") from None
    if count < 1:
        raise PreserveError("calibrate needs a CUDA GPU; CUDA found none")
    if index >= count:
        raise PreserveError(
            f"--device cuda:{index}: this machine has {count} CUDA device"
            f"{'s' if count > 1 else ''} (cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})"
        )
    return cp.cuda.runtime.getDeviceProperties(index)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def device_name(props: dict) -> str:
    return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])


def provenance(cp, index: int, props: dict, command: str) -> Provenance:
    name = device_name(props)
    driver = _smi_driver(index)
    if driver is None:
        v = cp.cuda.runtime.driverGetVersion()
        driver = f"CUDA driver API {v // 1000}.{v % 1000 // 10}"
    v = cp.cuda.runtime.runtimeGetVersion()
    return Provenance(
        device=name,
        compute_capability=f"{props['major']}.{props['minor']}",
        driver=driver,
        cuda=f"CUDA runtime {v // 1000}.{v % 1000 // 10}, CuPy {cp.__version__}",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command,
    )


def _smi_driver(index: int) -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader", "-i", str(index)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = done.stdout.strip()
    return text.splitlines()[0] if done.returncode == 0 and text else None


class _Bench:
    """Buffers, streams and events of one calibration on the current device."""

    def __init__(self, cp, kernels: dict, sm_count: int, l2_bytes: int, bulk: bool):
        self.cp, self.k, self.sm, self.l2, self.bulk = cp, kernels, sm_count, l2_bytes, bulk
        self.main = cp.cuda.Stream(non_blocking=True)  # the compute stream: spin (the collective), GEMV
        self.side = cp.cuda.Stream(non_blocking=True)  # the prefetch stream
        self.start, self.stop, self.side_done = cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event()
        size = plan.hbm_bytes(l2_bytes)
        # Not zeros (they can read faster than data); a cheap pattern written on the GPU.
        self.buffer = cp.arange(size // 4, dtype=cp.uint32)
        self.buffer *= cp.uint32(2654435761)
        self.sink = cp.zeros(1, dtype=cp.uint32)
        self.flush_vectors = plan.flush_bytes(l2_bytes) // plan.VECTOR_BYTES
        self.flush_launch = plan.stream_launch(plan.flush_bytes(l2_bytes), sm_count)
        cp.cuda.Device().synchronize()

    # -- building blocks, all queued on a stream
    def read(self, nbytes: int, passes: int, stream) -> None:
        launch = plan.stream_launch(nbytes, self.sm)
        self.k["read_stream"](
            (launch.grid,),
            (launch.block,),
            (self.buffer, np.uint64(nbytes // plan.VECTOR_BYTES), np.uint32(passes), self.sink),
            stream=stream,
        )

    def flush(self) -> None:
        self.k["read_stream"](
            (self.flush_launch.grid,),
            (self.flush_launch.block,),
            (self.buffer, np.uint64(self.flush_vectors), np.uint32(1), self.sink),
            stream=self.main,
        )

    def spin(self, seconds: float) -> None:
        self.k["spin"]((1,), (plan.SPIN_THREADS,), (np.uint64(round(seconds * 1e9)),), stream=self.main)

    def prefetch(self, weight, nbytes: int) -> None:
        chunking = plan.prefetch_chunks(nbytes, self.bulk)
        launch = plan.prefetch_launch(chunking, self.sm)
        self.k["prefetch_l2"](
            (launch.grid,),
            (launch.block,),
            (weight, np.uint64(nbytes), np.uint32(chunking.chunk)),
            stream=self.side,
        )

    def demote(self, weight) -> None:
        launch = plan.line_launch(weight.nbytes, self.sm)
        self.k["demote_l2"](
            (launch.grid,), (launch.block,), (weight, np.uint64(weight.nbytes)), stream=self.main
        )

    def gemv(self, x, w, y) -> None:
        with self.main:
            self.cp.matmul(x, w, out=y)

    def timed(self, body: Callable[[], None]) -> float:
        """Seconds between events on the main stream around ``body``."""
        self.start.record(self.main)
        body()
        self.stop.record(self.main)
        self.stop.synchronize()
        return self.cp.cuda.get_elapsed_time(self.start, self.stop) * 1e-3

    def median(
        self,
        body: Callable[[], None],
        repeats: int,
        before: Callable[[], None] | None = None,
        warmup: int = 2,
    ) -> float:
        times = []
        for i in range(warmup + repeats):
            if before is not None:
                before()
            t = self.timed(body)
            if i >= warmup:
                times.append(t)
        return float(np.median(times))

    # -- the measurements
    def hbm(self, settings: plan.Settings) -> BandwidthPoint:
        size = plan.hbm_bytes(self.l2)
        t = self.median(lambda: self.read(size, 1, self.main), settings.bandwidth_repeats)
        return BandwidthPoint(size, 1, t, size / t)

    def l2_sweep(self, settings: plan.Settings) -> tuple[BandwidthPoint, ...]:
        points = []
        for size in plan.working_sets(self.l2):
            passes = plan.sweep_passes(size)
            t = self.median(lambda: self.read(size, passes, self.main), settings.bandwidth_repeats)
            points.append(BandwidthPoint(size, passes, t, size * passes / t))
        return tuple(points)

    def peak_flops(self, settings: plan.Settings) -> float:
        cp = self.cp
        with self.main:
            a = cp.random.standard_normal((PEAK_N, PEAK_N), dtype=cp.float32).astype(cp.float16)
            b = cp.random.standard_normal((PEAK_N, PEAK_N), dtype=cp.float32).astype(cp.float16)
            c = cp.empty((PEAK_N, PEAK_N), dtype=cp.float16)
        t = self.median(lambda: self.gemv(a, b, c), max(5, settings.bandwidth_repeats // 2), warmup=3)
        return 2.0 * PEAK_N**3 / t

    def weight(self, nbytes: int):
        cp = self.cp
        k, n = plan.gemv_shape(nbytes)
        with self.main:
            return cp.random.standard_normal((k, n), dtype=cp.float32).astype(cp.float16)

    def activations(self, tokens: int, k: int, n: int):
        cp = self.cp
        with self.main:
            return (
                cp.random.standard_normal((tokens, k), dtype=cp.float32).astype(cp.float16),
                cp.empty((tokens, n), dtype=cp.float16),
            )

    def token_sweep(self, settings: plan.Settings, w) -> tuple[TokenPoint, ...]:
        points = []
        for tokens in settings.max_tokens_sweep:
            x, y = self.activations(tokens, *w.shape)
            t = self.median(lambda: self.gemv(x, w, y), settings.repeats, before=self.flush)
            points.append(TokenPoint(tokens, t))
        return tuple(points)

    def run(self, w, x, y, alpha: float, prefetch: bool) -> float:
        """One timed run: spin, then the GEMV; with ``prefetch``, the prefetch starts beside the spin."""
        self.demote(w)  # lines an earlier prefetch kept as evict_last would survive the flush
        self.flush()

        def body() -> None:
            if prefetch:
                self.side.wait_event(self.start)
                self.prefetch(w, w.nbytes)
            self.spin(alpha)
            self.gemv(x, w, y)

        t = self.timed(body)
        if prefetch:  # joined after the timed region: nothing of it leaks into the next run
            self.side_done.record(self.side)
            self.main.wait_event(self.side_done)
        return t

    def case(self, settings: plan.Settings, tokens: int, w, alpha: float, spin_s: float) -> PrefetchCase:
        x, y = self.activations(tokens, *w.shape)
        self.run(w, x, y, alpha, False)
        self.run(w, x, y, alpha, True)  # warm-up: cuBLAS picks its kernel, the kernels load
        base, pref = [], []
        for i in range(settings.repeats):
            order = (False, True) if i % 2 == 0 else (True, False)
            got = {p: self.run(w, x, y, alpha, p) for p in order}
            base.append(got[False])
            pref.append(got[True])
        diffs = np.array(base) - np.array(pref)
        q1, q3 = np.percentile(diffs, [25, 75])
        k, n = w.shape
        return PrefetchCase(
            tokens,
            w.nbytes,
            k,
            n,
            alpha,
            spin_s,
            w.nbytes,
            float(np.median(base)),
            float(np.median(pref)),
            float(np.median(diffs)),
            float(q3 - q1) / 2,
        )

    def spin_time(self, settings: plan.Settings, alpha: float) -> float:
        return self.median(lambda: self.spin(alpha), settings.repeats, before=self.flush)


def measure(
    index: int, settings: plan.Settings, command: str, log: Callable[[str], None] = lambda _: None
) -> Measurements:
    """Run every measurement on CUDA device ``index`` (seconds to about a minute on an H100)."""
    cp = load_cupy()
    props = open_device(cp, index)
    with cp.cuda.Device(index):
        prov = provenance(cp, index, props, command)
        major, minor = int(props["major"]), int(props["minor"])
        sm_count, l2_bytes = int(props["multiProcessorCount"]), int(props["l2CacheSize"])
        log(
            f"{prov.device}: {sm_count} SMs, {l2_bytes / plan.MIB:.0f} MiB L2, driver {prov.driver}; "
            "compiling"
        )
        kernels = compile_kernels(cp, major, minor)
        bench = _Bench(cp, kernels, sm_count, l2_bytes, bulk=major >= 9)
        hbm = bench.hbm(settings)
        log(
            f"HBM streaming read: {hbm.bytes_per_s / 1e12:.2f} TB/s over {hbm.working_set / plan.MIB:.0f} MiB"
        )
        sweep = bench.l2_sweep(settings)
        log(f"read bandwidth over {len(sweep)} working sets: done")
        peak = bench.peak_flops(settings)
        log(f"fp16 product {PEAK_N}^3: {peak / 1e12:.0f} TFLOP/s")
        weights = {m * plan.MIB: bench.weight(m * plan.MIB) for m in settings.weights_mib}
        biggest = weights[max(weights)]
        tokens = bench.token_sweep(settings, biggest)
        log(f"GEMV over {len(tokens)} token counts: done")
        spins = {a: bench.spin_time(settings, a) for a in sorted({a for _, _, a in plan.cases(settings)})}
        cases = []
        for t, wbytes, alpha in plan.cases(settings):
            cases.append(bench.case(settings, t, weights[wbytes], alpha, spins[alpha]))
        log(f"prefetch during a stand-in collective: {len(cases)} cases done")
        cp.cuda.Device().synchronize()
    return Measurements(
        prov,
        sm_count,
        l2_bytes,
        plan.prefetch_instruction(major, minor),
        hbm,
        sweep,
        peak,
        tuple(biggest.shape),
        tokens,
        tuple(cases),
    )
