"""The structures real exporters write, each test named for what it mirrors (README: "Real exporter
output"): onnxruntime-genai's symbolic ``kv_cache_dim``, a TorchScript decoder with its KV-cache through
``Concat``, and the negative cases of the structural KV-cache rule and of dim binding."""

import json
import shutil

import onnx
import pytest
from typer.testing import CliRunner

from preserve_onnx import optimize
from preserve_onnx.cli import app
from preserve_onnx.config import OptimizeConfig
from preserve_onnx.cost.analysis import analyze
from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.dims import graph_dims, parse_dim_options
from preserve_onnx.graph.structure import kv_cache_paths
from preserve_onnx.model_io import load_model
from tests.builders import G
from tests.conftest import SAMPLES
from tests.exporter_graphs import HEAD, HEADS, genai_kv_cache_dim, torchscript_decoder

runner = CliRunner()
KV = "kv_cache"


def plan_rows(plan):
    return [
        (w.window.collective, [(p.tensor, p.kind, p.consumer, p.nbytes) for p in w.prefetches])
        for w in plan.windows
    ]


def save_ranks(model, folder, ranks=2):
    folder.mkdir(parents=True)
    for r in range(ranks):
        onnx.save(model, folder / f"model_0{r}.onnx")
    return folder


# -- TorchScript (Olive's tensor-parallel export): attention in plain operators ----------------------


def test_torchscript_decoder_plans_its_kv_cache_at_the_concat_in_first_use_order():
    _, plan = optimize(torchscript_decoder(), OptimizeConfig(batch=2, context=64, budget=10**9))
    kv_bytes = 2 * HEADS * 64 * HEAD * 4
    assert plan_rows(plan) == [
        (
            "/model/layers.0/self_attn/o_proj/AllReduce",
            [
                ("onnx::MatMul_567", "weight", "/model/layers.0/mlp/gate_proj/MatMul", 6144),
                ("onnx::MatMul_568", "weight", "/model/layers.0/mlp/up_proj/MatMul", 6144),
                ("onnx::MatMul_569", "weight", "/model/layers.0/mlp/down_proj/MatMul", 6144),
            ],
        ),
        (
            "/model/layers.0/mlp/down_proj/AllReduce",
            [
                ("onnx::MatMul_571", "weight", "/model/layers.1/self_attn/q_proj/MatMul", 4096),
                ("onnx::MatMul_572", "weight", "/model/layers.1/self_attn/k_proj/MatMul", 4096),
                ("onnx::MatMul_573", "weight", "/model/layers.1/self_attn/v_proj/MatMul", 4096),
                ("past_key_values.1.key", KV, "/model/layers.1/self_attn/Concat_k", kv_bytes),
                ("past_key_values.1.value", KV, "/model/layers.1/self_attn/Concat_v", kv_bytes),
                ("onnx::MatMul_574", "weight", "/model/layers.1/self_attn/o_proj/MatMul", 4096),
            ],
        ),
        (
            "/model/layers.1/self_attn/o_proj/AllReduce",
            [
                ("onnx::MatMul_576", "weight", "/model/layers.1/mlp/gate_proj/MatMul", 6144),
                ("onnx::MatMul_577", "weight", "/model/layers.1/mlp/up_proj/MatMul", 6144),
                ("onnx::MatMul_578", "weight", "/model/layers.1/mlp/down_proj/MatMul", 6144),
            ],
        ),
        (
            "/model/layers.1/mlp/down_proj/AllReduce",
            [("onnx::MatMul_580", "weight", "/lm_head/MatMul", 10240)],
        ),
    ]


def test_torchscript_kv_paths_name_input_concat_and_present_output():
    model = torchscript_decoder()
    paths = kv_cache_paths(model.graph)
    assert sorted(paths) == [f"past_key_values.{i}.{k}" for i in (0, 1) for k in ("key", "value")]
    p = paths["past_key_values.1.key"]
    assert (p.output, model.graph.node[p.concat].name, p.aliases, p.seq_axis) == (
        "present.1.key",
        "/model/layers.1/self_attn/Concat_k",
        ("past_key_values.1.key",),
        2,
    )


def test_no_kv_leaves_the_structural_kv_cache_out():
    _, plan = optimize(torchscript_decoder(), OptimizeConfig(batch=2, context=64, budget=10**9, kv=False))
    assert all(p.kind == "weight" for w in plan.windows for p in w.prefetches)
    skipped = [(s.tensor, s.reason) for w in plan.windows for s in w.skipped if s.tensor.startswith("past")]
    assert skipped == [
        ("past_key_values.1.key", "KV-cache excluded by --no-kv"),
        ("past_key_values.1.value", "KV-cache excluded by --no-kv"),
    ]


