"""Hypothesis strategies for the property tests: random tensor-parallel graphs, built from a plain spec.

A strategy draws a :class:`ModelSpec` (a readable value that hypothesis prints and shrinks); :func:`build`
turns it into the ModelProto of one rank (weight *values* depend on the rank, the graph does not) plus a
:class:`Facts` record of what the graph is made of, written independently of the passes so that the
tests can compute the expected plan (docs/design.md §2, §4) themselves.

What the graphs contain (all float32 activations, stream ``[batch, 1, H]``):

* layers of weight consumers of every kind in docs/design.md §2 that the CPU onnxruntime runs: MatMul with the
  weight in input 1 or input 0, Gemm with B and C, MatMulNBits (4 bit, scales, zero points, bias),
  com.microsoft Attention (fused QKV weights, bias, ``past``), MultiHeadAttention (bias, past_key,
  past_value), GroupQueryAttention (past kv, cos/sin caches, head size 16) and the ONNX-domain
  Attention of opset 23 (past_key, past_value);
* collectives after any layer: AllReduce, and AllGather (axis -1 or 2, followed by a MatMul that
  brings the width back), which bounds windows even when it is not a selected collective;
* weights reaching their consumer through constant-only chains (DequantizeLinear of int8 with
  per-tensor or per-axis scale and optional zero point, Cast from float16, Transpose, Reshape of a
  flat initializer) or from a ``Constant`` node, with the chain's nodes scattered anywhere earlier in
  the node list;
* shared weights: a consumer may reuse a weight expression made for an earlier one (same or outer
  graph), so one tensor is read in several windows and several times in one window;
* ``If`` nodes whose branches hold layers and collectives and read outer-scope weights (or their own
  initializers) and main-graph KV-cache inputs.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper

from tests.builders import MS, G, collective, init, prefetch, vi

PAST = 3  # past sequence length fed to the runtime
BATCH = 2  # batch fed to the runtime
GQA_HEAD = 16  # GroupQueryAttention on CPU needs head_size % 16 == 0
NBITS_BLOCK = 16
ROPE_CACHE = 8  # rows of the cos/sin caches (>= PAST + 1)

# The consumer table of docs/design.md §2, written out again here on purpose (not imported from the passes):
# (domain, op_type) -> (weight slots, kv slots, (batch axis, sequence axis) of the KV inputs).
CONSUMERS = {
    ("", "MatMul"): ((0, 1), (), None),
    ("", "Gemm"): ((1, 2), (), None),
    (MS, "MatMulNBits"): ((1, 2, 3, 5), (), None),
    (MS, "Attention"): ((1, 2), (4,), (1, 3)),
    (MS, "MultiHeadAttention"): ((3,), (6, 7), (0, 2)),
    (MS, "GroupQueryAttention"): ((7, 8), (3, 4), (0, 2)),
    ("", "Attention"): ((), (4, 5), (0, 2)),
}

BLOCK_KINDS = ("mm", "mm0", "gemm", "nbits", "msattn", "mha", "gqa", "attn23", "none")


# --------------------------------------------------------------------------------------------- spec


class ShortRepr:
    """A repr with only the fields that differ from their defaults, so failing examples read short."""

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING or value != f.default:
                parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis' pretty printer
        printer.text(repr(self))


@dataclass(frozen=True, repr=False)
class WeightSpec(ShortRepr):
    """How one float weight reaches its consumer.

    base: ``f32`` (initializer as is), ``f16`` (float16 initializer -> Cast), ``int8`` (int8
    initializer -> DequantizeLinear), ``const`` (a Constant node: never a prefetch target).
    transpose / reshape: the initializer is stored transposed / flat and brought back by Transpose /
    Reshape (both: stored flat-transposed, Reshape then Transpose).
    share: 0 makes a fresh weight; k > 0 reuses the (k-1)-th visible weight expression of the same
    shape, when there is one.
    local: inside an If branch, store the initializer in the branch rather than the main graph.
    """

    base: str = "f32"
    transpose: bool = False
    reshape: bool = False
    zero_point: bool = False
    per_axis: bool = False
    share: int = 0
    local: bool = False


@dataclass(frozen=True, repr=False)
class Block(ShortRepr):
    """One layer: a weight consumer (or none) followed by an optional collective."""

    kind: str
    weights: tuple[WeightSpec, ...] = ()
    flags: tuple[bool, ...] = (False, False, False)
    heads: int = 1
    kv_share: int = 0  # k > 0: reuse an earlier KV-cache input of the same shape
    collective: str = ""  # "", "AllReduce", "AllGather"
    gather_axis: int = -1
    gather_weight: WeightSpec = WeightSpec()


@dataclass(frozen=True, repr=False)
class IfBlock(ShortRepr):
    then_branch: tuple[Block, ...]
    else_branch: tuple[Block, ...]
    collective: str = ""


@dataclass(frozen=True, repr=False)
class ModelSpec(ShortRepr):
    hidden: int
    layers: tuple
    placement_seed: int = 0


# ------------------------------------------------------------------------------------------- facts


@dataclass
class Facts:
    """What the built graph is made of, recorded while building (no pass code involved).

    exprs: tensor name -> root initializers it is computed from by constant-only operators, each with
        its role: ``target`` (a weight to prefetch), ``dq_weight`` (quantized weight of a
        DequantizeLinear: a target only with ``qdq_weights``), ``dq_scale`` (never a target). Constant
        node outputs map to an empty list.
    init_bytes: initializer name -> bytes (from the numpy array).
    kv_inputs: main-graph KV-cache input -> its shape (symbols ``batch`` and ``past``).
    collectives: collective node name -> its original input.
    opset: default-domain opset of the model.
    """

    exprs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    init_bytes: dict[str, int] = field(default_factory=dict)
    kv_inputs: dict[str, tuple] = field(default_factory=dict)
    collectives: dict[str, str] = field(default_factory=dict)
    has_gqa: bool = False
    has_if: bool = False
    opset: int = 17


# ------------------------------------------------------------------------------------------ builder


class _Graph(G):
    """One graph under construction (the main graph or an If branch)."""

    def __init__(self, parent: "_Graph | None", name: str = ""):
        super().__init__(name)
        self.parent = parent
        self.chain: set[int] = set()  # ids of constant-chain nodes (scattered later)
        self.pool: list[tuple[tuple, str]] = []  # (shape, expression name) visible from here

    def visible_pool(self) -> list[tuple[tuple, str]]:
        out = self.parent.visible_pool() if self.parent else []
        return out + self.pool


class _Builder:
    def __init__(self, spec: ModelSpec, rank: int):
        self.spec = spec
        self.rank = rank
        self.H = spec.hidden
        self.facts = Facts()
        self.counter = 0
        self.main = _Graph(None, "prop")
        self.main.input("x", ["batch", 1, self.H])
        self.main.output("y", ["batch", 1, self.H])  # the last Identity's; the present outputs follow
        self.kv_pool: list[tuple[tuple, tuple[str, ...]]] = []
        self.shape_inits: dict[tuple, str] = {}

    # -- names and values ------------------------------------------------------------------------
    def name(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}_{self.counter}"

    def values(self, shape, dtype, scale=1.0) -> np.ndarray:
        # Values depend on the rank and the tensor's position, never on the structure drawn later.
        rng = np.random.default_rng([self.rank, self.counter, len(shape)])
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            return rng.integers(max(info.min, -100), min(info.max, 100) + 1, size=shape).astype(dtype)
        return (rng.standard_normal(shape) * scale).astype(dtype)

    def init(self, g: _Graph, stem: str, array: np.ndarray, local: bool = False) -> str:
        name = self.name(stem)
        (g if local else self.main).init(name, array)
        self.facts.init_bytes[name] = array.nbytes
        return name

    def node(self, g: _Graph, op, inputs, outputs, *, domain="", chain=False, **attrs) -> onnx.NodeProto:
        n = g.node(op, list(inputs), list(outputs), name=self.name(f"{op}"), domain=domain, **attrs)
        if chain:
            g.chain.add(id(n))
        return n

    def shape_init(self, shape: tuple) -> str:
        if shape not in self.shape_inits:
            self.shape_inits[shape] = self.init(self.main, "shape", np.array(shape, dtype=np.int64))
        return self.shape_inits[shape]

    # -- weights ---------------------------------------------------------------------------------
    def weight(self, g: _Graph, ws: WeightSpec, shape: tuple, scale: float) -> str:
        """A float32 tensor of ``shape`` that is constant: an initializer or a constant-only chain."""
        if ws.share:
            compatible = [name for s, name in g.visible_pool() if s == shape]
            if compatible:
                return compatible[(ws.share - 1) % len(compatible)]
        # onnxruntime 1.32 cannot load a DequantizeLinear(int8 outer-scope initializer) -> MatMul inside a
        # subgraph ("TransposeDQWeightsForMatMulNBits Missing required weight"), so in branches int8
        # weights live in the branch.
        local = (ws.local or ws.base == "int8") and g is not self.main
        if ws.base == "const":
            out = self.name("const")
            self.node(
                g,
                "Constant",
                [],
                [out],
                chain=True,
                value=init(out + "_value", self.values(shape, np.float32, scale)),
            )
            self.facts.exprs[out] = []
            g.pool.append((shape, out))
            return out
        stored = tuple(reversed(shape)) if ws.transpose and len(shape) == 2 else shape
        flat = ws.reshape
        store_shape = (int(np.prod(stored)),) if flat else stored
        if flat and len(stored) == 1:
            store_shape = (1, stored[0])  # a 1-D weight is stored as a row and reshaped back
        roots: list[tuple[str, str]] = []
        if ws.base == "int8":
            q = self.init(g, "wq", self.values(store_shape, np.int8), local)
            per_axis = ws.per_axis and len(store_shape) == 2
            axis = 0
            scale_arr = (
                (np.abs(self.values((store_shape[axis],), np.float32)) + 0.5) * scale / 50
                if per_axis
                else np.array(scale / 50, dtype=np.float32)
            )
            s = self.init(g, "wscale", scale_arr.astype(np.float32), local)
            ins = [q, s]
            roots = [(q, "dq_weight")]
            if ws.zero_point:
                zp_shape = scale_arr.shape
                zp = self.init(g, "wzp", self.values(zp_shape, np.int8) // 10, local)
                ins.append(zp)
                roots.append((zp, "dq_weight"))  # follows the quantized weight (docs/design.md §2)
            cur = self.name("dq")
            attrs = {"axis": axis} if per_axis else {}
            self.node(g, "DequantizeLinear", ins, [cur], chain=True, **attrs)
        elif ws.base == "f16":
            w = self.init(g, "wh", self.values(store_shape, np.float16, scale), local)
            roots = [(w, "target")]
            cur = self.name("cast")
            self.node(g, "Cast", [w], [cur], chain=True, to=TensorProto.FLOAT)
        else:
            cur = self.init(g, "w", self.values(store_shape, np.float32, scale), local)
            roots = [(cur, "target")]
        self.facts.exprs[cur] = list(roots)
        if flat:
            nxt = self.name("reshape")
            self.node(g, "Reshape", [cur, self.shape_init(stored)], [nxt], chain=True)
            cur = nxt
            self.facts.exprs[cur] = list(roots)
        if stored != shape:
            nxt = self.name("transpose")
            self.node(g, "Transpose", [cur], [nxt], chain=True, perm=[1, 0])
            cur = nxt
            self.facts.exprs[cur] = list(roots)
        g.pool.append((shape, cur))
        return cur

    def plain(self, g: _Graph, stem: str, array: np.ndarray) -> str:
        name = self.init(g, stem, array)
        self.facts.exprs[name] = [(name, "target")]
        return name

    def kv(self, stem: str, shape: tuple, share: int) -> tuple[str, ...]:
        """Main-graph KV-cache input(s) of ``shape`` (symbols 'batch' and 'past')."""
        if share:
            compatible = [names for s, names in self.kv_pool if s == shape]
            if compatible:
                return compatible[(share - 1) % len(compatible)]
        names = []
        for part in ("key", "value"):
            name = self.name(f"past_key_values.{stem}.{part}")
            self.main.input(name, list(shape))
            self.facts.kv_inputs[name] = shape
            names.append(name)
        names = tuple(names)
        self.kv_pool.append((shape, names))
        return names

    def present(self, g: _Graph, names: list[str], shape: list) -> None:
        if g is self.main:
            for n in names:
                self.main.output(n, shape)

    # -- layers ----------------------------------------------------------------------------------
    def block(self, g: _Graph, b: Block, h: str) -> str:
        H = self.H
        sc = 1.0 / np.sqrt(H)
        ws = list(b.weights) + [WeightSpec()] * 6
        if b.kind == "mm":
            out = self.name("mm")
            self.node(g, "MatMul", [h, self.weight(g, ws[0], (H, H), sc)], [out])
            h = out
        elif b.kind == "mm0":
            t, m, out = self.name("t"), self.name("mm0"), self.name("tb")
            self.node(g, "Transpose", [h], [t], perm=[0, 2, 1])
            self.node(g, "MatMul", [self.weight(g, ws[0], (H, H), sc), t], [m])
            self.node(g, "Transpose", [m], [out], perm=[0, 2, 1])
            h = out
        elif b.kind == "gemm":
            flat, gm, out = self.name("flat"), self.name("gemm"), self.name("unflat")
            self.node(g, "Reshape", [h, self.shape_init((-1, H))], [flat])
            ins = [flat, self.weight(g, ws[0], (H, H), sc)]
            if b.flags[1]:
                ins.append(self.weight(g, ws[1], (H,), 1.0))
            self.node(g, "Gemm", ins, [gm], transB=int(b.flags[0]), alpha=1.0, beta=1.0)
            self.node(g, "Reshape", [gm, self.shape_init((-1, 1, H))], [out])
            h = out
        elif b.kind == "nbits":
            blocks = H // NBITS_BLOCK
            bq = self.plain(g, "nbits_b", self.values((H, blocks, NBITS_BLOCK // 2), np.uint8))
            scales = self.weight(g, ws[0], (H * blocks,), 0.02)
            ins = [h, bq, scales]
            if b.flags[0]:
                ins.append(self.plain(g, "nbits_zp", self.values((H * ((blocks + 1) // 2),), np.uint8)))
            if b.flags[1]:
                ins += [""] * (5 - len(ins)) + [self.weight(g, ws[1], (H,), 1.0)]
            out = self.name("nbits")
            self.node(g, "MatMulNBits", ins, [out], domain=MS, K=H, N=H, bits=4, block_size=NBITS_BLOCK)
            h = out
        elif b.kind == "msattn":
            n = b.heads
            past = self.kv("ms", (2, "batch", n, "past", H // n), b.kv_share)[0]
            out, present = self.name("attn"), self.name("present")
            w, bias = self.weight(g, ws[0], (H, 3 * H), sc), self.weight(g, ws[1], (3 * H,), 0.1)
            self.node(
                g,
                "Attention",
                [h, w, bias, "", past],
                [out, present],
                domain=MS,
                num_heads=n,
                unidirectional=1,
            )
            self.present(g, [present], [2, "batch", n, "total", H // n])
            h = out
        elif b.kind == "mha":
            n = b.heads
            pk, pv = self.kv("mha", ("batch", n, "past", H // n), b.kv_share)
            out, rk, rv = self.name("mha"), self.name("present_key"), self.name("present_value")
            bias = self.weight(g, ws[0], (3 * H,), 0.1)
            self.node(
                g,
                "MultiHeadAttention",
                [h, h, h, bias, "", "", pk, pv],
                [out, rk, rv],
                domain=MS,
                num_heads=n,
            )
            self.present(g, [rk, rv], ["batch", n, "total", H // n])
            h = out
        elif b.kind == "gqa":
            self.facts.has_gqa = True
            n = H // GQA_HEAD
            kvn = 1 if b.flags[0] else n
            pk, pv = self.kv("gqa", ("batch", kvn, "past", GQA_HEAD), b.kv_share)
            q, k, v = self.name("q"), self.name("k"), self.name("v")
            self.node(g, "MatMul", [h, self.weight(g, ws[0], (H, H), sc)], [q])
            self.node(g, "MatMul", [h, self.weight(g, ws[1], (H, kvn * GQA_HEAD), sc)], [k])
            self.node(g, "MatMul", [h, self.weight(g, ws[2], (H, kvn * GQA_HEAD), sc)], [v])
            ins = [q, k, v, pk, pv, "seqlens_k", "total_sequence_length"]
            rotary = b.flags[1]
            if rotary:
                ins += [
                    self.weight(g, ws[3], (ROPE_CACHE, GQA_HEAD // 2), 1.0),
                    self.weight(g, ws[4], (ROPE_CACHE, GQA_HEAD // 2), 1.0),
                ]
            out, rk, rv = self.name("gqa"), self.name("present_key"), self.name("present_value")
            self.node(
                g,
                "GroupQueryAttention",
                ins,
                [out, rk, rv],
                domain=MS,
                num_heads=n,
                kv_num_heads=kvn,
                do_rotary=int(rotary),
            )
            self.present(g, [rk, rv], ["batch", kvn, "total", GQA_HEAD])
            h = out
        elif b.kind == "attn23":
            self.facts.opset = 23
            n = b.heads
            pk, pv = self.kv("attn", ("batch", n, "past", H // n), b.kv_share)
            out, rk, rv = self.name("attn23"), self.name("present_key"), self.name("present_value")
            self.node(g, "Attention", [h, h, h, "", pk, pv], [out, rk, rv], q_num_heads=n, kv_num_heads=n)
            self.present(g, [rk, rv], ["batch", n, "total", H // n])
            h = out
        # "none": no operator, so collectives follow each other (empty windows, anchors that are graph
        # inputs or outer-scope tensors)
        return self.collective(g, b.collective, h, b.gather_axis, b.gather_weight)

    def collective(self, g: _Graph, kind: str, h: str, axis: int = -1, ws: WeightSpec = WeightSpec()) -> str:
        if kind == "AllReduce":
            out = self.name("reduced")
            n = self.node(g, "AllReduce", [h], [out], domain=MS)
            self.facts.collectives[n.name] = h
            return out
        if kind == "AllGather":
            out, back = self.name("gathered"), self.name("mm_gather")
            n = self.node(g, "AllGather", [h], [out], domain=MS, group_size=2, axis=axis)
            self.facts.collectives[n.name] = h
            w = self.weight(g, ws, (2 * self.H, self.H), 1.0 / np.sqrt(2 * self.H))
            self.node(g, "MatMul", [out, w], [back])
            return back
        return h

    def if_block(self, g: _Graph, b: IfBlock, h: str) -> str:
        self.facts.has_if = True
        if "cond" not in [v.name for v in self.main.inputs]:
            self.main.input("cond", [], TensorProto.BOOL)
        branches = []
        for layers in (b.then_branch, b.else_branch):
            sub = _Graph(g)
            cur = h
            for layer in layers:
                cur = self.layer(sub, layer, cur)
            out = self.name("branch_out")
            self.node(sub, "Identity", [cur], [out])
            sub.output(out, ["batch", 1, self.H])
            branches.append(sub)
        out = self.name("if_out")
        attrs = {}
        for attr, sub in zip(("then_branch", "else_branch"), branches):
            _scatter(sub, self.spec.placement_seed + self.counter)
            sub.name = self.name(attr)
            attrs[attr] = sub.graph()
        self.node(g, "If", ["cond"], [out], **attrs)
        return self.collective(g, b.collective, out)

    def layer(self, g: _Graph, layer, h: str) -> str:
        return self.if_block(g, layer, h) if isinstance(layer, IfBlock) else self.block(g, layer, h)

    def model(self) -> onnx.ModelProto:
        h = "x"
        for layer in self.spec.layers:
            h = self.layer(self.main, layer, h)
        self.node(self.main, "Identity", [h], ["y"])
        if self.facts.has_gqa:
            self.main.input("seqlens_k", ["batch"], TensorProto.INT32)
            self.main.input("total_sequence_length", [1], TensorProto.INT32)
        _scatter(self.main, self.spec.placement_seed)
        opset = self.facts.opset
        return self.main.model(opset, ir_version=9 if opset <= 21 else 11)


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor a node reads, including names its subgraphs read from outer scopes."""
    names = set(node.input)
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subs:
            for n in sub.node:
                names |= _reads(n)
    return names


