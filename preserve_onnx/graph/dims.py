"""Symbolic dimensions: how a tensor's dims become numbers (docs/design.md §2, "Sizes come from dims").

Exporters leave dims symbolic beyond batch and sequence (onnxruntime-genai's builder writes the
KV-cache as ``[batch_size, kv_heads, past_sequence_length, kv_cache_dim]``). A symbolic dim is bound in
this order:

1. ``--dim NAME=N`` (the spelling of onnxruntime's free-dimension overrides);
2. the batch and sequence axes of a KV-cache tensor by ``--batch`` / ``--context``;
3. the graph itself: the consuming attention operator (KV heads from ``kv_num_heads``, heads from
   ``num_heads``, head size = query width / ``num_heads``, the query width read from value_info or from
   the weight of the linear layer that makes it), or the ``present`` output that the cache flows into
   when that one has the dim fixed. A name bound to two different values by the graph is ambiguous and
   left unbound.

A dim that none of these binds is a one-line error naming the dim, the tensor and ``--dim``.
Nothing here reads weight bytes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import onnx

from preserve_onnx.errors import PreserveError, UsageError
from preserve_onnx.graph.index import MS_DOMAIN, Scope, attr, declared_types, iter_graphs, iter_scopes, nbytes
from preserve_onnx.graph.structure import (
    ATTENTION_OPS,
    FLOAT_TYPES,
    KvCachePath,
    consumer_slots,
    kv_cache_paths,
    op_key,
    producer_width,
)


def parse_dim_options(values: Iterable[str] | None) -> tuple[tuple[str, int], ...]:
    """``["kv_cache_dim=128", ...]`` -> ``(("kv_cache_dim", 128), ...)``; UsageError on bad spellings."""
    found: dict[str, int] = {}
    for text in values or ():
        name, sep, value = text.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value.isdigit() or int(value) < 1:
            raise UsageError(f"--dim: expected NAME=N with N a positive integer, got '{text}'")
        if name in found and found[name] != int(value):
            raise UsageError(f"--dim: '{name}' given twice ({found[name]} and {value})")
        found[name] = int(value)
    return tuple(found.items())


def dim_names(model: onnx.ModelProto) -> frozenset[str]:
    """Every symbolic dim name on the inputs, outputs and value_info of every graph (subgraphs included);
    an expression such as ``past_sequence_length + 1`` counts its name too. Graphs only: no weight is read."""
    names: set[str] = set()
    for _, graph in iter_graphs(model):
        for vi in (*graph.input, *graph.output, *graph.value_info):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
                continue
            for d in tt.shape.dim:
                if d.dim_param:
                    names.add(d.dim_param.strip())
                    expr = _EXPR.match(d.dim_param)
                    if expr:
                        names.add(expr.group(1))
    return frozenset(names)


def check_dim_names(
    models: onnx.ModelProto | Iterable[onnx.ModelProto],
    dims: Iterable[tuple[str, int]] | Mapping[str, int],
    what: str = "the model",
) -> None:
    """Refuse ``--dim`` names that no tensor of ``models`` has (a typo would otherwise bind nothing silently).

    Raises:
        UsageError: Names the unknown name(s) and lists the models' symbolic dim names.
    """
    given = [name for name, _ in (dims.items() if isinstance(dims, Mapping) else dims)]
    if not given:
        return
    known = frozenset().union(*map(dim_names, [models] if isinstance(models, onnx.ModelProto) else models))
    unknown = [name for name in given if name not in known]
    if not unknown:
        return
    listed = f"its symbolic dims: {', '.join(sorted(known))}" if known else "it has no symbolic dims"
    quoted = " or ".join(f"'{name}'" for name in unknown)
    raise UsageError(f"--dim {quoted}: no tensor of {what} has a dim of that name ({listed})")


# The KV-cache layout of each attention operator: axis -> (attribute giving that dim, or "head").
# GroupQueryAttention / MultiHeadAttention / ONNX Attention: [batch, heads, sequence, head_size];
# com.microsoft Attention's fused past: [2, batch, heads, sequence, head_size].
_KV_LAYOUT: dict[tuple[str, str], dict[int, str]] = {  # keys: structure.ATTENTION_OPS
    (MS_DOMAIN, "GroupQueryAttention"): {1: "kv_num_heads", 3: "head"},
    (MS_DOMAIN, "MultiHeadAttention"): {1: "num_heads", 3: "head"},
    (MS_DOMAIN, "Attention"): {2: "num_heads", 4: "head"},
    ("", "Attention"): {1: "kv_num_heads", 3: "head"},
}


def _head_size(
    scope: Scope, declared: Mapping[str, onnx.ValueInfoProto], node: onnx.NodeProto, key: tuple[str, str]
) -> int:
    """Head size from the query's width and the head counts (0 when the graph does not say)."""
    if key == (MS_DOMAIN, "Attention"):
        weights = scope.initializers.get(node.input[1]) if len(node.input) > 1 else None
        width = int(weights.dims[-1]) // 3 if weights is not None and weights.dims else 0
        heads = attr(node, "num_heads", 0)
        return width // heads if heads and width % heads == 0 else 0
    query = node.input[0] if node.input else ""
    vi = declared.get(query)
    width = 0
    if vi is not None and vi.type.tensor_type.HasField("shape") and vi.type.tensor_type.shape.dim:
        last = vi.type.tensor_type.shape.dim[-1]
        width = last.dim_value if last.HasField("dim_value") else 0
    width = width or producer_width(scope, query)[0] or _reshaped_width(scope, query)
    heads = attr(node, "num_heads", 0) or attr(node, "q_num_heads", 0)
    if key == (MS_DOMAIN, "GroupQueryAttention") and (len(node.input) < 2 or not node.input[1]):
        heads += 2 * attr(node, "kv_num_heads", 0)  # packed q|k|v in the query input
    return width // heads if heads and width and width % heads == 0 else 0


