"""The command line: parse, call the library, render. No graph logic lives here."""

from __future__ import annotations

import dataclasses
import functools
import inspect as pyinspect
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from preserve_onnx.config import PREFETCH_ATTRIBUTES, OptimizeConfig, PrefetchNaming
from preserve_onnx.errors import PreserveError, UsageError
from preserve_onnx.hardware import DEFAULT_PROFILE, builtin_profiles, format_size, load_profile, parse_size

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    help="Prefetch weights and KV-cache into L2 while tensor-parallel collectives communicate.",
)
# Under mpirun, Open MPI gives each rank a pseudo-terminal even when the job's output goes to a pipe or
# a file, so a rank cannot tell: no colour there.
_UNDER_MPI = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
out = Console(force_terminal=False if _UNDER_MPI else None)
err = Console(stderr=True, force_terminal=False if _UNDER_MPI else None)
# Without a terminal (CI logs, `| tee`, `> file`) rich would draw at $COLUMNS or 80 columns and fold
# collective names across lines; there, tables take the width of their content and no line (a table's
# title included) is wrapped.
LOG_WIDTH = 1 << 14
for _console in (out, err):
    if not _console.is_terminal:
        _console.width = LOG_WIDTH
        _console.soft_wrap = True

BIG_COPY = 64 << 20  # show a progress bar for data files above this size


