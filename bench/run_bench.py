#!/usr/bin/env python
"""`make bench`: what `optimize` costs on a Llama-3-70B-shaped 8-rank model, next to onnx load+save.

    .venv/bin/python bench/run_bench.py [--layers N] [--ranks N] [--quick] [--repeat N]
                                        [--jobs N] [--workdir DIR] [--keep] [--profile] [--strict]

One run builds the shape-only rank models (bench/make_big_model.py: real shapes, offsets and sizes,
SPARSE .data files), then measures, each in a fresh Python subprocess so that every peak-memory
figure belongs to that measurement alone:

  floor         onnx.load(rank 0, load_external_data=False) + onnx.save of the same graph, beside
                the input (external references kept)
  optimize-1    preserve_onnx.optimizer.optimize_path(rank 0, rank dir/out_00.onnx): written beside
                the input, so the data file is referenced, not copied. A kernel inotify watch on the
                rank's .data file (IN_OPEN/IN_ACCESS, sees C/C++ code too) and a sys.addaudithook
                counter of Python `open` events on *.data prove that no byte of it was read.
  cli-1         `preserve-onnx optimize -q` on rank 0, end to end (informative: what a user waits for)
  optimize-dir  optimize_path(rank dir, other dir): all ranks, process pool, data files copied
                (sparse-aware: holes stay holes; the output's real disk use is reported)
  shard         `preserve-onnx shard --tp 2` on a single-device Llama-3-8B-shaped fp16 model (builder
                layout, dense data, --shard-layers of its 32 layers) against `cp` of its data file in
                the same run; peak RSS against the largest tensor + 200 MB (issue 11)
  optimize-moe  a gpt-oss-20b-shaped single-device model (bench/make_moe_model.py: int4 QMoE experts,
                sparse) sharded with `shard --tp 2`, then floor and optimize-1 on its rank 0 (issue 16:
                within 2x of the floor per process); --no-moe skips it

Times: "op" is the measured call alone (interpreter start and imports excluded), "proc" is the
whole subprocess from spawn to exit. Each measurement runs --repeat times (default 3): median time,
max peak RSS. Goals (issue 2): optimize-1 within 2x of the floor, under 200 MB peak RSS, 0 bytes
of .data read. Results go to bench/out/bench.json. Exit status: 0, or 1 when a measurement fails
or .data was read (and, with --strict, when a goal is missed).

Sections are functions taking a Bench context and returning a result dict; main() runs them from
SECTIONS, so further sections (e.g. runtime overhead) are one function and one list entry away.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

GOAL_RATIO = 2.0  # optimize(1 rank) / load+save floor
GOAL_PEAK_MB = 200.0  # peak RSS of optimize(1 rank)
MB = 2**20


# --------------------------------------------------------------------------------------------------
# Measurement in a fresh subprocess

# Every child starts with this; the snippet sets _T1 after its imports and _T2 after the measured call
# and may fill _EXTRA. The last stdout line is the JSON result.
_PRELUDE = """\
import time as _time
_T0 = _time.perf_counter()
import json as _json, resource as _resource, sys as _sys
_EXTRA = {}
"""
# The child's own peak is VmHWM (per address space, new at exec); ru_maxrss would also hold the peak of
# the process it was forked from.
_EPILOGUE = """
_kids = _resource.getrusage(_resource.RUSAGE_CHILDREN)
_hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print("@@BENCH@@" + _json.dumps({"import_s": _T1 - _T0, "op_s": _T2 - _T1,
      "maxrss_kib": _hwm, "children_maxrss_kib": _kids.ru_maxrss, **_EXTRA}))