def _reshaped_width(scope: Scope, tensor: str) -> int:
    """The last entry of a ``Reshape``'s constant target when ``tensor`` is its output (or a rotary
    embedding's of it) and the entry is positive (the builder's per-head q/k norm reshapes the query back
    to ``[0, -1, width]``), else 0.
    Reads inline initializers and Constant nodes only (never the weights' data file)."""
    node = scope.producers.get(tensor)
    while node is not None and node.op_type in ("RotaryEmbedding", "MRotaryEmbedding"):  # same shape
        node = scope.producers.get(node.input[0])
    if node is None or node.op_type != "Reshape" or len(node.input) < 2:
        return 0
    source = scope.producers.get(node.input[1])
    value = (
        attr(source, "value")
        if source is not None and source.op_type == "Constant"
        else scope.initializers.get(node.input[1])
    )
    if not isinstance(value, onnx.TensorProto) or value.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    shape = onnx.numpy_helper.to_array(value).reshape(-1)
    return int(shape[-1]) if shape.size and shape[-1] > 0 else 0


def _fixed_dims(vi: onnx.ValueInfoProto | None) -> dict[int, int]:
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return {}
    return {
        axis: d.dim_value for axis, d in enumerate(vi.type.tensor_type.shape.dim) if d.HasField("dim_value")
    }


def graph_dims(
    model: onnx.ModelProto,
    scopes: Iterable[Scope] | None = None,
    kv_paths: Mapping[str, KvCachePath] | None = None,
) -> dict[str, int]:
    """Symbolic dim name -> value, for every KV-cache dim the graph itself fixes (rule 3 above).
    ``scopes``/``kv_paths``: the model's, when the caller has them already."""
    main = model.graph
    by_name: dict[str, set[int]] = {}
    inputs = {vi.name: vi for vi in main.input}
    outputs = {vi.name: vi for vi in main.output}

    def learn(tensor: str, axis_values: Mapping[int, int]) -> None:
        vi = inputs.get(tensor)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.dim_param and axis_values.get(axis, 0) > 0:
                by_name.setdefault(d.dim_param, set()).add(axis_values[axis])

    for scope in scopes if scopes is not None else iter_scopes(model):
        declared = None
        for node in scope.graph.node:
            key = op_key(node)
            if key not in _KV_LAYOUT:
                continue
            declared = declared if declared is not None else declared_types(scope.graph)
            values = {}
            for axis, source in _KV_LAYOUT[key].items():
                values[axis] = (
                    _head_size(scope, declared, node, key) if source == "head" else attr(node, source, 0)
                )
            slots = consumer_slots(node)  # the KV slots of docs/design.md §2's table
            batch_seq = slots.kv_axes
            if key == (MS_DOMAIN, "Attention"):
                values[0] = 2
            for slot in slots.kv:
                if slot < len(node.input) and node.input[slot]:
                    learn(node.input[slot], values)
            for present in node.output[1:3]:  # present key/value: the same layout
                if present in outputs:
                    learn_from = _fixed_dims(outputs[present])
                    for slot in slots.kv:
                        if slot < len(node.input) and node.input[slot]:
                            learn(
                                node.input[slot],
                                {
                                    a: v
                                    for a, v in learn_from.items()
                                    if a not in values and a not in batch_seq
                                },
                            )
    for path in (kv_paths if kv_paths is not None else kv_cache_paths(main)).values():
        concat_out = main.node[path.concat].output[0]
        if len(path.aliases) == 1 and concat_out == path.output:  # same axes on both sides
            fixed = _fixed_dims(outputs.get(path.output))
            learn(path.input, {a: v for a, v in fixed.items() if a not in (0, path.seq_axis)})
    return {name: next(iter(values)) for name, values in by_name.items() if len(values) == 1}


