"""Structure recognition shared by the planner, the cost model and ``shard``: found by graph shape,
never by names (docs/design.md §2).

The structural KV-cache rule: attention written in plain operators (TorchScript / dynamo exports, Olive's
tensor-parallel ranks, vendor toolchains' input) has no Attention op whose slot says "this is the cache".
Its cache is recognised by what the decoder does with it: a main-graph input that reaches a main-graph
output through a ``Concat`` (past -> present), with only layout operators between them. Everything the
input is turned into on its way to that Concat (the input itself, the layout operators' outputs) reads
the cache's bytes; ``Shape`` and ``Size`` read none.

The consumer table (which inputs of which operators carry weights and KV-cache, docs/design.md §2) lives
here too, so the planner, the cost model, dim binding and ``shard`` read one table.

Linear in the graph: one producer map, then walks along layout-operator chains only.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import GraphProto, NodeProto, TensorProto

from preserve_onnx.graph.index import MS_DOMAIN, Scope, is_default_domain, producer_index

# Operators that only move or relabel a tensor's elements (their other inputs are shapes/perms).
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Cast", "Unsqueeze", "Squeeze", "Identity"})
# Operators that read a tensor's metadata, not its bytes.
METADATA_OPS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class Slots:
    """Input indices of one consumer op: weights, KV-cache, and the KV layout (batch, sequence axes).

    ``experts``: the weight slots that hold expert banks (``[E, ...]`` tensors of a mixture-of-experts op,
    of which a step reads only the experts its tokens are routed to; docs/design.md §2).
    """

    weights: tuple[int, ...] = ()
    kv: tuple[int, ...] = ()
    kv_axes: tuple[int, int] = (0, 2)
    experts: tuple[int, ...] = ()


# (domain, op_type) -> slots. Domain "" stands for ai.onnx. Any input count is accepted (contrib ops
# grow optional inputs between onnxruntime releases; slots checked against onnxruntime 1.32's schemas).
CONSUMERS: dict[tuple[str, str], Slots] = {
    ("", "MatMul"): Slots(weights=(0, 1)),
    ("", "Gemm"): Slots(weights=(1, 2)),
    (MS_DOMAIN, "MatMulNBits"): Slots(weights=(1, 2, 3, 5)),
    (MS_DOMAIN, "Attention"): Slots(weights=(1, 2), kv=(4,), kv_axes=(1, 3)),
    (MS_DOMAIN, "MultiHeadAttention"): Slots(weights=(3,), kv=(6, 7)),
    (MS_DOMAIN, "GroupQueryAttention"): Slots(weights=(7, 8), kv=(3, 4)),
    ("", "Attention"): Slots(kv=(4, 5)),
    # Mixture-of-experts: fc1/fc2/fc3 weights and biases, all expert banks.
    (MS_DOMAIN, "MoE"): Slots(weights=(2, 3, 4, 5, 6, 7), experts=(2, 3, 4, 5, 6, 7)),
    # QMoE: fc1/fc2/fc3 weights, scales, biases (2-10) and zero points (11-13) are banks; router_weights
    # (14) and the global scales (15, 16) are read whole.
    (MS_DOMAIN, "QMoE"): Slots(weights=tuple(range(2, 17)), experts=tuple(range(2, 14))),
    # What onnxruntime's quantizers write (quantize_dynamic, static QDQ after fusion).
    ("", "MatMulInteger"): Slots(weights=(1, 3)),
    (MS_DOMAIN, "DynamicQuantizeMatMul"): Slots(weights=(1, 2, 3, 4)),
    (MS_DOMAIN, "MatMulIntegerToFloat"): Slots(weights=(1, 3, 5, 6)),
    ("", "QLinearMatMul"): Slots(weights=(3, 4, 5)),
    # GatherBlockQuantized (a quantized embedding) reads a few rows: not a consumer.
}


def consumer_slots(node: NodeProto) -> Slots | None:
    return CONSUMERS.get(op_key(node))


@dataclass(frozen=True)
class KvCachePath:
    """A plain-operator KV-cache: ``input`` -> layout ops -> ``Concat`` -> layout ops -> ``output``.

    ``aliases`` are the tensors that carry the input's bytes on the way to the Concat (the input first);
    ``seq_axis`` is the input's axis that the Concat grows (the sequence), or None when layout operators
    in between make it unknowable; ``concat`` is the Concat node's index in the main graph.
    """

    input: str
    output: str
    concat: int
    aliases: tuple[str, ...]
    seq_axis: int | None


def _is_layout(node: NodeProto) -> bool:
    """Whether ``node`` only relabels its data input's elements (input 0)."""
    return node.op_type in LAYOUT_OPS and is_default_domain(node.domain) and len(node.input) > 0