"""


class MeasureError(RuntimeError):
    pass


def run_child(snippet: str, cwd: Path) -> dict:
    """Run PRELUDE+snippet+EPILOGUE in a fresh interpreter; its numbers plus the process wall time."""
    code = _PRELUDE + textwrap.dedent(snippet) + _EPILOGUE
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@BENCH@@")]
    if proc.returncode != 0 or not lines:
        raise MeasureError(
            f"measurement subprocess failed (exit {proc.returncode}):\n"
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    result = json.loads(lines[-1][len("@@BENCH@@") :])
    result["proc_s"] = wall
    return result


def summarize(runs: list[dict]) -> dict:
    """Median times, max peak memory, over repeated runs of one measurement."""
    out: dict = {"runs": len(runs)}
    for key in ("op_s", "proc_s", "import_s"):
        vals = [r[key] for r in runs if key in r]
        if vals:
            out[key] = statistics.median(vals)
            out[key + "_min"] = min(vals)
    for key in ("maxrss_kib", "children_maxrss_kib"):
        vals = [r[key] for r in runs if key in r]
        if vals:
            out[key.replace("_kib", "_mb")] = max(vals) / 1024  # Linux: ru_maxrss is in KiB
    for key in runs[-1]:
        if key not in out and key not in ("op_s", "proc_s", "import_s", "maxrss_kib", "children_maxrss_kib"):
            out[key] = runs[-1][key]
    return out


def repeat(n: int, fn: Callable[[], dict], before: Callable[[], None] | None = None) -> dict:
    runs = []
    for _ in range(n):
        if before:
            before()
        runs.append(fn())
    return summarize(runs)


# --------------------------------------------------------------------------------------------------
# Proof that a file is not read: a kernel inotify watch (sees any code, C/C++ included)

IN_ACCESS, IN_MODIFY, IN_OPEN = 0x001, 0x002, 0x020
_EVENT = struct.Struct("iIII")


class FileWatch:
    """inotify watch on one file; ``events()`` drains and returns [(mask, ...)]. Linux only."""

    def __init__(self, path: Path):
        self.fd = -1
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name, use_errno=True) if name else ctypes.CDLL(None, use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            raise OSError("inotify not available")
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        wd = libc.inotify_add_watch(self.fd, os.fsencode(path), IN_ACCESS | IN_MODIFY | IN_OPEN)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            self.fd = -1
            raise OSError(err, "inotify_add_watch failed")

    def events(self) -> list[int]:
        masks = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return masks
            pos = 0
            while pos + _EVENT.size <= len(buf):
                _wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                masks.append(mask)
                pos += _EVENT.size + length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def describe_events(masks: list[int]) -> dict:
    return {
        "opens": sum(1 for m in masks if m & IN_OPEN),
        "reads": sum(1 for m in masks if m & IN_ACCESS),
        "writes": sum(1 for m in masks if m & IN_MODIFY),
    }


# --------------------------------------------------------------------------------------------------
# Context and sections


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    model_dir: Path = field(init=False)
    rank0: Path = field(init=False)
    results: dict = field(default_factory=dict)

    def __post_init__(self):
        self.model_dir = self.workdir / "model"
        self.rank0 = self.model_dir / "model_00.onnx"


def section_models(b: Bench) -> dict:
    """Generate the shape-only rank models (sparse .data)."""
    from make_big_model import make_big_model

    shutil.rmtree(b.model_dir, ignore_errors=True)
    t0 = time.perf_counter()
    paths = make_big_model(b.model_dir, preset=b.args.preset, ranks=b.args.ranks, layers=b.args.layers)
    seconds = time.perf_counter() - t0
    data = [Path(str(p) + ".data") for p in paths]
    import onnx  # the bench's own interpreter; counts nothing

    m = onnx.load(str(paths[0]), load_external_data=False)
    return {
        "seconds": seconds,
        "ranks": len(paths),
        "layers": b.args.layers,
        "preset": b.args.preset,
        "graph_bytes": paths[0].stat().st_size,
        "nodes": len(m.graph.node),
        "initializers": len(m.graph.initializer),
        "data_bytes_per_rank": data[0].stat().st_size,
        "data_bytes_total": sum(d.stat().st_size for d in data),
        "data_on_disk_bytes": sum(d.stat().st_blocks * 512 for d in data),
    }


def section_warmup(b: Bench) -> dict:
    """One throwaway child that imports everything, so no measurement pays for a cold page cache."""
    r = run_child(
        """
import onnx
from preserve_onnx.config import OptimizeConfig
from preserve_onnx.optimizer import optimize_path
from preserve_onnx import cli
_T1 = _T2 = _time.perf_counter()
""",
        b.model_dir,
    )
    return {"proc_s": r["proc_s"]}


_FLOOR = """
import onnx
_T1 = _time.perf_counter()
_m = onnx.load("model_00.onnx", load_external_data=False)
onnx.save(_m, "floor_00.onnx")
_T2 = _time.perf_counter()
"""


def section_floor(b: Bench) -> dict:
    """onnx.load (no external data) + onnx.save of rank 0's graph, beside it: the cost floor."""
    out = b.model_dir / "floor_00.onnx"

    def once():
        r = run_child(_FLOOR, b.model_dir)
        r["output_bytes"] = out.stat().st_size
        out.unlink()
        return r

    return repeat(b.args.repeat, once)


_OPTIMIZE_ONE = """
_data_opens = []
def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        p = args[0].decode() if isinstance(args[0], bytes) else args[0]
        if p.endswith(".data"):
            _data_opens.append(p)
_sys.addaudithook(_hook)
from preserve_onnx.config import OptimizeConfig
from preserve_onnx.optimizer import optimize_path
_T1 = _time.perf_counter()
_outcomes = optimize_path("model_00.onnx", "out_00.onnx", OptimizeConfig())
_T2 = _time.perf_counter()
_EXTRA["data_opens_audit"] = len(_data_opens)
_EXTRA["data_open_paths"] = sorted(set(_data_opens))[:5]
"""


def _count_prefetches(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return sum(1 for n in m.graph.node if n.op_type == "Prefetch")


def section_optimize_one(b: Bench) -> dict:
    """optimize_path on rank 0, output beside it; watches the .data file for any open or read."""
    data = Path(str(b.rank0) + ".data")
    out = b.model_dir / "out_00.onnx"
    st0 = data.stat()
    try:
        watch = FileWatch(data)
    except OSError as exc:
        watch = None
        watch_error = str(exc)
    masks: list[int] = []
    opens: list[int] = []

    def once():
        r = run_child(_OPTIMIZE_ONE, b.model_dir)
        opens.append(r["data_opens_audit"])
        r["output_bytes"] = out.stat().st_size
        r["prefetch_nodes"] = _count_prefetches(out)
        out.unlink()  # else the directory run would take out_00.onnx for a rank file
        return r

    try:
        if watch:
            watch.events()  # drain anything from before
        result = repeat(b.args.repeat, once)
        if watch:
            masks = watch.events()
        result["data_atime_unchanged"] = data.stat().st_atime_ns == st0.st_atime_ns  # informative (relatime)
        if watch:
            # Positive control: the watch does see a 1-byte read of the same file.
            with open(data, "rb") as f:
                f.read(1)
            control = describe_events(watch.events())
            result["inotify"] = {**describe_events(masks), "control_sees_read": control["reads"] > 0}
        else:
            result["inotify"] = {"error": watch_error}
    finally:
        if watch:
            watch.close()
    result["data_opens_audit"] = sum(opens)  # over all runs
    st1 = data.stat()
    result["data_size_unchanged"] = st0.st_size == st1.st_size and st0.st_mtime_ns == st1.st_mtime_ns
    ino = result["inotify"]
    # The audit hook alone is not proof: onnx's C++ external-data loader opens files without any
    # Python audit event. The inotify watch sees every open and read; its control shows it works.
    proven = ino.get("control_sees_read", False)
    clean = result["data_opens_audit"] == 0 and ino.get("opens", 0) == 0 and ino.get("reads", 0) == 0
    result["data_read_proof"] = "inotify+audit" if proven else "audit hook only (inotify unavailable)"
    result["data_bytes_read"] = 0 if clean else None
    return result


def section_cli_one(b: Bench) -> dict:
    """`preserve-onnx optimize -q` on rank 0, end to end, as a user runs it (informative)."""
    cli = Path(sys.executable).with_name("preserve-onnx")
    argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "preserve_onnx"]
    out = b.model_dir / "out_00.onnx"
    snippet = f"""
import subprocess as _sp
_T1 = _time.perf_counter()
_sp.run({argv + ["optimize", "-q", "model_00.onnx", "out_00.onnx"]!r}, check=True, capture_output=True)
_T2 = _time.perf_counter()
"""

    def once():
        r = run_child(snippet, b.model_dir)
        out.unlink()
        # The CLI is the child's child: its peak is RUSAGE_CHILDREN; time is the CLI's own wall time.
        return {"proc_s": r["op_s"], "maxrss_kib": r["children_maxrss_kib"]}

    return repeat(b.args.repeat, once)


