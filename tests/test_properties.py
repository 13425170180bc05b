"""Property-based tests: random tensor-parallel graphs (tests/strategies.py) through the optimizer.

For every drawn model and configuration:

* ``optimize`` succeeds and leaves its input untouched; the onnx checker passes on the input (the
  generator makes valid models) and on the output;
* every Prefetch is well formed (docs/design.md §3): 2 inputs and 1 output, the ``collective`` attribute names
  the collective its chain ends at, the chain starts at the collective's original input and sits
  immediately before it in the node list, offset + bytes lie within the tensor, split links are
  contiguous and within the hardware's per-operation limit;
* the plan is the one docs/design.md §4 prescribes, recomputed here independently from what the generator
  recorded (consumer slots, constant-only chains, KV sizes, first-use order, budget, partial cut,
  min chunk, non-selected collectives bounding windows);
* ``strip(optimize(m))`` serializes byte-identical to ``m``; optimizing twice gives the same bytes;
  an optimized model is refused without ``replan`` and re-planned to the same bytes with it;
* on the reference runtime, two rank models (same graph, different weights and KV-cache) give
  bit-identical outputs before and after optimization;
* the runtime's shape inference (docs/design.md §7): every model onnxruntime loads with our ops
  replaced by Identity loads in the runtime, drawn as collectives whose inputs mix known, named and
  unnamed dims, followed by TorchScript's ``Shape -> Gather -> Concat -> Reshape`` stages; and it
  computes what the same graph in plain ONNX computes.

Profiles (tests/conftest.py): ``ci`` (default: fixed seed, bounded) and ``fuzz`` (``make fuzz``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from preserve_onnx.config import OptimizeConfig
from preserve_onnx.errors import PreserveError
from preserve_onnx.hardware import DEFAULT_PROFILE, load_profile
from preserve_onnx.optimizer import optimize, strip
from tests.strategies import (
    BATCH,
    CONSUMERS,
    MS,
    PAST,
    SHAPE_RUN,
    Facts,
    ModelSpec,
    ShapeSpec,
    ShortRepr,
    build,
    build_shape_model,
    identity_twin,
    model_specs,
    shape_specs,
)

COLLECTIVE_OPS = ("AllReduce", "AllGather", "AllToAll")
HARDWARE = load_profile(DEFAULT_PROFILE)


# Examples tried by this process (the fuzz driver prints them).
COUNTS = {"structure": 0, "runtime": 0, "shapes": 0}


# ------------------------------------------------------------------------------------- strategies


@dataclasses.dataclass(frozen=True, repr=False)
class ConfigSpec(ShortRepr):
    """A drawn configuration, printed short in hypothesis reports; ``.config()`` is the OptimizeConfig."""

    budget: int | None = None  # None: the hardware rule
    max_op: int | None = None  # the hardware's per-operation limit; None: the profile's (120 MiB)
    min_chunk: int = 64 * 1024
    kv: bool = True
    qdq_weights: bool = False
    collectives: tuple[str, ...] = ("AllReduce",)
    batch: int = 8
    context: int = 16384

    def config(self) -> OptimizeConfig:
        hardware = (
            HARDWARE if self.max_op is None else dataclasses.replace(HARDWARE, max_prefetch_bytes=self.max_op)
        )
        return OptimizeConfig(
            hardware=hardware,
            budget=self.budget,
            min_chunk=self.min_chunk,
            kv=self.kv,
            qdq_weights=self.qdq_weights,
            collectives=self.collectives,
            batch=self.batch,
            context=self.context,
        )


@st.composite
def configs(draw) -> ConfigSpec:
    budget = draw(
        st.one_of(
            st.none(),  # the hardware rule
            st.just(0),
            st.integers(1, 256),  # tiny
            st.integers(256, 40_000),  # cuts somewhere in the windows of these tiny models
            st.just(1 << 30),  # everything
        )
    )
    max_op = draw(st.sampled_from((None, None, 0, 256, 1000, 4096)))
    # Large KV sizes only with the real per-operation limit: 256-byte links of 16 MiB would be 65k nodes.
    sizes = ((8, 16384), (BATCH, PAST), (1, 64)) if not max_op else ((BATCH, PAST), (1, 64))
    batch, context = draw(st.sampled_from(sizes))
    return ConfigSpec(
        budget=budget,
        max_op=max_op,
        min_chunk=draw(st.sampled_from((1, 16, 256, 4096, 64 * 1024))),
        kv=draw(st.booleans()),
        qdq_weights=draw(st.sampled_from((False, False, False, True))),
        collectives=draw(st.sampled_from((("AllReduce",), ("AllReduce", "AllGather")))),
        batch=batch,
        context=context,
    )


# ----------------------------------------------------------------------------------------- oracle


def _graphs(graph: onnx.GraphProto):
    """The graph and its subgraphs, depth first in node order."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from _graphs(sub)