def _scatter(g: _Graph, seed: int) -> None:
    """Move every constant-chain node to a random earlier place that keeps the list topological."""
    rng = random.Random(seed)
    nodes = g.nodes
    for node in [n for n in nodes if id(n) in g.chain]:
        i = next(k for k, n in enumerate(nodes) if n is node)
        ins = set(node.input)
        lo = max((k + 1 for k, n in enumerate(nodes[:i]) if ins & set(n.output)), default=0)
        nodes.pop(i)
        nodes.insert(rng.randint(lo, i), node)


def build(spec: ModelSpec, rank: int = 0) -> tuple[onnx.ModelProto, Facts]:
    """The rank's model for ``spec`` and what it is made of."""
    b = _Builder(spec, rank)
    model = b.model()
    return model, b.facts


# -------------------------------------------------------------------------------------- strategies


@st.composite
def weight_specs(draw, in_branch: bool = False) -> WeightSpec:
    base = draw(st.sampled_from(("f32", "f32", "f16", "int8", "const")))
    if base == "const":
        return WeightSpec(base="const", share=draw(st.integers(0, 2)))
    return WeightSpec(
        base=base,
        transpose=draw(st.booleans()),
        reshape=draw(st.booleans()),
        zero_point=base == "int8" and draw(st.booleans()),
        per_axis=base == "int8" and draw(st.booleans()),
        share=draw(st.sampled_from((0, 0, 1, 2, 3))),
        local=in_branch and draw(st.booleans()),
    )