def _disk_usage(root: Path) -> tuple[int, int]:
    logical = blocks = 0
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            logical += st.st_size
            blocks += st.st_blocks * 512
    return logical, blocks


def section_optimize_dir(b: Bench) -> dict:
    """optimize_path on the whole rank directory into another directory (data files copied)."""
    out = b.workdir / "optimized"
    jobs = b.args.jobs
    snippet = f"""
import os as _os
from preserve_onnx.config import OptimizeConfig
from preserve_onnx.optimizer import optimize_path
_T1 = _time.perf_counter()
_outcomes = optimize_path({str(b.model_dir)!r}, {str(out)!r}, OptimizeConfig(), jobs={jobs!r})
_T2 = _time.perf_counter()
_EXTRA["files"] = len(_outcomes)
_EXTRA["jobs"] = {jobs!r} if {jobs!r} is not None else min(len(_outcomes), _os.cpu_count() or 1)
"""
    result = repeat(
        b.args.repeat_dir,
        lambda: run_child(snippet, b.workdir),
        before=lambda: shutil.rmtree(out, ignore_errors=True),
    )
    logical, blocks = _disk_usage(out)
    src_logical, src_blocks = _disk_usage(b.model_dir)
    result.update(
        {
            "output_logical_bytes": logical,
            "output_disk_bytes": blocks,
            "input_logical_bytes": src_logical,
            "input_disk_bytes": src_blocks,
            "holes_preserved": blocks <= src_blocks + 2 * MB,
        }
    )
    shutil.rmtree(out, ignore_errors=True)
    return result


def section_profile(b: Bench) -> dict:
    """--profile: cProfile of optimize_path on rank 0 (second call, warm), top functions printed."""
    snippet = """
import cProfile, pstats, io
from preserve_onnx.config import OptimizeConfig
from preserve_onnx.optimizer import optimize_path
optimize_path("model_00.onnx", "out_00.onnx", OptimizeConfig())
_pr = cProfile.Profile()
_T1 = _time.perf_counter()
_pr.enable()
optimize_path("model_00.onnx", "out_00.onnx", OptimizeConfig())
_pr.disable()
_T2 = _time.perf_counter()
for _key in ("cumulative", "tottime"):
    _s = io.StringIO()
    pstats.Stats(_pr, stream=_s).strip_dirs().sort_stats(_key).print_stats(30)
    _EXTRA[_key] = _s.getvalue()
"""
    r = run_child(snippet, b.model_dir)
    (b.model_dir / "out_00.onnx").unlink(missing_ok=True)
    print(f"\n== cProfile of optimize_path(rank 0): {r['op_s'] * 1000:.0f} ms under the profiler ==")
    for key in ("cumulative", "tottime"):
        text = r[key]
        start = text.find("   ncalls")
        print(f"-- by {key} --")
        print(text[start:].rstrip() if start >= 0 else text.rstrip())
    return {"op_s": r["op_s"]}


# --------------------------------------------------------------------------------------------------
# Reference runtime (issues 3 and 7): overhead against plain onnxruntime, MPI against threads

RT_BASE = dict(
    hidden=1024,
    layers=8,
    heads=16,
    kv_heads=4,
    intermediate=2816,
    vocab=32000,
    world=2,
    dtype="float32",
    seed=0,
)
GOAL_RT_RATIO = 1.3
RT_CONTEXT = 16
RT_ROUNDS = 5  # rounds of (ours, twin, floor) blocks, so that drift in the machine's speed hits all three
RT_PER_ROUND = 8  # timed steps per block, after one untimed step
# The goal's model: the LM head split over the ranks by vocabulary, as Megatron-LM (ColumnParallelLinear
# output layer) and vLLM (ParallelLMHead) shard it; logits gathered with AllGather.
RT_SHAPE = dict(RT_BASE, vocab_parallel=True)
RT_DIR = BENCH_DIR / "out" / "runtime-vocab-parallel"
# For information: the committed samples' layout, LM head replicated on every rank. Each rank then
# multiplies the whole 131 MB head on one core while the twin splits it over two: the rank graphs
# themselves (the "floor" below, no runtime involved) are already ~1.3x the twin on this machine.
RT_SHAPE_REPLICATED = RT_BASE
RT_DIR_REPLICATED = BENCH_DIR / "out" / "runtime"


