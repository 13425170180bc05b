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

Budgets follow docs/design.md §4.3 with the planner's own fill rule, so with the export's rank count ``estimate``
prefetches exactly what ``optimize`` inserts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import onnx
from onnx import TensorProto, numpy_helper

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.errors import PreserveError, UsageError
from preserve_onnx.hardware import HardwareProfile
from preserve_onnx.model_io import load_model, resolve_ranks
from preserve_onnx.optimizer import plan_model
from preserve_onnx.graph.dims import Sizing, bind_lenient, decode_layout, message_bytes
from preserve_onnx.graph.index import MS_DOMAIN, Scope, attr, dtype_bits, is_collective, is_default_domain, \
    iter_scopes, node_label
from preserve_onnx.graph.structure import is_attention, kv_cache_paths, op_key, reads_bytes
from preserve_onnx.passes._live import KvLayout, expert_share, kv_buffer
from preserve_onnx.passes.collect_candidates import Candidate, consumer_slots, resolve_roots, structural_kv_axes
from preserve_onnx.passes.plan_prefetches import fill_window  # the planner's own rule
from preserve_onnx.passes.strip_prefetches import StripPrefetchesPass

TRACKS = ("compute", "communication", "prefetch")
_LINEAR = {"MatMul", "Gemm", "MatMulNBits"}
_SAME_SHAPE = {"Cast", "CastLike", "Identity", "Relu", "Sigmoid", "Tanh", "Gelu", "FastGelu", "QuickGelu",
               "Erf", "Neg", "Sqrt", "Softmax", "LayerNormalization", "SimplifiedLayerNormalization",
               "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
               "DequantizeLinear", "QuantizeLinear", "Dropout", "BiasGelu"}


# ----------------------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Read:
    """A weight or KV-cache tensor an operator reads from HBM (or from L2 once prefetched): ``nbytes`` are
    the bytes the step reads (live bytes of a GroupQueryAttention KV-cache, the expected share of an
    expert bank)."""

    tensor: str
    nbytes: int
    kind: str  # "weight" | "kv_cache"


class Link(NamedTuple):
    """One link of a window's chain in the timeline: ``nbytes`` moved, of which ``useful`` are bytes the
    consumers read (docs/design.md §4.7-4.8); skipped below ``min_tokens`` tokens per step."""

    tensor: str
    nbytes: int
    useful: int
    min_tokens: int = 0


@dataclass(frozen=True)
class Op:
    """One operator of the decode step, with what it costs before any rank re-sharding."""

    graph: str
    index: int
    name: str
    op_type: str
    kind: str  # "compute" | "collective" | "alias" (an If/Loop output taking its branch's value)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    flops: float = 0.0
    reads: tuple[Read, ...] = ()  # weights / KV-cache in consumer slots: prefetch targets
    fixed_bytes: int = 0  # other constant bytes (norm scales, gathered embedding rows): always HBM
    act_bytes: int = 0  # activations read and written
    message_bytes: int = 0  # collectives


@dataclass(frozen=True)
class WindowSpec:
    """A planned collective: its position in the step, its consumers, its budget and candidates."""

    graph: str
    collective: str
    position: int  # index of the collective in Analysis.ops
    op_positions: tuple[int, ...]  # the window's operators
    first_consumer: int | None  # position of the first operator with a Read (None: nothing to read)
    message_bytes: int
    window: object  # the planner's Window
    candidates: tuple[Candidate, ...]
    max_tokens: int = 0  # the plan's validity range (0 = no limit); above it the runtime skips the hints
    tokens: int = 1  # tokens per step at this batch: the anchor's dims except the last


@dataclass(frozen=True)
class Analysis:
    """A rank model's decode step at one batch/context: operators and planned windows."""

    source: str
    model_ranks: int
    batch: int
    context: int
    ops: tuple[Op, ...]
    windows: tuple[WindowSpec, ...]
    config: OptimizeConfig
    # What a step reads of a tensor when it reads less than all of it (docs/design.md §4.7-4.8): a
    # GroupQueryAttention KV buffer's layout (its live positions), an expert bank's read share.
    kv_layouts: Mapping[str, KvLayout] = field(default_factory=dict)
    shares: Mapping[str, float] = field(default_factory=dict)

    def useful(self, tensor: str, offset: int, size: int, live_range: bool, scale: float = 1.0) -> int:
        """Of a link over bytes ``[offset, offset + size)`` of ``tensor`` (live bytes with ``live_range``,
        else the tensor's raw bytes; both already re-sharded by ``scale``), the bytes a step reads."""
        if tensor in self.shares:
            return int(size * self.shares[tensor])
        layout = self.kv_layouts.get(tensor)
        if layout is None or live_range or layout.live_bytes == layout.raw_bytes:
            return size
        return int(layout.live_in_raw(int(offset / scale), int(size / scale)) * scale)


@dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...] | None
    numel: int
    dtype: int


def _bytes(info: _Info | None) -> int:
    if info is None:
        return 0
    try:
        bits = dtype_bits(info.dtype, "tensor")
    except PreserveError:
        bits = 32
    return (info.numel * bits + 7) // 8


def _input_info(vi: onnx.ValueInfoProto, values: Mapping[str, int], batch: int) -> _Info:
    """A graph input's shape at the decode step: fixed dims, then ``values`` (``--dim``, the dims the graph
    fixes, the KV-cache roles: :meth:`DecodeLayout.values`), then batch on axis 0 and 1 elsewhere."""
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return _Info(None, batch, tt.elem_type or TensorProto.FLOAT)
    dims = bind_lenient((d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim),
                        values, batch)
    return _Info(dims, math.prod(dims), tt.elem_type)


def _small_int_constant(t: TensorProto) -> tuple[int, ...] | None:
    """The values of a small inline int64 tensor (a Reshape shape); never external weight data."""
    if t.data_type != TensorProto.INT64 or t.data_location == TensorProto.EXTERNAL or math.prod(t.dims) > 16:
        return None
    return tuple(int(v) for v in numpy_helper.to_array(t).reshape(-1))


def _broadcast(infos: list[_Info]) -> _Info:
    known = [i for i in infos if i is not None]
    if not known:
        return _Info(None, 0, TensorProto.FLOAT)
    big = max(known, key=lambda i: i.numel)
    shapes = [i.shape for i in known]
    if all(s is not None for s in shapes):
        rank = max(len(s) for s in shapes)
        padded = [(1,) * (rank - len(s)) + s for s in shapes]
        dims = tuple(max(col) for col in zip(*padded))
        return _Info(dims, math.prod(dims), known[0].dtype)
    return _Info(None, big.numel, known[0].dtype)


