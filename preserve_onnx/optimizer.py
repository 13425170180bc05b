"""The optimize and strip pipelines, on one model or on whole rank directories.

``optimize`` = check-order -> [strip-prefetches -> drop-stale-weights (only with replan)] -> insert-prefetches
-> verify-prefetches. insert-prefetches consumes the analyses build-windows -> collect-candidates ->
plan-prefetches.

Stale links (docs/design.md §9): a model whose Prefetch links hint weights that no other node reads any
more (a quantizer ran after optimize) is refused without ``--replan``, with the count; ``--replan``
plans on the new weights, drops the initializers only those links read and, where the output's data
file is a copy, writes it without their bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from preserve_onnx.config import OptimizeConfig, PrefetchNaming
from preserve_onnx.errors import PreserveError, UsageError
from preserve_onnx.model_io import (
    RUNTIME_FILES,
    ProgressFactory,
    atomic_path,
    copy_tree_entry,
    external_info,
    external_tensors,
    find_rank_sets,
    is_rank_file,
    load_model,
    save_model,
    sibling_rank_count,
    staged_directory,
    write_bytes_atomic,
)
from preserve_onnx.passes import (
    CheckOrderPass,
    InsertPrefetchesPass,
    Plan,
    StripPrefetchesPass,
    VerifyPrefetchesPass,
)
from preserve_onnx.passes.drop_stale_weights import Dropped, DropStaleWeightsPass
from preserve_onnx.passes.plan_prefetches import (
    BuildWindowsPass,
    CollectCandidatesPass,
    PlanPrefetchesPass,
    planning_passes,
)
from preserve_onnx.passes.verify_prefetches import StaleLinks, Verification, stale_links
from preserve_onnx.pipeline import Pass, Sequential

# Every pass `optimize` can run, in pipeline order: the registry `preserve-onnx passes` prints and
# `--disable` is checked against (generated from the passes' own name, kind and summary).
REGISTRY: tuple[type[Pass], ...] = (
    CheckOrderPass,
    StripPrefetchesPass,
    DropStaleWeightsPass,
    BuildWindowsPass,
    CollectCandidatesPass,
    PlanPrefetchesPass,
    InsertPrefetchesPass,
    VerifyPrefetchesPass,
)
_REPLAN_ONLY = {StripPrefetchesPass.name, DropStaleWeightsPass.name}
# name -> (kind, one-line summary), in pipeline order.
PASSES = {
    cls.name: (cls.kind, cls.summary + (" (runs only with --replan)" if cls.name in _REPLAN_ONLY else ""))
    for cls in REGISTRY
}


@dataclass(frozen=True)
class RankOutcome:
    """What optimizing one file gave."""

    source: Path | None
    output: Path | None
    ranks: int
    modified: bool
    plan: Plan
    verification: Verification | None
    seconds: float
    stale: StaleLinks | None = None  # the input's Prefetch links whose X nothing else reads (None: no links)
    dropped: Dropped | None = None  # --replan: initializers only stale links read, removed
    compacted: int = 0  # bytes left out of the output's data files (those initializers' data)


def build_pipeline(
    config: OptimizeConfig, baseline: onnx.ModelProto, ranks: int, stale: StaleLinks | None = None
) -> Sequential:
    passes: list[Pass] = [CheckOrderPass()]
    if config.replan:
        stale = stale if stale is not None else stale_links(baseline, config.naming)
        passes += [StripPrefetchesPass(config.naming), DropStaleWeightsPass(stale.prefetch_only)]
    passes += [
        *planning_passes(config, ranks),
        InsertPrefetchesPass(config, ranks),
        VerifyPrefetchesPass(baseline, config.naming),
    ]
    return Sequential(passes, config.disabled, known=list(PASSES))


def planning_pipeline(config: OptimizeConfig, ranks: int = 1, *, strip: bool = False) -> Sequential:
    """``optimize``'s pipeline up to plan-prefetches, changing nothing but (``strip``) removing existing
    Prefetch nodes first as --replan does: the dry run ``inspect`` and the cost model run."""
    passes: list[Pass] = [CheckOrderPass(), *([StripPrefetchesPass(config.naming)] if strip else [])]
    return Sequential([*passes, *planning_passes(config, ranks)])


def plan_model(model: onnx.ModelProto, config: OptimizeConfig, ranks: int = 1) -> Plan:
    """What ``optimize`` would plan for ``model`` (:func:`planning_pipeline`'s Plan)."""
    return planning_pipeline(config, ranks)(model).stats("plan-prefetches")


def optimize(
    model: onnx.ModelProto | str | Path, config: OptimizeConfig | None = None, ranks: int | None = None
) -> tuple[onnx.ModelProto, Plan]:
    """Optimize one model (a ModelProto or a path) and return ``(optimized model, plan)``.

    The input is not changed. ``ranks`` (for the collective time in the budget rule) defaults to
    ``config.ranks``, else the number of sibling rank files of a path, else 1.
    """
    outcome, out = _optimize_loaded(model, config or OptimizeConfig(), ranks)
    return out, outcome.plan


def resolve_model(
    model: onnx.ModelProto | str | Path, config: OptimizeConfig, ranks: int | None
) -> tuple[onnx.ModelProto, Path | None, int]:
    """``(model, source path or None, ranks)``: loads a path (never its weights) and settles the rank
    count: ``ranks``, else ``config.ranks``, else the number of sibling rank files of a path, else 1."""
    if ranks is not None and (isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1):
        raise UsageError(f"ranks must be an integer of at least 1, got {ranks!r}")
    if not isinstance(model, (onnx.ModelProto, str, os.PathLike)):
        raise UsageError(
            f"expected an onnx.ModelProto or a path to an .onnx file, got {type(model).__name__}"
        )
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = Path(model)
        if ranks is None and config.ranks is None:
            ranks = sibling_rank_count(source)
        model = load_model(source)
    return model, source, ranks or config.ranks or 1


def _optimize_loaded(model, config: OptimizeConfig, ranks: int | None):
    start = time.perf_counter()
    model, source, ranks = resolve_model(model, config, ranks)
    stale = stale_links(model, config.naming)
    if stale.stale and not config.replan:
        # Planning on top would keep hinting bytes nothing reads; say so rather than "already contains".
        where = f"{source.name}: " if source is not None else ""
        raise PreserveError(f"{where}{stale.describe()}; nothing was written")
    result = build_pipeline(config, model, ranks, stale)(model)
    plan = result.stats("insert-prefetches") or result.stats("plan-prefetches")  # insert disabled: the plan
    outcome = RankOutcome(
        source,
        None,
        ranks,
        result.modified,
        plan,
        result.stats("verify-prefetches"),
        time.perf_counter() - start,
        stale if stale.total else None,
        result.stats("drop-stale-weights"),
    )
    return outcome, result.model


def strip(model: onnx.ModelProto | str | Path, naming: PrefetchNaming = PrefetchNaming()) -> onnx.ModelProto:
    """``model`` without Prefetch nodes, each collective reconnected to its original input."""
    if isinstance(model, (str, Path)):
        model = load_model(Path(model))
    return StripPrefetchesPass(naming)(model).model


def _optimize_one(
    config: OptimizeConfig,
    progress: ProgressFactory | None,
    src: Path,
    dest: Path | None,
    ranks: int | None,
    copy_data: bool | None,
) -> RankOutcome:
    outcome, model = _optimize_loaded(src, config, config.ranks or ranks)  # an explicit --ranks wins
    if dest is None:
        return outcome
    save_model(model, dest, src.parent, copy_data=copy_data, progress=progress)
    compacted = 0
    if outcome.dropped is not None and outcome.dropped.locations:
        model, compacted = compact_data(model, outcome.dropped.locations, dest, src)
    return dataclasses.replace(outcome, output=dest, compacted=compacted)


def compact_data(
    model: onnx.ModelProto, locations: tuple[str, ...], dest: Path, src: Path
) -> tuple[onnx.ModelProto, int]:
    """Rewrite the data files ``locations`` beside ``dest`` (already written) with only the bytes that
    ``model`` still reads, and ``dest`` with the new offsets; returns (model, bytes left out).

    Each tensor keeps the alignment its offset had (up to 4096). A file is left as it is when it is
    IN's own file (OUT beside IN, or in place) or another rank model beside IN reads it too. Bytes are
    moved, never interpreted.
    """
    saved = 0
    out = None
    for location in locations:
        target, original = dest.parent / location, src.parent / location
        if (
            not target.is_file()
            or (original.exists() and os.path.samefile(target, original))
            or _shared(location, src)
        ):
            continue
        if out is None:
            out = onnx.ModelProto()
            out.CopyFrom(model)
        tensors = sorted(
            (t for t in external_tensors(out) if external_info(t).get("location") == location),
            key=lambda t: int(external_info(t).get("offset", 0) or 0),
        )
        before = target.stat().st_size
        if not tensors:
            target.unlink()
            saved += before
            continue
        with atomic_path(target) as tmp, open(target, "rb") as fin, open(tmp, "wb") as fout:
            cursor = 0
            for t in tensors:
                info = external_info(t)
                offset, length = int(info.get("offset", 0) or 0), int(info.get("length", 0) or 0)
                align = min(4096, offset & -offset) if offset else 4096
                cursor = -(-cursor // align) * align
                fout.seek(cursor)
                done = 0
                while done < length:
                    buf = os.pread(fin.fileno(), min(8 << 20, length - done), offset + done)
                    if not buf:
                        raise PreserveError(
                            f"{target} is short: '{t.name}' needs bytes up to {offset + length}"
                        )
                    fout.write(buf)
                    done += len(buf)
                _set_offset(t, cursor)
                cursor += length
            fout.truncate(cursor)
            fout.flush()
            os.fsync(fout.fileno())
            os.chmod(tmp, target.stat().st_mode & 0o777)
        saved += before - cursor
    if out is None:
        return model, 0
    write_bytes_atomic(dest, out.SerializeToString())
    return out, saved


def _set_offset(tensor: onnx.TensorProto, offset: int) -> None:
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(offset)
            return
    tensor.external_data.add(key="offset", value=str(offset))


def _shared(location: str, src: Path) -> bool:
    """Whether another rank model beside ``src`` keeps data in ``location`` (compacting would break it)."""
    for entry in sorted(src.parent.iterdir()):
        if (
            entry != src
            and entry.is_file()
            and is_rank_file(entry.name)
            and any(external_info(t).get("location") == location for t in external_tensors(load_model(entry)))
        ):
            return True
    return False


def _strip_one(
    naming: PrefetchNaming,
    progress: ProgressFactory | None,
    src: Path,
    dest: Path | None,
    ranks: int | None,
    copy_data: bool | None,
) -> int:
    result = StripPrefetchesPass(naming)(load_model(src))
    if dest is not None:
        save_model(result.model, dest, src.parent, copy_data=copy_data, progress=progress)
    return result.stats


def resolve_output(src: Path, out: Path, in_place: bool) -> Path:
    """OUT for a single file: a folder means ``folder/<IN's name>``; IN itself needs ``--in-place``."""
    if out.is_dir() and not src.is_dir():
        out = out / src.name
    if out.exists() and src.exists() and os.path.samefile(src, out) and not in_place:
        raise PreserveError(f"OUT is IN ({src}); pass --in-place to overwrite it")
    if not out.parent.is_dir():
        raise PreserveError(f"{out.parent}: output folder does not exist")
    return out


def map_path(
    task: Callable,
    src: Path,
    out: Path | None,
    *,
    in_place: bool = False,
    jobs: int | None = None,
    progress: ProgressFactory | None = None,
) -> tuple:
    """Apply ``task(progress, src_file, dest_file, ranks, copy_data)`` to a file or a rank directory.

    A directory OUT is built in a hidden staging folder beside it (rank files by ``task``, every
    other file copied along) and renamed into place at the end; ``out=None`` writes nothing.
    """
    src = Path(src)
    if not src.exists():
        raise PreserveError(f"{src}: no such file or directory")
    if not src.is_dir():
        dest = resolve_output(src, Path(out), in_place) if out is not None else None
        return (task(progress, src, dest, None, None),)
    files = [(f, len(rs.files)) for rs in find_rank_sets(src) for f in rs.files]
    if out is None:
        return _run_all(task, [(f, None, n, None) for f, n in files], jobs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PreserveError(f"OUT {out} is a file; a rank directory needs a directory OUT")
    if out.exists() and os.path.samefile(src, out):
        if not in_place:
            raise PreserveError(f"OUT is IN ({src}); pass --in-place to overwrite it")
        return _run_all(task, [(f, f, n, False) for f, n in files], jobs)
    _check_directory_out(src, out)
    out = out.resolve()  # "." and ".." have no name to stage beside
    with staged_directory(out) as staging:
        # Everything that is not a rank model (data files, configs, tokenizers) is copied along.
        for entry in sorted(src.iterdir()):
            if not is_rank_file(entry.name):
                copy_tree_entry(entry, staging / entry.name, progress)
        return _run_all(task, [(f, staging / f.name, n, False) for f, n in files], jobs)


def _check_directory_out(src: Path, out: Path) -> None:
    """Refuses a directory OUT whose replacement would lose anything: one that contains IN, one inside
    IN, or an existing one holding files that the run would not write again."""
    src_r, out_r = src.resolve(), out.resolve()
    if src_r.is_relative_to(out_r):
        raise PreserveError(
            f"OUT {out} contains IN {src}: writing it would replace the input; choose a new folder"
        )
    if out_r.is_relative_to(src_r):
        raise PreserveError(f"OUT {out} is inside IN {src}; choose a folder outside it")
    if not out_r.parent.is_dir():
        raise PreserveError(f"{out.parent}: output folder does not exist")
    if out_r.is_dir():
        # OUT is replaced as a whole: allowed when everything in it is a rank model, a name that IN has
        # too, or what --with-runtime writes (a previous run's output), so nothing the user put there is lost.
        foreign = sorted(
            e.name
            for e in out_r.iterdir()
            if not is_rank_file(e.name) and not (src_r / e.name).exists() and e.name not in RUNTIME_FILES
        )
        if foreign:
            raise PreserveError(
                f"OUT {out} exists and holds '{foreign[0]}', which is not from IN "
                f"(OUT is replaced as a whole): remove it or choose a new folder"
            )


def optimize_path(
    src: Path,
    out: Path | None,
    config: OptimizeConfig,
    *,
    in_place: bool = False,
    jobs: int | None = None,
    progress: ProgressFactory | None = None,
) -> tuple[RankOutcome, ...]:
    """Optimize a file or a rank directory into ``out`` (None = dry run, nothing written)."""
    outcomes = map_path(
        functools.partial(_optimize_one, config), src, out, in_place=in_place, jobs=jobs, progress=progress
    )
    if out is not None and Path(src).is_dir():
        # Report final paths, not the staging folder's.
        outcomes = tuple(dataclasses.replace(o, output=Path(out) / o.source.name) for o in outcomes)
    return outcomes


def strip_path(
    src: Path, dest: Path, naming: PrefetchNaming = PrefetchNaming(), *, in_place: bool = False
) -> int:
    """Strip a file or every rank file of a directory into ``dest``; returns Prefetch nodes removed."""
    return sum(map_path(functools.partial(_strip_one, naming), src, dest, in_place=in_place, jobs=1))


def _run_all(task: Callable, tasks: list[tuple], jobs: int | None) -> tuple:
    jobs = jobs if jobs is not None else min(len(tasks), os.cpu_count() or 1)
    if jobs <= 1 or len(tasks) <= 1:
        return tuple(task(None, *t) for t in tasks)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(task, None, *t) for t in tasks]
        try:
            return tuple(f.result() for f in futures)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
