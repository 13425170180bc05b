"""The Megatron layout of a single-device decoder, found by structure (docs/design.md §8).

* Attention: every ``GroupQueryAttention`` / ``MultiHeadAttention`` / ``com.microsoft::Attention``, and
  every plain-operator core ``MatMul(Softmax(...), V)``. The linear that reads its output (through
  layout operators) is o_proj (row-parallel); walking back from o_proj's input to the first linears
  finds q/k/v (column-parallel; one fused linear counts as its parts), the KV-cache inputs, and every
  node in between (the *region*: rank-local, head-sharded work).
* MLP: a linear whose input comes only from other linears through element-wise operators (SiLU/GELU,
  the gate*up product, a Split/Slice of a fused gate_up) is down_proj (row); those linears are
  gate/up (column).
* The LM head is the linear left over whose output reaches a graph output; anything else left over
  is refused, by name. Nothing here reads weight bytes; the result is data for :mod:`.rewrite`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import AttributeProto, NodeProto

from preserve_onnx.config import MS_DOMAIN
from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.index import GraphIndex, Linear, attr, is_op
from preserve_onnx.graph.structure import LAYOUT_OPS, attention_cores, is_attention, kv_cache_paths
from preserve_onnx.shard.experts import Experts, find_experts
from preserve_onnx.shard.tracing import (
    bias_after,
    fused_parts,
    kv_slot_inputs,
    reaches_output,
    readers_through_layout,
    root_input,
    walk_back,
    width_of,
)

# Operators between gate/up and down_proj in an MLP (activations, the gate*up product, a fused gate_up's cut).
ELEMENTWISE = frozenset(
    [
        "Mul",
        "Add",
        "Sub",
        "Div",
        "Sigmoid",
        "Tanh",
        "Relu",
        "Gelu",
        "Erf",
        "Pow",
        "Sqrt",
        "Neg",
        "Softplus",
        "Mish",
        "HardSigmoid",
        "HardSwish",
        "Clip",
        "Cast",
        "Identity",
        "Split",
        "Slice",
        "Swish",
        "Elu",
        "LeakyRelu",
        "FastGelu",
        "BiasGelu",
        "QuickGelu",
        "Silu",
        "BiasSplitGelu",
        "Where",
        "Min",
        "Max",
    ]
)
HEAD_ATTRS = ("num_heads", "kv_num_heads", "q_num_heads")


@dataclass(frozen=True)
class Column:
    """A column-parallel linear: its output columns cut per fused part, each part into N blocks."""

    linear: Linear
    parts: tuple[int, ...]  # widths of the fused parts (q|k|v, gate|up), summing to the width
    unit: int  # columns per head (1 for the MLP and the LM head): a rank gets whole units
    labels: tuple[str, ...]  # what each part's units are, for messages
    biases: tuple[str, ...] = ()  # 1-D initializers added to the output: cut like the columns
    cuts: tuple[int, ...] = ()  # Split/Slice nodes that separate the fused parts


@dataclass
class Layout:
    """Everything :mod:`.rewrite` changes. Node references are indices into the graph's node list."""

    columns: dict[int, Column] = field(default_factory=dict)
    rows: dict[int, Linear] = field(default_factory=dict)
    region: set[int] = field(default_factory=set)  # rank-local nodes between column and row linears
    sharded: set[str] = field(default_factory=set)  # tensors cut on their head/width axis
    kv_inputs: set[str] = field(default_factory=set)
    lm_head: Linear | None = None
    heads: set[int] = field(default_factory=set)  # head counts seen (for Reshape shape constants)
    widths: set[int] = field(default_factory=set)  # full widths of sharded parts
    head_size: set[int] = field(default_factory=set)
    per_head: dict[str, int] = field(default_factory=dict)  # 1-D initializers of one value per q head
    experts: dict[int, Experts] = field(default_factory=dict)  # MoE / QMoE nodes, AllReduce after each
    replicated: set[int] = field(default_factory=set)  # linears every rank computes whole (routers, gates)
    state_layers: set[tuple[int, ...]] = field(
        default_factory=set
    )  # their output projections: layers whole on every rank


