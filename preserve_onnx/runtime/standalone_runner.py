#!/usr/bin/env python3
"""Run tensor-parallel rank models on onnxruntime's CPU provider with the preserve-onnx custom-op
library (Prefetch, com.microsoft AllReduce / AllGather) that lies beside this file, and check them
against their originals bit for bit. Needs only onnxruntime and numpy, not preserve-onnx.

`preserve-onnx optimize IN OUT --with-runtime` writes this file as OUT/run_ranks.py with
OUT/libpreserve_ops.so (built for this platform, any onnxruntime at least as new as 1.21):

    python OUT/run_ranks.py                         run OUT's rank models once, list the outputs
    python OUT/run_ranks.py --against IN            same feeds into IN's models: PASSED or FAILED
    python OUT/run_ranks.py DIR|RANK_FILE [--inputs feeds.npz] [--save outputs.npz] [--batch 1]
        [--context 16] [--seed 0] [--dim NAME=N] [--opt-level all] [--timeout 60]
        [--prefetch-domain preserve] [--prefetch-op Prefetch]

Rank models are Olive's model_00.onnx, model_01.onnx, ... or onnxruntime's rank_{r}_<name>.onnx; a
rank file runs with its whole family from its folder. Each rank is one InferenceSession on its own
thread (the library's collectives rendezvous between the threads). One decode step: inputs come from
--inputs (key NAME feeds every rank, rank{r}/NAME rank r) or are generated from --seed (symbolic dims:
--dim, then the dims the graphs fix (DIMS), then the roles the graphs' structure shows (LAYOUT: the
KV-cache inputs' batch axes -> --batch, their sequence axes -> --context, the present outputs' and the
attention mask's -> context + 1), NAME+k evaluated, else axis 0 -> batch and 1 elsewhere; token ids below
the vocabulary, attention_mask ones, KV-cache small normals per rank).
Exit status: 0 success, 1 an error (one line) or FAILED.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os
import re
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

LIBRARY = Path(__file__).resolve().parent / "libpreserve_ops.so"
# How the Prefetch nodes are spelled: `optimize --with-runtime` writes the naming it used here. NAMING,
# DIMS and LAYOUT stay one line each: runtime/bundle.py rewrites them by that pattern.
NAMING = {"domain": "preserve", "op": "Prefetch"}
# The Prefetch attributes the library reads (a NAMING without one of them: its own name).
KERNEL_ATTRS = ("max_size", "offset", "max_tokens", "min_tokens", "seq_axis", "window")
# Symbolic dims the rank graphs fix (a builder export's kv_cache_dim): written by `optimize --with-runtime`;
# --dim overrides them.
DIMS = {}
# The decode layout found by structure (docs/design.md §2): KV-cache inputs and the dim names of their
# batch / past / past+new axes. Written by `optimize --with-runtime`.
LAYOUT = {"kv": [], "batch": [], "past": [], "total": []}
EXPR = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*([+-])\s*(\d+)\s*$")
RANK_PATTERNS = (re.compile(r"^model_(\d+)\.onnx$"), re.compile(r"^rank_(\d+)_(.+)\.onnx$"))
DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}
LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_GROUPS = itertools.count()


class RunError(Exception):
    """A user-facing failure: printed as one line, exit 1."""


def rank_files(path: Path) -> list[Path]:
    """The rank files of a folder (one family), or the family of one rank file, in rank order."""
    if not path.exists():
        raise RunError(f"{path}: no such file or directory")
    folder, only = (path, None) if path.is_dir() else (path.parent, path.name)
    families: dict[str, dict[int, Path]] = {}
    for file in sorted(folder.iterdir()):
        for regex in RANK_PATTERNS:
            m = regex.match(file.name)
            if m:
                family = regex.pattern if regex.groups == 1 else f"rank_*_{m.group(2)}.onnx"
                families.setdefault(family, {})[int(m.group(1))] = file
    if only is not None:
        chosen = [f for f in families.values() if any(p.name == only for p in f.values())]
        if not chosen:
            return [path]  # not a rank file: a world of one
    else:
        chosen = list(families.values())
        if not chosen:
            raise RunError(f"{path} holds no rank models (model_00.onnx, ... or rank_0_<name>.onnx, ...)")
        if len(chosen) > 1:
            raise RunError(f"{path} holds several rank-model families: name one of its files")
    ranks = chosen[0]
    if sorted(ranks) != list(range(len(ranks))):
        raise RunError(f"{folder}: rank {min(set(range(len(ranks))) - set(ranks))} is missing")
    return [ranks[r] for r in range(len(ranks))]


def open_sessions(models: list[Path], args: argparse.Namespace) -> tuple[list[ort.InferenceSession], str]:
    """One session per rank, all in one new rendezvous group of the library."""
    group = f"run-ranks-{os.getpid()}-{next(_GROUPS)}"
    sessions = []
    for rank, model in enumerate(models):
        options = ort.SessionOptions()
        options.graph_optimization_level = LEVELS[args.opt_level]
        options.intra_op_num_threads = max(1, (os.cpu_count() or 1) // len(models))
        options.log_severity_level = 4
        for key, value in (
            ("preserve.rank", rank),
            ("preserve.world_size", len(models)),
            ("preserve.group", group),
            ("preserve.transport", "threads"),
            ("preserve.timeout_ms", round(args.timeout * 1000)),
            ("preserve.prefetch_domain", args.prefetch_domain),
            ("preserve.prefetch_op", args.prefetch_op),
            *((f"preserve.prefetch_attr_{attr}", NAMING.get(attr, attr)) for attr in KERNEL_ATTRS),
        ):
            options.add_session_config_entry(key, str(value))
        options.register_custom_ops_library(str(LIBRARY))
        try:
            sessions.append(ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise RunError(f"{model}: {str(exc).strip().splitlines()[-1]}") from exc
    return sessions, group


def bind(dim, axis: int, args: argparse.Namespace) -> int:
    """One axis's size for generated inputs (the same order as preserve-onnx's own feeds)."""
    if isinstance(dim, int) and dim >= 0:
        return dim
    values = {
        **{n: args.batch for n in LAYOUT["batch"]},
        **{n: args.context + 1 for n in LAYOUT["total"]},
        **{n: args.context for n in LAYOUT["past"]},
        **args.dims,
    }
    name = dim if isinstance(dim, str) else ""
    expr = EXPR.match(name)
    if name in values:
        return values[name]
    if expr and expr.group(1) in values:
        return values[expr.group(1)] + (1 if expr.group(2) == "+" else -1) * int(expr.group(3))
    return args.batch if axis == 0 else 1


def generate(sessions: list[ort.InferenceSession], args: argparse.Namespace) -> list[dict[str, np.ndarray]]:
    """Every rank's inputs from the seed; the KV-cache (LAYOUT's) differs per rank, the rest is shared."""
    vocab = min(
        (
            o.shape[-1]
            for s in sessions
            for o in s.get_outputs()
            if o.name == "logits" and o.shape and isinstance(o.shape[-1], int)
        ),
        default=100,
    )
    feeds = []
    for rank, session in enumerate(sessions):
        mine = {}
        for meta in session.get_inputs():
            if meta.type not in DTYPES:
                raise RunError(
                    f"cannot generate input {meta.name!r} of type {meta.type}: give it in --inputs"
                )
            dtype, name = np.dtype(DTYPES[meta.type]), meta.name
            shape = tuple(bind(d, i, args) for i, d in enumerate(meta.shape))
            per_rank = name in LAYOUT["kv"]
            rng = np.random.default_rng([args.seed, zlib.crc32(name.encode()), rank + 1 if per_rank else 0])
            if dtype == np.bool_:
                value = np.ones(shape, dtype)
            elif np.issubdtype(dtype, np.integer):
                fill = {
                    "attention_mask": 1,
                    "seqlens_k": args.context,
                    "total_sequence_length": args.context + 1,
                }
                if name == "input_ids":
                    value = rng.integers(0, vocab, size=shape).astype(dtype)
                elif name == "position_ids":
                    value = np.broadcast_to(np.arange(args.context, args.context + shape[-1]), shape).astype(
                        dtype
                    )
                else:
                    value = np.full(shape, fill.get(name, 0), dtype)
            else:
                value = (rng.standard_normal(shape, dtype=np.float32) * (0.1 if per_rank else 1.0)).astype(
                    dtype
                )
            mine[name] = value
        feeds.append(mine)
    return feeds


def load_inputs(path: Path, ranks: int) -> list[dict[str, np.ndarray]]:
    """``--inputs``: key NAME feeds every rank, key rank{r}/NAME feeds rank r."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read inputs file {path}: {str(exc).splitlines()[0]}") from exc
    feeds: list[dict[str, np.ndarray]] = [{} for _ in range(ranks)]
    for key, value in arrays.items():
        m = re.match(r"^rank(\d+)/(.+)$", key)
        for rank in [int(m.group(1))] if m else range(ranks):
            if rank < ranks:
                feeds[rank][m.group(2) if m else key] = value
    return feeds


