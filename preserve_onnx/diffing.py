"""Structural diff of two models or two rank directories, as data (``diff`` -> ``Diff``).

What is compared, per model: model fields (IR version, producer, ...), opset imports, metadata
properties, local functions; then per graph (the main graph and, through matched nodes, every
subgraph): graph inputs, outputs, value_info, initializers and nodes.

* Nodes are matched by name within their graph. Unnamed nodes (and names used twice) fall back to
  structure: the same op with the same outputs, else the same op with the same inputs. A matched node
  reports op/domain, rewired inputs, outputs, attribute and doc_string changes; its subgraph
  attributes are diffed as graphs (path ``<node>:<attribute>``, nested with ``/``). A graph whose
  common nodes come in a different order reports that once.
* Initializers are compared by metadata: dims, element type, where the bytes live (inline, or the
  external file, offset and length). Inline bytes are in the model already and are compared (shown
  as a short sha256); external bytes are read only with ``data=True``.
* Exit status semantics follow ``git diff --exit-code``: ``Diff.equal`` is what the CLI turns into
  0 or 1. If nothing above differs but the protobufs still do (a field this diff does not break
  down), one ``model`` entry says so, so "equal" is never claimed for models that are not.

Nothing here executes a model or writes a file.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from preserve_onnx.config import PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.index import COLLECTIVE_OPS, MS_DOMAIN
from preserve_onnx.model_io import external_info, load_model, model_files, validate_location
from preserve_onnx.passes.verify_prefetches import StaleLinks, stale_links

KINDS = (
    "model",
    "opset",
    "metadata",
    "function",
    "graph",
    "input",
    "output",
    "initializer",
    "value_info",
    "node",
)
_MODEL_FIELDS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")


@dataclass(frozen=True)
class Change:
    """One field that differs; ``None`` on the side where it is absent."""

    field: str  # "input[0]", "attribute max_size", "dims", "version", ...
    before: str | None
    after: str | None


@dataclass(frozen=True)
class Entry:
    """One difference: something added, removed or changed in one graph of a model."""

    kind: str  # one of KINDS
    status: str  # "added" | "removed" | "changed"
    graph: str  # "" for the main graph, "<node>:<attribute>" (nested with "/") for subgraphs
    name: str
    detail: str = ""  # one line: op and wiring for nodes, type and shape for tensors
    changes: tuple[Change, ...] = ()
    op: str = ""  # nodes: "domain::op_type" ("op_type" in the default domain)
    prefetch: bool = False  # nodes: spelled like a Prefetch node (the configured naming)


@dataclass(frozen=True)
class ModelDiff:
    """The differences between two models (one rank file of each side for directories)."""

    a: str
    b: str
    entries: tuple[Entry, ...]
    # Each side's stale Prefetch links (X read by no other node, docs/design.md §9); None when it has none.
    # A warning beside the diff, not a difference: two equal models can both be stale.
    stale_a: StaleLinks | None = None
    stale_b: StaleLinks | None = None

    @property
    def equal(self) -> bool:
        return not self.entries

    def counts(self) -> dict[str, int]:
        """``{"<kind> <status>": count}`` in entry order, e.g. ``{"node added": 3}``."""
        return dict(Counter(f"{e.kind} {e.status}" for e in self.entries))

    @property
    def prefetches_added(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.kind == "node" and e.status == "added" and e.prefetch)

    @property
    def prefetches_removed(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.kind == "node" and e.status == "removed" and e.prefetch)

    @property
    def rewired_collectives(self) -> tuple[Entry, ...]:
        """Collectives whose only change is which tensors they read (what optimize and strip do)."""
        return tuple(
            e
            for e in self.entries
            if e.kind == "node"
            and e.status == "changed"
            and e.op.split("::")[-1] in COLLECTIVE_OPS
            and e.op.startswith(MS_DOMAIN + "::")
            and all(c.field.startswith("input[") for c in e.changes)
        )


@dataclass(frozen=True)
class Diff:
    """The differences between A and B: one ModelDiff per model present on both sides."""

    a: str
    b: str
    models: tuple[ModelDiff, ...]
    only_a: tuple[str, ...] = ()  # model files of a directory A that B lacks
    only_b: tuple[str, ...] = ()

    @property
    def equal(self) -> bool:
        return not self.only_a and not self.only_b and all(m.equal for m in self.models)


def diff(
    a: onnx.ModelProto | str | Path,
    b: onnx.ModelProto | str | Path,
    *,
    naming: PrefetchNaming | None = None,
    data: bool = False,
) -> Diff:
    """Diff two models: ModelProtos, ``.onnx`` files, or two directories of models (paired by name).

    ``data=True`` also compares the bytes of external initializers (read from the data files next to
    each model); without it only their metadata is compared. Raises PreserveError for inputs that
    cannot be read or paired. ``naming`` (default: ``PrefetchNaming()``) says which nodes are
    Prefetch nodes (``Entry.prefetch``).
    """
    naming = naming or PrefetchNaming()
    if isinstance(a, onnx.ModelProto) or isinstance(b, onnx.ModelProto):
        ma, base_a = (a, None) if isinstance(a, onnx.ModelProto) else (load_model(Path(a)), Path(a).parent)
        mb, base_b = (b, None) if isinstance(b, onnx.ModelProto) else (load_model(Path(b)), Path(b).parent)
        la = "a" if base_a is None else str(a)
        lb = "b" if base_b is None else str(b)
        return Diff(
            la,
            lb,
            (diff_models(ma, mb, naming=naming, data=data, base_a=base_a, base_b=base_b, labels=(la, lb)),),
        )
    a, b = Path(a), Path(b)
    for p in (a, b):
        if not p.exists():
            raise PreserveError(f"{p}: no such file or directory")
    if a.is_dir() != b.is_dir():
        kinds = ("a directory", "a file") if a.is_dir() else ("a file", "a directory")
        raise PreserveError(f"cannot diff {kinds[0]} against {kinds[1]} ({a} vs {b})")
    if not a.is_dir():
        return Diff(str(a), str(b), (_diff_files(a, b, naming, data),))
    names_a, names_b = [p.name for p in model_files(a)], [p.name for p in model_files(b)]
    common = sorted(set(names_a) & set(names_b))
    if not common and not names_a and not names_b:
        raise PreserveError(f"no .onnx files in {a} or {b}")
    models = tuple(_diff_files(a / n, b / n, naming, data) for n in common)
    return Diff(
        str(a),
        str(b),
        models,
        tuple(sorted(set(names_a) - set(names_b))),
        tuple(sorted(set(names_b) - set(names_a))),
    )


def _diff_files(a: Path, b: Path, naming: PrefetchNaming, data: bool) -> ModelDiff:
    return diff_models(
        load_model(a),
        load_model(b),
        naming=naming,
        data=data,
        base_a=a.parent,
        base_b=b.parent,
        labels=(str(a), str(b)),
    )


def diff_models(
    a: onnx.ModelProto,
    b: onnx.ModelProto,
    *,
    naming: PrefetchNaming | None = None,
    data: bool = False,
    base_a: Path | None = None,
    base_b: Path | None = None,
    labels: tuple[str, str] = ("a", "b"),
) -> ModelDiff:
    """The differences between two loaded models; ``base_*`` are their folders (for ``data=True``)."""
    d = _Differ(naming or PrefetchNaming(), data, base_a, base_b)
    d.model(a, b)
    entries = d.entries
    if not entries and a.SerializeToString(deterministic=True) != b.SerializeToString(deterministic=True):
        entries = [
            Entry(
                "model",
                "changed",
                "",
                "(protobuf)",
                "the models differ in a field this diff does not break down",
            )
        ]
    naming = naming or PrefetchNaming()
    return ModelDiff(labels[0], labels[1], tuple(entries), _stale(a, naming), _stale(b, naming))


def _stale(model: onnx.ModelProto, naming: PrefetchNaming) -> StaleLinks | None:
    links = stale_links(model, naming)
    return links if links.stale else None


class _Differ:
    def __init__(self, naming: PrefetchNaming, data: bool, base_a: Path | None, base_b: Path | None):
        self.naming = naming
        self.data = data
        self.bases = (base_a, base_b)
        self.entries: list[Entry] = []

    def add(self, *args, **kwargs) -> None:
        self.entries.append(Entry(*args, **kwargs))

    # -- model level ---------------------------------------------------------------------------

    def model(self, a: onnx.ModelProto, b: onnx.ModelProto) -> None:
        changes = _field_changes(a, b, _MODEL_FIELDS)
        if changes:
            self.add("model", "changed", "", "(model)", "model fields", changes)
        ops_a = {o.domain or "ai.onnx": str(o.version) for o in a.opset_import}  # "" is the default domain
        ops_b = {o.domain or "ai.onnx": str(o.version) for o in b.opset_import}
        self.keyed(
            "opset",
            "",
            ops_a,
            ops_b,
            lambda v: f"version {v}",
            lambda x, y: [Change("version", x, y)] if x != y else [],
        )
        meta_a = {p.key: p.value for p in a.metadata_props}
        meta_b = {p.key: p.value for p in b.metadata_props}
        self.keyed(
            "metadata",
            "",
            meta_a,
            meta_b,
            repr,
            lambda x, y: [Change("value", repr(x), repr(y))] if x != y else [],
        )
        fn_a = {_fn_key(f): f for f in a.functions}
        fn_b = {_fn_key(f): f for f in b.functions}
        self.keyed(
            "function",
            "",
            fn_a,
            fn_b,
            _function_detail,
            lambda x, y: [] if x == y else [Change("definition", _function_detail(x), _function_detail(y))],
        )
        self.graph("", a.graph, b.graph)

    def keyed(self, kind: str, graph: str, a: dict, b: dict, describe, compare) -> None:
        """Entries for dicts keyed by name: removed (A order), added (B order), changed."""
        for key in a:
            if key not in b:
                self.add(kind, "removed", graph, key, describe(a[key]))
        for key in b:
            if key not in a:
                self.add(kind, "added", graph, key, describe(b[key]))
        for key in b:
            if key in a:
                changes = compare(a[key], b[key])
                if changes:
                    self.add(kind, "changed", graph, key, describe(b[key]), tuple(changes))

    # -- graph level ---------------------------------------------------------------------------

    def graph(self, path: str, a: onnx.GraphProto, b: onnx.GraphProto) -> None:
        changes = _field_changes(a, b, ("name", "doc_string"))
        if changes:
            self.add("graph", "changed", path, path or "(main)", "graph fields", changes)
        for kind, la, lb in (("input", a.input, b.input), ("output", a.output, b.output)):
            self.keyed(
                kind, path, _value_infos(la), _value_infos(lb), lambda v: v[1], lambda x, y: _io_changes(x, y)
            )
        self.keyed(
            "initializer",
            path,
            {t.name: t for t in a.initializer},
            {t.name: t for t in b.initializer},
            _tensor_detail,
            self.tensor_changes,
        )
        self.keyed(
            "value_info",
            path,
            _value_infos(a.value_info),
            _value_infos(b.value_info),
            lambda v: v[1],
            lambda x, y: [] if x[1] == y[1] else [Change("type", x[1], y[1])],
        )
        self.nodes(path, list(a.node), list(b.node))

    def nodes(self, path: str, a: list[onnx.NodeProto], b: list[onnx.NodeProto]) -> None:
        pairs = _match_nodes(a, b)
        matched_a = {i for i, _ in pairs}
        matched_b = {j for _, j in pairs}
        for i, node in enumerate(a):
            if i not in matched_a:
                self.add(
                    "node",
                    "removed",
                    path,
                    _label(node),
                    _node_detail(node),
                    op=_op(node),
                    prefetch=self.naming.matches(node),
                )
        for j, node in enumerate(b):
            if j not in matched_b:
                self.add(
                    "node",
                    "added",
                    path,
                    _label(node),
                    _node_detail(node),
                    op=_op(node),
                    prefetch=self.naming.matches(node),
                )
        subgraphs = []
        for i, j in sorted(pairs, key=lambda p: p[1]):
            changes, subs = _node_changes(a[i], b[j])
            if changes:
                self.add(
                    "node",
                    "changed",
                    path,
                    _label(b[j]),
                    _node_detail(b[j]),
                    tuple(changes),
                    op=_op(b[j]),
                    prefetch=self.naming.matches(b[j]),
                )
            prefix = f"{path}/" if path else ""
            subgraphs += [(f"{prefix}{_label(b[j])}:{attr}", ga, gb) for attr, ga, gb in subs]
        moved = _first_moved(pairs, a)
        if moved is not None:
            node, previous = moved
            self.add(
                "graph",
                "changed",
                path,
                path or "(main)",
                "node order",
                (Change("node order", f"{node} after {previous}", f"{node} before {previous}"),),
            )
        for sub_path, ga, gb in subgraphs:
            self.graph(sub_path, ga, gb)

    # -- tensors -------------------------------------------------------------------------------

    def tensor_changes(self, a: TensorProto, b: TensorProto) -> list[Change]:
        changes = []
        if list(a.dims) != list(b.dims):
            changes.append(Change("dims", _dims(a), _dims(b)))
        if a.data_type != b.data_type:
            changes.append(Change("dtype", _dtype(a.data_type), _dtype(b.data_type)))
        ext_a, ext_b = _is_external(a), _is_external(b)
        if ext_a != ext_b:
            changes.append(Change("stored", _where(a), _where(b)))
        elif ext_a:
            info_a, info_b = external_info(a), external_info(b)
            for key in sorted(set(info_a) | set(info_b), key=_ext_key_order):
                if info_a.get(key) != info_b.get(key):
                    changes.append(Change(f"external {key}", info_a.get(key), info_b.get(key)))
        if not ext_a and not ext_b:
            da, db = _inline_digest(a), _inline_digest(b)
            if da != db:
                changes.append(Change("data", da, db))
        elif self.data and not (ext_a and ext_b and self.same_bytes(a, b)):
            da, db = self.digest(a, 0), self.digest(b, 1)
            if da != db:
                changes.append(Change("data", da, db))
        return changes

    def same_bytes(self, a: TensorProto, b: TensorProto) -> bool:
        """Both tensors point at the same range of the same file: nothing to read."""
        base_a, base_b = self.bases
        if base_a is None or base_b is None or external_info(a) != external_info(b):
            return False
        fa, fb = validate_location(a, base_a), validate_location(b, base_b)
        return fa.exists() and fb.exists() and fa.samefile(fb)

    def digest(self, t: TensorProto, side: int) -> str:
        if not _is_external(t):
            return _inline_digest(t)
        base = self.bases[side]
        if base is None:
            raise PreserveError(
                f"initializer '{t.name}': --data needs the model's folder to read its "
                f"external data; pass a path rather than a loaded model"
            )
        path = validate_location(t, base)
        info = external_info(t)
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                remaining = int(length) if length else None
                while remaining is None or remaining > 0:
                    chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
                    if not chunk:
                        break
                    h.update(chunk)
                    if remaining is not None:
                        remaining -= len(chunk)
        except OSError as exc:
            raise PreserveError(f"initializer '{t.name}': cannot read {path}: {exc.strerror}") from None
        if remaining:
            raise PreserveError(f"initializer '{t.name}': {path} ends {remaining} bytes early")
        return f"sha256:{h.hexdigest()[:16]}"


# -- node matching and comparison --------------------------------------------------------------


def _match_nodes(a: list[onnx.NodeProto], b: list[onnx.NodeProto]) -> list[tuple[int, int]]:
    """Pairs (index in a, index in b): by unique name, then by (op, outputs), then by (op, inputs)."""
    names_a = Counter(n.name for n in a if n.name)
    names_b = Counter(n.name for n in b if n.name)
    index_b = {n.name: j for j, n in enumerate(b) if n.name and names_b[n.name] == 1}
    pairs = []
    for i, n in enumerate(a):
        if n.name and names_a[n.name] == 1 and n.name in index_b:
            pairs.append((i, index_b[n.name]))
    used_a = {i for i, _ in pairs}
    used_b = {j for _, j in pairs}
    # Structure, for unnamed nodes and names used more than once. A uniquely named node missing on
    # the other side is added or removed, never paired: its name is what reviewers look for.
    left_a = [i for i, n in enumerate(a) if i not in used_a and (not n.name or names_a[n.name] > 1)]
    left_b = [j for j, n in enumerate(b) if j not in used_b and (not n.name or names_b[n.name] > 1)]
    for key in (_by_outputs, _by_inputs):
        waiting: dict[tuple, list[int]] = defaultdict(list)
        for j in left_b:
            waiting[key(b[j])].append(j)
        rest_a = []
        for i in left_a:
            queue = waiting.get(key(a[i]))
            if queue:
                pairs.append((i, queue.pop(0)))
            else:
                rest_a.append(i)
        taken = {j for _, j in pairs}
        left_a, left_b = rest_a, [j for j in left_b if j not in taken]
    return pairs


def _by_outputs(n: onnx.NodeProto) -> tuple:
    return n.domain, n.op_type, tuple(n.output)


def _by_inputs(n: onnx.NodeProto) -> tuple:
    return n.domain, n.op_type, tuple(n.input)


def _node_changes(a: onnx.NodeProto, b: onnx.NodeProto):
    """(changes, [(attribute, graph a, graph b)] for subgraphs present on both sides)."""
    changes = _field_changes(a, b, ("name", "domain", "op_type"))
    for field, la, lb in (("input", a.input, b.input), ("output", a.output, b.output)):
        for k in range(max(len(la), len(lb))):
            x = la[k] if k < len(la) else None
            y = lb[k] if k < len(lb) else None
            if x != y:
                changes.append(Change(f"{field}[{k}]", x, y))
    attrs_a = {at.name: at for at in a.attribute}
    attrs_b = {at.name: at for at in b.attribute}
    subs = []
    for name in [*attrs_a, *(n for n in attrs_b if n not in attrs_a)]:
        x, y = attrs_a.get(name), attrs_b.get(name)
        if (
            x is not None
            and y is not None
            and x.type == y.type
            and x.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)
        ):
            if x.type == AttributeProto.GRAPH:
                subs.append((name, x.g, y.g))
            elif len(x.graphs) == len(y.graphs):
                subs += [(f"{name}[{k}]", gx, gy) for k, (gx, gy) in enumerate(zip(x.graphs, y.graphs))]
            else:
                changes.append(Change(f"attribute {name}", _attr_str(x), _attr_str(y)))
            continue
        sx = _attr_str(x) if x is not None else None
        sy = _attr_str(y) if y is not None else None
        if sx != sy:
            changes.append(Change(f"attribute {name}", sx, sy))
    if a.doc_string != b.doc_string:
        changes.append(Change("doc_string", _short(a.doc_string), _short(b.doc_string)))
    return changes, subs


def _first_moved(pairs: list[tuple[int, int]], a: list[onnx.NodeProto]) -> tuple[str, str] | None:
    """The first matched node (in A's order) that B puts before an earlier one, with that one."""
    ordered = sorted(pairs)
    best_j, best_i = -1, -1
    for i, j in ordered:
        if j < best_j:
            return _label(a[i]), _label(a[best_i])
        best_j, best_i = j, i
    return None


# -- formatting (one-line, deterministic) -------------------------------------------------------


def _label(node: onnx.NodeProto) -> str:
    """A node's name, or ``(<op> -> <first output>)`` for an unnamed one (stable under insertions)."""
    return node.name or f"({node.op_type} -> {node.output[0] if node.output else ''})"


def _op(node: onnx.NodeProto) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _node_detail(node: onnx.NodeProto) -> str:
    text = f"{_op(node)}({', '.join(node.input)}) -> {', '.join(node.output)}"
    attrs = " ".join(f"{a.name}={_attr_str(a)}" for a in node.attribute)
    return f"{text}  {attrs}" if attrs else text


def _attr_str(attr: AttributeProto) -> str:
    if attr.type == AttributeProto.GRAPH:
        return f"<graph {attr.g.name!r}: {len(attr.g.node)} nodes>"
    if attr.type == AttributeProto.GRAPHS:
        return f"<{len(attr.graphs)} graphs>"
    if attr.type == AttributeProto.TENSOR:
        return f"<tensor {_dtype(attr.t.data_type)}{_dims(attr.t)} {_inline_digest(attr.t)}>"
    if attr.type == AttributeProto.TENSORS:
        joined = b"".join(t.SerializeToString(deterministic=True) for t in attr.tensors)
        return f"<{len(attr.tensors)} tensors sha256:{hashlib.sha256(joined).hexdigest()[:16]}>"
    if attr.type == AttributeProto.FLOAT:  # stored as float32: 0.1, not 0.10000000149011612
        return str(np.float32(attr.f))
    if attr.type == AttributeProto.FLOATS:
        return _short(f"[{', '.join(str(np.float32(v)) for v in attr.floats)}]")
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    elif isinstance(value, list):
        value = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value]
    return _short(repr(value))


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field_changes(a, b, fields: Iterable[str]) -> list[Change]:
    out = []
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        if x != y:
            out.append(Change(f, _short(str(x)), _short(str(y))))
    return out