def bind_shape(
    vi: onnx.ValueInfoProto,
    *,
    dims: Mapping[str, int],
    graph: Mapping[str, int],
    batch_axis: int | None,
    seq_axis: int | None,
    batch: int,
    context: int,
    what: str,
) -> tuple[int, ...]:
    """``vi``'s dims as numbers, bound in the documented order; PreserveError names an unbindable dim."""
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        raise PreserveError(f"{what} '{vi.name}' has no shape; cannot size it")
    shape = []
    for axis, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            shape.append(d.dim_value)
        elif d.dim_param in dims:
            shape.append(dims[d.dim_param])
        elif axis == batch_axis:
            shape.append(batch)
        elif axis == seq_axis:
            shape.append(context)
        elif d.dim_param in graph:
            shape.append(graph[d.dim_param])
        else:
            label = f"symbolic dimension '{d.dim_param}'" if d.dim_param else "an unnamed dimension"
            hint = (
                f"give it with --dim {d.dim_param}=N"
                if d.dim_param
                else "name it in the model to bind it with --dim"
            )
            raise PreserveError(f"{what} '{vi.name}': cannot bind {label} (axis {axis}): {hint}")
    return tuple(shape)


def kv_bytes(
    vi: onnx.ValueInfoProto,
    axes: tuple[int | None, int | None],
    *,
    batch: int,
    context: int,
    dims: Mapping[str, int],
    graph: Mapping[str, int],
) -> int:
    """Bytes of a KV-cache input with its batch/sequence axes ``axes`` bound to ``batch``/``context``."""
    shape = bind_shape(
        vi,
        dims=dims,
        graph=graph,
        batch_axis=axes[0],
        seq_axis=axes[1],
        batch=batch,
        context=context,
        what="KV-cache input",
    )
    return nbytes(shape, vi.type.tensor_type.elem_type, f"KV-cache input '{vi.name}'")


@dataclass(frozen=True)
class Sizing:
    """Everything that turns a KV-cache input's dims into bytes: ``--batch``/``--context``, ``--dim``
    overrides and the dims the graph fixes (:func:`graph_dims`, worked out on first need: most
    exports fix every KV dim but batch and sequence, and then the graph is never searched)."""

    batch: int = 8
    context: int = 16384
    dims: Mapping[str, int] = field(default_factory=dict)
    find_graph_dims: Callable[[], Mapping[str, int]] = dict

    @classmethod
    def for_model(
        cls,
        model: onnx.ModelProto,
        batch: int,
        context: int,
        dims: Iterable[tuple[str, int]] = (),
        scopes: Iterable[Scope] | None = None,
        kv_paths: Mapping[str, KvCachePath] | None = None,
    ) -> "Sizing":
        return cls(batch, context, dict(dims), lambda: graph_dims(model, scopes, kv_paths))

    @functools.cached_property
    def graph(self) -> Mapping[str, int]:
        return self.find_graph_dims()

    def kv_bytes(self, vi: onnx.ValueInfoProto, axes: tuple[int | None, int | None]) -> int:
        return kv_bytes(vi, axes, batch=self.batch, context=self.context, dims=self.dims, graph=_Lazy(self))


class _Lazy(Mapping):
    """A Sizing's graph dims as a mapping that searches the graph only when a lookup needs it."""

    def __init__(self, sizing: Sizing) -> None:
        self.sizing = sizing

    def __getitem__(self, name: str) -> int:
        return self.sizing.graph[name]

    def __contains__(self, name: object) -> bool:
        return name in self.sizing.graph

    def __iter__(self):
        return iter(self.sizing.graph)

    def __len__(self) -> int:
        return len(self.sizing.graph)


