"""Shape inference of the custom ops (docs/design.md §7): the graph never holds a -1 after them.

onnxruntime writes a dim that has neither a value nor a name as the value -1. TorchScript's attention
reshapes with ``Shape -> Gather -> Concat -> Reshape`` and one literal -1 per target, twice per block;
behind a collective whose output dims were unknown and unnamed, that target held two -1s and the rank
did not load ("Target shape may not have multiple -1 dimensions"). Outputs now copy the input's dims
(values and names) and name the rest ``preserve.<op>.dim<n>``; AllGather's gathered axis is value x
group size when known, else a fresh name. Rule: every model that onnxruntime loads with our ops
replaced by Identity loads in the runtime (fuzzed in tests/test_properties.py).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _rt_graphs import init, model, vi
from onnx import TensorProto, helper

from preserve_onnx.errors import PreserveError
from preserve_onnx.optimizer import optimize
from preserve_onnx.runtime import RankSession, library_path
from preserve_onnx.runtime.options import _file_opset_domains, imports_com_microsoft
from tests.conftest import SAMPLE_VARIANTS, SAMPLES
from tests.strategies import ShapeSpec, build_shape_model, identity_twin

MS = "com.microsoft"
F32 = TensorProto.FLOAT
HEADS = 2
RUN = (2, 3, 8)  # batch, sequence, hidden of the feeds


def _x(rank: int, shape=RUN) -> np.ndarray:
    return np.random.default_rng(40 + rank).standard_normal(shape).astype(np.float32)


def _torchscript_attention(dims, head: list[onnx.NodeProto], src: str, extra_inits=(), value_info=()):
    """``head`` makes ``src`` from x; then TorchScript's pattern: one ``Shape`` of ``src``, ``Gather`` of
    batch and sequence, ``Concat`` into [b, s, heads, -1] for the first Reshape (the q/k/v split) and
    [b, s, -1] for the second (merging the heads back), each target with one literal -1."""
    nodes = list(head) + [
        helper.make_node("Shape", [src], ["shape"], name="/self_attn/Shape"),
        helper.make_node("Gather", ["shape", "i0"], ["b"], name="/self_attn/Gather", axis=0),
        helper.make_node("Gather", ["shape", "i1"], ["s"], name="/self_attn/Gather_1", axis=0),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"], name="/self_attn/Unsqueeze"),
        helper.make_node("Unsqueeze", ["s", "ax0"], ["s1"], name="/self_attn/Unsqueeze_1"),
        helper.make_node(
            "Concat", ["b1", "s1", "heads", "minus1"], ["split"], name="/self_attn/Concat", axis=0
        ),
        helper.make_node("Reshape", [src, "split"], ["q"], name="/self_attn/Reshape"),
        helper.make_node("Transpose", ["q"], ["qt"], name="/self_attn/Transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["qt"], ["o"], name="/self_attn/Transpose_1", perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["b1", "s1", "minus1"], ["merge"], name="/self_attn/Concat_1", axis=0),
        helper.make_node("Reshape", ["o", "merge"], ["y"], name="/self_attn/Reshape_1"),
    ]
    inits = [
        init("i0", np.array(0, np.int64)),
        init("i1", np.array(1, np.int64)),
        init("ax0", np.array([0], np.int64)),
        init("heads", np.array([HEADS], np.int64)),
        init("minus1", np.array([-1], np.int64)),
        *extra_inits,
    ]
    m = model(nodes, [vi("x", F32, dims)], [vi("y", F32, None), vi(src, F32, None)], inits)
    m.graph.value_info.extend(value_info)
    return m


def _expected_y(src: np.ndarray) -> np.ndarray:
    b, s = src.shape[:2]
    return src.reshape(b, s, HEADS, -1).transpose(0, 2, 1, 3).transpose(0, 2, 1, 3).reshape(b, s, -1)


UNKNOWN_DIMS = [[None, None, None], ["batch", None, 8], [None, "sequence_length", None]]


@pytest.mark.parametrize("dims", UNKNOWN_DIMS)
def test_torchscript_reshapes_after_an_allreduce_of_unknown_dims_load_and_run(dims):
    allreduce = helper.make_node("AllReduce", ["x"], ["ar"], name="ar", domain=MS)
    m = _torchscript_attention(dims, [allreduce], "ar")
    xs = [_x(0), _x(1)]
    out = RankSession([m, m]).run({}, {r: {"x": xs[r]} for r in range(2)})
    for r in range(2):
        np.testing.assert_array_equal(out[r]["ar"], xs[0] + xs[1])
        assert out[r]["y"].shape == RUN
        np.testing.assert_array_equal(out[r]["y"], _expected_y(xs[0] + xs[1]))


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("dims", UNKNOWN_DIMS)
def test_torchscript_reshapes_after_an_allgather_of_unknown_dims_load_and_run(dims, axis):
    gather = helper.make_node("AllGather", ["x"], ["ag"], name="ag", domain=MS, axis=axis, group_size=2)
    m = _torchscript_attention(dims, [gather], "ag")
    xs = [_x(0), _x(1)]
    out = RankSession([m, m]).run({}, {r: {"x": xs[r]} for r in range(2)})
    gathered = np.concatenate(xs, axis=axis)
    for r in range(2):
        np.testing.assert_array_equal(out[r]["ag"], gathered)
        np.testing.assert_array_equal(out[r]["y"], _expected_y(gathered))


@pytest.mark.parametrize("x_type", [np.float32, np.uint8])
@pytest.mark.parametrize("collective", [True, False])
@pytest.mark.parametrize("with_l", [False, True])
def test_torchscript_reshapes_after_a_prefetch_chain_of_unknown_dims_load_and_run(x_type, collective, with_l):
    """The optimizer's chain (three links, X a weight of the anchor's type or another, with or without the
    length input L of docs/design.md §3) in front of the AllReduce, and a chain read directly by the
    reshapes."""
    extra = {"seq_axis": 0, "window": 4} if with_l else {}
    head = [
        helper.make_node(
            "Prefetch",
            [a, "w", "lens"] if with_l else [a, "w"],
            [o],
            name=o,
            domain="preserve",
            max_size=0,
            offset=0,
            collective="ar",
            **extra,
        )
        for a, o in (("x", "p0"), ("p0", "p1"), ("p1", "p2"))
    ]
    src = "p2"
    if collective:
        head.append(helper.make_node("AllReduce", ["p2"], ["ar"], name="ar", domain=MS))
        src = "ar"
    inits = [init("w", np.arange(64).astype(x_type))] + (
        [init("lens", np.array(10, np.int64))] if with_l else []
    )
    m = _torchscript_attention([None, None, None], head, src, inits)
    xs = [_x(0), _x(1)]
    out = RankSession([m, m]).run({}, {r: {"x": xs[r]} for r in range(2)})
    for r in range(2):
        want = xs[0] + xs[1] if collective else xs[r]
        np.testing.assert_array_equal(out[r]["y"], _expected_y(want))


@pytest.mark.parametrize(
    "declared",
    [
        ["/model/layers.0/AllReduce_output_0_dim_0", "/model/layers.0/AllReduce_output_0_dim_1", 8],
        [
            "/model/layers.0/AllReduce_output_0_dim_0",
            "/model/layers.0/AllReduce_output_0_dim_1",
            "/model/layers.0/AllReduce_output_0_dim_2",
        ],
    ],
)
@pytest.mark.parametrize("dims", [["batch_size", "sequence_length", 8], [None, None, None]])
def test_torchscript_value_info_with_generated_dim_names_loads_and_runs(dims, declared):
    """TorchScript declares the AllReduce output with dim names of its own, unrelated to the input's."""
    out_name = "/model/layers.0/AllReduce_output_0"
    allreduce = helper.make_node("AllReduce", ["x"], [out_name], name="/model/layers.0/AllReduce", domain=MS)
    m = _torchscript_attention(dims, [allreduce], out_name, value_info=[vi(out_name, F32, declared)])
    xs = [_x(0), _x(1)]
    out = RankSession([m, m]).run({}, {r: {"x": xs[r]} for r in range(2)})
    for r in range(2):
        np.testing.assert_array_equal(out[r]["y"], _expected_y(xs[0] + xs[1]))


