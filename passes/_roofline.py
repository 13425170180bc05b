"""Where a window's prefetch stops paying: the largest tokens per step at which it still saves time.

A prefetch shortens an operator only while the operator waits on memory. The roofline says when that
stops (docs/design.md §6): a consumer that reads ``W`` bytes of weights and does ``F`` FLOP per token
is memory-bound while ``tokens * F / peak_flops < W / achieved_hbm_bw``, i.e. up to
``peak_flops * W / (F * achieved_hbm_bw)`` tokens (``HardwareProfile.roofline_tokens``). For a linear
layer ``F = 2 x weight elements``, so the bound is ``peak_flops * bytes_per_weight / (2 * achieved HBM
bw)``: about 330 tokens for fp16 on H100, a quarter of that for 4-bit weights. Attention and every
consumer that reads KV-cache stay memory-bound at any batch (their bytes grow with the tokens too), so
a window prefetching for one of them has no limit.

A window's limit is the largest over the consumers it prefetches for (while any of them is still
memory-bound the prefetch saves time); 0 = no limit. Tokens per step are the product of the anchor's
dims except the last (batch x sequence), what a runtime sees when the Prefetch runs.

Values never change: the limit only tells a runtime when to skip the cache hint. Reads metadata only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx

from preserve_onnx.graph.index import MS_DOMAIN, Scope, is_default_domain, node_label
from preserve_onnx.hardware import HardwareProfile
from preserve_onnx.passes.build_windows import Window
from preserve_onnx.passes.collect_candidates import Candidate

# (domain, op type) -> the input slot holding the weight operand, for the linear layers.
_LINEAR_WEIGHT_SLOT = {("", "MatMul"): 1, ("", "Gemm"): 1, (MS_DOMAIN, "MatMulNBits"): 1}


def window_max_tokens(
    scope: Scope, window: Window, candidates: Sequence[Candidate], prefetched: Sequence, hw: HardwareProfile
) -> int:
    """The window's ``max_tokens`` (0 = no limit) for the prefetches ``prefetched`` (anything with a
    ``consumer`` label) planned from ``candidates``."""
    consumers = dict.fromkeys(p.consumer for p in prefetched)
    if not consumers:
        return 0
    nodes = {node_label(scope.graph.node[i], i): scope.graph.node[i] for i in window.nodes}
    limit = 0.0
    for label in consumers:
        node = nodes.get(label)
        reads = [c for c in candidates if c.consumer == label]
        tokens = consumer_tokens(scope, node, reads, hw) if node is not None else math.inf
        limit = max(limit, tokens)
        if math.isinf(limit):
            return 0
    return max(1, int(limit))


def consumer_tokens(
    scope: Scope, node: onnx.NodeProto, reads: Sequence[Candidate], hw: HardwareProfile
) -> float:
    """Tokens per step up to which ``node`` stays memory-bound (``inf``: always)."""
    domain = "" if is_default_domain(node.domain) else node.domain
    slot = _LINEAR_WEIGHT_SLOT.get((domain, node.op_type))
    if slot is None or any(c.kind == "kv_cache" for c in reads):
        return math.inf  # attention / KV-cache reads: bytes grow with the tokens, never compute-bound
    if domain == "" and node.op_type == "MatMul" and not any(c.slot == 1 for c in reads):
        slot = 0  # the constant operand is on the left
    elements = _weight_elements(scope, node, slot, reads)
    weight_bytes = sum(c.nbytes for c in reads if c.kind == "weight")
    return hw.roofline_tokens(weight_bytes, 2.0 * elements) if elements else math.inf


def _weight_elements(scope: Scope, node: onnx.NodeProto, slot: int, reads: Sequence[Candidate]) -> int:
    """Elements of the weight operand (K x N): MatMulNBits' attributes, else its largest root tensor."""
    if node.op_type == "MatMulNBits":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return int(attrs.get("K", 0)) * int(attrs.get("N", 0))
    roots = [scope.initializers[c.tensor] for c in reads if c.slot == slot and c.tensor in scope.initializers]
    return max((math.prod(t.dims) for t in roots), default=0)