class _Walker:
    """Flattens the step into Ops and propagates element counts (a decode step, batch/context bound)."""

    def __init__(self, model: onnx.ModelProto, sizing: Sizing, qdq_weights: bool):
        self.batch, self.context, self.qdq_weights = sizing.batch, sizing.context, qdq_weights
        self.sizing = sizing
        self.scopes = {s.path: s for s in iter_scopes(model)}
        self.info: dict[str, _Info] = {}
        self.const: set[str] = set()
        self.ops: list[Op] = []
        # Plain-operator KV-cache (docs/design.md §2): tensor carrying the cache's bytes -> its path.
        self.kv_alias = {alias: path for path in kv_cache_paths(model.graph).values() for alias in path.aliases}
        self.kv_read: set[str] = set()  # structural KV inputs already read in this step
        self.kv_layouts: dict[str, KvLayout] = {}  # GroupQueryAttention KV buffers: their live positions
        self.shares: dict[str, float] = {}  # expert banks: the share of their bytes a step reads
        values = decode_layout(model).values(batch=sizing.batch, context=sizing.context, dims=sizing.dims)
        for vi in model.graph.input:
            self.info[vi.name] = _input_info(vi, values, sizing.batch)

    def walk(self, path: str) -> None:
        scope = self.scopes[path]
        for t in scope.graph.initializer:
            self.info[t.name] = _Info(tuple(t.dims), math.prod(t.dims), t.data_type)
            self.const.add(t.name)
        for index, node in enumerate(scope.graph.node):
            self._node(scope, index, node)

    def _node(self, scope: Scope, index: int, node: onnx.NodeProto) -> None:
        label = node_label(node, index)
        ins = tuple(i for i in node.input if i)
        outs = tuple(o for o in node.output if o)
        default = is_default_domain(node.domain)
        if default and node.op_type in ("If", "Loop", "Scan"):
            branch_attr = "then_branch" if node.op_type == "If" else "body"
            sub = f"{scope.path}/{label}:{branch_attr}" if scope.path else f"{label}:{branch_attr}"
            branch = self.scopes[sub].graph
            self.walk(sub)
            for out, b_out in zip(outs, branch.output):
                self.info[out] = self.info.get(b_out.name, _Info(None, 0, TensorProto.FLOAT))
            self.ops.append(Op(scope.path, index, label, node.op_type, "alias",
                               tuple(o.name for o in branch.output), outs))
            return
        if default and node.op_type == "Constant":
            value = attr(node, "value")
            if isinstance(value, TensorProto):
                self.info[outs[0]] = _Info(tuple(value.dims), math.prod(value.dims), value.data_type)
            self.const.update(outs)
            return
        if is_collective(node):
            anchor = node.input[0] if node.input else ""
            msg = message_bytes(scope, anchor, self.batch)
            for out in outs:
                self.info[out] = self.info.get(anchor, _Info(None, 0, TensorProto.FLOAT))
            self.ops.append(Op(scope.path, index, label, node.op_type, "collective", ins, outs,
                               message_bytes=msg))
            return
        out_infos = self._infer(scope, node)
        for out, info in zip(outs, out_infos):
            self.info[out] = info
        if ins and all(i in self.const for i in ins):
            self.const.update(outs)  # constant-only: folded by every runtime, costs nothing
            return
        if default and node.op_type in ("Shape", "Size"):
            # A tensor's metadata: known on the host once shapes are, so the shape arithmetic built on it
            # (TorchScript's Shape -> Gather -> Unsqueeze -> Concat chains) folds like constants.
            self.const.update(outs)
            return
        self.ops.append(self._cost(scope, index, label, node, ins, outs, out_infos))

    # -- shapes: element counts and dtypes of the outputs
    def _infer(self, scope: Scope, node: onnx.NodeProto) -> list[_Info]:
        get = self.info.get
        ins = [get(i) if i else None for i in node.input]
        a = ins[0] if ins else None
        op = node.op_type
        dtype = a.dtype if a is not None else TensorProto.FLOAT
        n_out = len(node.output)
        if op == "MatMul" and len(ins) > 1 and a is not None and ins[1] is not None:
            b = ins[1]
            if a.shape and b.shape and len(b.shape) >= 2:
                dims = a.shape[:-1] + b.shape[-1:]
                return [_Info(dims, math.prod(dims), a.dtype)]
            if b.shape and len(b.shape) >= 2 and b.shape[-2]:  # A's rows x B's columns
                return [_Info(None, a.numel // b.shape[-2] * b.shape[-1], a.dtype)]
            return [_Info(None, a.numel, a.dtype)]
        if op == "Gemm" and a is not None and len(ins) > 1 and ins[1] is not None and ins[1].shape:
            n = ins[1].shape[0] if attr(node, "transB", 0) else ins[1].shape[-1]
            rows = a.shape[1] if (a.shape and attr(node, "transA", 0)) else (a.shape[0] if a.shape else 1)
            return [_Info((rows, n), rows * n, a.dtype)]
        if op == "MatMulNBits" and a is not None:
            n, k = int(attr(node, "N", 0)), int(attr(node, "K", 0))
            if a.shape:
                dims = a.shape[:-1] + (n,)
                return [_Info(dims, math.prod(dims), a.dtype)]
            return [_Info(None, (a.numel // k if k else 1) * n, a.dtype)]
        if op == "Gather" and len(ins) > 1 and a is not None and ins[1] is not None:
            idx = ins[1]
            axis = int(attr(node, "axis", 0))
            if a.shape and idx.shape is not None:
                r = axis % len(a.shape)
                dims = a.shape[:r] + idx.shape + a.shape[r + 1:]
                return [_Info(dims, math.prod(dims), a.dtype)]
        if is_attention(node) and a is not None:
            return [self._attention_out(node, ins)] + [_Info(None, 0, dtype)] * (n_out - 1)
        if op == "Shape":
            rank = len(a.shape) if a is not None and a.shape else 4
            return [_Info((rank,), rank, TensorProto.INT64)]
        if op == "Cast":
            to = int(attr(node, "to", dtype))
            return [_Info(a.shape if a else None, a.numel if a else 0, to)]
        if op == "Reshape" and a is not None and len(node.input) > 1:
            target = scope.initializers.get(node.input[1])
            values = _small_int_constant(target) if target is not None else None
            if values is not None and a.shape is not None:
                dims = [a.shape[i] if v == 0 else v for i, v in enumerate(values)]
                if dims.count(-1) == 1:
                    known = math.prod(d for d in dims if d != -1)
                    dims[dims.index(-1)] = a.numel // known if known else 0
                if -1 not in dims:
                    return [_Info(tuple(dims), a.numel, a.dtype)]
            return [_Info(None, a.numel, a.dtype)]
        shaped = [i for i in ins if i is not None and i.shape]
        if op == "Concat" and shaped and all(i is not None for i in ins) and len({len(i.shape) for i in shaped}) == 1:
            # Inputs without a shape (a Reshape to a computed shape) extend the axis by their element count.
            ref = shaped[0].shape
            axis = int(attr(node, "axis", 0)) % len(ref)
            across = math.prod(ref[:axis] + ref[axis + 1:]) or 1
            extent = sum(i.shape[axis] if i.shape else i.numel // across for i in ins)
            dims = ref[:axis] + (extent,) + ref[axis + 1:]
            return [_Info(dims, math.prod(dims), shaped[0].dtype)]
        if op == "Transpose" and a is not None and a.shape:
            perm = attr(node, "perm") or list(reversed(range(len(a.shape))))
            return [_Info(tuple(a.shape[p] for p in perm), a.numel, a.dtype)]
        if op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin") and a is not None:
            axes = attr(node, "axes")
            if axes is None and len(node.input) > 1 and node.input[1] in scope.initializers:
                axes = _small_int_constant(scope.initializers[node.input[1]])
            if a.shape and axes:
                reduced = {int(x) % len(a.shape) for x in axes}
                keep = int(attr(node, "keepdims", 1))
                dims = tuple(1 if i in reduced else d for i, d in enumerate(a.shape) if keep or i not in reduced)
                return [_Info(dims, math.prod(dims), a.dtype)]
            return [_Info(None, max(1, a.numel // max(1, (a.shape or (1,))[-1])), a.dtype)]
        if op in _SAME_SHAPE and a is not None:
            return [a] * n_out
        # Elementwise and everything else: the broadcast of the inputs.
        return [_broadcast([i for i in ins if i is not None])] * max(1, n_out)

    def _attention_out(self, node: onnx.NodeProto, ins: list) -> _Info:
        q = ins[0]
        heads = int(attr(node, "num_heads", 0) or attr(node, "q_num_heads", 0) or 1)
        if node.op_type == "Attention" and node.domain not in ("", "ai.onnx") and len(ins) > 1 and ins[1] \
                and ins[1].shape:
            width = ins[1].shape[-1] // 3
            rows = q.numel // q.shape[-1] if q.shape else self.batch
            return _Info(None, rows * width, q.dtype)
        if node.op_type == "GroupQueryAttention" and q.shape:
            kv_heads = int(attr(node, "kv_num_heads", heads))
            packed = len(node.input) < 2 or not node.input[1]
            head = q.shape[-1] // (heads + 2 * kv_heads) if packed else q.shape[-1] // heads
            dims = q.shape[:-1] + (heads * head,)
            return _Info(dims, math.prod(dims), q.dtype)
        return q

    # -- costs
    def _cost(self, scope: Scope, index: int, label: str, node: onnx.NodeProto, ins: tuple[str, ...],
              outs: tuple[str, ...], out_infos: list[_Info]) -> Op:
        slots = consumer_slots(node)
        reads: list[Read] = []
        read_inputs: set[str] = set()
        fixed = act = 0
        flops = 0.0
        if slots is not None:
            for slot in sorted({*slots.weights, *slots.kv}):
                if slot >= len(node.input) or not node.input[slot]:
                    continue
                name = node.input[slot]
                if slot in slots.kv and name in scope.main_inputs and name not in scope.initializers:
                    reads.append(Read(name, self._kv_read(node, name, slots.kv_axes, scope), "kv_cache"))
                    read_inputs.add(name)
                elif slot in slots.weights:
                    res = resolve_roots(scope, name, qdq_weights=self.qdq_weights)
                    if res.reason:
                        continue  # an activation
                    for tensor in dict.fromkeys((*res.roots, *(t for t, _ in res.excluded))):
                        t = scope.initializers[tensor]
                        size = _bytes(_Info(None, math.prod(t.dims), t.data_type))
                        if slot in slots.experts:  # an expert bank: the share its tokens are routed to
                            experts = int(t.dims[0]) if t.dims else 0
                            share = expert_share(int(attr(node, "k", 1)), experts, self._rows(node))
                            self.shares[tensor] = share
                            size = int(size * share)
                        reads.append(Read(tensor, size, "weight"))
                    read_inputs.add(name)
            flops = self._consumer_flops(node, reads)
        if reads_bytes(node):
            # The first operator that reads a plain-operator KV-cache's bytes (usually its Concat) reads
            # them from HBM; later readers of the concatenation read an activation.
            for name in node.input:
                path = self.kv_alias.get(name)
                if path is None or path.input in self.kv_read or path.input not in scope.main_inputs:
                    continue
                vi = scope.main_inputs[path.input]
                reads.append(Read(path.input, self.sizing.kv_bytes(vi, structural_kv_axes(path, vi)), "kv_cache"))
                read_inputs.add(name)
                self.kv_read.add(path.input)
        for slot, name in enumerate(node.input):
            if not name or name in read_inputs:
                continue
            info = self.info.get(name)
            if name in self.const:
                # Gather reads only the rows it picks (an embedding lookup), other ops the whole constant.
                fixed += _bytes(out_infos[0]) if node.op_type == "Gather" and slot == 0 else _bytes(info)
            else:
                act += _bytes(info)
        keep = out_infos[:1] if is_attention(node) else out_infos  # present KV: written in place
        act += sum(_bytes(i) for i in keep)
        if not flops:
            flops = float(sum(i.numel for i in keep))
        return Op(scope.path, index, label, node.op_type, "compute", ins, outs, flops, tuple(reads), fixed, act)

    def _kv_read(self, node: onnx.NodeProto, name: str, axes: tuple[int, int], scope: Scope) -> int:
        """Bytes a step reads of a KV-cache input: a GroupQueryAttention's live bytes (its window, at most
        its buffer; docs/design.md §4.7), every other attention op's whole past."""
        vi = scope.main_inputs[name]
        raw = self.sizing.kv_bytes(vi, axes)
        if op_key(node) != (MS_DOMAIN, "GroupQueryAttention"):
            return raw
        buffer = kv_buffer(node, vi, axes[1], self.sizing, raw)
        shape = self.info[name].shape if name in self.info else None
        blocks = math.prod(shape[:axes[1]]) if shape and len(shape) > axes[1] else 0
        if blocks and buffer.row % blocks == 0:
            self.kv_layouts[name] = KvLayout(blocks, buffer.capacity, buffer.row // blocks, buffer.start, buffer.end)
        return buffer.live_bytes

    def _consumer_flops(self, node: onnx.NodeProto, reads: list[Read]) -> float:
        rows = self._rows(node)
        if node.op_type in _LINEAR:
            if node.op_type == "MatMulNBits":
                elems = int(attr(node, "K", 0)) * int(attr(node, "N", 0))
            else:
                w = node.input[1] if node.op_type == "Gemm" or node.input[0] not in self.const else node.input[0]
                if node.op_type == "MatMul" and w not in self.const:
                    # Both operands computed (attention in plain operators, Q @ K^T): batched, so
                    # 2 x A's elements x B's columns, not A's rows x all of B.
                    a, b = self.info.get(node.input[0]), self.info.get(node.input[1])
                    if a is not None and b is not None and b.shape:
                        return 2.0 * a.numel * b.shape[-1]
                elems = self.info[w].numel if w in self.info else 0
            return 2.0 * rows * elems
        flops = 0.0
        if node.op_type == "Attention" and node.domain not in ("", "ai.onnx") and len(node.input) > 1:
            w = self.info.get(node.input[1])
            flops += 2.0 * rows * (w.numel if w else 0)
        heads = int(attr(node, "num_heads", 0) or attr(node, "q_num_heads", 0) or 1)
        kv_heads = int(attr(node, "kv_num_heads", 0) or heads)
        for r in reads:
            if r.kind == "kv_cache":
                vi = self.info[r.tensor]
                elems = r.nbytes * 8 // max(1, dtype_bits(vi.dtype, r.tensor))
                flops += 2.0 * heads / kv_heads * elems
        return flops

    def _rows(self, node: onnx.NodeProto) -> int:
        """Rows of the activation operand of a linear layer (tokens in the step)."""
        a = self.info.get(node.input[0]) if node.input else None
        if node.op_type == "MatMul" and node.input[0] in self.const and len(node.input) > 1:
            a = self.info.get(node.input[1])
        if a is None or not a.shape:
            return self.batch
        return max(1, a.numel // max(1, a.shape[-1]))


def analyze(model: onnx.ModelProto, config: OptimizeConfig, model_ranks: int, source: str = "model") -> Analysis:
    """Flatten ``model``'s decode step and plan it as ``optimize`` would (``config``, ``model_ranks``).

    Prefetch nodes already in ``model`` (spelled as ``config.naming`` says) are removed first, as
    ``optimize --replan`` would: an optimized model is estimated exactly like its original.
    """
    model = StripPrefetchesPass(config.naming)(model).model
    walker = _Walker(model, Sizing.for_model(model, config.batch, config.context, config.dims), config.qdq_weights)
    walker.walk("")
    ops = tuple(walker.ops)
    position = {(op.graph, op.index): pos for pos, op in enumerate(ops) if op.kind != "alias"}
    plan = plan_model(model, config, model_ranks)  # optimize's own passes, dry
    windows = []
    for wp in plan.windows:
        w = wp.window
        if (w.graph, w.index) not in position:
            continue  # in a branch the decode step does not run (an If's else_branch)
        where = [position[(w.graph, i)] for i in w.nodes if (w.graph, i) in position]
        first = next((p for p in where if ops[p].reads), None)
        windows.append(WindowSpec(w.graph, w.collective, position[(w.graph, w.index)], tuple(where), first,
                                  w.message_bytes, w, wp.candidates, wp.max_tokens,
                                  _tokens(walker.info.get(w.anchor), config.batch)))
    return Analysis(source, model_ranks, config.batch, config.context, ops, tuple(windows), config,
                    dict(walker.kv_layouts), dict(walker.shares))


def _tokens(info: _Info | None, batch: int) -> int:
    """Tokens per step a Prefetch sees: the product of its anchor's dims except the last (docs/design.md §3)."""
    if info is None or not info.shape:
        return batch
    return max(1, math.prod(info.shape[:-1]))


# -------------------------------------------------------------------------------------- the timeline


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


def simulate(analysis: Analysis, hw: HardwareProfile, chains: tuple[tuple[tuple, ...], ...],
             ranks: int, l2_fraction: float, scenario: str) -> Timeline:
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
            events.append(Event("communication", op.name, op.op_type, start, dur,
                                (("message_bytes", op.message_bytes), ("ranks", ranks))))
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
                events.append(Event("prefetch", f"{analysis.windows[k].collective}/Prefetch", "prefetch", t0[k],
                                    amount / hbm_bw, (("bytes", amount), ("planned_bytes", total))))
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
        events.append(Event("compute", op.name, op.op_type, start, dur,
                            (("hbm_bytes", int(hbm)), ("l2_bytes", int(l2)), ("flops", int(flops)))))
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


# -------------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class WindowEstimate:
    graph: str
    collective: str
    collective_s: float
    budget_bytes: int
    planned_bytes: int
    overlapped_bytes: int  # of the planned bytes, those in L2 when the consumers start
    saved_s: float
    upper_bound_bytes: int
    upper_bound_saved_s: float
    max_tokens: int = 0  # the window's validity range (0 = no limit)
    tokens: int = 1  # tokens per step in this estimate (above max_tokens the plan's hints are skipped)
    hinted_bytes: int = 0  # of the planned bytes, those the runtime hints at this step (max/min_tokens)


class _Speedups:
    """Speedups from ``baseline_s``, ``preserve_s`` and ``upper_bound_s`` (fields or properties)."""

    baseline_s: float
    preserve_s: float
    upper_bound_s: float

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.preserve_s if self.preserve_s else 1.0

    @property
    def upper_bound_speedup(self) -> float:
        return self.baseline_s / self.upper_bound_s if self.upper_bound_s else 1.0


@dataclass(frozen=True)
class Estimate(_Speedups):
    source: str
    hardware: str
    batch: int
    context: int
    ranks: int
    model_ranks: int
    baseline: Timeline
    preserve: Timeline
    upper: Timeline
    windows: tuple[WindowEstimate, ...]
    kv_read_bytes: int = 0  # KV-cache bytes the step reads (live bytes; docs/design.md §4.7)

    @property
    def hinted_bytes(self) -> int:
        return sum(w.hinted_bytes for w in self.windows)

    @property
    def baseline_s(self) -> float:
        return self.baseline.step_s

    @property
    def preserve_s(self) -> float:
        return self.preserve.step_s

    @property
    def upper_bound_s(self) -> float:
        return self.upper.step_s


    @property
    def share_of_upper_bound(self) -> float:
        """Fraction of the upper bound's time saving that the plan reaches (1.0 when nothing can be saved)."""
        possible = self.baseline_s - self.upper_bound_s
        return (self.baseline_s - self.preserve_s) / possible if possible > 0 else 1.0


def plan_chains(analysis: Analysis, hw: HardwareProfile, ranks: int, budget: int | None = None,
                l2_fraction: float = 0.5) -> tuple[tuple[Link, ...], ...]:
    """Each window's planned chain at ``ranks``: the planner's fill rule over re-sharded candidates."""
    scale = analysis.model_ranks / ranks
    chains = []
    for w in analysis.windows:
        cands = tuple(dataclasses.replace(c, nbytes=int(c.nbytes * scale)) for c in w.candidates)
        limit = budget if budget is not None else hw.window_budget(w.message_bytes, ranks, l2_fraction)
        prefetches, _ = fill_window(w.window, cands, limit, analysis.config.min_chunk, 0, set())
        chains.append(tuple(Link(p.tensor, p.nbytes, analysis.useful(p.tensor, p.offset, p.nbytes, bool(p.lengths),
                                                                    scale), p.min_tokens) for p in prefetches))
    return tuple(chains)


def every_chain(analysis: Analysis, ranks: int) -> tuple[tuple[Link, ...], ...]:
    """The upper bound's chains: every candidate of every window, whole, at ``ranks``."""
    scale = analysis.model_ranks / ranks
    return tuple(tuple(Link(c.tensor, int(c.nbytes * scale),
                            analysis.useful(c.tensor, 0, int(c.nbytes * scale), bool(c.lengths), scale))
                       for c in w.candidates) for w in analysis.windows)


def budgets(analysis: Analysis, hw: HardwareProfile, ranks: int, budget: int | None,
            l2_fraction: float) -> tuple[int, ...]:
    return tuple(budget if budget is not None else hw.window_budget(w.message_bytes, ranks, l2_fraction)
                 for w in analysis.windows)


def evaluate(analysis: Analysis, hw: HardwareProfile, ranks: int | None = None, budget: int | None = None,
             l2_fraction: float = 0.5) -> Estimate:
    """Baseline, plan and upper-bound timelines of ``analysis`` on ``hw`` at ``ranks`` ranks."""
    ranks = ranks or analysis.model_ranks
    if ranks < 1:
        raise PreserveError("ranks must be at least 1")
    none = tuple(() for _ in analysis.windows)
    planned = plan_chains(analysis, hw, ranks, budget, l2_fraction)
    every = every_chain(analysis, ranks)
    base = simulate(analysis, hw, none, ranks, l2_fraction, "baseline")
    pres = simulate(analysis, hw, planned, ranks, l2_fraction, "preserve")
    upper = simulate(analysis, hw, every, ranks, l2_fraction, "upper bound")
    windows = []
    for k, (w, limit) in enumerate(zip(analysis.windows, budgets(analysis, hw, ranks, budget, l2_fraction))):
        def saved(t: Timeline) -> float:
            return sum(base.durations[p] - t.durations[p] for p in w.op_positions)

        hinted = 0 if 0 < w.max_tokens < w.tokens else \
            sum(link.nbytes for link in planned[k] if link.min_tokens <= w.tokens)
        windows.append(WindowEstimate(
            w.graph, w.collective, hw.collective_time(w.message_bytes, ranks), limit,
            sum(link.nbytes for link in planned[k]), pres.moved[k], saved(pres), upper.moved[k], saved(upper),
            w.max_tokens, w.tokens, hinted))
    scale = analysis.model_ranks / ranks
    kv_read = int(sum(r.nbytes for op in analysis.ops for r in op.reads if r.kind == "kv_cache") * scale)
    return Estimate(analysis.source, hw.name, analysis.batch, analysis.context, ranks, analysis.model_ranks,
                    base, pres, upper, tuple(windows), kv_read)


def rank_model(path: Path, ranks: int | None = None) -> tuple[Path, int]:
    """The rank model to estimate (rank 0 of what ``path`` names) and the rank count of its export."""
    files = resolve_ranks(path)
    return files[0], ranks or len(files)


def estimate_path(path: Path, hw: HardwareProfile, config: OptimizeConfig, ranks: int | None = None,
                  budget: int | None = None) -> Estimate:
    """Estimate one rank model (or rank 0 of a directory) as ``optimize`` with ``config`` would plan it."""
    model_path, model_ranks = rank_model(path, ranks)
    model = load_model(model_path)
    cfg = dataclasses.replace(config, hardware=hw, budget=budget)
    return evaluate(analyze(model, cfg, model_ranks, str(model_path)), hw, model_ranks, budget, cfg.l2_fraction)


# ---------------------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class SweepPoint(_Speedups):
    batch: int
    context: int
    ranks: int
    baseline_s: float
    preserve_s: float
    upper_bound_s: float
    kv_read_bytes: int = 0  # KV-cache bytes the step reads (flat past W on windowed layers)
    hinted_bytes: int = 0  # bytes the plan's hints move at this point (expert banks from min_tokens on)


SWEEP_KEYS = ("batch", "context", "ranks")


def parse_sweep(groups: list[str]) -> dict[str, tuple[int, ...]]:
    """``["batch=1,8,32", "context=1k,16k", "ranks=2,4,8"]`` -> values per key (context: k = 1024)."""
    out: dict[str, tuple[int, ...]] = {}
    for group in groups:
        for part in group.replace(";", " ").split():
            key, sep, values = part.partition("=")
            if not sep or key not in SWEEP_KEYS:
                raise UsageError(f"--sweep: expected key=v1,v2,... with key in {', '.join(SWEEP_KEYS)}; "
                                 f"got '{part}'")
            if key in out:
                raise UsageError(f"--sweep: '{key}' given twice")
            try:
                parsed = tuple(_sweep_int(v) for v in values.split(",") if v.strip())
            except ValueError:
                raise UsageError(f"--sweep: '{part}' holds a value that is not a whole number") from None
            if not parsed or min(parsed) < 1:
                raise UsageError(f"--sweep: '{part}' needs values of at least 1")
            if len(set(parsed)) != len(parsed):  # one point per value: a repeat would be counted twice
                raise UsageError(f"--sweep: '{part}' repeats a value")
            out[key] = parsed
    return out


def _sweep_int(text: str) -> int:
    text = text.strip().lower()
    if text.endswith("k"):
        return int(float(text[:-1]) * 1024)
    return int(text)


def sweep_path(path: Path, hw: HardwareProfile, config: OptimizeConfig, grid: dict[str, tuple[int, ...]],
               ranks: int | None = None, budget: int | None = None) -> tuple[SweepPoint, ...]:
    """Speedups over the batch x context x ranks grid (missing keys: the single configured value)."""
    model_path, model_ranks = rank_model(path, ranks)
    model = load_model(model_path)
    points = []
    for batch in grid.get("batch", (config.batch,)):
        for context in grid.get("context", (config.context,)):
            cfg = dataclasses.replace(config, hardware=hw, budget=budget, batch=batch, context=context)
            analysis = analyze(model, cfg, model_ranks, str(model_path))
            for p in grid.get("ranks", (model_ranks,)):
                est = evaluate(analysis, hw, p, budget, cfg.l2_fraction)
                points.append(SweepPoint(batch, context, p, est.baseline_s, est.preserve_s, est.upper_bound_s,
                                         est.kv_read_bytes, est.hinted_bytes))
    return tuple(points)


# ---------------------------------------------------------------------------------------- the trace


def chrome_trace(estimate: Estimate) -> dict:
    """Both timelines (and the upper bound) as a Chrome/Perfetto trace: one process per scenario, one
    thread per track; timestamps in microseconds."""
    events: list[dict] = []
    for pid, timeline in enumerate((estimate.baseline, estimate.preserve, estimate.upper), start=1):
        label = f"{timeline.scenario} ({timeline.step_s * 1e3:.3f} ms)"
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": label}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        for tid, track in enumerate(TRACKS, start=1):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": track}})
        for e in timeline.events:
            events.append({"name": e.name, "cat": e.category, "ph": "X", "pid": pid,
                           "tid": TRACKS.index(e.track) + 1, "ts": e.start * 1e6, "dur": e.duration * 1e6,
                           "args": dict(e.args)})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"hardware": estimate.hardware, "source": estimate.source, "batch": estimate.batch,
                          "context": estimate.context, "ranks": estimate.ranks,
                          "baseline_s": estimate.baseline_s, "preserve_s": estimate.preserve_s}}


# ------------------------------------------------------------------------------------------ to JSON


def estimate_dict(est: Estimate) -> dict:
    """The ``estimate --json`` document."""
    return {
        "schema": 1,
        "source": est.source,
        "hardware": est.hardware,
        "batch": est.batch,
        "context": est.context,
        "ranks": est.ranks,
        "model_ranks": est.model_ranks,
        "baseline_s": est.baseline_s,
        "preserve_s": est.preserve_s,
        "upper_bound_s": est.upper_bound_s,
        "speedup": est.speedup,
        "upper_bound_speedup": est.upper_bound_speedup,
        "share_of_upper_bound": est.share_of_upper_bound,
        "kv_read_bytes": est.kv_read_bytes,
        "hinted_bytes": est.hinted_bytes,
        "windows": [dataclasses.asdict(w) for w in est.windows],
    }


def sweep_list(points: tuple[SweepPoint, ...]) -> list[dict]:
    """The ``estimate --sweep --json`` document: a list of points."""
    return [{"batch": p.batch, "context": p.context, "ranks": p.ranks, "speedup": p.speedup,
             "upper_bound_speedup": p.upper_bound_speedup, "baseline_s": p.baseline_s,
             "preserve_s": p.preserve_s, "kv_read_bytes": p.kv_read_bytes, "hinted_bytes": p.hinted_bytes}
            for p in points]