# -- collective message sizes (docs/design.md §4.3, the budget rule) ----------------------------------


def message_bytes(
    scope: Scope, tensor: str, batch: int, declared: dict[str, onnx.ValueInfoProto] | None = None
) -> int:
    """Bytes of ``tensor`` in one decode step (sequence length 1, batch ``batch``); 0 when unknown."""
    vi = (declared if declared is not None else declared_types(scope.graph)).get(tensor)
    size = _declared_bytes(vi, batch) if vi is not None else None
    if size is not None:
        return size
    return _bytes_from_producer(scope, tensor, batch, depth=0)


def _declared_bytes(vi: onnx.ValueInfoProto, batch: int) -> int | None:
    tensor = vi.name
    if vi.type.HasField("tensor_type"):
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or tt.elem_type not in FLOAT_TYPES:
            return None
        dims = []
        for axis, d in enumerate(tt.shape.dim):
            # Symbolic dims: the first is the batch, the others (sequence) are 1 in a decode step.
            dims.append(d.dim_value if d.HasField("dim_value") else (batch if axis == 0 else 1))
        return nbytes(tuple(dims), tt.elem_type, tensor)
    return None


def _bytes_from_producer(scope: Scope, tensor: str, batch: int, depth: int) -> int:
    width, dtype = producer_width(scope, tensor)
    return nbytes((batch, width), dtype, tensor) if width else 0


assert set(_KV_LAYOUT) == ATTENTION_OPS, "every attention op needs its KV layout"


# -- decode-step layout: what a decode step's inputs look like, by structure (feeds, cost model) ------

_EXPR = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*([+-])\s*(\d+)\s*$")

# The present output(s) of each attention op and the KV input each one continues next step.
_PRESENT_OF: dict[tuple[str, str], dict[int, int]] = {  # keys: structure.ATTENTION_OPS
    (MS_DOMAIN, "GroupQueryAttention"): {1: 3, 2: 4},
    (MS_DOMAIN, "MultiHeadAttention"): {1: 6, 2: 7},
    (MS_DOMAIN, "Attention"): {1: 4},
    ("", "Attention"): {1: 4, 2: 5},
}


@dataclass(frozen=True)
class DecodeLayout:
    """A decode step's graph inputs as the graph's structure shows them (docs/design.md §2), never by name.

    ``kv_axes``: KV-cache input -> its (batch, sequence) axes (attention-op KV slots and structural
    Concat caches); ``feedback``: KV-cache output (present) -> the KV input it becomes next step;
    ``past`` / ``total`` / ``batch``: the symbolic dim names on the KV inputs' sequence axes (the past
    length), on the present outputs' sequence axes (past + new tokens) and on the KV batch axes;
    ``windows``: the dim names of window-sized buffers (GroupQueryAttention ``sliding_window_cache=1``
    with ``local_window_size`` W > 0, gpt-oss / Gemma 2 builder exports) -> W, their capacity: onnxruntime
    computes such a layer correctly only when the buffer holds exactly W slots, as onnxruntime-genai keeps it.
    """

    kv_axes: Mapping[str, tuple[int | None, int | None]] = field(default_factory=dict)
    feedback: Mapping[str, str] = field(default_factory=dict)
    past: frozenset[str] = frozenset()
    total: frozenset[str] = frozenset()
    batch: frozenset[str] = frozenset()
    fixed: Mapping[str, int] = field(default_factory=dict)
    windows: Mapping[str, int] = field(default_factory=dict)

    def values(
        self, *, batch: int, context: int, dims: Mapping[str, int] | None = None, new_tokens: int = 1
    ) -> dict[str, int]:
        """Symbolic dim name -> value at a step of ``new_tokens`` after a past of ``context``:
        ``--dim`` first, then the dims the graph fixes, then the roles above."""
        found = {name: batch for name in self.batch}
        found.update((name, context + new_tokens) for name in self.total)
        found.update((name, context) for name in self.past)
        found.update(self.windows)
        found.update(self.fixed)
        found.update(dims or {})
        return found