def _output_shapes(session: RankSession, rank: int = 0) -> dict[str, tuple | None]:
    return {m.name: m.shape for m in session.output_meta[rank]}


def _every_op_model():
    w = init("w", np.ones(2, np.uint8))
    nodes = [
        helper.make_node("AllReduce", ["x"], ["a"], name="ar0", domain=MS),
        helper.make_node("AllReduce", ["x"], ["b"], name="ar1", domain=MS),
        helper.make_node("AllGather", ["x"], ["g1"], name="ag1", domain=MS, axis=1, group_size=2),
        helper.make_node("AllGather", ["x"], ["g2"], name="ag2", domain=MS, axis=-1, group_size=2),
        helper.make_node("AllGather", ["x"], ["g0"], name="ag0", domain=MS, axis=0, group_size=2),
        helper.make_node(
            "Prefetch",
            ["x", "w"],
            ["p"],
            name="pf",
            domain="preserve",
            max_size=0,
            offset=0,
            collective="ar0",
        ),
    ]
    outputs = [vi(o, F32, None) for o in ("a", "b", "g1", "g2", "g0", "p")]
    return model(nodes, [vi("x", F32, ["batch", None, 4])], outputs, [w])


def test_outputs_copy_values_and_names_and_name_every_other_dim():
    session = RankSession([_every_op_model()] * 2)
    expected = {
        "a": ("batch", "preserve.AllReduce.dim0", 4),
        "b": ("batch", "preserve.AllReduce.dim1", 4),  # a name of its own: never two dims under one name
        "g1": ("batch", "preserve.AllGather.dim0", 4),  # unknown x 2: a fresh name
        "g2": ("batch", "preserve.AllGather.dim1", 8),  # 4 x 2
        "g0": ("preserve.AllGather.dim2", "preserve.AllGather.dim3", 4),  # batch x 2 has no name
        "p": ("batch", "preserve.Prefetch.dim0", 4),
    }
    for rank in range(2):  # the same names on every rank: each session numbers its own from 0
        assert _output_shapes(session, rank) == expected
    assert _output_shapes(RankSession([_every_op_model()] * 2)) == expected
    out = session.run({"x": np.ones((2, 3, 4), np.float32)})
    assert {k: v.shape for k, v in out[0].items()} == {
        "a": (2, 3, 4),
        "b": (2, 3, 4),
        "g1": (2, 6, 4),
        "g2": (2, 3, 8),
        "g0": (4, 3, 4),
        "p": (2, 3, 4),
    }


