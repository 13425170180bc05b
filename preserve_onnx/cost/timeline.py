"""The cost model's event timeline: compute, communication and prefetch tracks of one decode step
(the model's equations: :mod:`preserve_onnx.cost`)."""

from __future__ import annotations

from dataclasses import dataclass

from preserve_onnx.cost.analysis import Analysis, Link
from preserve_onnx.hardware import HardwareProfile


@dataclass(frozen=True)
class Event:
    """One span of a timeline (Chrome trace 'X' event)."""

    track: str  # one of TRACKS
    name: str
    category: str  # op type, or "prefetch"
    start: float
    duration: float
    args: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Timeline:
    scenario: str  # "baseline" | "preserve" | "upper bound"
    step_s: float
    durations: tuple[float, ...]  # per Analysis.ops position (0 for aliases)
    moved: tuple[int, ...]  # per window: bytes in L2 when its consumers start
    events: tuple[Event, ...]


def simulate(
    analysis: Analysis,
    hw: HardwareProfile,
    chains: tuple[tuple[tuple, ...], ...],
    ranks: int,
    l2_fraction: float,
    scenario: str,
) -> Timeline:
    """Replay the step: ``chains[k]`` is window k's prefetch chain in chain order, as :class:`Link` s (or
    ``(tensor, bytes)`` pairs: every byte useful, no ``min_tokens``)."""
    scale = analysis.model_ranks / ranks
    hbm_bw, l2_capacity = hw.effective_hbm_bw, hw.usable_l2_bytes
    act_limit = (1.0 - l2_fraction) * l2_capacity
    window_of: dict[int, int] = {}
    for k, w in enumerate(analysis.windows):
        for pos in w.op_positions:
            window_of[pos] = k
    starts = {w.position: k for k, w in enumerate(analysis.windows)}
    ready: dict[str, float] = {}
    compute_free = comm_free = 0.0
    t0: dict[int, float] = {}
    hits: dict[int, dict[str, int]] = {}
    moved = [0] * len(analysis.windows)
    durations = [0.0] * len(analysis.ops)
    events: list[Event] = []
    for pos, op in enumerate(analysis.ops):
        t_in = max((ready.get(i, 0.0) for i in op.inputs), default=0.0)
        if op.kind == "alias":
            for out in op.outputs:
                ready[out] = t_in
            continue
        if op.kind == "collective":
            start = max(comm_free, t_in)
            dur = hw.collective_time(op.message_bytes, ranks)
            comm_free = start + dur
            durations[pos] = dur
            events.append(
                Event(
                    "communication",
                    op.name,
                    op.op_type,
                    start,
                    dur,
                    (("message_bytes", op.message_bytes), ("ranks", ranks)),
                )
            )
            for out in op.outputs:
                ready[out] = comm_free
            if pos in starts:
                t0[starts[pos]] = start
            continue
        start = max(compute_free, t_in)
        k = window_of.get(pos)
        if k is not None and k in t0 and analysis.windows[k].first_consumer == pos:
            # The chain streamed from t0 until now; what it moved is what the consumers find in L2.
            chain = tuple(_link(link) for link in chains[k])
            w = analysis.windows[k]
            if scenario == "preserve" and 0 < w.max_tokens < w.tokens:
                chain = ()  # outside the validity range the runtime skips the hints (docs/design.md §3)
            if scenario == "preserve":  # expert banks below min_tokens: skipped the same way
                chain = tuple(link for link in chain if link.min_tokens <= w.tokens)
            total = sum(link.nbytes for link in chain)
            amount = int(min(total, hbm_bw * (start - t0[k]), l2_capacity))
            moved[k] = amount
            hits[k] = _take_prefix(chain, amount)
            if amount:
                events.append(
                    Event(
                        "prefetch",
                        f"{analysis.windows[k].collective}/Prefetch",
                        "prefetch",
                        t0[k],
                        amount / hbm_bw,
                        (("bytes", amount), ("planned_bytes", total)),
                    )
                )
        in_l2 = hits.get(k, {}) if k is not None else {}
        hbm = float(op.fixed_bytes)
        l2 = 0.0
        for r in op.reads:
            size = r.nbytes * scale
            cached = min(size, in_l2.get(r.tensor, 0))
            l2 += cached
            hbm += size - cached
        if op.act_bytes <= act_limit:
            l2 += op.act_bytes
        else:
            hbm += op.act_bytes
        flops = op.flops * (scale if op.reads else 1.0)
        dur = max(flops / hw.peak_flops, hbm / hbm_bw + l2 / hw.l2_bw) + hw.launch_overhead
        durations[pos] = dur
        compute_free = start + dur
        events.append(
            Event(
                "compute",
                op.name,
                op.op_type,
                start,
                dur,
                (("hbm_bytes", int(hbm)), ("l2_bytes", int(l2)), ("flops", int(flops))),
            )
        )
        for out in op.outputs:
            ready[out] = compute_free
    step = max([compute_free, comm_free, *ready.values()], default=0.0)
    return Timeline(scenario, step, tuple(durations), tuple(moved), tuple(events))


def _link(link: tuple) -> Link:
    return link if isinstance(link, Link) else Link(link[0], link[1], link[1])


def _take_prefix(chain: tuple[Link, ...], amount: int) -> dict[str, int]:
    """Tensor -> bytes the consumers find in L2 once the chain's first ``amount`` bytes moved: each link's
    useful share of what it moved."""
    got: dict[str, int] = {}
    for link in chain:
        if amount <= 0:
            break
        take = min(link.nbytes, amount)
        useful = link.useful if take == link.nbytes else int(link.useful * take / link.nbytes)
        got[link.tensor] = got.get(link.tensor, 0) + useful
        amount -= take
    return got