def decode_layout(model: onnx.ModelProto) -> DecodeLayout:
    """The :class:`DecodeLayout` of ``model``'s main graph (graphs only; never weights)."""
    main = model.graph
    inputs = {vi.name: vi for vi in main.input}
    outputs = {vi.name: vi for vi in main.output}
    kv_axes: dict[str, tuple[int | None, int | None]] = {}
    feedback: dict[str, str] = {}
    windowed: dict[str, int] = {}  # KV input of a window-sized buffer -> its capacity W

    def visit(graph: onnx.GraphProto, exported: Mapping[str, str]) -> None:
        """``exported``: this graph's tensors that leave it as a main-graph output (an If branch's
        outputs are its node's outputs by position: onnxruntime's merged decoders)."""
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH and op_key(node) == ("", "If"):
                    visit(a.g, {b.name: exported.get(o, o) for b, o in zip(a.g.output, node.output)})
            slots = consumer_slots(node)
            if slots is None or not slots.kv:
                continue
            window = attr(node, "local_window_size", 0) if attr(node, "sliding_window_cache", 0) else 0
            for slot in slots.kv:
                if slot < len(node.input) and node.input[slot] in inputs:
                    kv_axes.setdefault(node.input[slot], slots.kv_axes)
                    if window > 0:
                        windowed[node.input[slot]] = window
            for out, slot in _PRESENT_OF.get(op_key(node), {}).items():
                present = exported.get(node.output[out], node.output[out]) if out < len(node.output) else ""
                if present in outputs and slot < len(node.input) and node.input[slot] in inputs:
                    feedback.setdefault(present, node.input[slot])

    visit(main, {})
    paths = kv_cache_paths(main)
    for path in paths.values():
        rank = len(inputs[path.input].type.tensor_type.shape.dim)
        kv_axes.setdefault(path.input, (0, path.seq_axis if path.seq_axis is not None else max(0, rank - 2)))
        feedback.setdefault(path.output, path.input)
    names: dict[str, set[str]] = {"past": set(), "total": set(), "batch": set()}

    def dim_name(vi: onnx.ValueInfoProto | None, axis: int | None) -> str:
        dims = (
            vi.type.tensor_type.shape.dim if vi is not None and vi.type.tensor_type.HasField("shape") else ()
        )
        return dims[axis].dim_param if axis is not None and axis < len(dims) else ""

    windows: dict[str, int] = {}
    for name, (batch_axis, seq_axis) in kv_axes.items():
        names["batch"].add(dim_name(inputs[name], batch_axis))
        if name in windowed:
            windows[dim_name(inputs[name], seq_axis)] = windowed[name]
        else:
            names["past"].add(dim_name(inputs[name], seq_axis))
    for present, past in feedback.items():
        if past not in windowed:
            names["total"].add(dim_name(outputs[present], kv_axes[past][1]))
    # One interface convention, not structure: a Hugging Face / onnxruntime-genai decoder's
    # ``attention_mask`` spans the past and the new tokens (dynamo exports name its axis apart from the
    # present outputs' ``past_sequence_length + sequence_length``).
    mask = inputs.get("attention_mask")
    if kv_axes and mask is not None:
        names["total"].add(dim_name(mask, len(mask.type.tensor_type.shape.dim) - 1))
    for group in names.values():
        group.discard("")
    names["total"] -= names["past"]
    windows.pop("", None)
    return DecodeLayout(
        kv_axes,
        feedback,
        frozenset(names["past"]),
        frozenset(names["total"]),
        frozenset(names["batch"]),
        graph_dims(model, kv_paths=paths),
        {name: w for name, w in windows.items() if name not in names["past"]},
    )


def bind_lenient(
    shape: Iterable[int | str | None],
    values: Mapping[str, int],
    batch: int,
    by_axis: Mapping[int, int] | None = None,
) -> tuple[int, ...]:
    """Numbers for every dim of ``shape`` where no error is wanted (generated feeds, the cost model's
    activations): a fixed dim, a name in ``values`` (:meth:`DecodeLayout.values`), ``NAME +/- k`` of
    one, ``by_axis`` (a KV-cache input's batch and sequence axes), then axis 0 -> ``batch`` and any other
    axis -> 1 (the sequence length of a decode step)."""
    bound = []
    for axis, d in enumerate(shape):
        if isinstance(d, int) and d >= 0:
            bound.append(d)
            continue
        name = d if isinstance(d, str) else ""
        expr = _EXPR.match(name)
        if name in values:
            bound.append(values[name])
        elif expr and expr.group(1) in values:
            base = values[expr.group(1)]
            bound.append(base + int(expr.group(3)) if expr.group(2) == "+" else base - int(expr.group(3)))
        elif by_axis and axis in by_axis:
            bound.append(by_axis[axis])
        else:
            bound.append(batch if axis == 0 else 1)
    return tuple(bound)
