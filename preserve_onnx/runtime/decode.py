"""A greedy decode loop over rank sessions: each step's KV-cache outputs become the next step's inputs.

Invariant: the loop only moves tensors between steps (``present.X`` -> ``past_key_values.X``) and
advances the bookkeeping inputs (attention mask, position ids, next token); it computes nothing
itself, so two models that run bit-identical for one step stay bit-identical for every step.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from preserve_onnx.errors import PreserveError
from preserve_onnx.runtime.feeds import layout_of
from preserve_onnx.runtime.session import Ranks


def _next_feeds(feeds: dict[str, np.ndarray], next_ids: np.ndarray | None) -> None:
    """Advances the bookkeeping inputs of one feed dict in place by one token."""
    if "attention_mask" in feeds:
        mask = feeds["attention_mask"]
        ones = np.ones(mask.shape[:-1] + (1,), dtype=mask.dtype)
        feeds["attention_mask"] = np.concatenate([mask, ones], axis=-1)
    if "position_ids" in feeds:
        pos = feeds["position_ids"]
        feeds["position_ids"] = (pos[..., -1:] + 1).astype(pos.dtype)
    for name in ("seqlens_k", "total_sequence_length"):
        if name in feeds:
            feeds[name] = (feeds[name] + 1).astype(feeds[name].dtype)
    if next_ids is not None and "input_ids" in feeds:
        ids = feeds["input_ids"]
        feeds["input_ids"] = next_ids.reshape(ids.shape[0], 1).astype(ids.dtype)


def run_steps(
    session: Ranks,
    shared: Mapping[str, np.ndarray],
    per_rank: Mapping[int, Mapping[str, np.ndarray]],
    steps: int,
) -> list[dict[str, np.ndarray]]:
    """Runs ``steps`` greedy decode steps and returns every rank's outputs of the last one.

    After each step: every ``present*`` output is fed back into its KV-cache input on the same rank,
    ``attention_mask`` grows by one column of ones, ``position_ids`` (and GroupQueryAttention's
    ``seqlens_k`` / ``total_sequence_length``) advance by one, and ``input_ids`` becomes the argmax of
    rank 0's ``logits`` at the last position (the same ids when there are no logits). The caller's
    dicts are not modified.

    Args:
        session: The rank sessions.
        shared: Inputs for every rank (see :func:`generate_feeds`).
        per_rank: Per-rank inputs.
        steps: Number of steps, at least 1.

    Returns:
        One dict of outputs per rank from the last step.

    Raises:
        PreserveError: ``steps`` < 1 or a step fails.
    """
    if steps < 1:
        raise PreserveError(f"steps must be at least 1, got {steps}")
    shared_now = dict(shared)
    ranks_now = {r: dict(f) for r, f in per_rank.items()}
    outputs: list[dict[str, np.ndarray]] = []
    for step in range(steps):
        outputs = session.run(shared_now, ranks_now)
        if step == steps - 1:
            break
        advance_feeds(session, shared_now, ranks_now, outputs, next_token_ids(outputs))
    return outputs


def next_token_ids(outputs: list[dict[str, np.ndarray]]) -> np.ndarray | None:
    """The greedy next tokens: argmax of rank 0's ``logits`` at the last position (None without logits)."""
    logits = outputs[0].get("logits")
    if logits is None or logits.ndim < 2:
        return None
    last = logits[:, -1, :] if logits.ndim == 3 else logits
    return np.argmax(last.astype(np.float32), axis=-1)


def advance_feeds(
    session: Ranks,
    shared_now: dict[str, np.ndarray],
    ranks_now: dict[int, dict[str, np.ndarray]],
    outputs: list[dict[str, np.ndarray]],
    next_ids: np.ndarray | None,
) -> None:
    """Turns one step's feeds into the next step's, in place (see :func:`run_steps`)."""
    _next_feeds(shared_now, next_ids)
    feedback = layout_of(session).feedback
    # Under MPI a process holds only its own rank's outputs (MpiRankSession.local_ranks).
    for rank in getattr(session, "local_ranks", range(session.world_size)):
        own = ranks_now.setdefault(rank, {})
        _next_feeds(own, next_ids)
        for out_name, in_name in feedback.items():  # present -> past, by structure (docs/design.md §2)
            if out_name in outputs[rank]:
                own[in_name] = outputs[rank][out_name]
