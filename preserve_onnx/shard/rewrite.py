"""Turns a :class:`~.layout.Layout` into the rank graph and a plan per initializer.

The graph is the same on every rank (only weight values differ): head-count attributes, MatMulNBits
``N``/``K``, Reshape shape constants, Split sizes and Slice bounds of fused parts, and the KV-cache
inputs/outputs' head axis are divided by N; every row-parallel linear's and MoE / QMoE node's output
goes through a new ``com.microsoft::AllReduce`` placed right after it (a bias Add that follows it stays
after the AllReduce: counted once); with ``--vocab-parallel`` the LM head's output goes through
``com.microsoft::AllGather(axis=-1)``. Value-info of tensors whose shape changes is dropped (onnxruntime
infers it again).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import NodeProto, helper, numpy_helper

from preserve_onnx.config import MS_DOMAIN
from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.index import GraphIndex, Linear, attr, is_op
from preserve_onnx.shard.cutting import Cut
from preserve_onnx.shard.layout import Column, Layout, head_attrs


def _set_attr(node: NodeProto, name: str, value) -> None:
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(helper.make_attribute(name, value))


class Rewriter:
    """Applies a layout to a copy of the model; collects one :class:`Cut` per changed initializer."""

    def __init__(
        self,
        graph: onnx.GraphProto,
        ix: GraphIndex,
        layout: Layout,
        world: int,
        cuts: dict[str, Cut],
        shapes: dict[str, tuple[int | None, ...]] | None = None,
    ) -> None:
        self.graph = graph  # edited in place (a copy of the input model's graph or subgraph)
        self.nodes = list(self.graph.node)  # same order as ix.nodes: indices agree
        self.ix, self.layout, self.world = ix, layout, world
        self.cuts = cuts  # shared by every graph of the model: a weight captured by two If branches
        self.new_consts: dict[str, str] = {}
        self.shapes = shapes or {}  # inferred dims of the input model's tensors (None: unknown)
        self.patched: set[str] = set()
        self.names = {n.name for n in self.nodes} | {o for n in self.nodes for o in n.output}

    # -- initializers ------------------------------------------------------------------------
    def cut(self, name: str, cut: Cut, who: str) -> None:
        old = self.cuts.get(name)
        if old is not None and old != cut:
            raise PreserveError(
                f"initializer '{name}' is shared by layers that split it differently "
                f"(at '{who}'); cannot shard"
            )
        self.cuts[name] = cut

    def _split(self, name: str, axis: int, parts) -> Cut:
        dims = tuple(int(d) for d in self.ix.inits[name].dims)
        out = list(dims)
        out[axis] //= self.world
        return Cut("split", axis, tuple(parts), dims, tuple(out))

    def column_weights(self, col: Column) -> None:
        lin, node, W = col.linear, self.nodes[col.linear.index], self.world
        if lin.kind in ("matmul", "attention"):
            self.cut(lin.weight, self._split(lin.weight, 1, col.parts), lin.name)
        elif lin.kind == "qdq":
            self.cut(lin.weight, self._split(lin.weight, 1, col.parts), lin.name)
            dq = self.nodes[lin.dq]
            for name in dq.input[1:]:
                if name and list(self.ix.inits[name].dims) == [lin.width]:
                    self.cut(name, self._split(name, 0, col.parts), lin.name)
        elif lin.kind == "nbits":
            for slot in (1, 2, 3):
                if slot < len(node.input) and node.input[slot]:
                    name = node.input[slot]
                    dims = tuple(int(d) for d in self.ix.inits[name].dims)
                    per_row = int(np.prod(dims)) // lin.width
                    view = (lin.width, per_row)
                    out = (dims[0] // W, *dims[1:]) if len(dims) > 1 else (int(np.prod(dims)) // W,)
                    self.cut(name, Cut("split", 0, col.parts, view, out), lin.name)
            _set_attr(node, "N", lin.width // W)
        for bias in col.biases:
            self.cut(bias, self._split(bias, 0, col.parts), lin.name)
        if lin.kind == "attention":
            sizes = attr(node, "qkv_hidden_sizes")
            if sizes:
                _set_attr(node, "qkv_hidden_sizes", [s // W for s in sizes])

    def row_weights(self, lin: Linear) -> None:
        node, W = self.nodes[lin.index], self.world
        if lin.kind in ("matmul", "qdq"):
            self.cut(lin.weight, self._split(lin.weight, 0, (lin.depth,)), lin.name)
        elif lin.kind == "nbits":
            block = attr(node, "block_size")
            blocks = lin.depth // block
            b = self.ix.inits[node.input[1]]
            view = (lin.width, blocks, int(np.prod(b.dims)) // (lin.width * blocks))
            self.cut(
                node.input[1], Cut("split", 1, (blocks,), view, (lin.width, blocks // W, view[2])), lin.name
            )
            scales = node.input[2]
            sdims = tuple(int(d) for d in self.ix.inits[scales].dims)
            out = (int(np.prod(sdims)) // W,) if len(sdims) == 1 else (lin.width, blocks // W)
            self.cut(scales, Cut("split", 1, (blocks,), (lin.width, blocks), out), lin.name)
            if len(node.input) > 3 and node.input[3]:
                zp = self.ix.inits[node.input[3]]
                if zp.data_type == onnx.TensorProto.UINT8:
                    per_row = -(-blocks // 2)
                    packed = -(-(blocks // W) // 2)
                    out = (lin.width * packed,) if len(zp.dims) == 1 else (lin.width, packed)
                    self.cut(zp.name, Cut("zero_points", 1, (blocks,), (lin.width, per_row), out), lin.name)
                else:
                    self.cut(zp.name, Cut("split", 1, (blocks,), (lin.width, blocks), out), lin.name)
            if len(node.input) > 5 and node.input[5]:
                self.cut(node.input[5], Cut("scale"), lin.name)
            _set_attr(node, "K", lin.depth // W)
        else:
            raise PreserveError(f"unrecognised layer structure at node '{lin.name}': cannot split it by rows")

    # -- graph -------------------------------------------------------------------------------
    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def _const(self, like: str, values: np.ndarray) -> str:
        key = f"{like}|{values.dtype}|{values.tolist()}"
        if key not in self.new_consts:
            name = self._unique(f"{like}/tp{self.world}")
            self.graph.initializer.append(numpy_helper.from_array(values, name))
            self.new_consts[key] = name
        return self.new_consts[key]

    def collective(self, index: int, label: str, op: str, **attrs) -> NodeProto:
        node = self.nodes[index]
        out = node.output[0]
        partial = self._unique(f"{out}/rank_partial")
        node.output[0] = partial
        return helper.make_node(
            op, [partial], [out], name=self._unique(f"{label}/{op}"), domain=MS_DOMAIN, **attrs
        )

    def per_head_and_expert_weights(self) -> None:
        """Per-q-head inputs (attention sinks) cut like the q heads; every MoE / QMoE tensor as
        :mod:`.experts` planned it."""
        for name, heads in sorted(self.layout.per_head.items()):
            self.cut(name, self._split(name, 0, (heads,)), name)
        for experts in self.layout.experts.values():
            for name, cut in experts.cuts:
                self.cut(name, cut, experts.name)

    def heads(self) -> None:
        for i in sorted(
            self.layout.region
            | {c for c, col in self.layout.columns.items() if col.linear.kind == "attention"}
        ):
            node = self.nodes[i]
            for name in head_attrs(node):
                _set_attr(node, name, attr(node, name) // self.world)

    def reshapes(self) -> None:
        """Head counts and widths in the target shapes of Reshape and Expand of head-sharded tensors."""
        for i in sorted(self.layout.region):
            node = self.nodes[i]
            if node.input and node.input[0] in self.layout.sharded and len(node.input) > 1:
                if is_op(node, "Reshape"):
                    self._patch_shape(node, self._reshape_values)
                elif is_op(node, "Expand"):
                    self._patch_shape(node, self._expand_values(node.input[0]))

    def _patch_shape(self, node: NodeProto, rule) -> None:
        pieces = [node.input[1]]
        concat = self.ix.producer_node(node.input[1])
        if self.ix.constant(node.input[1]) is None and concat is not None and is_op(concat, "Concat"):
            if concat.output[0] in self.patched:  # one Concat shared by k's and v's Reshape: divided once
                return
            self.patched.add(concat.output[0])
            pieces = list(concat.input)
            target = concat
        else:
            target = node
        values = [self.ix.constant(p) for p in pieces]
        flat: list[int | None] = []
        for v in values:
            flat.extend([int(x) for x in v.reshape(-1)] if v is not None else [None])
        patched = rule(flat)
        if patched == flat:
            return
        pos = 0
        for k, (piece, v) in enumerate(zip(pieces, values)):
            n = v.size if v is not None else 1
            if v is not None and patched[pos : pos + n] != flat[pos : pos + n]:
                new = np.asarray(patched[pos : pos + n], v.dtype).reshape(v.shape)
                slot = list(target.input).index(piece) if target is concat else 1
                target.input[slot] = self._const(piece, new)
            pos += n

    def _expand_values(self, data: str):
        """Expand (repeat_kv's [B, kv_heads, n_rep, S, D]): an entry is divided only where the expanded
        tensor itself has that many heads (n_rep, a broadcast from 1, stays)."""
        dims = self.shapes.get(data)

        def rule(flat: list[int | None]) -> list[int | None]:
            if dims is None or len(dims) != len(flat):
                return flat
            return [
                v // self.world if v is not None and v in self.layout.heads and d == v else v
                for v, d in zip(flat, dims)
            ]

        return rule

    def _reshape_values(self, flat: list[int | None]) -> list[int | None]:
        lay, W = self.layout, self.world
        last = flat[-1] if flat else None
        out = list(flat)
        for k, v in enumerate(flat):
            if v is None or v <= 0:
                continue
            width = v in lay.widths and v not in lay.head_size  # [B, S, heads * head_size]
            # [.., heads, head_size], or [.., heads, per-head width] of a fused per-head part (Qwen3.5's
            # q|gate: [0, 0, heads, 2 * head_size] of the q part's width)
            per_head = last in lay.head_size or (last is not None and last > 0 and v * last in lay.widths)
            heads = k < len(flat) - 1 and v in lay.heads and per_head
            if width or heads:
                out[k] = v // W
        return out

    def cuts_of_fused(self) -> None:
        for col in self.layout.columns.values():
            for i in col.cuts:
                node = self.nodes[i]
                if is_op(node, "Split"):
                    if len(node.input) > 1 and node.input[1]:
                        sizes = self.ix.constant(node.input[1])
                        node.input[1] = self._const(node.input[1], (sizes // self.world).astype(sizes.dtype))
                    elif attr(node, "split"):
                        _set_attr(node, "split", [s // self.world for s in attr(node, "split")])
                else:
                    for slot in (1, 2):
                        v = self.ix.constant(node.input[slot])
                        if 0 < int(v.reshape(-1)[0]) <= col.linear.width:
                            node.input[slot] = self._const(
                                node.input[slot], (v // self.world).astype(v.dtype)
                            )

    def io_shapes(self) -> None:
        for vi in list(self.graph.input) + list(self.graph.output):
            if vi.name in self.layout.sharded:
                divide_head_axis(vi, self.world)
        keep = [
            vi
            for vi in self.graph.value_info
            if vi.name not in self.layout.sharded and vi.name not in self.cuts
        ]
        del self.graph.value_info[:]
        self.graph.value_info.extend(keep)

    def apply(self, vocab_parallel: bool) -> None:
        for i in sorted(self.layout.columns):
            self.column_weights(self.layout.columns[i])
        for i in sorted(self.layout.rows):
            self.row_weights(self.layout.rows[i])
        self.per_head_and_expert_weights()
        self.heads()
        self.reshapes()
        self.cuts_of_fused()
        self.io_shapes()
        inserted: dict[int, NodeProto] = {}
        for i in sorted(self.layout.rows):
            inserted[i] = self.collective(i, self.layout.rows[i].name, "AllReduce")
        for i, experts in sorted(self.layout.experts.items()):
            inserted[i] = self.collective(i, experts.name, "AllReduce")
        lm = self.layout.lm_head
        if vocab_parallel and lm is not None:
            inserted[lm.index] = self.collective(
                lm.index, lm.name, "AllGather", group_size=self.world, axis=-1
            )
        order = []
        for i, node in enumerate(self.nodes):
            order.append(node)
            if i in inserted:
                order.append(inserted[i])
        copies = []
        for node in order:  # copied before the repeated field that holds them is cleared
            c = NodeProto()
            c.CopyFrom(node)
            copies.append(c)
        del self.graph.node[:]
        self.graph.node.extend(copies)


def divide_head_axis(vi: onnx.ValueInfoProto, world: int) -> None:
    """A KV-cache input/output's head axis ([B, heads, S, D], or [2, B, heads, S, D]) divided, when fixed."""
    dims = vi.type.tensor_type.shape.dim
    axis = 2 if len(dims) == 5 else 1
    if len(dims) > axis and dims[axis].HasField("dim_value"):
        if dims[axis].dim_value % world:
            raise PreserveError(
                f"--tp {world} does not divide the {dims[axis].dim_value} heads of KV-cache "
                f"tensor '{vi.name}'"
            )
        dims[axis].dim_value //= world