def _function_detail(f: onnx.FunctionProto) -> str:
    """``(A, X, L) -> Y: Identity`` (the body's op types; the first 5 and a count of the rest)."""
    ops = [n.op_type for n in f.node]
    body = ", ".join(ops[:5]) + (f", ... ({len(ops)} nodes)" if len(ops) > 5 else "")
    return f"({', '.join(f.input)}) -> {', '.join(f.output)}: {body}"


def _fn_key(f: onnx.FunctionProto) -> str:
    return f"{f.domain}::{f.name}" + (f"[{f.overload}]" if getattr(f, "overload", "") else "")


def _value_infos(infos) -> dict[str, tuple[int, str]]:
    """name -> (position, type string)."""
    return {vi.name: (k, _type_str(vi.type)) for k, vi in enumerate(infos)}


def _io_changes(x: tuple[int, str], y: tuple[int, str]) -> list[Change]:
    changes = []
    if x[1] != y[1]:
        changes.append(Change("type", x[1], y[1]))
    if x[0] != y[0]:
        changes.append(Change("position", str(x[0]), str(y[0])))
    return changes


def _type_str(t: onnx.TypeProto) -> str:
    which = t.WhichOneof("value")
    if which == "tensor_type":
        tt = t.tensor_type
        elem = _dtype(tt.elem_type) if tt.elem_type else "?"
        if not tt.HasField("shape"):
            return elem
        dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        return f"{elem}[{','.join(dims)}]"
    if which is None:
        return "(no type)"
    return _short(" ".join(str(t).split()))