def _version(value: bool) -> None:
    """``--version``: ``preserve-onnx <version>`` from the installed package's metadata."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from preserve_onnx import __version__

    try:
        number = version("preserve-onnx")
    except PackageNotFoundError:  # run from a checkout that was never installed
        number = __version__
    print(f"preserve-onnx {number}")
    raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="print the version and exit")
    ] = False,
) -> None:
    pass


def handle_errors(fn: Callable | None = None, *, error_code: int = 1) -> Callable:
    """A PreserveError becomes one red line and exit 1 (Ctrl-C too, after cleaning up); never a traceback.

    ``@handle_errors(error_code=2)`` exits 2 instead, for a command whose 1 means something else
    (`diff`: 1 = different, 2 = trouble).
    """
    if fn is None:
        return functools.partial(handle_errors, error_code=error_code)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PreserveError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2 if isinstance(exc, UsageError) else error_code) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/red]: nothing was written", highlight=False, soft_wrap=True)
            raise typer.Exit(error_code) from None
        except typer.Exit:
            raise
        except BrokenPipeError:
            # `preserve-onnx ... --json | head`: the reader left; say nothing more, like other CLI tools.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(error_code) from None
        except OSError as exc:  # writing the output itself failed (a full disk under `> file`)
            where = f" ({exc.filename})" if exc.filename else ""
            err.print(
                f"[red]error:[/red] {escape(exc.strerror or str(exc))}{escape(where)}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(error_code) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
            if os.environ.get("PRESERVE_DEBUG"):
                raise
            err.print(
                f"[red]internal error:[/red] {type(exc).__name__}: {escape(str(exc))} "
                f"(set PRESERVE_DEBUG=1 for a traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(error_code) from None

    return wrapper


def _progress(quiet: bool):
    """A factory of progress callbacks for large file copies (None when quiet)."""
    if quiet:
        return None

    def factory(name: str, total: int):
        if total < BIG_COPY:
            return lambda n: None
        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=err,
            transient=True,
        )
        progress.start()
        task = progress.add_task(f"copying {name}", total=total)
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            progress.update(task, advance=n)
            if done[0] >= total:
                progress.stop()

        return advance

    return factory


def _naming(domain: str, op: str, attrs: Optional[list[str]] = None, version: int = 1) -> PrefetchNaming:
    """The Prefetch spelling from --prefetch-domain/-op/-version and ``--prefetch-attr OURS=THEIRS``."""
    if not domain or not op:
        raise UsageError("--prefetch-domain and --prefetch-op must not be empty")
    if version < 1:
        raise UsageError("--prefetch-version must be at least 1")
    renames: dict[str, str] = {}
    for item in attrs or ():
        ours, sep, theirs = item.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if not sep or ours not in PREFETCH_ATTRIBUTES or not theirs.isidentifier():
            raise UsageError(
                f"--prefetch-attr '{item}': expected NAME=NEW with NAME one of "
                f"{', '.join(PREFETCH_ATTRIBUTES)} and NEW an identifier"
            )
        renames[ours] = theirs
    names = {a: renames.get(a, a) for a in PREFETCH_ATTRIBUTES}
    if len(set(names.values())) != len(names):
        raise UsageError(f"--prefetch-attr: two attributes would share a name ({names})")
    return PrefetchNaming(domain=domain, op_type=op, version=version, **names)


DomainOpt = Annotated[str, typer.Option("--prefetch-domain", help="domain of the Prefetch op")]
OpOpt = Annotated[str, typer.Option("--prefetch-op", help="op type of the Prefetch op")]
AttrOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--prefetch-attr",
        metavar="NAME=NEW",
        help=f"rename a Prefetch attribute ({', '.join(PREFETCH_ATTRIBUTES)}); repeatable",
    ),
]
VersionOpt = Annotated[int, typer.Option("--prefetch-version", help="opset version of the Prefetch domain")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="say why tensors were skipped")]
# Planning options (planning_options below adds them to every command that plans).
HardwareOpt = Annotated[str, typer.Option(help="hardware profile NAME or FILE.toml")]
BudgetOpt = Annotated[Optional[str], typer.Option(help="bytes per window, e.g. 96MiB (overrides the rule)")]
L2FractionOpt = Annotated[float, typer.Option(help="share of L2 a window may fill")]
BatchOpt = Annotated[int, typer.Option(help="batch size that sizes the KV-cache and messages")]
ContextOpt = Annotated[int, typer.Option(help="context length that sizes the KV-cache")]
NoKvOpt = Annotated[bool, typer.Option("--no-kv", help="do not prefetch KV-cache")]
QdqOpt = Annotated[
    bool,
    typer.Option(
        "--qdq-weights",
        help="also prefetch DequantizeLinear's quantized weights (blocks onnxruntime's DQ+MatMul fusion)",
    ),
]
StaticKvOpt = Annotated[
    bool,
    typer.Option(
        "--static-kv",
        help="KV-cache links without the length input L "
        "(two-input Prefetch: raw byte ranges, no live ranges)",
    ),
]
CollectivesOpt = Annotated[str, typer.Option(help="comma-separated collectives to plan")]
MinChunkOpt = Annotated[str, typer.Option(help="smallest partial prefetch")]
RanksOpt = Annotated[
    Optional[int], typer.Option(help="ranks of the export, for the collective time (default: from the files)")
]
DimOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--dim",
        metavar="NAME=N",
        help="bind a symbolic dim by name, before --batch/--context and the graph; repeatable",
    ),
]


def _config(
    *,
    hardware: str,
    budget: Optional[str],
    l2_fraction: float,
    batch: int,
    context: int,
    no_kv: bool,
    qdq_weights: bool,
    collectives: str,
    naming: PrefetchNaming,
    min_chunk: str,
    ranks: Optional[int],
    replan: bool = False,
    disabled: tuple[str, ...] = (),
    dim: Optional[list[str]] = None,
    static_kv: bool = False,
) -> OptimizeConfig:
    """The planning options, checked, as the optimizer's frozen config."""
    from preserve_onnx.graph.dims import parse_dim_options

    known = ("AllReduce", "AllGather", "AllToAll")
    chosen = tuple(c.strip() for c in collectives.split(",") if c.strip())
    bad = [c for c in chosen if c not in known]
    if bad or not chosen:
        raise UsageError(
            f"--collectives: unknown '{bad[0] if bad else collectives}' (choose from {', '.join(known)})"
        )
    for label, value in (("--batch", batch), ("--context", context)):
        _at_least_one(label, value)
    if not 0 < l2_fraction <= 1:
        raise UsageError("--l2-fraction must be in (0, 1]")
    _at_least_one("--ranks", ranks)
    return OptimizeConfig(
        hardware=load_profile(hardware),
        budget=_size("--budget", budget) if budget is not None else None,
        l2_fraction=l2_fraction,
        batch=batch,
        context=context,
        dims=parse_dim_options(dim),
        kv=not no_kv,
        qdq_weights=qdq_weights,
        static_kv=static_kv,
        collectives=chosen,
        naming=naming,
        min_chunk=_size("--min-chunk", min_chunk),
        ranks=ranks,
        replan=replan,
        disabled=disabled,
    )


# The planning options, declared once (docs/cli.md): every command that plans takes this group, as
# (name, annotation, default). ``planning_options`` adds them to a command and hands it the checked
# OptimizeConfig as ``config``.
_PLANNING_OPTIONS: tuple[tuple[str, object, object], ...] = (
    ("hardware", HardwareOpt, DEFAULT_PROFILE),
    ("budget", BudgetOpt, None),
    ("l2_fraction", L2FractionOpt, 0.5),
    ("batch", BatchOpt, 8),
    ("context", ContextOpt, 16384),
    ("ranks", RanksOpt, None),
    ("no_kv", NoKvOpt, False),
    ("qdq_weights", QdqOpt, False),
    ("static_kv", StaticKvOpt, False),
    ("collectives", CollectivesOpt, "AllReduce"),
    ("min_chunk", MinChunkOpt, "64KiB"),
    ("dim", DimOpt, None),
    ("prefetch_domain", DomainOpt, "preserve"),
    ("prefetch_op", OpOpt, "Prefetch"),
    ("prefetch_attr", AttrOpt, None),
    ("prefetch_version", VersionOpt, 1),
)


