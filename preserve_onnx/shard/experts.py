"""Mixture-of-experts layers (``com.microsoft::MoE`` / ``QMoE``), tensor-parallel (docs/design.md §8).

Every rank keeps all E experts and the router: the intermediate axis of every expert is split. fc1
(and fc3) ``[E, rows, K]`` are cut on their rows (the intermediate: gate|up blocks each, or interleaved
gate/value pairs kept whole, ``swiglu_fusion`` 2 / 1), fc2 ``[E, hidden, intermediate]`` on its K axis;
the op's output is then a partial sum that a ``com.microsoft::AllReduce`` completes, and fc2's bias,
added to every rank's partial sum by the kernel, stays on rank 0 only (zeros elsewhere). QMoE weights
are packed along K (``bits`` per element), with scales and zero points per row or per K block: a
rank's intermediate must be a whole number of quantization blocks (whole bytes when per row).

The linears whose outputs reach the router inputs (router_probs, QMoE's router_weights) are replicated:
every rank computes the same routing. Structure only: no weight bytes are read here.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import NodeProto

from preserve_onnx.config import MS_DOMAIN
from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.index import GraphIndex, attr
from preserve_onnx.shard.cutting import Cut
from preserve_onnx.shard.tracing import walk_back

# Input slots per op: (fc1 weight, scales, bias, zero points), fc2 (...), fc3 (...); -1 = none.
_SLOTS = {
    "MoE": ((2, -1, 3, -1), (4, -1, 5, -1), (6, -1, 7, -1)),
    "QMoE": ((2, 3, 4, 11), (5, 6, 7, 12), (8, 9, 10, 13)),
}
ROUTER_SLOTS = {"MoE": (1,), "QMoE": (1, 14)}
# QMoE inputs a split cannot handle (FP8 activation scales): refused when present.
_QMOE_UNSUPPORTED = range(17, 21)


@dataclass(frozen=True)
class Experts:
    """One MoE / QMoE node: its intermediate width, the cut of each expert tensor, its routers."""

    index: int
    name: str
    inter: int
    cuts: tuple[tuple[str, Cut], ...]
    routers: frozenset[int]


def is_moe(node: NodeProto) -> bool:
    return node.domain == MS_DOMAIN and node.op_type in _SLOTS


def _input(node: NodeProto, slot: int) -> str:
    return node.input[slot] if 0 <= slot < len(node.input) else ""


class _Moe:
    """The facts of one node, and the refusals that name it."""

    def __init__(self, ix: GraphIndex, index: int, world: int) -> None:
        self.ix, self.index, self.world = ix, index, world
        self.node = ix.nodes[index]
        self.label = ix.label(index)
        self.quantized = self.node.op_type == "QMoE"

    def refuse(self, why: str) -> PreserveError:
        return PreserveError(f"unrecognised layer structure at node '{self.label}': {why}")

    def dims(self, slot: int) -> tuple[int, ...] | None:
        name = _input(self.node, slot)
        if not name:
            return None
        t = self.ix.inits.get(name)
        if t is None:
            raise self.refuse(f"its input {slot} ('{name}') is not an initializer")
        return tuple(int(d) for d in t.dims)

    def bits(self, fc: int) -> int:
        if not self.quantized:
            return 0
        return attr(self.node, f"fc{fc}_expert_weight_bits", 0) or attr(self.node, "expert_weight_bits", 4)

    def split(self, slot: int, axis: int, parts: tuple[int, ...]) -> tuple[str, Cut]:
        dims = self.dims(slot)
        out = list(dims)
        out[axis] //= self.world
        return _input(self.node, slot), Cut("split", axis, parts, dims, tuple(out))


def _packed(parts: tuple[int, ...], bits: int, world: int) -> tuple[int, ...] | None:
    """``parts`` (elements) as bytes of ``bits``-bit values, when every rank's block is whole bytes."""
    if any(p * bits % 8 or (p // world) * bits % 8 for p in parts):
        return None
    return tuple(p * bits // 8 for p in parts)


def _experts(ix: GraphIndex, index: int, world: int) -> Experts:
    m = _Moe(ix, index, world)
    node, op = m.node, m.node.op_type
    if m.quantized:
        quant = attr(node, "quant_type", b"int")
        quant = quant.decode() if isinstance(quant, bytes) else quant
        if quant != "int":
            raise m.refuse(f"QMoE quant_type '{quant}' is not split (integer quantization only)")
        if attr(node, "weights_prepacked", 0):
            raise m.refuse("QMoE weights_prepacked: an execution provider's own layout cannot be split")
        for slot in _QMOE_UNSUPPORTED:
            if _input(node, slot):
                raise m.refuse(f"QMoE input {slot} (FP8 activation scales) is not split")
    (w1, s1, b1, z1), (w2, s2, b2, z2), (w3, s3, b3, z3) = _SLOTS[op]
    fc1, fc2 = m.dims(w1), m.dims(w2)
    if fc1 is None or fc2 is None or len(fc1) != 3 or len(fc2) != 3:
        raise m.refuse("its fc1/fc2 expert weights are not [experts, rows, columns] initializers")
    bits1, bits2, bits3 = m.bits(1), m.bits(2), m.bits(3)
    inter = fc2[2] * 8 // bits2 if bits2 else fc2[2]
    fusion = fc1[1] // inter if inter and fc1[1] % inter == 0 else 0
    swiglu = attr(node, "swiglu_fusion", 0)
    if fusion not in (1, 2) or (fusion == 2) != (swiglu in (1, 2)):
        raise m.refuse(
            f"fc1's {fc1[1]} rows are neither its {inter} intermediate columns nor a fused pair of them "
            f"(swiglu_fusion {swiglu})"
        )
    if inter % world:
        raise PreserveError(
            f"--tp {world} does not divide the {inter} expert intermediate columns of '{m.label}'"
        )
    block = attr(node, "block_size", 0) if m.quantized else 0
    share = inter // world
    if m.quantized and block and share % block:
        raise PreserveError(
            f"--tp {world} does not divide the {inter // block if inter % block == 0 else inter / block:g} "
            f"K blocks (block_size {block}) of the experts' fc2 of '{m.label}'"
        )
    if m.quantized and not block and share * bits2 % 8:
        raise PreserveError(
            f"--tp {world} leaves {share} {bits2}-bit columns per rank in the experts' fc2 of '{m.label}': "
            f"not whole bytes"
        )
    # fc1 rows: [gate | up] blocks each split (swiglu_fusion 2), or interleaved gate/value pairs in
    # contiguous runs (1: a rank's run of 2*share rows holds whole pairs), or the intermediate alone.
    rows1 = (inter, inter) if swiglu == 2 and fusion == 2 else (fc1[1],)
    cuts = [m.split(w1, 1, rows1)]
    if _input(node, b1):
        cuts.append(m.split(b1, 1, rows1))
    cuts.append(m.split(w2, 2, (fc2[2],)))
    if _input(node, b2):
        cuts.append((_input(node, b2), Cut("first")))
    fc3 = m.dims(w3)
    if fc3 is not None:
        if len(fc3) != 3 or fc3[1] != inter:
            raise m.refuse(f"its fc3 expert weights {list(fc3)} do not have its {inter} intermediate rows")
        cuts.append(m.split(w3, 1, (inter,)))
        if _input(node, b3):
            cuts.append(m.split(b3, 1, (inter,)))
    if m.quantized:
        cuts += _scales_and_zero_points(m, (s1, z1, rows1, bits1), (s3, z3, (inter,), bits3))
        cuts += _fc2_scales_and_zero_points(m, s2, z2, inter, block, bits2)
    routers: set[int] = set()
    for slot in ROUTER_SLOTS[op]:
        name = _input(node, slot)
        if name and name not in ix.inits:
            routers |= walk_back(ix, name)[1]
    return Experts(index, m.label, inter, tuple(cuts), frozenset(routers))


def _scales_and_zero_points(m: _Moe, *fcs) -> list[tuple[str, Cut]]:
    """fc1/fc3 scales and zero points: per row of the weight (their axis 1), like the weight's rows.
    2-D zero points pack the rows' values along axis 1 (``bits`` each)."""
    cuts = []
    for scales, zero_points, rows, bits in fcs:
        if _input(m.node, scales):
            cuts.append(m.split(scales, 1, rows))
        dims = m.dims(zero_points)
        if dims is None:
            continue
        if len(dims) == 3:
            cuts.append(m.split(zero_points, 1, rows))
            continue
        packed = _packed(rows, bits, m.world)
        if packed is None or len(dims) != 2 or dims[1] != sum(packed):
            raise m.refuse(f"its per-row zero points {list(dims)} cannot be cut into whole bytes per rank")
        cuts.append(m.split(zero_points, 1, packed))
    return cuts


def _fc2_scales_and_zero_points(m: _Moe, scales: int, zero_points: int, inter: int, block: int, bits: int):
    """fc2's scales and zero points: per output row (2-D, the same on every rank) or per K block (3-D,
    cut on the block axis; 4-bit zero points unpacked, cut and packed again)."""
    cuts = []
    blocks = inter // block if block else 0
    dims = m.dims(scales)
    if dims is not None and len(dims) == 3:
        cuts.append(m.split(scales, 2, (blocks,)))
    dims = m.dims(zero_points)
    if dims is not None and len(dims) == 3:
        name = _input(m.node, zero_points)
        if bits == 4:
            per_row = -(-blocks // 2)
            out = (dims[0], dims[1], -(-(blocks // m.world) // 2))
            cuts.append((name, Cut("zero_points", 1, (blocks,), (dims[0] * dims[1], per_row), out)))
        else:
            packed = _packed((blocks,), bits, m.world)
            if packed is None:
                raise m.refuse(f"its fc2 zero points {list(dims)} cannot be cut into whole bytes per rank")
            cuts.append(m.split(zero_points, 2, packed))
    return cuts


def find_experts(ix: GraphIndex, world: int) -> dict[int, Experts]:
    """Every MoE / QMoE node of ``ix``'s graph, by node index; PreserveError names what is refused."""
    return {i: _experts(ix, i, world) for i, node in enumerate(ix.nodes) if is_moe(node)}