def _is_collective(node) -> bool:
    return node.domain == MS and node.op_type in COLLECTIVE_OPS


def _kv_bytes(shape: tuple, config: OptimizeConfig) -> int:
    dims = [config.batch if d == "batch" else config.context if d == "past" else d for d in shape]
    return int(np.prod(dims)) * 4


def expected_candidates(model: onnx.ModelProto, facts: Facts, config: OptimizeConfig) -> dict[str, list]:
    """docs/design.md §2/§4.1-4.2 from the generator's records: collective name -> [(tensor, bytes)] in
    first-use order (empty for collectives that are not selected)."""
    roles = {"target"} | ({"dq_weight"} if config.qdq_weights else set())
    out: dict[str, list] = {}
    for graph in _graphs(model.graph):
        nodes = list(graph.node)
        positions = [i for i, n in enumerate(nodes) if _is_collective(n)]
        for k, pos in enumerate(positions):
            coll = nodes[pos]
            end = positions[k + 1] if k + 1 < len(positions) else len(nodes)
            found: list[tuple[str, int]] = []
            if coll.op_type in config.collectives:
                for node in nodes[pos + 1 : end]:
                    domain = "" if node.domain in ("", "ai.onnx") else node.domain
                    slots = CONSUMERS.get((domain, node.op_type))
                    if slots is None:
                        continue
                    weights, kv, _ = slots
                    for slot in sorted({*weights, *kv}):
                        name = node.input[slot] if slot < len(node.input) else ""
                        if not name or name == coll.input[0]:
                            continue
                        if slot in kv and name in facts.kv_inputs:
                            tensors = [(name, _kv_bytes(facts.kv_inputs[name], config))] if config.kv else []
                        elif slot in weights and name in facts.exprs:
                            tensors = [
                                (r, facts.init_bytes[r]) for r, role in facts.exprs[name] if role in roles
                            ]
                        else:
                            tensors = []
                        for t in tensors:
                            if t[0] not in [f[0] for f in found]:
                                found.append(t)
            out[coll.name] = found
    return out


def expected_spans(cands: list, budget: int, min_chunk: int) -> list[tuple[str, int]]:
    """docs/design.md §4.3-4.4: whole tensors while they fit; the first that does not is cut when at least
    min_chunk remains; the window stops there."""
    spans, remaining = [], budget
    for tensor, size in cands:
        if size <= remaining:
            spans.append((tensor, size))
            remaining -= size
        else:
            if remaining >= min_chunk:
                spans.append((tensor, remaining))
            break
    return spans


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def check_prefetches(
    original: onnx.ModelProto, optimized: onnx.ModelProto, facts: Facts, plan, config: OptimizeConfig
) -> None:
    """Every Prefetch well formed and placed; the chains are exactly the plan docs/design.md §4 prescribes."""
    expected = expected_candidates(original, facts, config)
    windows = {w.window.collective: w for w in plan.windows}
    selected = {
        name
        for name in expected
        if any(
            n.name == name and n.op_type in config.collectives
            for g in _graphs(original.graph)
            for n in g.node
        )
    }
    assert set(windows) == selected, "one plan window per selected collective"
    max_op = config.hardware.max_prefetch_bytes
    seen_prefetches = 0
    total_prefetches = 0
    for graph in _graphs(optimized.graph):
        nodes = list(graph.node)
        readers: dict[str, int] = {}
        for n in nodes:
            for name in n.input:
                readers[name] = readers.get(name, 0) + 1
        for n in nodes:
            if n.op_type == "Prefetch":
                total_prefetches += 1
                assert n.domain == "preserve"
        for i, coll in enumerate(nodes):
            if not _is_collective(coll):
                continue
            chain = []
            j = i - 1
            while j >= 0 and nodes[j].op_type == "Prefetch" and nodes[j].domain == "preserve":
                chain.insert(0, nodes[j])
                j -= 1
            seen_prefetches += len(chain)
            anchor = facts.collectives[coll.name]
            links = []
            for p in chain:
                assert len(p.input) in (2, 3) and len(p.output) == 1, p
                if len(p.input) == 3:  # a GroupQueryAttention KV link reads its node's seqlens_k (design §3)
                    assert p.input[2] == "seqlens_k" and p.input[1] in facts.kv_inputs, p
                    assert _attrs(p)["seq_axis"] == 2, p
                assert p.input[0] == anchor, f"{p.name}: chain broken ({p.input[0]} != {anchor})"
                assert readers.get(p.output[0]) == 1, f"{p.name}: output read {readers.get(p.output[0])}x"
                a = _attrs(p)
                assert a["collective"].decode() == coll.name
                x = p.input[1]
                size = facts.init_bytes.get(x) or _kv_bytes(facts.kv_inputs[x], config)
                offset, max_size = a["offset"], a["max_size"]
                span = max_size or size
                assert offset >= 0 and max_size >= 0 and span > 0, (p.name, offset, max_size)
                assert offset + span <= size, (p.name, offset, span, size)
                if max_op:
                    assert span <= max_op, (p.name, span, max_op)
                links.append((x, offset, span, max_size))
                anchor = p.output[0]
            assert coll.input[0] == anchor, f"{coll.name} reads {coll.input[0]}, not its chain's end {anchor}"
            # Links of one tensor are contiguous from offset 0; max_size 0 only for a single whole link.
            spans: list[tuple[str, int]] = []
            for x, offset, span, max_size in links:
                if spans and spans[-1][0] == x:
                    assert offset == spans[-1][1], (x, offset, spans[-1])
                    spans[-1] = (x, offset + span)
                else:
                    assert offset == 0, (x, offset)
                    spans.append((x, span))
            for x, offset, span, max_size in links:
                if max_size == 0:
                    assert sum(1 for link in links if link[0] == x) == 1
            if coll.name not in windows:
                assert not chain, f"{coll.name} is not a selected collective but has prefetches"
                continue
            wp = windows[coll.name]
            if config.budget is not None:
                assert wp.budget == config.budget
            want = expected_spans(expected[coll.name], wp.budget, config.min_chunk)
            assert spans == want, f"{coll.name}: planned {spans}, docs/design.md §4 says {want}"
            assert [(p.tensor, p.offset, p.max_size) for p in wp.prefetches] == [
                (x, o, m) for x, o, _, m in links
            ]
            assert wp.prefetched_bytes == sum(s for _, _, s, _ in links)
    assert seen_prefetches == total_prefetches == plan.prefetch_count, (
        "every Prefetch sits immediately before its collective"
    )
    # New names are unique: every tensor is produced once and every node name is used once (SSA).
    produced = [o for g in _graphs(optimized.graph) for n in g.node for o in n.output if o]
    names = [n.name for g in _graphs(optimized.graph) for n in g.node]
    assert len(produced) == len(set(produced)) and len(names) == len(set(names))
    assert not set(produced) & {t.name for g in _graphs(optimized.graph) for t in g.initializer}


