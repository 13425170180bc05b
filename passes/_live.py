"""What a decode step reads of a KV-cache and of an expert bank (docs/design.md §3 "Live ranges", §4.7-4.8).

**KV-cache live ranges.** onnxruntime-genai runs its builder's GroupQueryAttention exports with one
buffer for past and present: the buffer is ``max_length`` long on its sequence axis and only the first
``seqlens_k[b]`` positions of each (batch, head) block hold tokens; a layer with ``local_window_size``
W > 0 reads only the last W of them. At the planning point every sequence holds ``--context``
positions, so a block's live positions are ``[max(0, P - W), P)`` with ``P = min(context, buffer
length)`` (W = 0: from 0). A buffer's length is its sequence dim as the graph fixes it or ``--dim``
binds it, else ``--context``; a ``sliding_window_cache=1`` node's buffer is window-sized and
cache-relative, so its window is 0 and its capacity bounds P.

**Expert banks.** A mixture-of-experts op routes each token to its top ``k`` of ``E`` experts; with
routing uniform and tokens independent, a step of T tokens reads about ``f(T) = 1 - (1 - k/E)^T`` of
each ``[E, ...]`` bank. A bank is worth planning in first-use order when ``f(T) >= 0.5`` at the planning
point, and a runtime skips its hint below ``min_tokens``, the smallest T with ``f(T) >= 0.5``.

Reads metadata only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from preserve_onnx.graph.dims import Sizing
from preserve_onnx.graph.index import MS_DOMAIN, attr

# The share of a bank a step must read before prefetching the bank beats the rest of the window.
EXPERT_SHARE = 0.5


def expert_share(k: int, experts: int, tokens: int) -> float:
    """``f(T) = 1 - (1 - k/E)^T``: the expected share of a bank's ``experts`` that ``tokens`` tokens routed
    uniformly to their top ``k`` read (1.0 when ``k >= E``)."""
    if experts <= 0 or k >= experts:
        return 1.0
    return 1.0 - (1.0 - k / experts) ** max(0, tokens)


def expert_min_tokens(k: int, experts: int) -> int:
    """The smallest T with ``f(T) >= 0.5`` (1 when one token already reads half the bank)."""
    if experts <= 0 or 2 * k >= experts:
        return 1
    t = max(1, math.ceil(math.log(1.0 - EXPERT_SHARE) / math.log(1.0 - k / experts)))
    while t > 1 and expert_share(k, experts, t - 1) >= EXPERT_SHARE:  # float rounding at the boundary
        t -= 1
    while expert_share(k, experts, t) < EXPERT_SHARE:
        t += 1
    return t


def kv_window(node: onnx.NodeProto) -> int:
    """The ``window`` of a GroupQueryAttention node's KV links: its ``local_window_size`` when > 0 and the
    node keeps a full-length buffer; 0 otherwise (no window, or a ``sliding_window_cache=1`` node whose
    window-sized buffer holds exactly the positions it reads)."""
    if node.domain != MS_DOMAIN or node.op_type != "GroupQueryAttention":
        return 0
    w = int(attr(node, "local_window_size", -1))
    return w if w > 0 and not int(attr(node, "sliding_window_cache", 0)) else 0


def buffer_length(vi: onnx.ValueInfoProto, seq_axis: int, sizing: Sizing) -> int:
    """A KV buffer's length on ``seq_axis`` as :func:`preserve_onnx.graph.dims.bind_shape` binds it: the
    fixed dim, else ``--dim``, else ``--context``."""
    dims = vi.type.tensor_type.shape.dim
    if not 0 <= seq_axis < len(dims):
        return sizing.context
    d = dims[seq_axis]
    if d.HasField("dim_value"):
        return d.dim_value
    return int(sizing.dims.get(d.dim_param, sizing.context))


@dataclass(frozen=True)
class KvBuffer:
    """A GroupQueryAttention KV buffer at the planning point: ``capacity`` positions of ``row`` bytes each
    (one position of every (batch, head) block), of which ``[start, end)`` hold the tokens a step reads."""

    capacity: int
    row: int
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.capacity * self.row

    @property
    def live_bytes(self) -> int:
        return (self.end - self.start) * self.row


def kv_buffer(
    node: onnx.NodeProto, vi: onnx.ValueInfoProto, seq_axis: int, sizing: Sizing, raw: int
) -> KvBuffer:
    """The buffer behind a GroupQueryAttention KV input whose bytes at ``sizing`` are ``raw``: its length
    as :func:`buffer_length` binds it; a ``sliding_window_cache=1`` node's buffer is window-sized, so a
    length that neither the graph nor ``--dim`` fixes is its ``local_window_size``."""
    bound = buffer_length(vi, seq_axis, sizing)
    capacity = bound
    dims = vi.type.tensor_type.shape.dim
    w = int(attr(node, "local_window_size", -1))
    if (
        int(attr(node, "sliding_window_cache", 0))
        and w > 0
        and 0 <= seq_axis < len(dims)
        and not dims[seq_axis].HasField("dim_value")
        and dims[seq_axis].dim_param not in sizing.dims
    ):
        capacity = w
    start, end = live_positions(capacity, sizing.context, kv_window(node))
    return KvBuffer(capacity, raw // bound if bound else 0, start, end)


def live_positions(length: int, context: int, window: int) -> tuple[int, int]:
    """``(start, end)``: the positions of every (batch, head) block that hold the last ``window`` (0: all)
    of ``context`` tokens in a buffer of ``length``."""
    end = min(context, length)
    return (max(0, end - window) if window > 0 else 0), end


@dataclass(frozen=True)
class KvLayout:
    """A KV buffer at the planning point: ``blocks`` blocks (the axes before the sequence axis) of
    ``length`` positions of ``position_bytes`` each; positions ``[start, end)`` of every block are live."""

    blocks: int
    length: int
    position_bytes: int
    start: int
    end: int

    @property
    def raw_bytes(self) -> int:
        return self.blocks * self.length * self.position_bytes

    @property
    def live_bytes(self) -> int:
        return self.blocks * (self.end - self.start) * self.position_bytes

    def live_in_raw(self, offset: int, size: int) -> int:
        """Live bytes inside the raw byte range ``[offset, offset + size)`` of the buffer (what a static
        two-input link over that range fetches that a step reads)."""
        block = self.length * self.position_bytes
        if block <= 0 or size <= 0 or self.end <= self.start:
            return 0
        lo, hi = offset, min(offset + size, self.raw_bytes)
        live_lo, live_hi = self.start * self.position_bytes, self.end * self.position_bytes
        total = 0
        first, last = lo // block, (hi - 1) // block
        full = max(0, last - first - 1)  # blocks strictly between the first and the last
        total += full * (live_hi - live_lo)
        for b in {first, last}:
            base = b * block
            total += max(0, min(hi, base + live_hi) - max(lo, base + live_lo))
        return total
