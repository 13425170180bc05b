"""float16 graphs on the CPU provider (docs/design.md §7, "float16 on the CPU provider"): onnxruntime runs the
float16 operators it has no kernel for (MatMul) in float32 and moves a collective that sits alone between two
of them to float32 as well; behind a Prefetch chain it would not. The collectives compute in their model
precision whatever onnxruntime hands them, so optimized models stay bit-identical to their originals."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _rt_graphs import init, model, prefetch, vi
from onnx import TensorProto, helper
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.runtime import RankSession, compare_outputs
from preserve_onnx.runtime.options import optimization_level, session_options
from tests.conftest import SAMPLES

LEVELS = ["all", "extended", "basic", "disable"]


def _rank(w1, w2, *, chain=0, collective="AllReduce", expose=False):
    """x @ w1 -> [chain Prefetch links] -> collective -> @ w2, all float16; ``expose`` makes the collective's
    output a graph output too (onnxruntime then keeps the collective in float16)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["mm"], name="mm")]
    anchor = "mm"
    for i in range(chain):
        nodes.append(prefetch(anchor, "w2" if i % 2 == 0 else "w1", f"p{i}"))
        anchor = f"p{i}"
    attrs = {"group_size": 2, "axis": 0} if collective == "AllGather" else {}
    nodes += [
        helper.make_node(collective, [anchor], ["c"], name="c", domain="com.microsoft", **attrs),
        helper.make_node("MatMul", ["c", "w2"], ["y"], name="down"),
    ]
    outputs = [vi("y", TensorProto.FLOAT16, None)] + ([vi("c", TensorProto.FLOAT16, None)] if expose else [])
    return model(nodes, [vi("x", TensorProto.FLOAT16, [4, 16])], outputs, [init("w1", w1), init("w2", w2)])


def _weights(seed):
    rng = np.random.default_rng(seed)
    w1 = [rng.standard_normal((16, 32)).astype(np.float16) for _ in range(2)]
    w2 = [rng.standard_normal((32, 16)).astype(np.float16) for _ in range(2)]
    return w1, w2, rng.standard_normal((4, 16)).astype(np.float16)


def _optimized_ops(m, tmp_path, level="all"):
    """The nodes onnxruntime runs for ``m`` (op type, Cast's target type), Prefetch nodes left out."""
    options = session_options(
        rank=0,
        world=1,
        group="g",
        level=optimization_level(level),
        threads=1,
        timeout_s=5,
        prefetch=("preserve", "Prefetch"),
    )
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [
        (n.op_type, *[a.i for a in n.attribute if a.name == "to"])
        for n in onnx.load(tmp_path / "ort.onnx").graph.node
        if n.op_type != "Prefetch"
    ]


def test_the_mechanism_a_lone_collective_runs_in_float32_one_behind_a_chain_in_float16(tmp_path):
    """What makes the original and the optimized model differ without pinning: the Casts onnxruntime
    inserts."""
    w1, w2, _ = _weights(0)
    assert _optimized_ops(_rank(w1[0], w2[0]), tmp_path) == [
        ("Cast", 1),
        ("MatMul",),
        ("AllReduce",),
        ("MatMul",),
        ("Cast", 10),
    ]
    assert _optimized_ops(_rank(w1[0], w2[0], chain=2), tmp_path) == [
        ("Cast", 1),
        ("MatMul",),
        ("Cast", 10),
        ("AllReduce",),
        ("Cast", 1),
        ("MatMul",),
        ("Cast", 10),
    ]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("collective", ["AllReduce", "AllGather"])
def test_float16_chains_are_bit_identical_to_the_original(level, collective):
    w1, w2, x = _weights(1)
    original = RankSession([_rank(w1[r], w2[r], collective=collective) for r in range(2)], opt_level=level)
    optimized = RankSession(
        [_rank(w1[r], w2[r], chain=3, collective=collective) for r in range(2)], opt_level=level
    )
    a, b = original.run({"x": x}), optimized.run({"x": x})
    result = compare_outputs(a, b)
    assert result.identical, result


@pytest.mark.parametrize("collective", ["AllReduce", "AllGather"])
def test_a_collective_run_in_float32_computes_what_its_float16_kernel_computes(collective):
    """The lone collective (run in float32) gives the bytes of the same collective kept in float16 (its
    output a graph output): partial results rounded to float16, an AllReduce's sum rounded once."""
    w1, w2, x = _weights(2)
    lone = RankSession([_rank(w1[r], w2[r], collective=collective) for r in range(2)]).run({"x": x})
    kept = RankSession([_rank(w1[r], w2[r], collective=collective, expose=True) for r in range(2)]).run(
        {"x": x}
    )
    for r in range(2):
        assert lone[r]["y"].tobytes() == kept[r]["y"].tobytes()
    # Unrounded partial sums (what onnxruntime alone would compute) differ on these values.
    wide = [(x.astype(np.float32) @ w1[r].astype(np.float32)) for r in range(2)]
    c = (wide[0] + wide[1]) if collective == "AllReduce" else np.concatenate(wide, axis=0)
    unpinned = (c.astype(np.float32) @ w2[0].astype(np.float32)).astype(np.float16)
    assert unpinned.tobytes() != lone[0]["y"].tobytes()


def _toposort(graph: onnx.GraphProto) -> None:
    """onnxruntime's float16 converter appends its input Casts at the end of the node list."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, order = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        assert ready, "cycle"
        for n in ready:
            known.update(n.output)
        order += ready
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(order)


@pytest.mark.parametrize("level", ["all", "disable"])
def test_float16_converted_torchscript_export_stays_bit_identical_after_optimize(tmp_path, level):
    """Issue 18: convert_float_to_float16(keep_io_types=True) on the TorchScript ranks, then optimize, then
    run --against. Before the pinning: FAILED, 6 of 10 outputs, max abs diff 0.00012207."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = SAMPLES / "exporters" / "torch-llama-fp32" / "tp2"
    converted = tmp_path / "fp16"
    converted.mkdir()
    for r in range(2):
        m = convert_float_to_float16(onnx.load(src / f"model_{r:02d}.onnx"), keep_io_types=True)
        _toposort(m.graph)
        onnx.save(m, converted / f"model_{r:02d}.onnx")
    runner = CliRunner()
    out = tmp_path / "opt"
    r = runner.invoke(app, ["optimize", str(converted), str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert sum(n.op_type == "Prefetch" for n in onnx.load(out / "model_00.onnx").graph.node) > 0
    r = runner.invoke(
        app, ["run", str(out), "--against", str(converted), "--steps", "2", "--opt-level", level]
    )
    assert r.exit_code == 0, r.output
    assert "PASSED: 10 outputs on 2 rank(s) bit-identical" in r.output
