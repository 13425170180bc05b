"""`run --twin`: sharded rank models against the single-device model they were sharded from.

Invariant: both sides see the same feeds and the same tokens. The single model's inputs are built from
the ranks' feeds (replicated inputs as they are, KV-cache shards concatenated in rank order on the one
axis where the single model's shape is the ranks' times N); after every step both sides take the next
token from the ranks' logits, so a rounding difference can never make the two decodes diverge and any
difference beyond the dtype's tolerance is the sharding's fault.

Axes are found by comparing shapes (the rank model's input or output against the single model's: the
axis whose size differs, summed over the ranks), never by name, so any head-axis layout works.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

from preserve_onnx.config import PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.index import is_collective, iter_graphs
from preserve_onnx.model_io import load_model, resolve_ranks, resolve_single
from preserve_onnx.runtime.backend import RunResult, session_kwargs
from preserve_onnx.runtime.compare import TwinCheck, TwinComparison, max_abs_diff
from preserve_onnx.runtime.decode import advance_feeds, next_token_ids
from preserve_onnx.runtime.feeds import DEFAULT_CONTEXT, generate_feeds, layout_of, load_feeds
from preserve_onnx.runtime.session import RankSession
from preserve_onnx.runtime.values import TensorMeta

# Default absolute tolerance per output dtype (documented in the README, "run --twin"). float32 and
# float16: measured on the committed samples (worst 1.4e-6 and 2.0e-3 over seeds, batches, contexts),
# with margin for deeper models. bfloat16: float16's bound times the ratio of the two types' machine
# epsilons (2^-7 / 2^-10 = 8); onnxruntime's CPU provider has no bfloat16 MatMul or Add, so no
# bfloat16 decoder runs here to measure. Integers and booleans must be equal.
DEFAULT_ATOL: dict[np.dtype, float] = {
    np.dtype(np.float64): 1e-9,
    np.dtype(np.float32): 1e-4,
    np.dtype(np.float16): 2e-2,
    np.dtype(ml_dtypes.bfloat16): 1.6e-1,
}
# The least tolerance of floating-point outputs of a model whose MatMulNBits quantize their activations
# (accuracy_level 4 on CPU: int8 per block of block_size along K). Both sides quantize the same blocks,
# but an activation that differs by one float32 rounding can land on the other side of an int8 step,
# which moves the product by a whole step. Measured on the onnxruntime-genai builder's int4 exports
# (genai-llama-int4 at 2 ranks, genai-llama8h-int4-zp at 2 and 4; 5 seeds x 3 batch/context, 3 steps):
# 3 runs of 45 had such a flip, at most 3.9e-3 on logits of magnitude 0.8 (the others at most 4e-7);
# this bound leaves a 5x margin (int8 activations are coarser than float16).
INT8_ACTIVATIONS_ATOL = 2e-2


def default_atol(dtype: np.dtype, name: str, least: float = 0.0) -> float:
    """The default tolerance of an output of ``dtype`` (0 for integers and booleans); float outputs get
    at least ``least`` (:data:`INT8_ACTIVATIONS_ATOL` for models that quantize activations).

    Raises:
        PreserveError: A floating-point type without a default (float8): ``--atol`` must say.
    """
    dtype = np.dtype(dtype)
    if dtype in DEFAULT_ATOL:
        return max(DEFAULT_ATOL[dtype], least)
    if dtype == np.bool_ or np.issubdtype(dtype, np.integer) or dtype == np.dtype(object):
        return 0.0
    raise PreserveError(f"output {name!r} is {dtype}, which has no default tolerance: give --atol")


def quantizes_activations(model: onnx.ModelProto) -> bool:
    """Whether a ``com.microsoft::MatMulNBits`` of the model has ``accuracy_level`` 4 (int8 activations)."""
    return any(
        node.op_type == "MatMulNBits"
        and node.domain == "com.microsoft"
        and any(a.name == "accuracy_level" and a.i == 4 for a in node.attribute)
        for _, graph in iter_graphs(model)
        for node in graph.node
    )


def _fmt(shape: Sequence[object] | None) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]" if shape is not None else "[?]"


def single_model(single: Path) -> tuple[Path, onnx.ModelProto]:
    """The single-device model file of ``--twin`` (a file, or a folder holding exactly one ``.onnx``) and
    its graph (weights not loaded).

    Raises:
        PreserveError: Missing, several models, or a model with collectives (a rank model).
    """
    single = resolve_single(single, "--twin")
    try:
        model = load_model(single)  # with load_model's checks: readable, external-data locations
    except PreserveError as exc:
        raise PreserveError(f"--twin {exc}") from exc
    for path, graph in iter_graphs(model):
        for node in graph.node:
            if is_collective(node):
                raise PreserveError(
                    f"--twin {single}: it has collectives ({node.op_type} '{node.name}'): it is a "
                    f"rank model, not the single-device model the ranks were sharded from"
                )
    return single, model


def _check_signatures(
    kind: str, ranks: Sequence[Sequence[TensorMeta]], single: Sequence[TensorMeta], single_path: Path
) -> None:
    """Same names and dtypes on every rank and in the single model."""
    want = {m.name: m for m in single}
    for rank, metas in enumerate(ranks):
        have = {m.name: m for m in metas}
        if set(have) != set(want):
            only_single = ", ".join(sorted(set(want) - set(have))) or "none"
            only_rank = ", ".join(sorted(set(have) - set(want))) or "none"
            raise PreserveError(
                f"--twin {single_path}: its {kind}s differ from rank {rank}'s (only in the single "
                f"model: {only_single}; only in the rank: {only_rank}): is it the model the "
                f"ranks were sharded from?"
            )
        for name, meta in have.items():
            if meta.dtype != want[name].dtype:
                raise PreserveError(
                    f"--twin {single_path}: {kind} {name!r} is {want[name].dtype} there but "
                    f"{meta.dtype} on rank {rank}"
                )


def input_split_axis(name: str, ranks: Sequence[TensorMeta], single: TensorMeta) -> int | None:
    """The axis on which the single model's input is the ranks' inputs concatenated (None: replicated).

    Compared on static dims only: the axis where a rank's size differs from the single model's, and
    the ranks' sizes on it add up to the single model's.

    Raises:
        PreserveError: The shapes are not a split over these ranks (e.g. another rank count).
    """
    if single.shape is None or any(m.shape is None for m in ranks):
        return None
    world = len(ranks)
    if any(len(m.shape) != len(single.shape) for m in ranks):
        raise PreserveError(
            f"input {name!r} has rank shape {_fmt(ranks[0].shape)} but {_fmt(single.shape)} in "
            f"the single model"
        )
    differing = [
        axis
        for axis, size in enumerate(single.shape)
        if isinstance(size, int)
        and any(isinstance(m.shape[axis], int) and m.shape[axis] != size for m in ranks)
    ]
    if not differing:
        return None
    if len(differing) == 1:
        axis = differing[0]
        sizes = [m.shape[axis] for m in ranks]
        if all(isinstance(s, int) for s in sizes) and sum(sizes) == single.shape[axis]:
            return axis
    raise PreserveError(
        f"input {name!r} is {_fmt(single.shape)} in the single model but {_fmt(ranks[0].shape)} "
        f"on rank 0 of {world}: not {world} shards of it on one axis (are these the ranks of a "
        f"{world}-way split of that model?)"
    )


def _bound(meta: TensorMeta, dims: Mapping[str, int]) -> TensorMeta:
    """``meta`` with the symbolic dims that ``dims`` knows replaced by their values."""
    if meta.shape is None:
        return meta
    return replace(meta, shape=tuple(dims.get(d, d) if isinstance(d, str) else d for d in meta.shape))


def twin_feeds(
    session: RankSession,
    twin: RankSession,
    shared: Mapping[str, np.ndarray],
    per_rank: Mapping[int, Mapping[str, np.ndarray]],
    rank_dims: Mapping[str, int] | None = None,
    single_dims: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """The single model's feeds from the ranks': replicated inputs as they are, shards concatenated.

    ``rank_dims`` / ``single_dims``: symbolic dims the rank graphs / the single graph fix (e.g. KV
    heads an export leaves symbolic in its inputs: ``DecodeLayout.fixed``), used to find the split axis.
    Inputs the ranks are not given are left out (the ranks' own run names them first).

    Raises:
        PreserveError: An input cannot be assembled (ranks fed different values where the single model
            has the ranks' shape, or shards that do not concatenate).
    """
    feeds: dict[str, np.ndarray] = {}
    for meta in twin.input_meta[0]:
        name = meta.name
        rank_metas = [
            _bound(next(m for m in metas if m.name == name), rank_dims or {}) for metas in session.input_meta
        ]
        values = [per_rank.get(r, {}).get(name, shared.get(name)) for r in range(session.world_size)]
        if any(v is None for v in values):
            continue
        axis = input_split_axis(name, rank_metas, _bound(meta, single_dims or {}))
        if axis is None:
            first = np.asarray(values[0])
            if any(
                np.asarray(v).shape != first.shape or np.asarray(v).tobytes() != first.tobytes()
                for v in values[1:]
            ):
                raise PreserveError(
                    f"input {name!r} is fed different values on different ranks but has the "
                    f"ranks' shape in the single model: no single feed matches them all"
                )
            feeds[name] = first
            continue
        try:
            feeds[name] = np.concatenate([np.asarray(v) for v in values], axis=axis)
        except ValueError as exc:
            shapes = ", ".join(_fmt(np.shape(v)) for v in values)
            raise PreserveError(
                f"input {name!r}: the ranks' feeds ({shapes}) do not concatenate on axis {axis}"
            ) from exc
    return feeds


def output_checks(
    step: int,
    expected: Mapping[str, np.ndarray],
    got: Sequence[Mapping[str, np.ndarray]],
    atol: float | None,
    least: float = 0.0,
) -> tuple[list[TwinCheck], set[str]]:
    """Checks every rank's outputs of one step against the single model's; also the sharded names.

    Tolerance: ``atol``, else the dtype's default but at least ``least`` (see :func:`default_atol`).

    An output whose shape equals the single model's on every rank is replicated (compared whole); one
    whose shape differs on exactly one axis, where the ranks' sizes add up to the single model's, is
    sharded (rank r compared with its slice, in rank order); anything else is a mismatch (diff inf).
    """
    checks: list[TwinCheck] = []
    sharded: set[str] = set()
    for name, want in expected.items():
        want = np.asarray(want)
        tol = default_atol(want.dtype, name, least) if atol is None else atol
        parts = [np.asarray(outputs[name]) for outputs in got]
        if all(p.shape == want.shape for p in parts):
            checks.extend(TwinCheck(step, r, name, max_abs_diff(p, want), tol) for r, p in enumerate(parts))
            continue
        axis = _output_axis(want.shape, [p.shape for p in parts])
        if axis is None:
            checks.extend(TwinCheck(step, r, name, math.inf, tol) for r in range(len(parts)))
            continue
        sharded.add(name)
        bounds = np.cumsum([p.shape[axis] for p in parts])[:-1]
        for r, (p, slice_) in enumerate(zip(parts, np.split(want, bounds, axis=axis))):
            checks.append(TwinCheck(step, r, name, max_abs_diff(p, slice_), tol))
    return checks, sharded


def _output_axis(full: tuple[int, ...], parts: list[tuple[int, ...]]) -> int | None:
    if any(len(p) != len(full) for p in parts):
        return None
    differing = [a for a in range(len(full)) if any(p[a] != full[a] for p in parts)]
    if len(differing) == 1 and sum(p[differing[0]] for p in parts) == full[differing[0]]:
        return differing[0]
    return None


def summarize(checks: Sequence[TwinCheck], outputs: int, sharded: set[str]) -> TwinComparison:
    """Folds every step's checks into one verdict."""
    worst: TwinCheck | None = None
    failing: dict[tuple[int, str], None] = {}
    for check in checks:
        if not check.ok:
            failing[(check.rank, check.name)] = None
        if worst is None or check.badness > worst.badness:
            worst = check
    return TwinComparison(
        passed=not failing,
        worst=worst,
        failing=tuple(sorted(failing)),
        outputs=outputs,
        sharded=tuple(sorted(sharded)),
    )


def failure_hint(model: onnx.ModelProto, opt_level: str) -> str:
    """Why a correctly sharded model can still fail, where the single model shows the known cause.

    Above ``basic``, onnxruntime's CPU provider turns ``DequantizeLinear -> MatMul`` into ``MatMulNBits``
    with ``accuracy_level`` 4 and 32-wide blocks, which quantizes the activations to int8 per block of
    32 along K; a rank's share of a row-parallel K need not start on such a block, so the two sides
    round differently (4.6e-2 on the logits of the committed llama-qdq sample). Explicit MatMulNBits
    weights split on whole K blocks do not have this problem (measured: float32-level differences at
    every accuracy level).
    """
    if opt_level in ("disable", "basic"):
        return ""
    for _, graph in iter_graphs(model):
        dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        if any(n.op_type == "MatMul" and dq_outputs.intersection(n.input) for n in graph.node):
            return (
                "at this --opt-level onnxruntime rewrites DequantizeLinear -> MatMul into MatMulNBits that "
                "quantize activations in 32-wide blocks, which a rank's share of K need not align with: "
                "compare with --opt-level basic"
            )
    return ""


def run_twin(
    path: Path,
    single: Path,
    *,
    inputs: Path | None = None,
    steps: int = 1,
    batch: int = 1,
    context: int = DEFAULT_CONTEXT,
    seed: int = 0,
    opt_level: str = "all",
    naming: PrefetchNaming = PrefetchNaming(),
    timeout_s: float = 60,
    atol: float | None = None,
    dims: Mapping[str, int] | None = None,
) -> RunResult:
    """Runs the rank models at ``path`` and the single-device model ``single`` in lock step and compares.

    Feeds come from ``inputs`` or are generated for the ranks (see :func:`generate_feeds`); the single
    model's are assembled from them (:func:`twin_feeds`). Every step's outputs are compared
    (:func:`output_checks`) within ``atol``, or the output dtype's default (:data:`DEFAULT_ATOL`; at least
    :data:`INT8_ACTIVATIONS_ATOL` when the single model's MatMulNBits quantize activations). Both
    sides take the next token from rank 0's logits. ``dims`` (``--dim``) bind symbolic dims of the
    generated feeds (see :func:`run_models`).

    Returns:
        A RunResult with the ranks' last outputs and ``twin`` set.

    Raises:
        PreserveError: Unreadable models, models that are not a split of ``single`` (inputs, outputs,
            dtypes or shapes), or a failing run.
    """
    if steps < 1:
        raise PreserveError(f"steps must be at least 1, got {steps}")
    if atol is not None and not atol >= 0:
        raise PreserveError(f"atol must be at least 0, got {atol}")
    start = time.perf_counter()
    models = resolve_ranks(path)
    single, graph = single_model(single)
    least = INT8_ACTIVATIONS_ATOL if quantizes_activations(graph) else 0.0
    kw = session_kwargs(naming, opt_level, timeout_s)
    with RankSession(list(models), **kw) as ranks:
        try:
            twin = RankSession(single, **kw)
        except PreserveError as exc:
            raise PreserveError(f"--twin {single}: {exc}") from exc
        with twin:
            _check_signatures("input", ranks.input_meta, twin.input_meta[0], single)
            _check_signatures("output", ranks.output_meta, twin.output_meta[0], single)
            if inputs is not None:
                shared, per_rank = load_feeds(inputs)
            else:
                shared, per_rank = generate_feeds(ranks, batch=batch, context=context, seed=seed, dims=dims)
            ranks_shared, ranks_own = dict(shared), {r: dict(f) for r, f in per_rank.items()}
            try:
                single_feeds = twin_feeds(
                    ranks, twin, shared, per_rank, layout_of(ranks).fixed, layout_of(twin).fixed
                )
            except PreserveError as exc:
                raise PreserveError(f"--twin {single}: {exc}") from exc
            checks: list[TwinCheck] = []
            sharded: set[str] = set()
            outputs: list[dict[str, np.ndarray]] = []
            for step in range(1, steps + 1):
                outputs = ranks.run(ranks_shared, ranks_own)
                try:
                    expected = twin.run(single_feeds, {})[0]
                except PreserveError as exc:
                    raise PreserveError(f"--twin {single}: {exc}") from exc
                step_checks, step_sharded = output_checks(step, expected, outputs, atol, least)
                checks += step_checks
                sharded |= step_sharded
                if step == steps:
                    break
                next_ids = next_token_ids(outputs)
                advance_feeds(ranks, ranks_shared, ranks_own, outputs, next_ids)
                twin_own = {0: single_feeds}
                advance_feeds(twin, {}, twin_own, [expected], next_ids)
                single_feeds = twin_own[0]
    comparison = summarize(checks, sum(len(o) for o in outputs), sharded)
    if not comparison.passed:
        comparison = replace(comparison, hint=failure_hint(graph, opt_level))
    return RunResult(tuple(models), outputs, None, steps, time.perf_counter() - start, twin=comparison)