def planning_options(fn: Callable | None = None, *, budget: bool = True) -> Callable:
    """Give a command the planning options (``_PLANNING_OPTIONS``; ``budget=False``: all but --budget) and
    call it with ``config``, the OptimizeConfig they make (checked by ``_config``), instead of them."""
    if fn is None:
        return functools.partial(planning_options, budget=budget)
    options = [o for o in _PLANNING_OPTIONS if budget or o[0] != "budget"]
    signature = pyinspect.signature(fn, eval_str=True)
    own = [q for q in signature.parameters.values() if q.name != "config"]
    positional = [q for q in own if q.default is pyinspect.Parameter.empty]
    added = [
        pyinspect.Parameter(name, pyinspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=kind)
        for name, kind, default in options
    ]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        chosen = {name: kwargs.pop(name, default) for name, _, default in options}
        naming = _naming(
            chosen.pop("prefetch_domain"),
            chosen.pop("prefetch_op"),
            chosen.pop("prefetch_attr"),
            chosen.pop("prefetch_version"),
        )
        chosen.setdefault("budget", None)
        return fn(*args, config=_config(naming=naming, **chosen), **kwargs)

    wrapper.__signature__ = signature.replace(
        parameters=[*positional, *added, *(q for q in own if q not in positional)]
    )
    return wrapper


def _writable(*paths: Optional[Path]) -> None:
    """Check the files a command will write before it writes anything (an OUT, a CSV)."""
    from preserve_onnx.model_io import check_destination

    for path in paths:
        if path is not None:
            check_destination(path)


def _size(label: str, text: str) -> int:
    try:
        return parse_size(text)
    except PreserveError as exc:
        raise UsageError(f"{label}: {exc}") from None


def _at_least_one(label: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{label} must be at least 1")


def _check_dim_names(path: Path, dims, *, single: bool = False) -> None:
    """``--dim`` names that no tensor of the model(s) at ``path`` has: one line, exit 2. Only with --dim: the
    graph of a directory's first rank of each family (``single``: the one model) is parsed, never weights."""
    if not dims or not Path(path).exists():  # a missing path: the command's own message
        return
    from preserve_onnx.graph.dims import check_dim_names
    from preserve_onnx.model_io import find_rank_sets, load_model, resolve_single

    path = Path(path)
    if single:
        files = [resolve_single(path)]
    else:
        files = [s.files[0] for s in find_rank_sets(path)] if path.is_dir() else [path]
    check_dim_names([load_model(f) for f in files], dims, ", ".join(f.name for f in files))


QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="only errors and the closing line")]