def test_torchscript_ranks_optimize_and_run_bit_identical(tmp_path):
    ranks = save_ranks(torchscript_decoder(), tmp_path / "tp2")
    r = runner.invoke(
        app, ["optimize", str(ranks), str(tmp_path / "opt"), "--batch", "1", "--context", "64", "-q"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["run", str(tmp_path / "opt"), "--against", str(ranks), "--steps", "2", "-q"])
    assert r.exit_code == 0, r.output
    assert "PASSED: 10 outputs on 2 rank(s) bit-identical" in r.output


def test_cost_model_counts_the_kv_bytes_the_concat_reads():
    config = OptimizeConfig(batch=2, context=64)
    analysis = analyze(torchscript_decoder(), config, model_ranks=2)
    reads = {op.name: [(r.tensor, r.kind, r.nbytes) for r in op.reads] for op in analysis.ops if op.reads}
    kv_bytes = 2 * HEADS * 64 * HEAD * 4
    for i in (0, 1):
        assert reads[f"/model/layers.{i}/self_attn/Concat_k"] == [(f"past_key_values.{i}.key", KV, kv_bytes)]
        assert reads[f"/model/layers.{i}/self_attn/Concat_v"] == [
            (f"past_key_values.{i}.value", KV, kv_bytes)
        ]
    # The attention MatMuls read the concatenation (an activation), not the cache a second time.
    assert "/model/layers.0/self_attn/MatMul" not in reads


def test_inspect_shows_structural_kv_cache_as_kv_cache(tmp_path):
    ranks = save_ranks(torchscript_decoder(), tmp_path / "tp2")
    r = runner.invoke(
        app, ["inspect", str(ranks / "model_00.onnx"), "--json", "--batch", "2", "--context", "64"]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    kinds = {(p["tensor"], p["kind"]) for w in report["models"][0]["windows"] for p in w["prefetches"]}
    assert ("past_key_values.1.key", KV) in kinds and ("past_key_values.1.value", KV) in kinds


# -- structural rule: negative cases ----------------------------------------------------------------


def _concat_graph(*, to_output: bool, shape_only: bool = False, layout=None):
    g = G()
    g.input("x", ["batch", 8])
    g.input("past", ["batch", 2, "past_len", 4])
    g.input("new", ["batch", 2, 1, 4])
    g.node("Relu", ["new"], ["new_r"], name="new_k")  # the step's new keys are computed, never an input
    g.allreduce("x", "a", name="ar")
    g.node("MatMul", ["a", g.weight("w", (8, 8))], ["y"], name="mm")
    past = "past"
    if shape_only:
        g.node("Shape", ["past"], ["past_shape"], name="shape_of_past")
        g.output("past_shape", [4], onnx.TensorProto.INT64)
        g.node("Concat", ["past", "new_r"], ["present"], name="concat_before", axis=2)
        g.nodes.insert(1, g.nodes.pop())  # the Concat reads the cache before the collective
    else:
        if layout:
            g.node("Transpose", ["past"], ["past_t"], name="transpose", perm=layout)
            past = "past_t"
        if layout:
            g.node("Transpose", ["new_r"], ["new_t"], name="transpose_new", perm=layout)
        g.node(
            "Concat",
            [past, "new_t" if layout else "new_r"],
            ["present"],
            name="concat",
            axis=1 if layout else 2,
        )
    if to_output:
        g.output("present")
    else:
        g.node("ReduceSum", ["present"], ["summed"], name="reduce", keepdims=0)
        g.output("summed")
    g.output("y")
    return g.model()


def test_concatenated_input_that_never_reaches_an_output_is_not_kv_cache():
    model = _concat_graph(to_output=False)
    assert kv_cache_paths(model.graph) == {}
    _, plan = optimize(model, OptimizeConfig(batch=2, context=16, budget=10**9))
    assert plan_rows(plan) == [("ar", [("w", "weight", "mm", 256)])]


def test_kv_input_read_only_by_shape_in_a_window_is_no_candidate_there():
    _, plan = optimize(
        _concat_graph(to_output=True, shape_only=True), OptimizeConfig(batch=2, context=16, budget=10**9)
    )
    (window,) = plan.windows
    assert [p.tensor for p in window.prefetches] == ["w"]
    assert [(s.tensor, s.consumer, s.reason) for s in window.skipped if s.tensor == "past"] == [
        ("past", "shape_of_past", "Shape reads only the KV-cache's shape, not its bytes: not a consumer")
    ]


def test_kv_cache_through_a_transpose_is_sized_on_the_concat_axis_mapped_back():
    # past [batch, 2, past_len, 4] -Transpose(0,2,1,3)-> [batch, past_len, 2, 4] -Concat(axis 1)-> present
    model = _concat_graph(to_output=True, layout=[0, 2, 1, 3])
    path = kv_cache_paths(model.graph)["past"]
    assert (path.aliases, path.seq_axis) == (("past", "past_t"), 2)
    _, plan = optimize(model, OptimizeConfig(batch=3, context=10, budget=10**9))
    assert plan_rows(plan) == [
        ("ar", [("w", "weight", "mm", 256), ("past", KV, "transpose", 3 * 2 * 10 * 4 * 4)])
    ]


# -- onnxruntime-genai: symbolic kv_cache_dim ------------------------------------------------------


@pytest.fixture
def genai_ranks(tmp_path):
    """The llama-gqa sample with the builder's
    ``[batch_size, kv_heads, past_sequence_length, kv_cache_dim]``."""
    dest = tmp_path / "genai"
    shutil.copytree(SAMPLES / "llama-gqa" / "tp2", dest)
    for r in (0, 1):
        path = dest / f"model_0{r}.onnx"
        onnx.save(genai_kv_cache_dim(load_model(path)), path)
    return dest


def test_genai_kv_cache_dim_is_bound_from_the_attention_op(genai_ranks):
    model = load_model(genai_ranks / "model_00.onnx")
    assert graph_dims(model) == {"kv_cache_dim": 16}  # q width 32 / num_heads 2
    _, plan = optimize(model, OptimizeConfig(batch=8, context=16384))
    _, original = optimize(
        load_model(SAMPLES / "llama-gqa" / "tp2" / "model_00.onnx"), OptimizeConfig(batch=8, context=16384)
    )
    assert plan_rows(plan) == plan_rows(original)
    assert any(
        p.kind == KV and p.nbytes == 8 * 1 * 16384 * 16 * 4 for w in plan.windows for p in w.prefetches
    )


def test_dim_option_overrides_the_graph(genai_ranks):
    r = runner.invoke(
        app,
        [
            "inspect",
            str(genai_ranks / "model_00.onnx"),
            "--json",
            "--dim",
            "kv_cache_dim=32",
            "--budget",
            "1GiB",
        ],
    )
    assert r.exit_code == 0, r.output
    kv = {
        p["tensor"]: p["bytes"]
        for w in json.loads(r.output)["models"][0]["windows"]
        for p in w["prefetches"]
        if p["kind"] == KV
    }
    assert kv and set(kv.values()) == {8 * 1 * 16384 * 32 * 4}


def test_genai_ranks_optimize_and_run_bit_identical(genai_ranks, tmp_path):
    r = runner.invoke(app, ["optimize", str(genai_ranks), str(tmp_path / "opt"), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app, ["run", str(tmp_path / "opt"), "--against", str(genai_ranks), "--steps", "2", "-q"]
    )
    assert r.exit_code == 0, r.output
    assert "PASSED: 10 outputs on 2 rank(s) bit-identical" in r.output


def test_run_dim_option_sizes_generated_feeds(genai_ranks):
    r = runner.invoke(app, ["run", str(genai_ranks), "--dim", "kv_cache_dim=16", "--dim", "batch_size=3"])
    assert r.exit_code == 0, r.output
    assert "3x1x17x16" in r.output  # present: batch 3 (from --dim), past 16 + 1, head 16


# -- dims that cannot be bound, and bad --dim spellings ---------------------------------------------


def _unbindable():
    model = torchscript_decoder(kv_dims=("batch_size", HEADS, "past_sequence_length", "head_dim"))
    for vi in model.graph.output:
        if vi.name.startswith("present."):
            vi.type.tensor_type.shape.dim[3].dim_param = "head_dim"
    return model


def test_dim_nothing_binds_is_one_line_naming_dim_tensor_and_option(tmp_path):
    save_ranks(_unbindable(), tmp_path / "tp2")
    r = runner.invoke(app, ["optimize", str(tmp_path / "tp2"), str(tmp_path / "out")])
    assert r.exit_code == 1
    assert r.output.strip() == (
        "error: collect-candidates failed after check-order, build-windows: KV-cache "
        "input 'past_key_values.1.key': cannot bind symbolic dimension 'head_dim' "
        "(axis 3): give it with --dim head_dim=N"
    )
    assert not (tmp_path / "out").exists()


def test_dim_option_binds_what_the_graph_does_not(tmp_path):
    with pytest.raises(PreserveError, match="head_dim"):
        optimize(_unbindable(), OptimizeConfig(batch=2, context=64))
    _, plan = optimize(
        _unbindable(), OptimizeConfig(batch=2, context=64, dims=(("head_dim", 16),), budget=10**9)
    )
    assert plan_rows(plan) == plan_rows(
        optimize(torchscript_decoder(), OptimizeConfig(batch=2, context=64, budget=10**9))[1]
    )


@pytest.mark.parametrize(
    "spelling",
    ["kv_cache_dim", "kv_cache_dim=", "=16", "kv_cache_dim=0", "kv_cache_dim=x", "kv_cache_dim=-4"],
)
def test_bad_dim_spelling_is_a_usage_error(spelling, tmp_path):
    r = runner.invoke(
        app, ["inspect", str(SAMPLES / "llama-gqa" / "tp2" / "model_00.onnx"), "--dim", spelling]
    )
    assert r.exit_code == 2
    assert f"--dim: expected NAME=N with N a positive integer, got '{spelling}'" in r.output


def test_dim_given_twice_with_two_values_is_refused():
    with pytest.raises(PreserveError, match="'a' given twice"):
        parse_dim_options(["a=1", "a=2"])
    assert parse_dim_options(["a=1", "a=1", "b=3"]) == (("a", 1), ("b", 3))


def test_api_checks_dims():
    with pytest.raises(PreserveError, match="dims must be"):
        OptimizeConfig(dims=(("kv_cache_dim", 0),))
    assert OptimizeConfig(dims={"kv_cache_dim": 16}).dims == (("kv_cache_dim", 16),)


def test_graph_dims_leave_a_name_bound_to_two_values_unbound():
    g = G()
    g.input("q", ["batch", 1, 32])
    for i, kv_heads in enumerate((1, 2)):
        for kind in ("key", "value"):
            g.input(f"past.{i}.{kind}", ["batch", "kv_heads", "past", 16])
        g.node(
            "GroupQueryAttention",
            ["q", "", "", f"past.{i}.key", f"past.{i}.value"],
            [f"o{i}"],
            name=f"gqa{i}",
            domain="com.microsoft",
            num_heads=2,
            kv_num_heads=kv_heads,
        )
    assert graph_dims(g.model()) == {}


def test_cost_model_counts_plain_attention_matmuls_as_batched():
    analysis = analyze(torchscript_decoder(), OptimizeConfig(batch=2, context=64), model_ranks=2)
    flops = {op.name: op.flops for op in analysis.ops}
    # scores = Q [2, heads, 1, head] @ K^T [2, heads, head, 65]: 2 x (2 x heads x 1 x 65) x head
    assert flops["/model/layers.0/self_attn/MatMul"] == 2.0 * (2 * HEADS * 65) * HEAD
    # context = P [2, heads, 1, 65] @ V [2, heads, 65, head]
    assert flops["/model/layers.0/self_attn/MatMul_1"] == 2.0 * (2 * HEADS * HEAD) * 65


def test_inspect_verbose_says_why_a_shape_reader_is_not_a_consumer(tmp_path):
    onnx.save(_concat_graph(to_output=True, shape_only=True), tmp_path / "m.onnx")
    r = runner.invoke(app, ["inspect", str(tmp_path / "m.onnx"), "-v", "--batch", "2", "--context", "16"])
    assert r.exit_code == 0, r.output
    assert "shape_of_past[0]" in r.output and "Shape reads only the KV-cache's" in r.output


def test_cost_model_folds_shape_arithmetic_like_constants():
    """TorchScript's Shape -> Gather -> Unsqueeze -> Concat chains are host-side metadata: no operator
    of the step is built only from shapes and constants."""
    analysis = analyze(torchscript_decoder(), OptimizeConfig(batch=2, context=64), model_ranks=2)
    costed = {op.name for op in analysis.ops}
    assert not any(
        name.endswith(("/Shape", "/Gather_0", "/Unsqueeze_1", "/Concat", "/Slice", "/Concat_shape"))
        for name in costed
    )
    assert "/model/layers.0/self_attn/q/Reshape" in costed  # the Reshape of the activation still runs