def _dtype(data_type: int) -> str:
    try:
        return TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return f"type{data_type}"


def _dims(t: TensorProto) -> str:
    return "[" + ",".join(str(d) for d in t.dims) + "]"


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _where(t: TensorProto) -> str:
    if not _is_external(t):
        return "inline"
    info = external_info(t)
    return f"{info.get('location', '?')}@{info.get('offset', 0)}+{info.get('length', '?')}"


def _tensor_detail(t: TensorProto) -> str:
    return f"{_dtype(t.data_type)}{_dims(t)} {_where(t)}"


def _ext_key_order(key: str) -> tuple[int, str]:
    order = {"location": 0, "offset": 1, "length": 2}
    return order.get(key, 3), key


def _inline_digest(t: TensorProto) -> str:
    """A short hash of an inline tensor's values: the same values give the same hash whichever field
    holds them (``raw_data`` or ``float_data``, ...)."""
    if t.data_type != TensorProto.STRING:
        try:
            array = numpy_helper.to_array(t)
            payload = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        except Exception:  # noqa: BLE001 - a malformed tensor: hash what is stored instead
            payload = t.raw_data if t.HasField("raw_data") else t.SerializeToString(deterministic=True)
    elif t.HasField("raw_data"):
        payload = t.raw_data
    else:
        values = TensorProto()
        for f in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"):
            getattr(values, f).extend(getattr(t, f))
        payload = values.SerializeToString(deterministic=True)
    return f"sha256:{hashlib.sha256(payload).hexdigest()[:16]}"