def test_prefetch_vendor_op_names_its_dims_after_itself():
    m = model(
        [
            helper.make_node(
                "PrefetchWeights", ["x", "w"], ["p"], name="pf", domain="vendor.ops", max_size=0, offset=0
            )
        ],
        [vi("x", F32, [None, 4])],
        [vi("p", F32, None)],
        [init("w", np.ones(4, np.float32))],
        opsets=[helper.make_opsetid("", 17), helper.make_opsetid("vendor.ops", 1)],
    )
    session = RankSession(m, prefetch_domain="vendor.ops", prefetch_op="PrefetchWeights")
    assert _output_shapes(session) == {"p": ("preserve.PrefetchWeights.dim0", 4)}


@pytest.mark.parametrize("op", ["AllGather", "Prefetch"])
def test_an_input_of_unknown_rank_keeps_no_shape(op):
    """AllGather, and Prefetch whose X has A's type, leave an output of unknown rank without a shape
    (onnxruntime types it): a MatMul after it loads, as it would after Identity."""
    if op == "AllGather":
        node = helper.make_node("AllGather", ["x"], ["c"], name="ag", domain=MS, axis=0, group_size=1)
    else:
        node = helper.make_node(
            "Prefetch", ["x", "w"], ["c"], name="pf", domain="preserve", max_size=0, offset=0
        )
    m = model(
        [node, helper.make_node("MatMul", ["c", "w2"], ["y"], name="mm")],
        [vi("x", F32, None)],
        [vi("y", F32, None)],
        [init("w", np.ones(3, np.float32)), init("w2", np.ones((4, 2), np.float32))],
    )
    out = RankSession(m).run({"x": np.ones((3, 4), np.float32)})
    np.testing.assert_array_equal(out[0]["y"], np.full((3, 2), 4, np.float32))