def run(sessions: list[ort.InferenceSession], group: str, feeds: list[dict[str, np.ndarray]]) -> list[dict]:
    """One step on every rank at once (threads); a failing rank releases the others' collectives."""
    library = ctypes.CDLL(str(LIBRARY))
    library.preserve_abort_group.argtypes = [ctypes.c_char_p]
    outputs: list[dict | None] = [None] * len(sessions)
    errors: list[tuple[int, str]] = []

    def work(rank: int) -> None:
        session = sessions[rank]
        try:
            names = [o.name for o in session.get_outputs()]
            wanted = {i.name for i in session.get_inputs()}
            missing = sorted(wanted - set(feeds[rank]))
            if missing:
                raise RunError(f"no input {missing[0]!r}")
            values = session.run(names, {k: v for k, v in feeds[rank].items() if k in wanted})
            outputs[rank] = dict(zip(names, values))
        except Exception as exc:  # noqa: BLE001 - reported as one line below
            text = str(exc).strip().splitlines()
            errors.append((rank, text[-1] if text else type(exc).__name__))
            library.preserve_abort_group(group.encode())

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        rank, reason = min(errors)
        raise RunError(f"rank {rank}: {reason}")
    return outputs


def compare(expected: list[dict], actual: list[dict]) -> tuple[bool, int, float]:
    """``(identical, outputs compared, worst max abs diff)``: bytes, dtype and shape must all agree."""
    worst, count, identical = 0.0, 0, True
    for want, got in zip(expected, actual):
        for name, value in got.items():
            count += 1
            other = want.get(name)
            if other is None or other.dtype != value.dtype or other.shape != value.shape:
                return False, count, float("inf")
            if other.tobytes() != value.tobytes():
                identical = False
                diff = np.abs(other.astype(np.float64) - value.astype(np.float64))
                worst = max(worst, float(np.nanmax(diff)) if diff.size else 0.0)
    return identical, count, worst


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run_ranks.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "models",
        nargs="?",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="folder of rank models or one rank file (default: this file's folder)",
    )
    parser.add_argument(
        "--against", type=Path, help="the original rank models: same feeds, outputs bit-identical"
    )
    parser.add_argument("--inputs", type=Path, help=".npz of inputs (NAME, or rank{r}/NAME)")
    parser.add_argument("--save", type=Path, help="write every rank's outputs to this .npz as rank{r}/NAME")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=16, help="past sequence length of generated inputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=N", help="bind a symbolic dim")
    parser.add_argument("--opt-level", choices=sorted(LEVELS), default="all")
    parser.add_argument("--timeout", type=float, default=60, help="seconds a rank waits in a collective")
    parser.add_argument("--prefetch-domain", default=NAMING["domain"])
    parser.add_argument("--prefetch-op", default=NAMING["op"])
    args = parser.parse_args(argv)
    args.dims = dict(DIMS)
    for item in args.dim:
        name, _, value = item.partition("=")
        if not name or not value.isdigit():
            parser.error(f"--dim {item}: use NAME=N")
        args.dims[name] = int(value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not LIBRARY.is_file():
            raise RunError(
                f"{LIBRARY} is missing: it comes with this file (preserve-onnx optimize --with-runtime)"
            )
        api = ctypes.CDLL(str(LIBRARY)).preserve_ort_api_version()  # onnxruntime 1.N serves C API N
        if tuple(int(part) for part in re.findall(r"\d+", ort.__version__)[:2]) < (1, api):
            raise RunError(
                f"onnxruntime {ort.__version__} is older than {LIBRARY.name} needs (onnxruntime 1.{api}): "
                f"upgrade it: pip install --upgrade 'onnxruntime>=1.{api}'"
            )
        models = rank_files(args.models)
        sessions, group = open_sessions(models, args)
        feeds = load_inputs(args.inputs, len(models)) if args.inputs else generate(sessions, args)
        outputs = run(sessions, group, feeds)
        if args.save:
            tmp = args.save.with_name(args.save.name + ".tmp")
            with open(tmp, "wb") as handle:
                np.savez(
                    handle, **{f"rank{r}/{k}": v for r, out in enumerate(outputs) for k, v in out.items()}
                )
            os.replace(tmp, args.save)
        if args.against is None:
            for rank, out in enumerate(outputs):
                for name, value in out.items():
                    print(f"rank {rank}  {name}  {value.dtype}  {'x'.join(map(str, value.shape))}")
            print(f"ran {len(models)} rank(s) of {args.models}")
            return 0
        originals = rank_files(args.against)
        if len(originals) != len(models):
            raise RunError(f"{args.models} has {len(models)} ranks but {args.against} has {len(originals)}")
        try:
            expected = run(*open_sessions(originals, args), feeds)
        except RunError as exc:
            raise RunError(f"the original {args.against}: {exc}") from exc
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    identical, count, worst = compare(expected, outputs)
    verdict = "PASSED" if identical else "FAILED"
    how = "bit-identical to" if identical else "differ from"
    print(
        f"{verdict}: {count} outputs on {len(models)} rank(s) {how} {args.against} (max abs diff {worst:g})"
    )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