def _column(ix: GraphIndex, lin: Linear, unit: int, label_of) -> Column:
    biases, tensor = bias_after(ix, lin)
    node = ix.nodes[lin.index]
    if lin.kind == "attention":
        sizes = attr(node, "qkv_hidden_sizes") or [lin.width // 3] * 3
        parts, cuts = tuple(sizes), ()
        biases = (node.input[2],) if len(node.input) > 2 and node.input[2] in ix.inits else ()
    else:
        parts, cuts = fused_parts(ix, lin, tensor)
        packed = [
            i
            for i, t in readers_through_layout(ix, tensor)
            if is_op(ix.nodes[i], "GroupQueryAttention", MS_DOMAIN)
            and ix.nodes[i].input[0] == t
            and (len(ix.nodes[i].input) < 2 or not ix.nodes[i].input[1])
        ]
        if packed and not cuts:  # q|k|v packed into GroupQueryAttention's query input
            gqa = ix.nodes[packed[0]]
            nh, nkv = attr(gqa, "num_heads", 0), attr(gqa, "kv_num_heads", 0)
            hs = lin.width // (nh + 2 * nkv)
            parts = (nh * hs, nkv * hs, nkv * hs)
    if lin.kind == "nbits" and len(node.input) > 5 and node.input[5] in ix.inits:
        biases += (node.input[5],)
    return Column(lin, parts, unit, tuple(label_of(p) for p in parts), biases, cuts)


def _declared_head_size(
    ix: GraphIndex, node: NodeProto, kv_inputs: set[str], dims: dict[str, int]
) -> tuple[int, str]:
    """(head size, where it was read) from what states it outright: a per-head q/k norm weight fused
    into the attention op (GroupQueryAttention in[14]/in[15], ``[head_size]``), or the KV-cache's last
    dim (fixed, or bound with ``--dim``); (0, "") when neither says."""
    for slot in (14, 15) if is_op(node, "GroupQueryAttention", MS_DOMAIN) else ():
        if slot < len(node.input) and node.input[slot] in ix.inits:
            dims_ = ix.inits[node.input[slot]].dims
            if len(dims_) == 1 and dims_[0] > 0:
                return int(dims_[0]), f"its q/k norm weight '{node.input[slot]}'"
    for name in sorted(kv_inputs):
        dim = ix.inputs[name].type.tensor_type.shape.dim
        if dim:
            last = dim[-1]
            hs = last.dim_value or dims.get(last.dim_param, 0)
            if hs:
                return hs, f"the last dim of KV-cache input '{name}'"
    return 0, ""


def _site_heads(
    ix: GraphIndex, site: int, cols: list[Linear], kv_inputs: set[str], dims: dict[str, int]
) -> tuple[int, int, int]:
    """(q heads, KV heads, head size) of one attention site; 0 where the graph does not say. The head
    size comes from the op's inputs and the projection widths, never from the hidden size (Gemma: 256
    at hidden 2304)."""
    node = ix.nodes[site]
    nh, nkv = attr(node, "num_heads", 0), attr(node, "kv_num_heads", 0)
    if node.op_type == "MultiHeadAttention":
        nkv = nh
    if is_op(node, "Attention"):  # ONNX Attention: head counts given only for 3-D inputs
        nh = attr(node, "q_num_heads", 0)
    if node.op_type == "Attention" and node.domain == MS_DOMAIN:
        if site not in ix.linears:
            raise PreserveError(
                f"unrecognised layer structure at node '{ix.label(site)}': its q|k|v weight is not "
                f"an initializer"
            )
        width = ix.linears[site].width
        sizes = attr(node, "qkv_hidden_sizes") or [width // 3] * 3
        return nh, nh, sizes[0] // nh if nh else 0
    declared, source = _declared_head_size(ix, node, kv_inputs, dims)
    if nh:
        width = width_of(ix, node.input[0])
        packed = len(node.input) < 2 or not node.input[1]
        heads = nh + 2 * nkv if packed else nh
        if declared and width and width != heads * declared:
            raise PreserveError(
                f"unrecognised layer structure at node '{ix.label(site)}': head size {declared} (from "
                f"{source}) times its {heads} heads is not the {width} columns of its query"
            )
        return nh, nkv, declared or (width // heads if width % heads == 0 else 0)
    hs = declared
    if not hs:  # a Reshape right after a column linear: [..., heads or -1, head_size]
        for c in cols:
            for i in ix.consumers.get(bias_after(ix, c)[1], ()):
                shape = ix.constant(ix.nodes[i].input[1]) if is_op(ix.nodes[i], "Reshape") else None
                if shape is not None and shape.size >= 3 and int(shape.reshape(-1)[-1]) > 0:
                    hs = int(shape.reshape(-1)[-1])
    return 0, 0, hs


# GroupQueryAttention inputs that hold one value per q head (attention sinks, gpt-oss): split like q.
PER_HEAD_SLOTS = {(MS_DOMAIN, "GroupQueryAttention"): (11,)}
# Its quantized KV-cache's scales (k_scale, v_scale): one value per tensor is the same on every rank.
KV_SCALE_SLOTS = {(MS_DOMAIN, "GroupQueryAttention"): (12, 13)}


def _per_head_inputs(ix: GraphIndex, site: int, nh: int) -> dict[str, int]:
    node = ix.nodes[site]
    found = {}
    for slot in PER_HEAD_SLOTS.get((node.domain, node.op_type), ()):
        name = node.input[slot] if slot < len(node.input) else ""
        if not name:
            continue
        t = ix.inits.get(name)
        if t is None or list(t.dims) != [nh]:
            raise PreserveError(
                f"unrecognised layer structure at node '{ix.label(site)}': its per-head input {slot} "
                f"('{name}') is not an initializer of its {nh} heads"
            )
        found[name] = nh
    for slot in KV_SCALE_SLOTS.get((node.domain, node.op_type), ()):
        name = node.input[slot] if slot < len(node.input) else ""
        t = ix.inits.get(name) if name else None
        if name and (t is None or int(np.prod(t.dims)) != 1):
            raise PreserveError(
                f"unrecognised layer structure at node '{ix.label(site)}': its KV-cache quantization scale "
                f"input {slot} ('{name}') is not one per-tensor value (a per-channel scale is not split)"
            )
    return found


def _propagate(ix: GraphIndex, layout: Layout, seeds: set[str]) -> set[str]:
    sharded = set(seeds)
    for i, node in enumerate(ix.nodes):
        if (
            i in layout.region
            and not is_op(node, "Shape")
            and not is_op(node, "Size")
            and any(t in sharded for t in node.input)
        ):
            sharded.update(o for o in node.output if o)
    return sharded


def _reaches_output_through_layout(ix: GraphIndex, tensor: str) -> str | None:
    if tensor in ix.outputs:
        return tensor
    todo, seen = [tensor], set()
    while todo:
        t = todo.pop()
        for i in ix.consumers.get(t, ()):
            node = ix.nodes[i]
            if node.op_type in LAYOUT_OPS and node.input[0] == t and node.output[0] not in seen:
                if node.output[0] in ix.outputs:
                    return node.output[0]
                seen.add(node.output[0])
                todo.append(node.output[0])
    return None


def _state_nodes(ix: GraphIndex) -> list[tuple[int, str, str]]:
    """(node, state input, state output) of every node other than attention and linears that carries a
    graph input to a graph output of the same rank and type: a recurrent, SSM or convolution state
    (Mamba, Gated DeltaNet's LinearAttention / CausalConvWithState)."""

    def rank_and_type(vi) -> tuple[int, int]:
        t = vi.type.tensor_type
        return (len(t.shape.dim) if t.HasField("shape") else -1), t.elem_type

    found = []
    for i, node in enumerate(ix.nodes):
        if (
            is_attention(node)
            or i in ix.linears
            or node.op_type in LAYOUT_OPS
            or is_op(node, "Concat")
            or any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute)
        ):
            continue
        states = {r for r in (root_input(ix, t) for t in node.input if t) if r}
        outs = {o for o in (_reaches_output_through_layout(ix, t) for t in node.output if t) if o}
        pairs = sorted(
            (s, o)
            for s in states
            for o in outs
            if rank_and_type(ix.inputs[s]) == rank_and_type(ix.outputs[o])
        )
        if pairs:
            found.append((i, *pairs[0]))
    return found


def _replicate_state_layers(ix: GraphIndex, layout: Layout) -> None:
    """A state layer is computed whole on every rank: its state cannot be split by heads or columns,
    and replicating it is exact (its input, the normed residual stream, is the same on every rank, and
    so is its output). The layer is delimited by linears: from the state node forward to the output
    projections, and from their inputs back to the input projections; every one of them must be a
    linear no other layer claims, else the layer is refused, naming the state node."""
    claimed = layout.columns.keys() | layout.rows.keys()
    for i, state, out in _state_nodes(ix):
        if i in layout.region:  # a KV-cache update inside an attention block (ScatterND into a static cache)
            continue
        node = ix.nodes[i]
        outs, todo, seen = set(), [o for o in node.output if o], set()
        while todo:
            t = todo.pop()
            for c in ix.consumers.get(t, ()):
                if c in ix.linears:
                    outs.add(c)
                elif c not in seen and not is_attention(ix.nodes[c]):
                    seen.add(c)
                    todo.extend(o for o in ix.nodes[c].output if o)
        ins = {c for o in outs for c in walk_back(ix, ix.nodes[o].input[0])[1]}
        if not outs or (outs | ins) & claimed:
            raise PreserveError(
                f"cannot shard the layer at node '{ix.label(i)}' ({node.op_type}): it carries state from "
                f"graph input '{state}' to graph output '{out}' (a recurrent, SSM or convolution state), and "
                f"no projections of its own enclose it to compute it whole on every rank"
            )
        layout.replicated |= outs | ins
        layout.state_layers.add(tuple(sorted(outs)))  # a layer of several state nodes counts once


def _output_projections(ix: GraphIndex, out: str) -> set[int]:
    """The linears that read an attention output through layout operators and an output gate (a Mul:
    Qwen3.5's ``attention * sigmoid(gate)``, the gate being per head like the output)."""
    rows, todo, seen = set(), [out], set()
    while todo:
        for i, t in readers_through_layout(ix, todo.pop()):
            node = ix.nodes[i]
            if i in ix.linears and node.input[0] == t:
                rows.add(i)
            elif is_op(node, "Mul") and node.output[0] not in seen:
                seen.add(node.output[0])
                todo.append(node.output[0])
    return rows


def find_layout(
    ix: GraphIndex, world: int, *, vocab_parallel: bool = False, dims: dict[str, int] | None = None
) -> Layout:
    """The Megatron layout of ``ix``'s graph for ``world`` ranks; PreserveError names what is refused."""
    dims = dict(dims or {})
    layout = Layout()
    sites = attention_cores(ix.graph)
    if not sites:
        raise PreserveError(
            "unrecognised layer structure: no attention found (GroupQueryAttention, "
            "MultiHeadAttention, Attention, or MatMul -> Softmax -> MatMul)"
        )
    col_seeds: set[str] = set()
    kv_paths = kv_cache_paths(ix.graph)
    for site in sites:
        rows = _output_projections(ix, ix.nodes[site].output[0])
        if len(rows) != 1:
            raise PreserveError(
                f"unrecognised layer structure at node '{ix.label(site)}': its output does not reach "
                f"exactly one output projection (found {len(rows)})"
            )
        row = ix.linears[rows.pop()]
        region, cols, _ = walk_back(ix, ix.nodes[row.index].input[0])
        if site in ix.linears:
            cols.add(site)
        col_lins = [ix.linears[c] for c in sorted(cols)]
        kv = {r for i in region for r in (root_input(ix, t) for t in ix.nodes[i].input) if r in kv_paths}
        kv |= {r for r in (root_input(ix, t) for t in kv_slot_inputs(ix.nodes[site])) if r}
        for name in sorted(kv & kv_paths.keys()):
            rank = len(
                ix.graph.input[[vi.name for vi in ix.graph.input].index(name)].type.tensor_type.shape.dim
            )
            if kv_paths[name].seq_axis != rank - 2:
                # Its head axis is divided where [batch, heads, sequence, head_size] has it; a cache that
                # reaches its Concat through a Transpose or Reshape keeps its heads elsewhere.
                raise PreserveError(
                    f"unrecognised layer structure at node '{ix.label(kv_paths[name].concat)}': KV-cache "
                    f"input '{name}' is not laid out [batch, heads, sequence, head_size] (its Concat grows "
                    f"axis {kv_paths[name].seq_axis} of it)"
                )
        nh, nkv, hs = _site_heads(ix, site, col_lins, kv, dims)
        if not hs:
            raise PreserveError(
                f"unrecognised layer structure at node '{ix.label(site)}': cannot tell its head size "
                f"(give the KV-cache's last dim with --dim NAME=N)"
            )
        for what, count in (("attention heads", nh), ("KV heads", nkv)):
            if count and count % world:
                raise PreserveError(f"--tp {world} does not divide the {count} {what} of '{ix.label(site)}'")
        layout.per_head.update(_per_head_inputs(ix, site, nh))

        def label(width: int, nh=nh, hs=hs) -> str:
            return "attention heads" if nh and width == nh * hs else "KV heads" if nh else "heads"

        for lin in col_lins:
            layout.columns[lin.index] = _column(ix, lin, hs, label)
        layout.rows[row.index] = row
        layout.region |= region
        layout.head_size.add(hs)
        layout.heads |= {h for h in (nh, nkv) if h}
        layout.heads |= {p // hs for lin in col_lins for p in layout.columns[lin.index].parts if p % hs == 0}
        for lin in col_lins:
            col_seeds.update(o for o in ix.nodes[lin.index].output if o)
    _replicate_state_layers(ix, layout)
    layout.experts = find_experts(ix, world)
    routers = {r for e in layout.experts.values() for r in e.routers}
    layout.replicated |= routers - layout.columns.keys() - layout.rows.keys()
    _find_mlps(ix, layout, col_seeds)
    _find_output_gates(ix, layout)
    _find_lm_head(ix, layout, vocab_parallel)
    _find_kv_and_shards(ix, layout, col_seeds)
    _check_divisible(ix, layout, world)
    return layout


def _find_mlps(ix: GraphIndex, layout: Layout, col_seeds: set[str]) -> None:
    for i, lin in sorted(ix.linears.items()):
        if i in layout.columns or i in layout.rows or i in layout.replicated:
            continue
        region, cols, ok = walk_back(ix, ix.nodes[i].input[0], ELEMENTWISE)
        if not ok or not cols or cols & (layout.columns.keys() | layout.rows.keys()):
            continue
        for c in sorted(cols):
            layout.columns[c] = _column(ix, ix.linears[c], 1, lambda w: "FFN columns")
            col_seeds.update(o for o in ix.nodes[c].output if o)
        layout.rows[i] = lin
        layout.region |= region


def _from_layer_output(ix: GraphIndex, tensor: str, ends: set[str]) -> bool:
    """Whether ``tensor`` is one of ``ends`` through element-wise and layout operators."""
    todo, seen = [tensor], set()
    while todo:
        t = todo.pop()
        if t in ends:
            return True
        node = ix.producer_node(t)
        if t in seen or node is None or (node.op_type not in ELEMENTWISE and node.op_type not in LAYOUT_OPS):
            continue
        seen.add(t)
        todo.extend(x for x in node.input if x and not ix.is_constant(x))
    return False


def _find_output_gates(ix: GraphIndex, layout: Layout) -> None:
    """A linear left over whose output, through element-wise operators, multiplies the output of a
    row-parallel linear or an MoE (Qwen-MoE's shared-expert gate ``sigmoid(x W) * shared(x)``, as a Mul
    or as the gate input 2 of ``com.microsoft::GatedAdd``: in0 + in2 * in1) is replicated: every rank
    computes the same gate and applies it to the reduced output."""
    ends = {ix.nodes[i].output[0] for i in (*layout.rows, *layout.experts)}
    for i in sorted(ix.linears):
        if i in layout.columns or i in layout.rows or i in layout.replicated:
            continue
        todo, seen = [ix.nodes[i].output[0]], set()
        while todo:
            t = todo.pop()
            for c in ix.consumers.get(t, ()):
                node = ix.nodes[c]
                gating = is_op(node, "Mul") or (is_op(node, "GatedAdd", MS_DOMAIN) and node.input[2:3] == [t])
                if gating and any(_from_layer_output(ix, x, ends) for x in node.input if x != t):
                    layout.replicated.add(i)
                elif node.op_type in ELEMENTWISE and node.output[0] not in seen and not is_op(node, "Mul"):
                    seen.add(node.output[0])
                    todo.append(node.output[0])


def _find_lm_head(ix: GraphIndex, layout: Layout, vocab_parallel: bool) -> None:
    for i, lin in sorted(ix.linears.items()):
        if i in layout.columns or i in layout.rows or i in layout.replicated:
            continue
        if not reaches_output(ix, ix.nodes[i].output[0]) or layout.lm_head is not None:
            raise PreserveError(
                f"unrecognised layer structure at node '{lin.name}': a linear layer that is not part "
                f"of attention, an MLP or the LM head"
            )
        layout.lm_head = lin
    if vocab_parallel:
        if layout.lm_head is None:
            raise PreserveError(
                "--vocab-parallel: no LM head found (a linear layer whose output is the logits)"
            )
        layout.columns[layout.lm_head.index] = _column(ix, layout.lm_head, 1, lambda w: "vocabulary entries")


def _find_kv_and_shards(ix: GraphIndex, layout: Layout, col_seeds: set[str]) -> None:
    """KV-cache inputs (attention KV slots, or a Concat that joins them to sharded k/v) and the closure of
    sharded tensors; a sharded tensor read outside the region is refused."""
    first = _propagate(ix, layout, col_seeds)
    for i in sorted(layout.region | set(layout.columns)):
        node = ix.nodes[i]
        picks = kv_slot_inputs(node)
        if is_op(node, "Concat") and i in layout.region and any(t in first for t in node.input):
            picks = list(node.input)
        layout.kv_inputs.update(r for r in (root_input(ix, t) for t in picks if t) if r)
    if layout.lm_head is not None and layout.lm_head.index in layout.columns:
        col_seeds = col_seeds | {ix.nodes[layout.lm_head.index].output[0]}
    layout.sharded = _propagate(ix, layout, col_seeds | layout.kv_inputs)
    for t in sorted(layout.sharded):
        for i in ix.consumers.get(t, ()):
            node = ix.nodes[i]
            if (
                i in layout.region
                or is_op(node, "Shape")
                or is_op(node, "Size")
                or (i in layout.rows and node.input[0] == t)
                or (layout.lm_head is not None and t == ix.nodes[layout.lm_head.index].output[0])
            ):
                continue
            if i in layout.columns and ix.linears[i].kind == "attention":
                continue
            raise PreserveError(
                f"unrecognised layer structure at node '{ix.label(i)}': it reads '{t}', which is "
                f"split across ranks, outside attention and MLP"
            )
    for c in layout.columns.values():
        layout.widths.update(c.parts)
        layout.widths.add(c.linear.width)


def _check_divisible(ix: GraphIndex, layout: Layout, world: int) -> None:
    for i in sorted(layout.columns):
        col = layout.columns[i]
        if sum(col.parts) != col.linear.width:
            raise PreserveError(
                f"unrecognised layer structure at node '{col.linear.name}': its fused parts "
                f"{list(col.parts)} do not add up to its {col.linear.width} columns"
            )
        for part, label in zip(col.parts, col.labels):
            count = part // col.unit
            if part % col.unit or count % world:
                raise PreserveError(
                    f"--tp {world} does not divide the {count} {label} of '{col.linear.name}'"
                )
    for i in sorted(layout.rows):
        row = layout.rows[i]
        if row.kind == "nbits":
            node = ix.nodes[i]
            block = attr(node, "block_size", 0)
            blocks = -(-row.depth // block) if block else 0
            if not block or row.depth % block or blocks % world:
                raise PreserveError(
                    f"--tp {world} does not divide the {blocks} K blocks (block_size {block}) of '{row.name}'"
                )
            if len(node.input) > 4 and node.input[4]:
                raise PreserveError(
                    f"unrecognised layer structure at node '{row.name}': MatMulNBits with g_idx"
                )
        elif row.depth % world:
            raise PreserveError(f"--tp {world} does not divide the {row.depth} input rows of '{row.name}'")


def head_attrs(node: NodeProto) -> list[str]:
    return [a.name for a in node.attribute if a.name in HEAD_ATTRS and a.i > 0]