WEIGHT_COUNT = {
    "mm": 1,
    "mm0": 1,
    "gemm": 2,
    "nbits": 2,
    "msattn": 2,
    "mha": 1,
    "gqa": 5,
    "attn23": 0,
    "none": 0,
}


@st.composite
def blocks(draw, hidden: int, in_branch: bool = False, kinds=BLOCK_KINDS) -> Block:
    kind = draw(st.sampled_from(kinds))
    weights = tuple(draw(weight_specs(in_branch)) for _ in range(WEIGHT_COUNT[kind]))
    heads = draw(st.sampled_from([n for n in (1, 2, 4) if hidden % n == 0 and hidden // n >= 4]))
    collective = draw(st.sampled_from(("", "AllReduce", "AllReduce", "AllGather")))
    return Block(
        kind=kind,
        weights=weights,
        flags=tuple(draw(st.booleans()) for _ in range(3)),
        heads=heads,
        kv_share=draw(st.sampled_from((0, 0, 1, 2))),
        collective=collective,
        gather_axis=draw(st.sampled_from((-1, 2))),
        gather_weight=draw(weight_specs(in_branch)) if collective == "AllGather" else WeightSpec(),
    )


@st.composite
def if_blocks(draw, hidden: int, depth: int) -> IfBlock:
    """An If whose branches hold 0-3 layers (the then branch at least one), nested up to ``depth``."""
    layer = blocks(hidden, True)
    if depth > 1:
        layer = st.one_of(layer, if_blocks(hidden, depth - 1))
    then = tuple(draw(st.lists(layer, min_size=1, max_size=3)))
    other = tuple(draw(st.lists(layer, min_size=0, max_size=3)))
    return IfBlock(then, other, draw(st.sampled_from(("", "AllReduce"))))


@st.composite
def model_specs(draw, max_layers: int = 8, subgraphs: bool = True) -> ModelSpec:
    hidden = draw(st.sampled_from((16, 32)))
    n = draw(st.integers(1, max_layers))
    layers = []
    for _ in range(n):
        if subgraphs and draw(st.integers(0, 5)) == 0:
            layers.append(draw(if_blocks(hidden, depth=2)))
        else:
            layers.append(draw(blocks(hidden)))
    # At least one AllReduce, so that there is something to plan.
    if not any(_has_allreduce(layer) for layer in layers):
        layers.append(dataclasses.replace(draw(blocks(hidden)), collective="AllReduce"))
    return ModelSpec(hidden, tuple(layers), draw(st.integers(0, 2**16)))


def _has_allreduce(layer) -> bool:
    if isinstance(layer, IfBlock):
        inner = layer.then_branch + layer.else_branch
        return layer.collective == "AllReduce" or any(_has_allreduce(b) for b in inner)
    return layer.collective == "AllReduce"


# ------------------------------------------------------------------ shape inference (docs/design.md §7)

SHAPE_RUN = (2, 3, 8)  # the runtime shape of x in the shape-inference graphs


@dataclass(frozen=True, repr=False)
class ShapeSpec(ShortRepr):
    """A graph for the runtime's shape inference: x -> [MatMul] -> Prefetch chain -> collective -> stages.

    dims: x's declared dims, per axis an int (the runtime value of SHAPE_RUN), a name, or None (neither
        value nor name); None as a whole: x has no shape at all (unknown rank).
    prefetches: Prefetch links before the collective; ``prefetch_x`` is their X's type (``f32`` like
        the anchor, or ``u8``).
    collective: ``AllReduce``, ``AllGather`` (on ``gather_axis``, ``group_size`` = world) or ``""``
        (the Prefetch chain only).
    value_info: what the graph declares for the collective's output: ``""`` nothing, ``generated``
        TorchScript's dim names unrelated to the input's (``..._AllReduce_output_0_dim_0``),
        ``static`` the runtime dims as values, ``unknown`` dims with neither value nor name.
    stages: the TorchScript attention's Shape-based reshapes, each ``Shape -> Gather -> Concat ->
        Reshape`` with one -1: ``split`` [d0, d1, heads, -1] (rank 3 -> 4), ``merge`` [d0, d1, -1]
        (-> rank 3), ``same`` the full Shape (rank kept).
    """

    dims: tuple | None = (None, None, 8)
    matmul: bool = False
    prefetches: int = 0
    prefetch_x: str = "f32"
    collective: str = "AllReduce"
    gather_axis: int = -1
    world: int = 1
    value_info: str = ""
    stages: tuple[str, ...] = ("split", "merge")
    heads: int = 2


@st.composite
def shape_specs(draw) -> ShapeSpec:
    known_rank = draw(st.integers(0, 7)) > 0
    if known_rank:
        dims = tuple(
            draw(st.sampled_from((SHAPE_RUN[axis], f"{prefix}{axis}", None)))
            for axis, prefix in enumerate(draw(st.sampled_from(("batch", "d", "seq_"))) for _ in range(3))
        )
    else:
        dims = None
    # An input of unknown rank arrives as a scalar; AllReduce and a Prefetch whose X has another type
    # write their output as one (the documented limit), so unknown rank goes only through the others.
    collective = draw(
        st.sampled_from(("AllReduce", "AllGather", "")) if known_rank else st.sampled_from(("AllGather", ""))
    )
    prefetches = draw(st.integers(0 if collective else 1, 3))
    world = draw(st.sampled_from((1, 2))) if collective else 1
    stages = []
    rank = 3
    for _ in range(draw(st.integers(1, 3))):
        stage = draw(st.sampled_from(("split", "merge", "same") if rank == 3 else ("merge", "same")))
        stages.append(stage)
        rank = 4 if stage == "split" else 3 if stage == "merge" else rank
    return ShapeSpec(
        dims=dims,
        matmul=draw(st.booleans()),
        prefetches=prefetches,
        prefetch_x=draw(st.sampled_from(("f32", "u8"))) if known_rank else "f32",
        collective=collective,
        gather_axis=draw(st.sampled_from((0, 1, 2, -1))),
        world=world,
        value_info=draw(st.sampled_from(("", "generated", "static", "unknown"))) if collective else "",
        stages=tuple(stages),
        heads=draw(st.sampled_from((1, 2, 4))),
    )


def _ints(name: str, values) -> TensorProto:
    return init(name, np.asarray(values, dtype=np.int64))


def build_shape_model(spec: ShapeSpec, equivalent: bool = False) -> onnx.ModelProto:
    """The model for ``spec`` (every rank runs it on the same x). ``equivalent``: with Prefetch and the
    collective replaced by what they compute then, in plain ONNX: Identity, and on 2 ranks AllReduce ->
    Add(x, x), AllGather -> Concat(x, x). On 1 rank that is :func:`identity_twin` of the model."""
    nodes: list[onnx.NodeProto] = []
    inits = [_ints("axis0", [0]), _ints("minus1", [-1])]
    if "split" in spec.stages:
        inits.append(_ints("heads", [spec.heads]))
    cur = "x"
    if spec.matmul:
        inits.append(init("w", np.eye(SHAPE_RUN[2], dtype=np.float32) * 0.5))
        nodes.append(helper.make_node("MatMul", [cur, "w"], ["mm"], name="mm"))
        cur = "mm"
    if spec.prefetches:
        x_dtype = np.float32 if spec.prefetch_x == "f32" else np.uint8
        inits.append(init("pw", np.arange(64).astype(x_dtype)))
    for i in range(spec.prefetches):
        out = f"pf{i}"
        if not equivalent:
            nodes.append(prefetch(cur, "pw", out, name=out, collective="coll"))
        else:
            nodes.append(helper.make_node("Identity", [cur], [out], name=out))
        cur = out
    if spec.collective:
        out = f"/model/layers.0/{spec.collective}_output_0"
        if not equivalent:
            gather = spec.collective == "AllGather"
            attrs = {"axis": spec.gather_axis, "group_size": spec.world} if gather else {}
            nodes.append(collective(spec.collective, cur, out, "coll", **attrs))
        elif spec.world == 1:
            nodes.append(helper.make_node("Identity", [cur], [out], name="coll"))
        elif spec.collective == "AllReduce":
            nodes.append(helper.make_node("Add", [cur, cur], [out], name="coll"))
        else:
            nodes.append(
                helper.make_node("Concat", [cur] * spec.world, [out], name="coll", axis=spec.gather_axis)
            )
        cur = out
    for s, stage in enumerate(spec.stages):
        shape = f"shape{s}"
        nodes.append(helper.make_node("Shape", [cur], [shape], name=shape))
        parts = []
        for axis in (0, 1):
            inits.append(_ints(f"idx{s}_{axis}", axis))
            nodes += [
                helper.make_node(
                    "Gather", [shape, f"idx{s}_{axis}"], [f"g{s}_{axis}"], name=f"g{s}_{axis}", axis=0
                ),
                helper.make_node(
                    "Unsqueeze", [f"g{s}_{axis}", "axis0"], [f"u{s}_{axis}"], name=f"u{s}_{axis}"
                ),
            ]
            parts.append(f"u{s}_{axis}")
        target = f"target{s}"
        if stage == "same":
            target = shape
        else:
            parts += ["heads", "minus1"] if stage == "split" else ["minus1"]
            nodes.append(helper.make_node("Concat", parts, [target], name=target, axis=0))
        out = "y" if s == len(spec.stages) - 1 else f"r{s}"
        nodes.append(helper.make_node("Reshape", [cur, target], [out], name=f"reshape{s}"))
        cur = out
    value_infos = []
    if spec.collective and spec.value_info:
        run = list(SHAPE_RUN)
        if spec.collective == "AllGather":
            run[spec.gather_axis] *= spec.world
        declared = {
            "generated": [f"/model/layers.0/{spec.collective}_output_0_dim_{i}" for i in range(3)],
            "static": run,
            "unknown": [None] * 3,
        }[spec.value_info]
        value_infos.append(vi(f"/model/layers.0/{spec.collective}_output_0", TensorProto.FLOAT, declared))
    return G(
        "shapes",
        nodes=nodes,
        inputs=[vi("x", TensorProto.FLOAT, spec.dims)],
        outputs=[vi("y", TensorProto.FLOAT, None)],
        inits=inits,
        value_info=value_infos,
    ).runtime_model()


def identity_twin(
    model: onnx.ModelProto, prefetch: tuple[str, str] = ("preserve", "Prefetch")
) -> onnx.ModelProto:
    """A copy of ``model`` with every Prefetch and com.microsoft AllReduce / AllGather (subgraphs too)
    replaced by Identity of its input(s): the model whose loading docs/design.md §7's rule is about."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    ours = {prefetch, (MS, "AllReduce"), (MS, "AllGather")}

    def edit(graph: onnx.GraphProto) -> None:
        nodes = []
        for node in graph.node:
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    edit(sub)
            if (node.domain, node.op_type) not in ours:
                nodes.append(node)
                continue
            count = 1 if (node.domain, node.op_type) == prefetch else len(node.output)
            nodes += [
                helper.make_node("Identity", [node.input[i]], [node.output[i]], name=f"{node.name}/{i}")
                for i in range(count)
            ]
        del graph.node[:]
        graph.node.extend(nodes)

    edit(twin.graph)
    return twin
