"""Cost model: what the prefetches are worth on a given accelerator (docs/design.md §6).

One decode step of one rank model is replayed as an event timeline with three tracks: *compute* (one
in-order stream: every operator in node order), *communication* (collectives) and *prefetch* (the
Prefetch chains, running on the memory system while their collective communicates). An operator starts
when its stream is free and its inputs are ready; a collective's consumers therefore wait for it. The
same engine runs three scenarios: the baseline (no prefetch), the plan (the bytes `optimize` would
prefetch) and the upper bound (every window filled: all of its candidates, no budget).

Equations (seconds, bytes, FLOP; ``s = model_ranks / ranks`` re-shards weights and KV-cache when the
rank count differs from the export's)::

    operator    t_op = max(s * F / peak_flops, B_hbm / hbm_bw + B_l2 / l2_bw) + launch_overhead
    collective  t_c  = alpha + 2 (p - 1) / p * M / link_bw        ring AllReduce, p ranks, M message bytes
    prefetch    a window's chain of P bytes starts with its collective at t0 and streams at hbm_bw until
                the window's first consumer starts at t1:
                    moved = min(P, hbm_bw * (t1 - t0), L2)
                ``moved`` covers the chain's first bytes (consumption order); consumers read those at
                l2_bw and the rest of their weights and KV-cache at hbm_bw
    activations bytes an operator reads or writes that are neither weights nor KV-cache go at l2_bw when
                they fit in the L2 share prefetching leaves, (1 - l2_fraction) * L2, else at hbm_bw
    step        the end of the last event;  speedup = step(baseline) / step(plan)

What a step reads (docs/design.md §4.7-4.8): a GroupQueryAttention KV-cache read counts its live bytes
(``--batch`` sequences of ``--context`` positions, ``min(context, W)`` on a windowed layer, at most the
buffer's length), not the buffer; an expert bank counts the share ``f(T) = 1 - (1 - k/E)^T`` of its
bytes that T tokens routed uniformly to their top k of E experts read. A link moves its bytes in full
but only the bytes the consumers read are credited: all of a live-range link, ``f(T)`` of a bank link,
and of a static (two-input) KV link the live bytes inside its raw range. A bank link below its
``min_tokens`` moves nothing in the ``preserve`` scenario (the runtime skips the hint).

``hbm_bw`` is the achieved bandwidth (``hbm_bw x hbm_efficiency``) and ``L2`` the usable share
(``l2_bytes x l2_usable_fraction``) of the profile (docs/design.md §6). Validity range: a window whose
plan carries ``max_tokens`` (the roofline bound of its consumers, ``passes/_roofline.py``) and whose
step has more tokens than that moves nothing in the ``preserve`` scenario, as the runtime skips the
hints; the upper bound ignores the limit (it is the physics, not the policy).

F and B come from the graph: weights from initializer metadata (through constant-only chains, as the
planner resolves them), KV-cache from the graph inputs with batch and context bound, activations from a
small shape propagation (symbolic batch -> ``batch``, past/total sequence -> ``context``, other
sequence axes -> 1). Linear layers cost ``2 * rows * K * N`` FLOP, attention ``2 * heads/kv_heads * KV
elements``, everything else one FLOP per output element. Operators whose inputs are all constant are
folded (cost nothing); KV-cache outputs (``present``) are written in place and cost nothing; an ``If``
runs its then_branch (onnxruntime's merged decoders put the decoder with past there), Loop/Scan bodies
run once.

Budgets follow docs/design.md §4.3 with the planner's own fill rule, so with the export's rank count
``estimate`` prefetches exactly what ``optimize`` inserts.
"""