def _single_device_note(model: Path, first: Optional[Path] = None, *, known: bool = False) -> None:
    """A yellow ``note:`` on stderr when the model has no collective at all: a single-device export, which
    plans nothing until `shard` makes its rank models (docs/shard.md). Called only when a plan came out empty;
    ``first``: the model file to look at (default: the first rank at ``model``); ``known``: the caller saw no
    collective already. Reads the graph only."""
    if not known:
        from preserve_onnx.graph.index import is_collective, iter_graphs
        from preserve_onnx.model_io import load_model, resolve_ranks

        graph = load_model(first if first is not None else resolve_ranks(model)[0])
        if any(is_collective(node) for _, g in iter_graphs(graph) for node in g.node):
            return
    where = escape(str(model))
    err.print(
        f"[yellow]note:[/yellow] {where} has no collectives: it looks like a single-device export; run "
        f"`preserve-onnx shard {where} OUT --tp N` first (docs/shard.md)",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@handle_errors
@planning_options
def optimize(
    src: Annotated[Path, typer.Argument(metavar="IN", help="rank model (.onnx) or directory of rank models")],
    dest: Annotated[
        Path, typer.Argument(metavar="OUT", help="output file, or directory for a rank directory")
    ],
    report: Annotated[Optional[Path], typer.Option(help="write the JSON report here")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="plan and report, write no model")] = False,
    replan: Annotated[
        bool, typer.Option("--replan", help="strip existing Prefetch nodes, plan again")
    ] = False,
    in_place: Annotated[bool, typer.Option("--in-place", help="allow OUT == IN")] = False,
    disable: Annotated[Optional[list[str]], typer.Option(help="skip a pass by name (repeatable)")] = None,
    jobs: Annotated[Optional[int], typer.Option(help="ranks optimized in parallel (default: cores)")] = None,
    with_runtime: Annotated[
        bool,
        typer.Option(
            "--with-runtime",
            help="also write the runtime library and run_ranks.py (needs only onnxruntime and "
            "numpy) beside the models",
        ),
    ] = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
    *,
    config: OptimizeConfig,
) -> None:
    """Insert Prefetch nodes so weight and KV-cache reads overlap each collective."""
    from preserve_onnx.optimizer import optimize_path
    from preserve_onnx.report import counted, render_outcomes, report_dict, write_json

    start = time.perf_counter()
    config = dataclasses.replace(config, replan=replan, disabled=tuple(disable or ()))
    _at_least_one("--jobs", jobs)
    _writable(report)
    _check_dim_names(src, config.dims)
    if with_runtime:
        if dry_run:
            raise UsageError("--with-runtime writes files beside the models; --dry-run writes none")
        if not src.is_dir():
            # The runner runs a folder's rank family; a file OUT's folder may hold anything.
            raise UsageError(
                "--with-runtime writes a runnable folder: give IN as a directory of rank models "
                "(and OUT as a folder)"
            )
        from preserve_onnx.runtime.library import library_path

        library_path()  # refused before any model is written when the library is not built
    outcomes = optimize_path(
        src, None if dry_run else dest, config, in_place=in_place, jobs=jobs, progress=_progress(quiet)
    )
    if with_runtime:
        from preserve_onnx.graph.dims import decode_layout
        from preserve_onnx.model_io import load_model
        from preserve_onnx.runtime.bundle import write_runtime

        # The decode layout of the first input rank (graph only; optimize changes no input or output).
        first = next((o.source for o in outcomes if o.source is not None), None)
        write_runtime(
            dest, config.naming, dict(config.dims), decode_layout(load_model(first)) if first else None
        )
    if report is not None:
        write_json(report, report_dict(outcomes, config))
    if not quiet:
        render_outcomes(out, outcomes, verbose)
        if not any(o.plan.windows for o in outcomes):
            _single_device_note(src, outcomes[0].source)
    count = sum(o.plan.prefetch_count for o in outcomes)
    total = sum(o.plan.prefetched_bytes for o in outcomes)
    written = (
        outcomes[0].output
        if len(outcomes) == 1 and outcomes[0].output is not None and not src.is_dir()
        else dest
    )  # a file written into a folder OUT is named
    where = "dry run, nothing written" if dry_run else f"wrote {escape(str(written))}"
    out.print(
        f"[green]done[/green]: {len(outcomes)} model(s), {counted(count, 'prefetch', 'prefetches')}, "
        f"{format_size(total)} "
        f"planned; {where} in {time.perf_counter() - start:.2f} s",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@handle_errors
def strip(
    src: Annotated[Path, typer.Argument(metavar="IN")],
    dest: Annotated[Path, typer.Argument(metavar="OUT")],
    prefetch_domain: DomainOpt = "preserve",
    prefetch_op: OpOpt = "Prefetch",
    prefetch_attr: AttrOpt = None,
    prefetch_version: VersionOpt = 1,
    in_place: Annotated[bool, typer.Option("--in-place", help="allow OUT == IN")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Remove every Prefetch node and reconnect each collective to its original input."""
    from preserve_onnx.optimizer import strip_path

    naming = _naming(prefetch_domain, prefetch_op, prefetch_attr, prefetch_version)
    removed = strip_path(src, dest, naming, in_place=in_place)
    written = dest / src.name if src.is_file() and dest.is_dir() else dest
    out.print(
        f"[green]done[/green]: removed {removed} Prefetch nodes; wrote {escape(str(written))}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@handle_errors
@planning_options
def inspect(
    model: Annotated[
        Path, typer.Argument(metavar="MODEL|DIR", help="rank model or directory of rank models")
    ],
    json_out: Annotated[
        bool, typer.Option("--json", help="print the JSON report (schema 1) instead of tables")
    ] = False,
    jobs: Annotated[Optional[int], typer.Option(help="ranks inspected in parallel (default: cores)")] = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
    *,
    config: OptimizeConfig,
) -> None:
    """Show collectives, their windows, candidate tensors and what optimize would prefetch."""
    import json

    from preserve_onnx.inspection import inspect_path
    from preserve_onnx.report import counted
    from preserve_onnx.report_ci import inspection_dict, render_inspections

    start = time.perf_counter()
    _at_least_one("--jobs", jobs)
    _check_dim_names(model, config.dims)
    inspections = inspect_path(model, config, jobs=jobs)
    if json_out:
        print(json.dumps(inspection_dict(inspections, config), indent=2))
        return
    if not quiet:
        render_inspections(out, inspections, verbose)
        if not any(i.collectives for i in inspections):
            _single_device_note(model, known=True)
    count = sum(i.plan.prefetch_count for i in inspections)
    total = sum(i.plan.prefetched_bytes for i in inspections)
    collectives_found = sum(len(i.collectives) for i in inspections)
    out.print(
        f"[green]done[/green]: {len(inspections)} model(s), {counted(collectives_found, 'collective')}, "
        f"{counted(count, 'prefetch', 'prefetches')}, {format_size(total)} would be planned; "
        f"nothing written "
        f"in {time.perf_counter() - start:.2f} s",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@handle_errors(error_code=2)
def diff(
    a: Annotated[Path, typer.Argument(metavar="A", help="model or directory of models")],
    b: Annotated[Path, typer.Argument(metavar="B", help="model or directory of models")],
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable diff")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="a pull-request comment in Markdown")] = False,
    data: Annotated[
        bool, typer.Option("--data", help="also compare external weight bytes (reads them)")
    ] = False,
    prefetch_domain: DomainOpt = "preserve",
    prefetch_op: OpOpt = "Prefetch",
    prefetch_attr: AttrOpt = None,
    prefetch_version: VersionOpt = 1,
    quiet: QuietOpt = False,
) -> None:
    """Structural diff of two models or rank directories; exit 0 equal, 1 different, 2 trouble."""
    import json

    from preserve_onnx.diffing import diff as diff_paths
    from preserve_onnx.report_ci import diff_dict, diff_markdown, render_diff

    if json_out and markdown:
        raise UsageError("--json and --markdown exclude each other")
    result = diff_paths(
        a, b, naming=_naming(prefetch_domain, prefetch_op, prefetch_attr, prefetch_version), data=data
    )
    if json_out:
        print(json.dumps(diff_dict(result), indent=2))
    elif markdown:
        print(diff_markdown(result), end="")
    else:
        render_diff(out, result, quiet)
    if not result.equal:
        raise typer.Exit(1)


@app.command("passes")
@handle_errors
def list_passes() -> None:
    """List the passes and analyses of the optimize pipeline."""
    from preserve_onnx.optimizer import PASSES
    from preserve_onnx.report import passes_table

    out.print(passes_table(PASSES))


@app.command("hardware")
@handle_errors
def list_hardware() -> None:
    """List the built-in hardware profiles."""
    from preserve_onnx.report import hardware_table

    out.print(hardware_table(builtin_profiles().values()))
    out.print(
        "* the default: the library a user of the platform gets. fp16 max tokens: tokens per step past "
        "which a linear layer is compute-bound and prefetching its fp16 weights saves nothing "
        "(peak / (2 x achieved HBM BW / 2 B)).",
        highlight=False,
        soft_wrap=True,
    )
    for hw in builtin_profiles().values():
        out.print(
            f"[bold]{escape(hw.name)}[/bold]: {escape(hw.description)}", highlight=False, soft_wrap=True
        )


SweepArgs = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="[KEY=V,...]...",
        show_default=False,
        help="further --sweep groups, e.g. context=1k,16k ranks=2,8",
    ),
]


@app.command()
@handle_errors
@planning_options
def estimate(
    model: Annotated[
        Path, typer.Argument(metavar="MODEL|DIR", help="rank model or directory of rank models")
    ],
    more_sweep: SweepArgs = None,
    trace: Annotated[
        Optional[Path], typer.Option(help="write a Chrome/Perfetto trace of the timelines")
    ] = None,
    sweep: Annotated[
        Optional[list[str]],
        typer.Option(
            help="speedup grid: batch=1,8,32 context=1k,16k,128k ranks=2,4,8 (k = 1024; ranks re-shard)"
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    all_windows: Annotated[bool, typer.Option("--all", help="one row per window, however many")] = False,
    quiet: QuietOpt = False,
    *,
    config: OptimizeConfig,
) -> None:
    """Estimate the decode step without and with the prefetches (cost model)."""
    import json

    from preserve_onnx.cost.estimate import estimate_path
    from preserve_onnx.cost.sweep import parse_sweep, sweep_path
    from preserve_onnx.model_io import write_bytes_atomic
    from preserve_onnx.report import counted
    from preserve_onnx.report_cost import (
        chrome_trace,
        estimate_dict,
        estimate_summary,
        estimate_table,
        sweep_list,
        sweep_table,
    )

    start = time.perf_counter()
    if more_sweep and not sweep:
        raise UsageError(f"unexpected argument '{more_sweep[0]}' (sweep groups follow --sweep)")
    hw = config.hardware
    _writable(trace)
    _check_dim_names(model, config.dims)
    if sweep:
        if trace is not None:
            raise UsageError("--trace writes one timeline; it cannot be combined with --sweep")
        if all_windows:
            raise UsageError("--all lists the windows of one estimate; it cannot be combined with --sweep")
        grid = parse_sweep([*sweep, *(more_sweep or ())])
        points = sweep_path(model, hw, config, grid, config.ranks, config.budget)
        if json_out:
            print(json.dumps(sweep_list(points), indent=2))
            return
        if not quiet:
            out.print(sweep_table(points, model, hw.name))
            if not any(p.hinted_bytes for p in points):
                _single_device_note(model)
        best = max(points, key=lambda p: p.speedup)
        out.print(
            f"[green]done[/green]: {counted(len(points), 'point')}; best {best.speedup:.3f}x at batch "
            f"{best.batch}, context {best.context}, {counted(best.ranks, 'rank')} in "
            f"{time.perf_counter() - start:.2f} s",
            highlight=False,
            soft_wrap=True,
        )
        return
    est = estimate_path(model, hw, config, config.ranks, config.budget)
    if trace is not None:
        write_bytes_atomic(trace, json.dumps(chrome_trace(est)).encode())
    if json_out:
        print(json.dumps(estimate_dict(est), indent=2))
        return
    if not quiet:
        out.print(estimate_table(est, None if all_windows else 12))
        out.print(estimate_summary(est), highlight=False, soft_wrap=True)
        if not est.windows:
            _single_device_note(model, Path(est.source))
    where = f"; trace in {escape(str(trace))}" if trace is not None else ""
    out.print(
        f"[green]done[/green]: {counted(len(est.windows), 'window')} estimated{where} in "
        f"{time.perf_counter() - start:.2f} s",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@handle_errors
@planning_options(budget=False)
def explore(
    model: Annotated[
        Path, typer.Argument(metavar="MODEL|DIR", help="rank model or directory of rank models")
    ],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of the table")] = False,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="write the sweep as CSV")] = None,
    plot: Annotated[
        Optional[Path], typer.Option(help="write a plot, .png, .svg or .pdf (needs matplotlib)")
    ] = None,
    quiet: QuietOpt = False,
    *,
    config: OptimizeConfig,
) -> None:
    """Sweep the L2 size (0-256 MiB): performance per cost with and without prefetching."""
    import json

    from preserve_onnx.cost.explore import explore_path, plot_format, write_csv, write_plot
    from preserve_onnx.report_cost import exploration_dict, explore_summary, explore_table

    start = time.perf_counter()
    _writable(csv_path, plot)
    if plot is not None:
        plot_format(plot)
    _check_dim_names(model, config.dims)
    ex = explore_path(model, config.hardware, config, config.ranks)
    if csv_path is not None:
        write_csv(csv_path, ex)
    if plot is not None:
        write_plot(plot, ex)
    if json_out:
        print(json.dumps(exploration_dict(ex), indent=2))
        return
    if not quiet:
        out.print(explore_table(ex))
        out.print(explore_summary(ex), highlight=False, soft_wrap=True)
        if all(p.preserve_s == p.baseline_s for p in ex.points):
            _single_device_note(model, Path(ex.source))
    out.print(
        f"[green]done[/green]: {len(ex.points)} L2 sizes in {time.perf_counter() - start:.2f} s",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@handle_errors
def run(
    model: Annotated[
        Path, typer.Argument(metavar="MODEL|DIR", help="rank model or directory of rank models")
    ],
    inputs: Annotated[
        Optional[Path], typer.Option(help="feeds .npz: NAME for every rank, rank{r}/NAME for one")
    ] = None,
    against: Annotated[
        Optional[Path], typer.Option(help="original model(s): require bit-identical outputs")
    ] = None,
    twin: Annotated[
        Optional[Path],
        typer.Option(
            help="the single-device model the ranks were sharded from: require outputs within tolerance"
        ),
    ] = None,
    atol: Annotated[
        Optional[float],
        typer.Option(
            help="--twin's absolute tolerance for every output (default by dtype: float32 1e-4, "
            "float16 2e-2, bfloat16 0.16, integers exact)"
        ),
    ] = None,
    save: Annotated[Optional[Path], typer.Option(help="write outputs to .npz as rank{r}/NAME")] = None,
    steps: Annotated[
        int, typer.Option(help="decode steps, feeding present.* back into past_key_values.*")
    ] = 1,
    batch: Annotated[int, typer.Option(help="batch size of generated feeds")] = 1,
    context: Annotated[int, typer.Option(help="past length of generated feeds")] = 16,
    seed: Annotated[int, typer.Option(help="seed of generated feeds")] = 0,
    opt_level: Annotated[
        str, typer.Option(help="onnxruntime optimization: disable|basic|extended|layout|all")
    ] = "all",
    backend: Annotated[
        str,
        typer.Option(
            help="threads: all ranks in this process; mpi: one process per rank "
            "under `mpirun -n RANKS` (rank 0 reports)"
        ),
    ] = "threads",
    timeout: Annotated[float, typer.Option(help="seconds a rank waits in a collective for the others")] = 60,
    prefetch_domain: DomainOpt = "preserve",
    prefetch_op: OpOpt = "Prefetch",
    prefetch_attr: AttrOpt = None,
    prefetch_version: VersionOpt = 1,
    dim: DimOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run rank models on the reference CPU runtime; with --against, prove outputs are unchanged;
    with --twin, compare them with the single-device model they were sharded from."""
    from preserve_onnx.graph.dims import parse_dim_options
    from preserve_onnx.report import counted, outputs_table
    from preserve_onnx.runtime.feeds import save_outputs
    from preserve_onnx.runtime.runner import run_models

    for label, value in (("--steps", steps), ("--batch", batch), ("--context", context)):
        _at_least_one(label, value)
    if seed < 0:
        raise UsageError("--seed must be at least 0")
    if not timeout > 0:
        raise UsageError("--timeout must be positive")
    _check_twin_options(twin, atol, against, backend)
    _writable(save)
    dims = dict(parse_dim_options(dim))
    _check_dim_names(model, dims)
    if twin is not None:
        from preserve_onnx.runtime.twin import run_twin

        result = run_twin(
            model,
            twin,
            inputs=inputs,
            steps=steps,
            batch=batch,
            context=context,
            seed=seed,
            opt_level=opt_level,
            naming=_naming(prefetch_domain, prefetch_op, prefetch_attr, prefetch_version),
            timeout_s=timeout,
            atol=atol,
            dims=dims,
        )
    else:
        result = run_models(
            model,
            against=against,
            inputs=inputs,
            steps=steps,
            batch=batch,
            context=context,
            seed=seed,
            opt_level=opt_level,
            naming=_naming(prefetch_domain, prefetch_op, prefetch_attr, prefetch_version),
            timeout_s=timeout,
            backend=backend,
            dims=dims,
        )
    if not result.report:  # an MPI rank other than 0: rank 0 saves and prints for all; exit alike
        if result.comparison is not None and not result.comparison.identical:
            raise typer.Exit(1)
        return
    if save is not None:
        save_outputs(save, result.outputs)
    if not quiet:
        out.print(outputs_table(result.outputs, steps))
    if result.twin is not None:
        _print_twin(result, twin, steps)
        return
    c = result.comparison
    if c is None:
        out.print(
            f"[green]done[/green]: ran {len(result.models)} rank(s) in {result.seconds:.2f} s",
            highlight=False,
            soft_wrap=True,
        )
        return
    count = sum(len(o) for o in result.outputs)
    if c.identical:
        out.print(
            f"[green]PASSED[/green]: {counted(count, 'output')} on {len(result.models)} rank(s) "
            f"bit-identical to "
            f"{escape(str(against))} after {steps} step(s) (max abs diff 0)",
            highlight=False,
            soft_wrap=True,
        )
        return
    rank, name, diff = c.worst
    out.print(
        f"[red]FAILED[/red]: {len(c.differing)} of {count} outputs differ from {escape(str(against))}; "
        f"worst: rank {rank} '{escape(name)}', max abs diff {diff:g}",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(1)


def _check_twin_options(
    twin: Optional[Path], atol: Optional[float], against: Optional[Path], backend: str
) -> None:
    if twin is None:
        if atol is not None:
            raise UsageError("--atol is --twin's tolerance: give --twin too")
        return
    if against is not None:
        raise UsageError("--twin and --against are two different checks: give one of them")
    if backend != "threads":
        raise UsageError(
            "--twin runs on the threads backend only (the single-device model runs in the same "
            "process as the ranks)"
        )
    if atol is not None and not atol >= 0:
        raise UsageError("--atol must be at least 0")


def _print_twin(result, twin: Path, steps: int) -> None:
    """The closing line of `run --twin`; exit 1 on FAILED."""
    from preserve_onnx.report import counted

    c = result.twin
    w = c.worst
    at = f" at step {w.step}" if steps > 1 else ""
    worst = f"worst: rank {w.rank} '{escape(w.name)}'{at}, max abs diff {w.diff:g} (atol {w.atol:g})"
    if c.passed:
        out.print(
            f"[green]PASSED[/green]: {counted(c.outputs, 'output')} on {len(result.models)} rank(s) "
            f"match "
            f"{escape(str(twin))} within tolerance after {steps} step(s); {worst}",
            highlight=False,
            soft_wrap=True,
        )
        return
    out.print(
        f"[red]FAILED[/red]: {len(c.failing)} of {c.outputs} outputs beyond tolerance of "
        f"{escape(str(twin))}; {worst}",
        highlight=False,
        soft_wrap=True,
    )
    if c.hint:
        out.print(f"hint: {escape(c.hint)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
@handle_errors
def shard(
    model: Annotated[
        Path, typer.Argument(metavar="MODEL", help="single-device decoder .onnx (or its folder)")
    ],
    dest: Annotated[Path, typer.Argument(metavar="OUT", help="new folder for model_00.onnx ... (+ .data)")],
    tp: Annotated[int, typer.Option("--tp", help="tensor-parallel ranks N")],
    vocab_parallel: Annotated[
        bool,
        typer.Option("--vocab-parallel", help="split the LM head by vocabulary and AllGather the logits"),
    ] = False,
    dim: Annotated[
        Optional[list[str]],
        typer.Option(
            "--dim",
            metavar="NAME=N",
            help="bind a symbolic dim the recognition needs (the head size of "
            "plain-operator attention); repeatable",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Shard a single-device decoder export into N tensor-parallel rank models (Megatron layout)."""
    from preserve_onnx.graph.dims import parse_dim_options
    from preserve_onnx.shard import shard_model

    dims = dict(parse_dim_options(dim))
    _check_dim_names(model, dims, single=True)
    result = shard_model(model, dest, tp, vocab_parallel=vocab_parallel, dims=dims)
    gathered = ", logits gathered by AllGather" if result.vocab_parallel else ""
    experts = "".join(
        f", {n} {what}{'s' if n > 1 else ''}{where}"
        for n, what, where in (
            (result.expert_layers, "mixture-of-experts layer", ""),
            (result.state_layers, "state layer", " computed whole on every rank"),
        )
        if n
    )
    out.print(
        f"[green]done[/green]: {result.world} rank models ({result.column_parallel} column-parallel and "
        f"{result.row_parallel} row-parallel linears{experts}, {result.allreduces} AllReduce per rank"
        f"{gathered}), "
        f"{format_size(result.bytes_written)} of weights; wrote {escape(str(dest))} in "
        f"{result.seconds:.2f} s",
        highlight=False,
        soft_wrap=True,
    )


@app.command("runtime-lib")
@handle_errors
def runtime_lib() -> None:
    """Print the path of the reference runtime's custom-op library."""
    from preserve_onnx.runtime import library_path

    print(library_path())


@app.command()
@handle_errors
def calibrate(
    device: Annotated[str, typer.Option(help="the CUDA device to measure, cuda:N")] = "cuda:0",
    out_path: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            metavar="PROFILE.toml",
            help="where to write the calibrated profile (default: NAME-calibrated.toml)",
        ),
    ] = None,
    name: Annotated[
        Optional[str],
        typer.Option(
            help="published profile to start from and name to write (h100-sxm, h200, ...; default: the GPU's)"
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Measure a CUDA GPU (CuPy) and write a calibrated hardware profile; compare the cost model
    (docs/calibrate.md)."""
    import json
    import shlex

    from preserve_onnx.calibrate import calibrate as run_calibration
    from preserve_onnx.calibrate import calibrated_toml
    from preserve_onnx.calibrate.plan import device_index
    from preserve_onnx.calibrate.render import calibration_dict, comparison_table, figures_table, summary
    from preserve_onnx.model_io import write_bytes_atomic

    start = time.perf_counter()
    device_index(device)  # a bad --device or --out fails before CuPy is imported
    _writable(out_path)
    command = (
        shlex.join(["preserve-onnx", "calibrate", *sys.argv[2:]])
        if sys.argv[1:2] == ["calibrate"]
        else f"preserve-onnx calibrate --device {device}"
    )
    cal = run_calibration(
        device,
        name,
        command=command,
        log=lambda line: err.print(f"calibrate: {escape(line)}", highlight=False, soft_wrap=True),
    )
    dest = out_path if out_path is not None else Path(f"{cal.profile.name}-calibrated.toml")
    write_bytes_atomic(dest, calibrated_toml(cal.profile, cal.published, cal.measured_fields).encode())
    if json_out:
        print(json.dumps({**calibration_dict(cal), "written": str(dest)}, indent=2))
        return
    out.print(figures_table(cal))
    out.print(comparison_table(cal))
    out.print(escape(summary(cal)), highlight=False, soft_wrap=True)
    out.print(
        f"[green]done[/green]: wrote {escape(str(dest))} (--hardware {escape(str(dest))}) in "
        f"{time.perf_counter() - start:.0f} s",
        highlight=False,
        soft_wrap=True,
    )


def main() -> None:
    """The ``preserve-onnx`` command: typer parses, but a usage error is one line (exit 2), not typer's
    box."""
    try:
        from typer import _click as click  # typer >= 0.28 vendors click
    except ImportError:  # pragma: no cover - older typer depends on click
        import click
    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:  # before a command's own handler is in place (argument parsing)
        _interrupted()
    except typer.Abort:  # click's own end of input or Ctrl-C
        _interrupted()
    except click.exceptions.ClickException as exc:
        _usage_error(exc)
    except SystemExit as exc:
        if exc.code == 130:  # typer's silent exit for a Ctrl-C outside a command's handler
            _interrupted()
        raise
    if code == 130:  # typer's Ctrl-C while parsing, returned as an exit code without standalone mode
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


def _usage_error(exc) -> None:
    """``error: Missing argument 'OUT'. (see 'preserve-onnx optimize --help')`` and click's exit code (2).
    With no arguments at all the help was printed already (no_args_is_help)."""
    if type(exc).__name__ != "NoArgsIsHelpError":
        ctx = getattr(exc, "ctx", None)
        message = " ".join(exc.format_message().split())
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err.print(f"[red]error:[/red] {escape(message)}{escape(hint)}", highlight=False, soft_wrap=True)
    sys.exit(exc.exit_code)


def _interrupted() -> None:
    err.print("[red]interrupted[/red]: nothing was written", highlight=False)
    sys.exit(1)