def kv_cache_paths(graph: GraphProto) -> dict[str, KvCachePath]:
    """Main-graph input name -> its KV-cache path, for every input that follows the structural rule.

    Walks backwards from each graph output through layout operators to a ``Concat``, and from each of
    the Concat's inputs through layout operators to a graph input: one producer map, then short chains.
    """
    producer = producer_index(graph)
    inputs = {vi.name: vi for vi in graph.input}
    for t in graph.initializer:
        inputs.pop(t.name, None)  # an input with a default value is a constant to every runtime

    def back(tensor: str) -> tuple[str, list[int]]:
        """Follow layout operators upwards from ``tensor``: (where the chain starts, its nodes top-down)."""
        chain: list[int] = []
        while tensor in producer and len(chain) < 16:
            node = graph.node[producer[tensor]]
            if not _is_layout(node):
                break
            chain.append(producer[tensor])
            tensor = node.input[0]
        return tensor, chain[::-1]

    paths: dict[str, KvCachePath] = {}
    for out in graph.output:
        top, _ = back(out.name)
        concat = producer.get(top)
        node = graph.node[concat] if concat is not None else None
        if node is None or node.op_type != "Concat" or not is_default_domain(node.domain):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        for inp in node.input:
            source, chain = back(inp)
            if source not in inputs or source in paths:
                continue
            vi = inputs[source]
            rank = len(vi.type.tensor_type.shape.dim) if vi.type.tensor_type.HasField("shape") else 0
            axes: tuple[int, ...] | None = tuple(range(rank)) if rank else None
            for i in chain:
                axes = _follow_axes(graph.node[i], axes)
            seq = None
            if axes is not None and axis is not None and -len(axes) <= axis < len(axes):
                seq = axes[axis % len(axes)]
            aliases = (source, *(graph.node[i].output[0] for i in chain))
            paths[source] = KvCachePath(source, out.name, concat, aliases, seq)
    return paths


def _follow_axes(node: NodeProto, axes: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The input axes behind ``node``'s output axes (Cast/Identity keep them, Transpose permutes them)."""
    if axes is None or node.op_type in ("Cast", "Identity"):
        return axes
    if node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        perm = perm or list(reversed(range(len(axes))))
        return tuple(axes[p] for p in perm) if sorted(perm) == list(range(len(axes))) else None
    return None  # Reshape/Squeeze/Unsqueeze: the sequence axis can no longer be told


def reads_bytes(node: NodeProto) -> bool:
    """Whether ``node`` reads its inputs' values (``Shape``/``Size`` read only metadata)."""
    return not (is_default_domain(node.domain) and node.op_type in METADATA_OPS)


# -- attention cores (shared with `shard`, docs/design.md §8) ----------------------------------------

# The attention operators that hold a whole attention block (output 0 is the context, outputs 1-2 the
# present KV-cache): (domain, op_type), domain "" for ai.onnx. The one attention-op table of the project.
ATTENTION_OPS = frozenset(
    {
        (MS_DOMAIN, "GroupQueryAttention"),
        (MS_DOMAIN, "MultiHeadAttention"),
        (MS_DOMAIN, "Attention"),
        ("", "Attention"),
    }
)


def op_key(node: NodeProto) -> tuple[str, str]:
    """``(domain, op_type)`` with the default domain spelled "" (the key of the tables here)."""
    return ("" if is_default_domain(node.domain) else node.domain, node.op_type)


def is_attention(node: NodeProto) -> bool:
    return op_key(node) in ATTENTION_OPS


def attention_cores(graph: GraphProto) -> list[int]:
    """Indices of the nodes that end an attention block, found by structure: every
    ``com.microsoft`` GroupQueryAttention / MultiHeadAttention / Attention and ONNX ``Attention`` (opset
    23), and in plain-operator exports every ``MatMul`` whose first input is a ``Softmax`` output
    (through Cast/Dropout/Identity, or the value inputs of a ``Where`` that masks NaNs): the
    probabilities times V. Output 0 of each is the attention context that o_proj reads."""
    producer = producer_index(graph)

    def from_softmax(tensor: str, depth: int = 0) -> bool:
        src = graph.node[producer[tensor]] if tensor in producer else None
        if src is None or not is_default_domain(src.domain) or depth > 4:
            return False
        if src.op_type == "Softmax":
            return True
        if src.op_type in ("Cast", "Dropout", "Identity"):
            return from_softmax(src.input[0], depth + 1)
        if src.op_type == "Where":
            return any(from_softmax(t, depth + 1) for t in src.input[1:])
        return False

    cores = []
    for index, node in enumerate(graph.node):
        if is_attention(node):
            cores.append(index)
        elif is_default_domain(node.domain) and node.op_type == "MatMul" and from_softmax(node.input[0]):
            cores.append(index)
    return cores


# -- linear layers' output widths (message sizes, head sizes) ----------------------------------------

# Operators a linear layer's output passes through on its way to a collective or an attention op.
_PASS_THROUGH = {"Add", "Mul", "Sub", "Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze"}
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})


def producer_width(scope: Scope, tensor: str, depth: int = 0) -> tuple[int, int]:
    """(last-axis width, element type) of ``tensor`` when a linear layer with a constant weight makes
    it (through elementwise/layout operators such as a bias Add), else (0, 0)."""
    node: NodeProto | None = scope.producers.get(tensor)
    if node is None or depth > 8:
        return 0, 0
    width, dtype = _linear_output(scope, node)
    if width:
        return width, dtype
    if node.op_type in _PASS_THROUGH:
        for name in node.input:
            if name and name not in scope.initializers:
                return producer_width(scope, name, depth + 1)
    return 0, 0


def _linear_output(scope: Scope, node: NodeProto) -> tuple[int, int]:
    """(output width, element type) of a linear layer with a constant weight, else (0, 0)."""
    inits = scope.initializers
    if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
        w = inits[node.input[1]]
        if w.dims and w.data_type in FLOAT_TYPES:
            return int(w.dims[-1]), w.data_type
    if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits:
        w = inits[node.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        if len(w.dims) == 2 and w.data_type in FLOAT_TYPES:
            return int(w.dims[0] if trans_b else w.dims[1]), w.data_type
    if node.op_type == "MatMulNBits":
        n = next((a.i for a in node.attribute if a.name == "N"), 0)
        scales = inits.get(node.input[2]) if len(node.input) > 2 else None
        return int(n), (scales.data_type if scales is not None else TensorProto.FLOAT)
    return 0, 0
