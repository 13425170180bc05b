"""The Python API: optimize, strip, inspect and diff return data; the CLI is a thin layer over them."""

import dataclasses
import json

import onnx
import pytest
from typer.testing import CliRunner

import preserve_onnx
from preserve_onnx import OptimizeConfig, diff, inspect, inspect_path, load_model, optimize, strip
from preserve_onnx.cli import app
from preserve_onnx.report_ci import diff_dict, inspection_dict
from tests.conftest import SAMPLES

runner = CliRunner()
MODEL = SAMPLES / "llama-gqa" / "tp2" / "model_00.onnx"


def test_public_names():
    assert {
        "optimize",
        "optimize_path",
        "strip",
        "inspect",
        "inspect_path",
        "diff",
        "Diff",
        "Inspection",
        "OptimizeConfig",
        "PrefetchNaming",
        "load_model",
        "save_model",
    } <= set(preserve_onnx.__all__)
    for name in preserve_onnx.__all__:
        assert hasattr(preserve_onnx, name)


def test_inspect_and_diff_stay_functions_after_their_modules_are_imported():
    import preserve_onnx.diffing
    import preserve_onnx.inspection

    assert callable(preserve_onnx.inspect) and callable(preserve_onnx.diff)
    assert preserve_onnx.inspect.__module__ == "preserve_onnx.inspection"
    assert preserve_onnx.diff.__module__ == "preserve_onnx.diffing"


def test_optimize_inspect_strip_diff_round_trip():
    config = OptimizeConfig(budget=1 << 20)
    original = load_model(MODEL)
    model, plan = optimize(MODEL, config)  # a path: ranks from the sibling rank file
    assert (plan.ranks, plan.prefetch_count) == (2, 11)
    assert inspect(MODEL, config).plan == plan
    assert inspect(model, config, ranks=2).plan == plan
    changes = diff(original, model)
    (m,) = changes.models
    assert (changes.a, changes.b, changes.equal) == ("a", "b", False)
    assert len(m.prefetches_added) == plan.prefetch_count
    assert [e.name for e in m.rewired_collectives] == [w.window.collective for w in plan.windows]
    assert diff(original, strip(model)).equal
    assert strip(model) == original


def test_results_are_frozen():
    ins = inspect(MODEL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ins.plan = None
    d = diff(MODEL, MODEL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.models = ()
    assert d.equal and (d.a, d.b) == (str(MODEL), str(MODEL))


def test_the_cli_prints_what_the_library_returns(tmp_path):
    src = SAMPLES / "llama-gqa" / "tp2"
    r = runner.invoke(app, ["inspect", str(src), "--json"])
    assert json.loads(r.output) == inspection_dict(inspect_path(src), OptimizeConfig())
    model, _ = optimize(MODEL)
    onnx.save_model(model, tmp_path / "o.onnx")
    r = runner.invoke(app, ["diff", str(MODEL), str(tmp_path / "o.onnx"), "--json"])
    assert json.loads(r.output) == diff_dict(diff(MODEL, tmp_path / "o.onnx"))


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: preserve_onnx.PrefetchNaming(max_size="offset"),
            "two Prefetch attributes would share a name",
        ),
        (
            lambda: preserve_onnx.PrefetchNaming(op_type=""),
            "the Prefetch domain and op type must not be empty",
        ),
        (
            lambda: preserve_onnx.PrefetchNaming(version=0),
            "opset version must be an integer of at least 1, got 0",
        ),
        (lambda: preserve_onnx.PrefetchNaming(offset="1st"), "attribute names must be identifiers"),
        (
            lambda: preserve_onnx.PrefetchNaming(domain="com.microsoft", op_type="AllReduce"),
            "cannot be spelled com.microsoft::AllReduce: that is a collective",
        ),
        (lambda: OptimizeConfig(l2_fraction=2.0), r"l2_fraction must be in \(0, 1\], got 2.0"),
        (lambda: OptimizeConfig(budget=-5), "budget must be an integer of at least 0, got -5"),
        (lambda: OptimizeConfig(batch=0), "batch must be an integer of at least 1, got 0"),
        (lambda: OptimizeConfig(min_chunk=-1), "min_chunk must be an integer of at least 0, got -1"),
        (lambda: OptimizeConfig(ranks=0), "ranks must be an integer of at least 1, got 0"),
        (lambda: OptimizeConfig(collectives="AllReduce"), "collectives must be a tuple"),
        (lambda: OptimizeConfig(hardware="tpu-v9"), "unknown hardware 'tpu-v9'"),
        (lambda: optimize(MODEL, ranks=-1), "ranks must be an integer of at least 1, got -1"),
        (lambda: optimize(42), "expected an onnx.ModelProto or a path to an .onnx file, got int"),
    ],
)
def test_the_api_refuses_what_the_cli_refuses(build, message):
    with pytest.raises(preserve_onnx.PreserveError, match=message):
        build()


def test_hardware_by_name_in_the_api():
    assert OptimizeConfig(hardware="h100-sxm").hardware.name == "h100-sxm"


def test_strip_refuses_nodes_that_only_share_the_prefetch_spelling(tmp_path):
    # Told that Prefetch is spelled like a one-input op the model uses, strip must not delete those ops.
    naming = preserve_onnx.PrefetchNaming(domain="com.microsoft", op_type="SkipSimplifiedLayerNormalization")
    with pytest.raises(
        preserve_onnx.PreserveError,
        match=r"^node '.*' \(com\.microsoft::"
        r"SkipSimplifiedLayerNormalization\) is not a Prefetch \(2 or 3 inputs, 1 output\)",
    ):
        strip(MODEL, naming)


def test_optimizing_does_not_load_the_diff_and_inspect_modules():
    import subprocess
    import sys

    code = (
        "import sys; from preserve_onnx.optimizer import optimize_path; "
        "print(sorted(m for m in ('preserve_onnx.diffing', 'preserve_onnx.inspection') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (r.returncode, r.stdout.strip()) == (0, "[]"), r.stderr
    assert "diff" in dir(preserve_onnx)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        preserve_onnx.nope
