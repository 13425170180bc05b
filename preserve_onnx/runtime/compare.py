"""Comparisons of runs: bit-exact (``run --against``: every rank, every output) and the results of a
twin run (``run --twin``: within tolerances by dtype, made by :mod:`preserve_onnx.runtime.twin`).

Invariant: ``identical`` is True only when both runs have the same ranks and output names and every
pair of arrays has the same dtype, shape and bytes. Bytes, not values: NaN equals NaN of the same bit
pattern and -0.0 differs from 0.0, which is what "the optimized model runs bit-identical" means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    """Result of :func:`compare_outputs`.

    Attributes:
        identical: Every output of every rank is byte-identical (same dtype and shape too).
        worst: ``(rank, name, max_abs_diff)`` of the pair that differs most (``inf`` for a missing
            output, a shape mismatch or a NaN on one side only); when identical, the first pair with
            a difference of 0.0; None when there are no outputs at all.
        differing: ``(rank, name)`` of every pair that is not byte-identical, in rank and name order.
    """

    identical: bool
    worst: tuple[int, str, float] | None
    differing: tuple[tuple[int, str], ...] = ()


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == np.dtype(object):
        return bool(np.array_equal(a, b))
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute elementwise difference; ``inf`` for shape mismatches or NaN on one side only.

    Args:
        a: First array.
        b: Second array.

    Returns:
        The difference as a Python float (0.0 for empty arrays).
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    if a.dtype == np.dtype(object) or b.dtype == np.dtype(object):
        return 0.0 if np.array_equal(a, b) else math.inf
    x = a.astype(np.float64)
    y = b.astype(np.float64)
    nan_x, nan_y = np.isnan(x), np.isnan(y)
    if np.any(nan_x != nan_y):
        return math.inf
    with np.errstate(invalid="ignore"):
        diff = np.abs(x - y)
    diff[nan_x & nan_y] = 0.0
    diff[(x == y)] = 0.0  # equal infinities
    return float(np.nanmax(diff))


def compare_outputs(
    a: Sequence[Mapping[str, np.ndarray]], b: Sequence[Mapping[str, np.ndarray]]
) -> Comparison:
    """Compares two runs' outputs byte for byte.

    Args:
        a: Per rank, output name to array (e.g. the original model's run).
        b: The same for the other run (e.g. the optimized model's run).

    Returns:
        A :class:`Comparison`.
    """
    worst: tuple[int, str, float] | None = None
    differing: list[tuple[int, str]] = []
    for rank in range(max(len(a), len(b))):
        left = a[rank] if rank < len(a) else {}
        right = b[rank] if rank < len(b) else {}
        for name in sorted(set(left) | set(right)):
            if name in left and name in right:
                x, y = np.asarray(left[name]), np.asarray(right[name])
                same = _same_bytes(x, y)
                diff = 0.0 if same else max_abs_diff(x, y)
            else:
                same, diff = False, math.inf
            if not same:
                differing.append((rank, name))
            if worst is None or diff > worst[2]:
                worst = (rank, name, diff)
    return Comparison(identical=not differing, worst=worst, differing=tuple(differing))


@dataclass(frozen=True)
class TwinCheck:
    """One output of one rank at one step against the single model's (its slice when sharded)."""

    step: int  # 1-based
    rank: int
    name: str
    diff: float  # max abs difference; inf for a shape mismatch or a NaN on one side only
    atol: float

    @property
    def ok(self) -> bool:
        return self.diff <= self.atol

    @property
    def badness(self) -> float:
        """How far the difference is into its tolerance (> 1: beyond it)."""
        if self.atol > 0:
            return self.diff / self.atol
        return 0.0 if self.diff == 0 else math.inf


@dataclass(frozen=True)
class TwinComparison:
    """Result of a twin run.

    Attributes:
        passed: Every output of every rank at every step is within its tolerance.
        worst: The check furthest into (or beyond) its tolerance; the first one on a tie.
        failing: ``(rank, name)`` of every output beyond its tolerance at some step, in order.
        outputs: Outputs compared per step (every rank's).
        sharded: Names of the outputs that are split over the ranks (the others are replicated).
    """

    passed: bool
    worst: TwinCheck | None
    failing: tuple[tuple[int, str], ...]
    outputs: int
    sharded: tuple[str, ...]
    hint: str = ""  # a known cause of differences that is not the sharding's (see :func:`failure_hint`)