def reference_strip(model: onnx.ModelProto) -> onnx.ModelProto:
    """docs/design.md §4.5 done independently: drop every Prefetch, reconnect its readers (also in subgraphs,
    innermost graphs first), drop the preserve opset import."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graphs = list(_graphs(out.graph))
    replaced = {n.output[0]: n.input[0] for g in graphs for n in g.node if n.op_type == "Prefetch"}

    def source(name):
        while name in replaced:
            name = replaced[name]
        return name

    for g in reversed(graphs):  # children before parents: a parent's rebuild copies its children
        for i in reversed(range(len(g.node))):
            if g.node[i].op_type == "Prefetch":
                del g.node[i]
        for n in g.node:
            for k, name in enumerate(n.input):
                n.input[k] = source(name)
    for op in list(out.opset_import):
        if op.domain == "preserve":
            out.opset_import.remove(op)
    for fn in list(out.functions):  # Prefetch's definition for tools that infer shapes (docs/design.md §9)
        if (fn.domain, fn.name) == ("preserve", "Prefetch"):
            out.functions.remove(fn)
    return out


def _checker_ok(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - the checker raises several types
        return str(exc)
    return None


# ------------------------------------------------------------------------------------------- tests


@given(spec=model_specs(), cs=configs())
def test_optimize_plans_and_rewrites_per_spec(spec: ModelSpec, cs: ConfigSpec):
    config = cs.config()
    COUNTS["structure"] += 1
    model, facts = build(spec, rank=0)
    before = model.SerializeToString()
    optimized, plan = optimize(model, config, ranks=2)
    planned = [
        (w.window.collective, [(p.tensor, p.offset, p.max_size) for p in w.prefetches]) for w in plan.windows
    ]
    note(f"plan: {planned}")
    assert model.SerializeToString() == before, "optimize changed its input"
    assert _checker_ok(model) is None, "the generator made a model the onnx checker rejects"
    assert _checker_ok(optimized) is None
    check_prefetches(model, optimized, facts, plan, config)
    assert reference_strip(optimized).SerializeToString() == before
    assert strip(optimized).SerializeToString() == before
    again, _ = optimize(model, config, ranks=2)
    assert again.SerializeToString() == optimized.SerializeToString(), "optimize is not deterministic"
    if plan.prefetch_count:
        with pytest.raises(PreserveError, match="replan"):
            optimize(optimized, config, ranks=2)
        replanned, _ = optimize(optimized, dataclasses.replace(config, replan=True), ranks=2)
        assert replanned.SerializeToString() == optimized.SerializeToString()


def _feeds(model: onnx.ModelProto, facts: Facts, cond: bool):
    """Shared inputs and per-rank KV-cache (different on each rank) for one decode step."""
    H = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    rng = np.random.default_rng(7)
    shared = {"x": rng.standard_normal((BATCH, 1, H)).astype(np.float32)}
    names = {vi.name for vi in model.graph.input}
    if "cond" in names:
        shared["cond"] = np.array(cond)
    if "seqlens_k" in names:
        shared["seqlens_k"] = np.full((BATCH,), PAST, dtype=np.int32)
        shared["total_sequence_length"] = np.array([PAST + 1], dtype=np.int32)
    per_rank = {}
    for rank in (0, 1):
        r = np.random.default_rng([rank, 11])
        per_rank[rank] = {
            name: (
                r.standard_normal([BATCH if d == "batch" else PAST if d == "past" else d for d in shape])
                * 0.1
            ).astype(np.float32)
            for name, shape in facts.kv_inputs.items()
        }
    return shared, per_rank


@given(spec=model_specs(max_layers=6), cs=configs(), cond=st.booleans())
def test_optimized_ranks_run_bit_identical(spec: ModelSpec, cs: ConfigSpec, cond: bool):
    config = cs.config()
    from preserve_onnx.runtime import RankSession, compare_outputs

    COUNTS["runtime"] += 1
    built = [build(spec, rank=r) for r in (0, 1)]
    originals = [m for m, _ in built]
    optimized = [optimize(m, config, ranks=2)[0] for m in originals]
    # qdq_weights=True is documented to stop onnxruntime's DequantizeLinear+MatMul fusion (README
    # "Decisions"), which changes numerics at ORT_ENABLE_ALL; below that level the bits must agree.
    level = "basic" if config.qdq_weights else "all"
    shared, per_rank = _feeds(originals[0], built[0][1], cond)
    want = RankSession(originals, opt_level=level, intra_op_threads=1).run(shared, per_rank)
    got = RankSession(optimized, opt_level=level, intra_op_threads=1).run(shared, per_rank)
    result = compare_outputs(want, got)
    assert result.identical, result


def _plain_session(model: onnx.ModelProto):
    """A stock onnxruntime session (no custom ops), quiet about the initializers it drops."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_load_error(model: onnx.ModelProto) -> str | None:
    try:
        _plain_session(model)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
        return str(exc)
    return None