def _runtime_model(shape: dict, where: Path) -> None:
    """Builds, once, into ``where``: the 2-rank llama (``tp2/``), its unsharded twin (``full/``), the
    optimized ranks (``opt/``) and the floor (``tp2/floor_model_NN.onnx``: the rank graphs with every
    collective replaced by a local op of the same output shape, so plain onnxruntime can run them)."""
    stamp = where / "shape.json"
    want = json.dumps(shape, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == want and (where / "tp2" / "floor_model_01.onnx").is_file():
        return
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    sys.path.insert(0, str(REPO / "sample_models"))
    import onnx
    from make_samples import build_llama

    from preserve_onnx.config import OptimizeConfig
    from preserve_onnx.optimizer import optimize_path

    build_llama(out_dir=where, **dict(shape))
    tp = where / f"tp{shape['world']}"
    optimize_path(tp, where / "opt", OptimizeConfig())
    for rank_file in sorted(tp.glob("model_*.onnx")):
        m = onnx.load(str(rank_file), load_external_data=False)
        for n in m.graph.node:
            if n.op_type == "AllReduce":  # the sum of one rank: its input
                n.op_type, n.domain = "Identity", ""
                del n.attribute[:]
            elif n.op_type == "AllGather":  # the rank's own part, world times: the gathered shape
                axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                n.op_type, n.domain = "Concat", ""
                del n.attribute[:]
                n.attribute.append(onnx.helper.make_attribute("axis", axis))
                n.input.extend([n.input[0]] * (shape["world"] - 1))
        onnx.save(m, str(tp / f"floor_{rank_file.name}"))  # data referenced beside it, not copied
    stamp.write_text(want)


# One process; RT_ROUNDS rounds, each a block of RT_PER_ROUND steps of: the optimized ranks on
# RankSession (threads), the unsharded twin on a plain InferenceSession with as many threads as cores,
# and the floor (the rank graphs without collectives, one plain single-thread session per rank on its
# own thread). Blocks, not single steps interleaved: onnxruntime's intra-op pool spins on the cores for
# a while after each run, which would starve the next step of the other side; the first step of each
# block is not timed for the same reason.
_RUNTIME = """
import os, statistics, threading
import onnxruntime as ort
from pathlib import Path
from preserve_onnx.runtime import RankSession
from preserve_onnx.runtime.feeds import generate_feeds
ranks = sorted(Path("opt").glob("model_*.onnx"))
session = RankSession(ranks)
shared, per_rank = generate_feeds(session, batch=1, context=CONTEXT)
opts = ort.SessionOptions()
opts.intra_op_num_threads = max(1, os.cpu_count() or 1)
twin = ort.InferenceSession("full/model.onnx", opts, providers=["CPUExecutionProvider"])
t_shared, t_rank = generate_feeds(twin, batch=1, context=CONTEXT)
twin_feeds = {**t_shared, **t_rank[0]}
one = ort.SessionOptions()
one.intra_op_num_threads = 1
floor = [ort.InferenceSession(str(p), one, providers=["CPUExecutionProvider"])
         for p in sorted(Path(ranks[0].parent.parent, "tpWORLD").glob("floor_model_*.onnx"))]
floor_feeds = [{**s, **r[0]} for s, r in (generate_feeds(f, batch=1, context=CONTEXT) for f in floor)]
def run_floor():
    threads = [threading.Thread(target=f.run, args=(None, x)) for f, x in zip(floor, floor_feeds)]
    for t in threads: t.start()
    for t in threads: t.join()
steps = {"ours": lambda: session.run(shared, per_rank), "plain": lambda: twin.run(None, twin_feeds),
         "floor": run_floor}
times = {k: [] for k in steps}
for fn in steps.values():
    for _ in range(3): fn()
_T1 = _time.perf_counter()
for _ in range(ROUNDS):
    for name, fn in steps.items():
        fn()
        for _ in range(PER_ROUND):
            t = _time.perf_counter(); fn(); times[name].append(_time.perf_counter() - t)
_T2 = _time.perf_counter()
for name, xs in times.items():
    _EXTRA[name + "_s"] = statistics.median(xs)
    _EXTRA[name + "_min_s"] = min(xs)
_EXTRA.update(rank_threads=max(1, (os.cpu_count() or 1) // len(ranks)),
              twin_threads=opts.intra_op_num_threads, steps=len(times["ours"]), collectives=sum(
                  1 for n in __import__("onnx").load(str(ranks[0]), load_external_data=False).graph.node
                  if n.op_type in ("AllReduce", "AllGather")))
"""


def _measure_runtime(shape: dict, where: Path, label: str) -> dict:
    _runtime_model(shape, where)
    snippet = (
        _RUNTIME.replace("CONTEXT", str(RT_CONTEXT))
        .replace("ROUNDS", str(RT_ROUNDS))
        .replace("PER_ROUND", str(RT_PER_ROUND))
        .replace("WORLD", str(shape["world"]))
    )
    load_before = os.getloadavg()[0]
    r = run_child(snippet, where)
    r["ratio"] = r["ours_s"] / r["plain_s"]
    r["ratio_min"] = r["ours_min_s"] / r["plain_min_s"]
    r["floor_ratio"] = r["floor_s"] / r["plain_s"]
    r["over_floor"] = r["ours_s"] / r["floor_s"]
    r["loadavg_1min_before"] = load_before
    s = shape
    r["lines"] = [
        f"runtime overhead, {label} (hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, "
        f"{s['dtype']}, batch 1, 1 decode step, context {RT_CONTEXT}; median of {r['steps']} in {RT_ROUNDS} "
        f"rounds): optimized {s['world']}-rank model on RankSession {r['ours_s'] * 1000:.1f} ms "
        f"({r['rank_threads']} thread/rank, {r['collectives']} collectives/rank) vs unsharded twin on plain "
        f"onnxruntime {r['plain_s'] * 1000:.1f} ms ({r['twin_threads']} threads): {r['ratio']:.2f}x "
        f"(best steps: {r['ours_min_s'] * 1000:.1f} vs {r['plain_min_s'] * 1000:.1f} ms, "
        f"{r['ratio_min']:.2f}x)",
        f"  floor, the same rank graphs without collectives on plain onnxruntime (one thread each): "
        f"{r['floor_s'] * 1000:.1f} ms = {r['floor_ratio']:.2f}x the twin; the runtime adds "
        f"{(r['ours_s'] - r['floor_s']) * 1000:.1f} ms ({r['over_floor']:.2f}x the floor: collectives, "
        f"Prefetch kernels, Python); 1-min load average before: {load_before:.1f} on {os.cpu_count()} cpus",
    ]
    return r


def section_runtime(b: Bench) -> dict:
    """Runtime overhead (the issue-3 goal): the optimized 2-rank model on our runtime vs its unsharded
    twin on plain onnxruntime, LM head vocabulary-parallel."""
    return _measure_runtime(RT_SHAPE, RT_DIR, "vocab-parallel LM head")


def section_runtime_replicated(b: Bench) -> dict:
    """The same with the LM head replicated on every rank (the committed samples' layout)."""
    return _measure_runtime(RT_SHAPE_REPLICATED, RT_DIR_REPLICATED, "LM head replicated")


_MPI_CHILD = """
import os, statistics, sys, time, json
from pathlib import Path
from preserve_onnx.runtime.feeds import generate_feeds
from preserve_onnx.runtime.mpi import MpiRankSession, get_context
ctx = get_context()
session = MpiRankSession(sorted(Path("opt").glob("model_*.onnx")))
shared, per_rank = generate_feeds(session, batch=1, context=CONTEXT)
for _ in range(3):
    session.run(shared, per_rank)
times = []
for _ in range(ITERS):
    ctx.allgather(None, "bench barrier")  # start every step together, as the thread backend does
    t = time.perf_counter(); session.run(shared, per_rank); times.append(time.perf_counter() - t)
every = ctx.gather(times, 0, "bench gather")
if ctx.rank == 0:
    step = [max(ts) for ts in zip(*every)]  # a step ends when its slowest rank does
    print("@@MPI@@" + json.dumps({"mpi_s": statistics.median(step), "mpi_min_s": min(step)}))
"""


def section_runtime_mpi(b: Bench) -> dict:
    """The same 2-rank model, one process per rank under mpirun, against the thread backend's time."""
    mpirun = shutil.which("mpirun")
    threads = b.results.get("runtime", {})
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        mpirun = None
    if mpirun is None or not threads:
        why = "no mpirun/mpi4py (make mpi)" if mpirun is None else "the runtime section did not run"
        return {"skipped": why, "lines": [f"runtime, MPI backend: skipped ({why})"]}
    snippet = _MPI_CHILD.replace("CONTEXT", str(RT_CONTEXT)).replace("ITERS", str(RT_ROUNDS * RT_PER_ROUND))
    env = dict(
        os.environ,
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_btl_vader_single_copy_mechanism="none",
    )
    proc = subprocess.run(
        [mpirun, "-n", str(RT_SHAPE["world"]), "--oversubscribe", sys.executable, "-c", snippet],
        cwd=RT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@MPI@@")]
    if proc.returncode != 0 or not lines:
        raise MeasureError(f"mpirun failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    r = json.loads(lines[-1][len("@@MPI@@") :])
    r["threads_s"] = threads["ours_s"]
    r["ratio"] = r["mpi_s"] / threads["ours_s"]
    r["ratio_min"] = r["mpi_min_s"] / threads["ours_min_s"]
    r["lines"] = [
        f"runtime, MPI backend (mpirun -n {RT_SHAPE['world']}, shared memory, same model and step): "
        f"{r['mpi_s'] * 1000:.1f} ms vs threads {threads['ours_s'] * 1000:.1f} ms: {r['ratio']:.2f}x "
        f"(best steps {r['mpi_min_s'] * 1000:.1f} vs {threads['ours_min_s'] * 1000:.1f} ms: "
        f"{r['ratio_min']:.2f}x; "
        f"vs plain onnxruntime twin: {r['mpi_s'] / threads['plain_s']:.2f}x)"
    ]
    return r


# --------------------------------------------------------------------------------------------------
# shard (issue 11): a single-device Llama-3-8B-shaped fp16 model (builder layout, dense data) -> 2 ranks

GOAL_SHARD_RATIO = 2.0  # shard --tp 2 wall time / `cp` of the model's data file
GOAL_SHARD_EXTRA_MB = 200.0  # peak RSS of shard at most the largest tensor + this


def _timed_child(argv: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS in MB, exit status, stderr) of one command, its rusage alone (wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read().decode(errors="replace")
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode, stderr


def _largest_tensor_bytes(model: Path) -> tuple[str, int]:
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    sizes = [
        (t.name, int(dict((e.key, e.value) for e in t.external_data).get("length", 0)) or len(t.raw_data))
        for t in m.graph.initializer
    ]
    return max(sizes, key=lambda s: s[1])


def _shard_layers(args: argparse.Namespace, workdir: Path) -> tuple[int, str]:
    """Layers of the shard input: --shard-layers, else the whole model when the disk holds it twice over
    (input, then cp's copy or shard's output, ~2.3x its size), else 4 layers (with the reason)."""
    from make_big_model import PRESETS

    if args.shard_layers is not None:
        return args.shard_layers, ""
    c = PRESETS[args.shard_preset]
    head = c.hidden // c.heads
    per_layer = c.hidden * (2 * c.hidden + 2 * c.kv_heads * head) + 3 * c.hidden * c.intermediate
    need = 2.3 * 2 * (2 * c.vocab * c.hidden + c.layers * per_layer)  # fp16
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free >= need:
        return c.layers, ""
    return (
        4,
        f" (not the whole model: {need / 2**30:.0f} GiB of free disk needed, {free / 2**30:.0f} GiB here)",
    )


def section_shard(b: Bench) -> dict:
    """`preserve-onnx shard --tp 2` on a single-device model, next to `cp` of its data file, same run."""
    cli = Path(sys.executable).with_name("preserve-onnx")
    argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "preserve_onnx"]
    probe = subprocess.run(argv + ["shard", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        return {
            "available": False,
            "lines": [f"shard: not available (`preserve-onnx shard --help` exited {probe.returncode})"],
        }
    from make_big_model import make_single_model

    where = b.workdir / "shard"
    shutil.rmtree(where, ignore_errors=True)
    copy, out = where / "cp.data", where / "tp2"
    layers, why = _shard_layers(b.args, b.workdir)
    r: dict = {"available": True, "preset": b.args.shard_preset, "layers": layers, "layers_why": why}
    try:
        # Dense: shard keeps a sparse input's holes as holes (it neither reads nor writes them), which
        # would measure nothing but metadata; a real export has no holes.
        t0 = time.perf_counter()
        model = make_single_model(where / "single", preset=b.args.shard_preset, layers=layers, dense=True)
        r["make_s"] = time.perf_counter() - t0
        data = Path(str(model) + ".data")
        largest_name, largest = _largest_tensor_bytes(model)
        r.update(data_bytes=data.stat().st_size, largest_tensor=largest_name, largest_tensor_bytes=largest)
        # Written bytes of one measurement must not be flushed during the next one: sync in between.
        os.sync()
        r["cp_s"], r["cp_maxrss_mb"], status, err = _timed_child(["cp", str(data), str(copy)])
        if status != 0:
            raise MeasureError(f"cp failed: {err.strip()}")
        r["cp_bytes"] = copy.stat().st_size
        copy.unlink()
        os.sync()
        r["shard_s"], r["shard_maxrss_mb"], status, err = _timed_child(
            argv + ["shard", str(model), str(out), "--tp", "2"]
        )
        if status != 0:
            raise MeasureError(f"shard failed (exit {status}): {err.strip()}")
        r["shard_bytes"] = sum(p.stat().st_size for p in out.iterdir())
    finally:
        shutil.rmtree(where, ignore_errors=True)
    r["ratio"] = r["shard_s"] / r["cp_s"]
    r["peak_goal_mb"] = largest / MB + GOAL_SHARD_EXTRA_MB
    gib = 2**30
    r["lines"] = [
        f"shard --tp 2, {r['preset']} x {r['layers']} layers{why} fp16 "
        f"({r['data_bytes'] / gib:.1f} GiB, dense): "
        f"{r['shard_s']:.1f} s vs cp {r['cp_s']:.1f} s = {r['ratio']:.2f}x "
        f"(writes {r['shard_bytes'] / gib:.1f} vs {r['cp_bytes'] / gib:.1f} GiB: "
        f"{r['shard_bytes'] / r['shard_s'] / MB:.0f} vs {r['cp_bytes'] / r['cp_s'] / MB:.0f} MB/s); "
        f"peak RSS {r['shard_maxrss_mb']:.0f} MB (largest tensor {largest_name} {largest / MB:.0f} MB)"
    ]
    return r


# optimize on a mixture-of-experts rank (issue 16): a gpt-oss-20b-shaped single-device model (sparse,
# bench/make_moe_model.py) sharded with `shard --tp 2` (holes stay holes), then rank 0 optimized against
# the same load+save floor as the dense model's.


def section_optimize_moe(b: Bench) -> dict:
    """gpt-oss-20b shape: shard --tp 2 (informative), then load+save floor vs optimize_path on rank 0."""
    cli = Path(sys.executable).with_name("preserve-onnx")
    argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "preserve_onnx"]
    from make_moe_model import SHAPE, make_moe_model

    where = b.workdir / "moe"
    shutil.rmtree(where, ignore_errors=True)
    ranks = where / "tp2"
    r: dict = {"layers": SHAPE["layers"], "experts": SHAPE["experts"]}
    try:
        model = make_moe_model(where / "single")
        r["data_bytes"] = Path(str(model) + ".data").stat().st_size
        r["shard_s"], r["shard_maxrss_mb"], status, err = _timed_child(
            argv + ["shard", str(model), str(ranks), "--tp", "2"]
        )
        if status != 0:
            raise MeasureError(f"shard of the MoE model failed (exit {status}): {err.strip()}")
        r["rank_data_bytes"] = (ranks / "model_00.onnx.data").stat().st_size

        def floor():
            one = run_child(_FLOOR, ranks)
            (ranks / "floor_00.onnx").unlink()
            return one

        def optimize():
            one = run_child(_OPTIMIZE_ONE, ranks)
            one["prefetch_nodes"] = _count_prefetches(ranks / "out_00.onnx")
            (ranks / "out_00.onnx").unlink()
            return one

        r["floor"] = repeat(b.args.repeat, floor)
        r["optimize"] = repeat(b.args.repeat, optimize)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    fl, op = r["floor"], r["optimize"]
    r["ratio_op"] = op["op_s"] / fl["op_s"]
    r["ratio_proc"] = op["proc_s"] / fl["proc_s"]
    gib = 2**30
    r["lines"] = [
        f"MoE: gpt-oss-20b shape ({r['layers']} layers, {r['experts']} experts, int4 QMoE, "
        f"{r['data_bytes'] / gib:.1f} GiB sparse): shard --tp 2 {r['shard_s']:.1f} s at "
        f"{r['shard_maxrss_mb']:.0f} MB; "
        f"optimize rank 0 ({r['rank_data_bytes'] / gib:.1f} GiB) {op['op_s'] * 1000:.0f} ms vs load+save "
        f"{fl['op_s'] * 1000:.0f} ms = {r['ratio_op']:.1f}x on the call, {r['ratio_proc']:.2f}x per process "
        f"({op['proc_s'] * 1000:.0f} vs {fl['proc_s'] * 1000:.0f} ms), peak RSS {op['maxrss_mb']:.0f} MB, "
        f"{op.get('prefetch_nodes')} Prefetch nodes"
    ]
    return r


# name, function, runs only when (args) says so. A section gets the Bench (args, workdir, model_dir,
# rank0, the results so far) and returns a JSON-able dict, stored as results[name] in bench.json; a
# "lines" entry (list of str) is printed in the report. Raise MeasureError to stop the run with a message.
SECTIONS: list[tuple[str, Callable[[Bench], dict], Callable[[argparse.Namespace], bool]]] = [
    ("models", section_models, lambda a: True),
    ("warmup", section_warmup, lambda a: True),
    ("floor", section_floor, lambda a: True),
    ("optimize_one", section_optimize_one, lambda a: True),
    ("cli_one", section_cli_one, lambda a: not a.no_cli),
    ("optimize_dir", section_optimize_dir, lambda a: True),
    ("profile", section_profile, lambda a: a.profile),
    # The peak-memory measurements run before the runtime sections: those load models into this process,
    # and Linux keeps a process's peak RSS across fork and exec, so a child started after them reports
    # this process's peak instead of its own (810 MB for every child, measured 2026-12-07).
    ("shard", section_shard, lambda a: not a.no_shard),
    ("optimize_moe", section_optimize_moe, lambda a: not a.no_moe),
    ("runtime", section_runtime, lambda a: not a.no_runtime),
    ("runtime_replicated", section_runtime_replicated, lambda a: not a.no_runtime),
    ("runtime_mpi", section_runtime_mpi, lambda a: not a.no_runtime),
]


# --------------------------------------------------------------------------------------------------
# Report


def verdicts(res: dict) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, passed) for the issue-2 goals."""
    out = []
    floor, one = res.get("floor"), res.get("optimize_one")
    if floor and one:
        r_op = one["op_s"] / floor["op_s"]
        r_proc = one["proc_s"] / floor["proc_s"]
        out.append(
            (
                f"optimize(1 rank) within {GOAL_RATIO:g}x of load+save (call only)",
                f"{r_op:.1f}x",
                r_op <= GOAL_RATIO,
            )
        )
        out.append(
            (
                f"optimize(1 rank) within {GOAL_RATIO:g}x of load+save (whole process)",
                f"{r_proc:.2f}x",
                r_proc <= GOAL_RATIO,
            )
        )
        out.append(
            (
                f"optimize(1 rank) peak memory under {GOAL_PEAK_MB:g} MB",
                f"{one['maxrss_mb']:.0f} MB",
                one["maxrss_mb"] < GOAL_PEAK_MB,
            )
        )
        ino = one.get("inotify", {})
        if "error" in ino:
            seen = f"{one['data_opens_audit']} py opens; inotify unavailable: {ino['error']}"
        else:
            seen = (
                f"{ino.get('opens')} opens, {ino.get('reads')} reads (inotify, control "
                f"{'ok' if ino.get('control_sees_read') else 'FAILED'}); "
                f"{one['data_opens_audit']} py opens"
            )
        out.append(("0 bytes of .data read by optimize", seen, one["data_bytes_read"] == 0))
    rt = res.get("runtime")
    if rt and "ratio" in rt:
        out.append(
            (
                f"runtime vs plain onnxruntime at most {GOAL_RT_RATIO:g}x (vocab-parallel head)",
                f"{rt['ratio']:.2f}x",
                rt["ratio"] <= GOAL_RT_RATIO,
            )
        )
    moe = res.get("optimize_moe")
    if moe and "ratio_proc" in moe:
        out.append(
            (
                f"optimize(1 MoE rank, gpt-oss-20b shape) within {GOAL_RATIO:g}x of load+save (process)",
                f"{moe['ratio_proc']:.2f}x",
                moe["ratio_proc"] <= GOAL_RATIO,
            )
        )
    sh = res.get("shard")
    if sh and "ratio" in sh:
        out.append(
            (
                f"shard --tp 2 within {GOAL_SHARD_RATIO:g}x of cp of its data file",
                f"{sh['ratio']:.2f}x",
                sh["ratio"] <= GOAL_SHARD_RATIO,
            )
        )
        out.append(
            (
                f"shard peak memory at most largest tensor + {GOAL_SHARD_EXTRA_MB:g} MB",
                f"{sh['shard_maxrss_mb']:.0f} MB of {sh['peak_goal_mb']:.0f}",
                sh["shard_maxrss_mb"] <= sh["peak_goal_mb"],
            )
        )
    return out


def print_report(b: Bench, total_s: float) -> None:
    res = b.results
    m = res.get("models", {})
    print()
    print(
        f"preserve-onnx bench: {m.get('preset')} shape-only, {m.get('ranks')} ranks x "
        f"{m.get('layers')} layers; "
        f"rank graph {m.get('graph_bytes', 0) / 1024:.0f} KiB, {m.get('nodes')} nodes, "
        f"{m.get('initializers')} initializers; "
        f".data {m.get('data_bytes_per_rank', 0) / 2**30:.1f} GiB/rank "
        f"(sparse, {m.get('data_on_disk_bytes', 0) / MB:.1f} MiB on disk)"
    )
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cpu(s); "
        f"each measurement in a fresh subprocess, "
        f"median of {b.args.repeat} (optimize-dir: {b.args.repeat_dir})"
    )
    print()
    hdr = f"{'measurement':<40} {'op (ms)':>9} {'proc (ms)':>10} {'peak RSS (MB)':>14}"
    print(hdr)
    print("-" * len(hdr))

    def row(label, r, peak=None, op=True):
        if not r:
            return
        op_ms = f"{r['op_s'] * 1000:9.1f}" if op and "op_s" in r else f"{'-':>9}"
        peak = peak if peak is not None else f"{r['maxrss_mb']:.0f}"
        print(f"{label:<40} {op_ms} {r['proc_s'] * 1000:10.0f} {peak:>14}")

    row("floor: onnx.load + onnx.save, rank 0", res.get("floor"))
    row("optimize_path, rank 0 (out beside it)", res.get("optimize_one"))
    row("preserve-onnx optimize CLI, rank 0", res.get("cli_one"), op=False)
    d = res.get("optimize_dir")
    if d:
        row(
            f"optimize_path, {m.get('ranks')} ranks -> dir ({d.get('jobs')} jobs)",
            d,
            peak=f"{d['maxrss_mb']:.0f} + {d['children_maxrss_mb']:.0f}/wkr",
        )
    print()
    one, floor = res.get("optimize_one"), res.get("floor")
    if one and floor:
        print(
            f"ratio optimize/floor: {one['op_s'] / floor['op_s']:.1f}x on the call alone "
            f"({one['op_s'] * 1000:.0f} vs {floor['op_s'] * 1000:.1f} ms), "
            f"{one['proc_s'] / floor['proc_s']:.2f}x per process "
            f"(imports: {one['import_s'] * 1000:.0f} vs {floor['import_s'] * 1000:.0f} ms)"
            + (
                f", CLI {res['cli_one']['proc_s'] / floor['proc_s']:.1f}x per process"
                if res.get("cli_one")
                else ""
            )
            + f"; {one.get('prefetch_nodes')} Prefetch nodes inserted"
        )
    if d:
        print(
            f"optimize-dir output: {d['output_logical_bytes'] / 2**30:.1f} GiB logical, "
            f"{d['output_disk_bytes'] / MB:.1f} MiB on disk (input {d['input_disk_bytes'] / MB:.1f} MiB): "
            f"holes {'preserved' if d['holes_preserved'] else 'NOT preserved'}"
        )
    # Sections added later report themselves: a "lines" list in their result is printed here.
    for name, _fn, _wanted in SECTIONS:
        for line in res.get(name, {}).get("lines", []):
            print(line)
    print()
    for goal, measured, ok in verdicts(res):
        tag = "PASS" if ok else "MISS"
        print(f"  [{tag}] {goal:<62} {measured}")
    print(f"\nbench wall time: {total_s:.1f} s (models generated in {m.get('seconds', 0):.1f} s)")


# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="llama3-70b", help="bench/make_big_model.py preset")
    ap.add_argument("--layers", type=int, default=None, help="layer count (default: the preset's, 80)")
    ap.add_argument("--ranks", type=int, default=8, help="tensor-parallel ranks (default 8)")
    ap.add_argument("--quick", action="store_true", help="20 layers (unless --layers), 1 repeat")
    ap.add_argument("--repeat", type=int, default=None, help="runs per measurement (default 3)")
    ap.add_argument(
        "--repeat-dir", type=int, default=None, help="runs of the directory measurement (default 2)"
    )
    ap.add_argument(
        "--jobs", type=int, default=None, help="ranks in parallel for the directory run (default: cores)"
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=BENCH_DIR / "out" / "work",
        help="where the models go (default bench/out/work; removed afterwards)",
    )
    ap.add_argument("--json", type=Path, default=BENCH_DIR / "out" / "bench.json", help="results file")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--no-cli", action="store_true", help="skip the end-to-end CLI measurement")
    ap.add_argument(
        "--no-runtime",
        action="store_true",
        help="skip the reference runtime's overhead and MPI measurements (bench/out/runtime)",
    )
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of optimize on rank 0")
    ap.add_argument("--no-shard", action="store_true", help="skip the `shard --tp 2` measurement")
    ap.add_argument("--shard-preset", default="llama3-8b", help="make_big_model preset of the shard input")
    ap.add_argument(
        "--shard-layers",
        type=int,
        default=None,
        help="layers of the shard input (default: the whole model when the disk holds it, else 4; --quick 2)",
    )
    ap.add_argument(
        "--no-moe",
        action="store_true",
        help="skip the mixture-of-experts measurement (gpt-oss-20b shape: shard, then optimize)",
    )
    ap.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    a = ap.parse_args(argv)
    if a.quick and a.layers is None:
        a.layers = 20
    if a.layers is None:
        from make_big_model import PRESETS

        a.layers = PRESETS[a.preset].layers if a.preset in PRESETS else None
    if a.repeat is None:
        a.repeat = 1 if a.quick else 3
    if a.shard_layers is None and a.quick:
        a.shard_layers = 2
    if a.repeat_dir is None:
        a.repeat_dir = 1 if a.quick else 2
    if (
        a.repeat < 1
        or a.repeat_dir < 1
        or a.ranks < 1
        or (a.layers is not None and a.layers < 1)
        or (a.shard_layers is not None and a.shard_layers < 1)
    ):
        ap.error("--repeat, --repeat-dir, --ranks, --layers and --shard-layers must be at least 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    b = Bench(args, workdir)
    failed = None
    try:
        for name, fn, wanted in SECTIONS:
            if not wanted(args):
                continue
            print(f"bench: {name} ...", flush=True)
            try:
                b.results[name] = fn(b)
            except MeasureError as exc:
                failed = f"{name}: {exc}"
                print(f"bench: {failed}", file=sys.stderr)
                break
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - t0
    print_report(b, total)
    goals = verdicts(b.results)
    doc = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "total_s": total,
        "results": b.results,
        "failed": failed,
        "goals": [{"goal": g, "measured": m, "pass": ok} for g, m, ok in goals],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"results: {args.json}")
    if failed:
        return 1
    one = b.results.get("optimize_one", {})
    if one and one.get("data_bytes_read") != 0:
        return 1
    if args.strict and not all(ok for _, _, ok in goals):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
