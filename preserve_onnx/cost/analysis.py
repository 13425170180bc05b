"""The cost model's graph side: one decode step of a rank model flattened into operators with their
FLOP and bytes (weights, KV-cache, activations), windows and their prefetch candidates (the model's
equations: :mod:`preserve_onnx.cost`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import onnx
from onnx import TensorProto, numpy_helper

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.dims import Sizing, bind_lenient, decode_layout, message_bytes
from preserve_onnx.graph.index import (
    MS_DOMAIN,
    Scope,
    attr,
    dtype_bits,
    is_collective,
    is_default_domain,
    iter_scopes,
    node_label,
)
from preserve_onnx.graph.structure import is_attention, kv_cache_paths, op_key, reads_bytes
from preserve_onnx.optimizer import plan_model
from preserve_onnx.passes._live import KvLayout, expert_share, kv_buffer
from preserve_onnx.passes.collect_candidates import (
    Candidate,
    consumer_slots,
    resolve_roots,
    structural_kv_axes,
)
from preserve_onnx.passes.strip_prefetches import StripPrefetchesPass

TRACKS = ("compute", "communication", "prefetch")
_LINEAR = {"MatMul", "Gemm", "MatMulNBits"}
_SAME_SHAPE = {
    "Cast",
    "CastLike",
    "Identity",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Gelu",
    "FastGelu",
    "QuickGelu",
    "Erf",
    "Neg",
    "Sqrt",
    "Softmax",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RotaryEmbedding",
    "DequantizeLinear",
    "QuantizeLinear",
    "Dropout",
    "BiasGelu",
}


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
    dims = bind_lenient(
        (d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim), values, batch
    )
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
        self.kv_alias = {
            alias: path for path in kv_cache_paths(model.graph).values() for alias in path.aliases
        }
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
            self.ops.append(
                Op(
                    scope.path,
                    index,
                    label,
                    node.op_type,
                    "alias",
                    tuple(o.name for o in branch.output),
                    outs,
                )
            )
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
            self.ops.append(
                Op(scope.path, index, label, node.op_type, "collective", ins, outs, message_bytes=msg)
            )
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
                dims = a.shape[:r] + idx.shape + a.shape[r + 1 :]
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
        if (
            op == "Concat"
            and shaped
            and all(i is not None for i in ins)
            and len({len(i.shape) for i in shaped}) == 1
        ):
            # Inputs without a shape (a Reshape to a computed shape) extend the axis by their element count.
            ref = shaped[0].shape
            axis = int(attr(node, "axis", 0)) % len(ref)
            across = math.prod(ref[:axis] + ref[axis + 1 :]) or 1
            extent = sum(i.shape[axis] if i.shape else i.numel // across for i in ins)
            dims = ref[:axis] + (extent,) + ref[axis + 1 :]
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
                dims = tuple(
                    1 if i in reduced else d for i, d in enumerate(a.shape) if keep or i not in reduced
                )
                return [_Info(dims, math.prod(dims), a.dtype)]
            return [_Info(None, max(1, a.numel // max(1, (a.shape or (1,))[-1])), a.dtype)]
        if op in _SAME_SHAPE and a is not None:
            return [a] * n_out
        # Elementwise and everything else: the broadcast of the inputs.
        return [_broadcast([i for i in ins if i is not None])] * max(1, n_out)

    def _attention_out(self, node: onnx.NodeProto, ins: list) -> _Info:
        q = ins[0]
        heads = int(attr(node, "num_heads", 0) or attr(node, "q_num_heads", 0) or 1)
        if (
            node.op_type == "Attention"
            and node.domain not in ("", "ai.onnx")
            and len(ins) > 1
            and ins[1]
            and ins[1].shape
        ):
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
    def _cost(
        self,
        scope: Scope,
        index: int,
        label: str,
        node: onnx.NodeProto,
        ins: tuple[str, ...],
        outs: tuple[str, ...],
        out_infos: list[_Info],
    ) -> Op:
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
                reads.append(
                    Read(path.input, self.sizing.kv_bytes(vi, structural_kv_axes(path, vi)), "kv_cache")
                )
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
        return Op(
            scope.path, index, label, node.op_type, "compute", ins, outs, flops, tuple(reads), fixed, act
        )

    def _kv_read(self, node: onnx.NodeProto, name: str, axes: tuple[int, int], scope: Scope) -> int:
        """Bytes a step reads of a KV-cache input: a GroupQueryAttention's live bytes (its window, at most
        its buffer; docs/design.md §4.7), every other attention op's whole past."""
        vi = scope.main_inputs[name]
        raw = self.sizing.kv_bytes(vi, axes)
        if op_key(node) != (MS_DOMAIN, "GroupQueryAttention"):
            return raw
        buffer = kv_buffer(node, vi, axes[1], self.sizing, raw)
        shape = self.info[name].shape if name in self.info else None
        blocks = math.prod(shape[: axes[1]]) if shape and len(shape) > axes[1] else 0
        if blocks and buffer.row % blocks == 0:
            self.kv_layouts[name] = KvLayout(
                blocks, buffer.capacity, buffer.row // blocks, buffer.start, buffer.end
            )
        return buffer.live_bytes

    def _consumer_flops(self, node: onnx.NodeProto, reads: list[Read]) -> float:
        rows = self._rows(node)
        if node.op_type in _LINEAR:
            if node.op_type == "MatMulNBits":
                elems = int(attr(node, "K", 0)) * int(attr(node, "N", 0))
            else:
                w = (
                    node.input[1]
                    if node.op_type == "Gemm" or node.input[0] not in self.const
                    else node.input[0]
                )
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


def analyze(
    model: onnx.ModelProto, config: OptimizeConfig, model_ranks: int, source: str = "model"
) -> Analysis:
    """Flatten ``model``'s decode step and plan it as ``optimize`` would (``config``, ``model_ranks``).

    Prefetch nodes already in ``model`` (spelled as ``config.naming`` says) are removed first, as
    ``optimize --replan`` would: an optimized model is estimated exactly like its original.
    """
    model = StripPrefetchesPass(config.naming)(model).model
    walker = _Walker(
        model, Sizing.for_model(model, config.batch, config.context, config.dims), config.qdq_weights
    )
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
        windows.append(
            WindowSpec(
                w.graph,
                w.collective,
                position[(w.graph, w.index)],
                tuple(where),
                first,
                w.message_bytes,
                w,
                wp.candidates,
                wp.max_tokens,
                _tokens(walker.info.get(w.anchor), config.batch),
            )
        )
    return Analysis(
        source,
        model_ranks,
        config.batch,
        config.context,
        ops,
        tuple(windows),
        config,
        dict(walker.kv_layouts),
        dict(walker.shares),
    )


def _tokens(info: _Info | None, batch: int) -> int:
    """Tokens per step a Prefetch sees: the product of its anchor's dims except the last
    (docs/design.md §3)."""
    if info is None or not info.shape:
        return batch
    return max(1, math.prod(info.shape[:-1]))