@given(spec=shape_specs())
def test_runtime_loads_what_onnxruntime_loads_with_identity(spec: ShapeSpec):
    from preserve_onnx.runtime import RankSession

    COUNTS["shapes"] += 1
    model = build_shape_model(spec)
    identity_error = _ort_load_error(identity_twin(model))
    note(f"Identity twin: {identity_error or 'loads'}")
    if spec.world == 1:  # the twin is then the equivalent model, which the generator makes loadable
        assert identity_error is None, "the generator made a graph onnxruntime refuses"
    x = np.random.default_rng(5).standard_normal(SHAPE_RUN).astype(np.float32)
    want = _plain_session(build_shape_model(spec, equivalent=True)).run(None, {"x": x})[0]
    # Loads whenever the twin does (the rule), and also on 2 ranks where the twin's shapes differ.
    got = RankSession([model] * spec.world, intra_op_threads=1).run({"x": x})
    for rank in range(spec.world):
        assert got[rank]["y"].shape == want.shape
        assert got[rank]["y"].tobytes() == want.tobytes()


# ---------------------------------------------------------------------------------- minimal repros


def test_strip_removes_prefetches_in_subgraphs_below_a_graph_with_prefetches():
    from tests.builders import G

    g = G()
    g.input("x", ["batch", 16])
    g.input("cond", [], onnx.TensorProto.BOOL)
    g.allreduce("x", "a0", name="ar0")
    g.node("MatMul", ["a0", g.weight("w0", (16, 16))], ["h0"], name="mm0")
    then = G("then")
    then.allreduce("h0", "a1", name="ar1")
    then.node("MatMul", ["a1", g.weight("w1", (16, 16))], ["t"], name="mm1")
    then.output("t", ["batch", 16])
    other = G("else")
    other.node("Identity", ["h0"], ["e"], name="id")
    other.output("e", ["batch", 16])
    g.node("If", ["cond"], ["y"], name="if", then_branch=then.graph(), else_branch=other.graph())
    g.output("y", ["batch", 16])
    model = g.model()
    optimized, plan = optimize(model, OptimizeConfig(budget=1 << 20))
    assert [[p.tensor for p in w.prefetches] for w in plan.windows] == [["w0"], ["w1"]]
    assert reference_strip(optimized) == model
    assert strip(optimized) == model  # fails: then_branch still holds Prefetch(a... , w1)