def test_allreduce_of_an_input_of_unknown_rank_reads_as_a_scalar():
    """The documented limit: the API sets AllReduce's output type only with a shape, and an unknown rank
    arrives as rank 0, so a MatMul after it is refused (it loads after Identity)."""
    m = model(
        [
            helper.make_node("AllReduce", ["x"], ["c"], name="ar", domain=MS),
            helper.make_node("MatMul", ["c", "w2"], ["y"], name="mm"),
        ],
        [vi("x", F32, None)],
        [vi("y", F32, None)],
        [init("w2", np.ones((4, 2), np.float32))],
    )
    ort.InferenceSession(identity_twin(m).SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(PreserveError, match=r"^rank 0: .*\(MatMul\).*Input tensors of wrong rank \(0\)"):
        RankSession(m)


def test_shape_spec_graph_with_every_kind_of_dim_runs_on_two_ranks():
    """One drawn-style graph of tests/strategies.py, fixed: the property test's building blocks."""
    spec = ShapeSpec(
        dims=(None, "seq_1", 8),
        matmul=True,
        prefetches=2,
        prefetch_x="u8",
        collective="AllGather",
        gather_axis=1,
        world=2,
        value_info="generated",
        stages=("split", "same", "merge"),
    )
    x = _x(0)
    plain = ort.InferenceSession(
        build_shape_model(spec, equivalent=True).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    want = plain.run(None, {"x": x})[0]
    assert want.shape == (2, 6, 8)
    out = RankSession([build_shape_model(spec)] * 2).run({"x": x})
    for r in range(2):
        assert out[r]["y"].tobytes() == want.tobytes()


# ------------------------------------------------------------------------- the rule on committed samples


def _op_types(graph: onnx.GraphProto) -> set[str]:
    """Op types of a graph and every subgraph in it."""
    types = set()
    for node in graph.node:
        types.add(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                types |= _op_types(sub)
    return types


def _rank_files(folder):
    return sorted(folder.glob("*.onnx"))


SAMPLE_DIRS = [SAMPLES / v / "tp2" for v in SAMPLE_VARIANTS] + sorted(
    p for p in (SAMPLES / "exporters").glob("*/tp*") if p.is_dir() and _rank_files(p)
)


def _identity_loads(m: onnx.ModelProto, folder) -> bool:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    try:
        ort.InferenceSession(
            identity_twin(m).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception:  # noqa: BLE001 - onnxruntime raises several types; then the rule asks nothing
        return False
    return True


@pytest.mark.parametrize("optimized", [False, True], ids=["original", "optimized"])
@pytest.mark.parametrize("folder", SAMPLE_DIRS, ids=lambda p: str(p.relative_to(SAMPLES)))
def test_samples_that_load_with_identity_load_in_the_runtime(folder, optimized):
    files = _rank_files(folder)
    ranks = [onnx.load(str(f), load_external_data=False) for f in files]
    if optimized:
        ranks = [optimize(f, ranks=len(files))[0] for f in files]
        if "exporters" not in str(folder):  # the generated samples always get Prefetch chains
            assert "Prefetch" in _op_types(ranks[0].graph)
    assert all(_identity_loads(m, folder) for m in ranks)  # so the rule asks the runtime to load them
    session = RankSession(ranks, data_dir=folder)
    assert session.world_size == len(files)


SINGLE_MODELS = sorted(SAMPLES.glob("*/full/*.onnx")) + sorted(SAMPLES.glob("exporters/*/full/*.onnx"))


@pytest.mark.parametrize("path", SINGLE_MODELS, ids=lambda p: str(p.parent.relative_to(SAMPLES)))
def test_single_device_samples_load_in_the_runtime(path):
    """No op of ours in them: what onnxruntime loads, the runtime loads (TorchScript's imports no
    com.microsoft, where our ops hid the FusedMatMul onnxruntime's optimizer inserts)."""
    assert _identity_loads(onnx.load(str(path), load_external_data=False), path.parent)
    assert RankSession(path).world_size == 1


# ------------------------------------------------ models without com.microsoft (single-device exports)


def _matmul_scale_model() -> onnx.ModelProto:
    """MatMul then Mul by a scalar, importing only the default domain (a TorchScript export's opsets):
    onnxruntime's optimizer fuses the pair into com.microsoft::FusedMatMul."""
    return model(
        [
            helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
            helper.make_node("Mul", ["mm", "scale"], ["y"], name="scale"),
        ],
        [vi("x", F32, ["batch", 4])],
        [vi("y", F32, None)],
        [init("w", np.arange(8, dtype=np.float32).reshape(4, 2)), init("scale", np.array(0.25, np.float32))],
        opsets=[helper.make_opsetid("", 17)],
    )


@pytest.mark.parametrize("as_path", [False, True], ids=["proto", "path"])
def test_a_model_without_com_microsoft_loads_where_onnxruntime_inserts_its_own_ops(tmp_path, as_path):
    """Our ops registered in com.microsoft hid onnxruntime's FusedMatMul from a model that does not
    import the domain ("com.microsoft:FusedMatMul(-1) is not a registered function/op"): such a model
    gets no op of ours in that domain."""
    m = _matmul_scale_model()
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "plain.onnx")
    plain = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert "FusedMatMul" in {n.op_type for n in onnx.load(str(tmp_path / "plain.onnx")).graph.node}
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    source = m
    if as_path:
        source = tmp_path / "model.onnx"
        onnx.save(m, str(source))
    out = RankSession(source).run({"x": x})
    assert out[0]["y"].tobytes() == plain.run(None, {"x": x})[0].tobytes()


def test_imports_com_microsoft_reads_the_opsets_of_a_file_without_parsing_its_graph(tmp_path):
    rank_file = SAMPLES / "llama-gqa" / "tp2" / "model_00.onnx"
    plain = tmp_path / "plain.onnx"
    onnx.save(_matmul_scale_model(), str(plain))
    assert imports_com_microsoft(rank_file) is True
    assert imports_com_microsoft(onnx.load(str(rank_file), load_external_data=False)) is True
    assert imports_com_microsoft(plain) is False
    assert imports_com_microsoft(_matmul_scale_model()) is False
    assert _file_opset_domains(plain) == {""}
    header = onnx.load(str(rank_file), load_external_data=False)
    assert _file_opset_domains(rank_file) == {o.domain for o in header.opset_import}
    # Unreadable: registered as before, and onnxruntime names what is wrong with the file.
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(rank_file.read_bytes()[:100])
    text = tmp_path / "text.onnx"
    text.write_text("not a model\n")
    for bad in (truncated, text, tmp_path / "missing.onnx"):
        assert _file_opset_domains(bad) is None
        assert imports_com_microsoft(bad) is True
    with pytest.raises(PreserveError, match=r"^rank 0: "):
        RankSession(truncated)


def test_the_library_refuses_a_com_microsoft_entry_other_than_0_or_1():
    options = ort.SessionOptions()
    options.add_session_config_entry("preserve.com_microsoft", "no")
    with pytest.raises(Exception, match=r"preserve.com_microsoft must be '0' or '1', got 'no'"):
        options.register_custom_ops_library(str(library_path()))
