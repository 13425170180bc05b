"""Vendor naming: --prefetch-domain/-op/-version and --prefetch-attr, honoured by every command."""

import json

import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from preserve_onnx import OptimizeConfig, PrefetchNaming, optimize
from preserve_onnx.cli import app
from preserve_onnx.config import PREFETCH_ATTRIBUTES
from preserve_onnx.model_io import load_model
from tests.builders import two_layer_mlp
from tests.conftest import SAMPLES

runner = CliRunner()
SRC = SAMPLES / "llama-gqa" / "tp2"
VENDOR = [
    "--prefetch-domain",
    "com.acme.npu",
    "--prefetch-op",
    "CmoPrefetch",
    "--prefetch-version",
    "2",
    "--prefetch-attr",
    "max_size=size",
    "--prefetch-attr",
    "offset=start",
    "--prefetch-attr",
    "collective=tag",
    "--prefetch-attr",
    "max_tokens=valid_tokens",
]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def prefetch_nodes(model):
    return [n for n in model.graph.node if n.domain == "com.acme.npu"]


@pytest.fixture(scope="module")
def vendor_dir(tmp_path_factory):
    dest = tmp_path_factory.mktemp("vendor") / "opt"
    r = cli("optimize", SRC, dest, "--budget", "1MiB", "-q", *VENDOR)
    assert r.exit_code == 0, r.output
    return dest


def test_optimize_writes_the_vendor_spelling(vendor_dir):
    model = load_model(vendor_dir / "model_00.onnx")
    nodes = prefetch_nodes(model)
    assert len(nodes) == 11
    assert {n.op_type for n in nodes} == {"CmoPrefetch"}
    first = nodes[0]
    assert [(a.name, helper.get_attribute_value(a)) for a in first.attribute] == [
        ("size", 0),
        ("start", 0),
        ("tag", b"/model/layers.0/attn/o_proj/AllReduce"),
        ("valid_tokens", 470),
    ]
    assert [(o.domain, o.version) for o in model.opset_import if o.domain == "com.acme.npu"] == [
        ("com.acme.npu", 2)
    ]
    assert not any(n.op_type == "Prefetch" for n in model.graph.node)
    (fn,) = model.functions  # the definition tools that infer shapes read, in the vendor's spelling
    assert (fn.domain, fn.name, list(fn.input), list(fn.output), list(fn.attribute)) == (
        "com.acme.npu",
        "CmoPrefetch",
        ["A", "X", "L"],
        ["Y"],
        ["size", "start", "tag", "valid_tokens", *PREFETCH_ATTRIBUTES[4:]],
    )  # the rest keep their names
    size = {n.name: next(a.i for a in n.attribute if a.name == "size") for n in nodes}
    partial = [n for n in nodes if size[n.name] != 0]
    assert [(n.input[1], size[n.name]) for n in partial] == [("past_key_values.1.key", 1032192)]


def test_report_records_the_naming(tmp_path):
    assert (
        cli(
            "optimize", SRC, tmp_path / "o", "--dry-run", "-q", "--report", tmp_path / "r.json", *VENDOR
        ).exit_code
        == 0
    )
    settings = json.loads((tmp_path / "r.json").read_text())["settings"]
    assert {k: v for k, v in settings.items() if k.startswith("prefetch")} == {
        "prefetch_domain": "com.acme.npu",
        "prefetch_op": "CmoPrefetch",
        "prefetch_version": 2,
        "prefetch_attributes": {
            "max_size": "size",
            "offset": "start",
            "collective": "tag",
            "max_tokens": "valid_tokens",
            "min_tokens": "min_tokens",
            "seq_axis": "seq_axis",
            "window": "window",
        },
    }


def test_strip_with_the_same_naming_gives_the_original_back(vendor_dir, tmp_path):
    r = cli("strip", vendor_dir, tmp_path / "back", *VENDOR)
    assert r.exit_code == 0, r.output
    assert "removed 22 Prefetch nodes" in r.output
    for rank in ("model_00.onnx", "model_01.onnx"):
        assert (tmp_path / "back" / rank).read_bytes() == (SRC / rank).read_bytes()
    assert cli("diff", SRC, tmp_path / "back", *VENDOR).exit_code == 0
    # The default spelling sees no Prefetch nodes: nothing removed, still different.
    assert "removed 0 Prefetch nodes" in cli("strip", vendor_dir, tmp_path / "same").output
    assert cli("diff", SRC, tmp_path / "same").exit_code == 1


def test_inspect_reads_the_vendor_attributes(vendor_dir):
    r = cli("inspect", vendor_dir / "model_00.onnx", "--json", "--budget", "1MiB", *VENDOR)
    assert r.exit_code == 0, r.output
    (model,) = json.loads(r.output)["models"]
    existing = model["existing_prefetches"]
    assert len(existing) == 11
    assert [(p["tensor"], p["collective"], p["max_size"]) for p in existing if p["max_size"]] == [
        ("past_key_values.1.key", "/model/layers.0/mlp/down_proj/AllReduce", 1032192)
    ]
    # Its plan is the plan of the original (the vendor Prefetch nodes are set aside first).
    planned = [p["node"] for w in model["windows"] for p in w["prefetches"]]
    assert planned == [p["node"] for p in existing]


def test_diff_counts_vendor_prefetch_nodes(vendor_dir):
    r = cli("diff", SRC / "model_00.onnx", vendor_dir / "model_00.onnx", "--json", *VENDOR)
    assert r.exit_code == 1
    (model,) = json.loads(r.output)["models"]
    assert model["summary"] == [
        "11 Prefetch nodes added",
        "4 collectives rewired",
        "1 opset import added",
        "1 function added",
    ]


def test_run_is_bit_identical_with_the_vendor_names(vendor_dir):
    from preserve_onnx.runtime.library import prefetch_counters

    before = prefetch_counters()
    r = cli("run", vendor_dir, "--against", SRC, "-q", *VENDOR)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("PASSED: 10 outputs on 2 rank(s) bit-identical")
    after = prefetch_counters()
    assert after - before == (22, 0, 0, 264192)  # 11 hints on each of 2 ranks, one step


def test_a_runtime_without_the_vendor_kernel_runs_the_function_body(vendor_dir):
    """The default spelling registers no CmoPrefetch kernel: onnxruntime inlines the model's function
    (Identity), so the outputs are the same and not one hint is issued."""
    from preserve_onnx.runtime.library import prefetch_counters

    before = prefetch_counters()
    r = cli("run", vendor_dir, "--against", SRC, "-q")
    assert r.exit_code == 0, r.output
    assert prefetch_counters() - before == (0, 0, 0, 0)


@pytest.mark.parametrize(
    "value, message",
    [
        ("size", "--prefetch-attr 'size': expected NAME=NEW"),
        ("bogus=x", "--prefetch-attr 'bogus=x': expected NAME=NEW"),
        ("max_size=", "--prefetch-attr 'max_size=': expected NAME=NEW"),
        ("max_size=1st", "--prefetch-attr 'max_size=1st': expected NAME=NEW"),
        ("max_size=offset", "--prefetch-attr: two attributes would share a name"),
    ],
)
@pytest.mark.parametrize("command", ["optimize", "strip", "inspect", "diff"])
def test_bad_attribute_renames_are_one_line_errors(command, value, message, tmp_path):
    args = {
        "optimize": [SRC, tmp_path / "o"],
        "strip": [SRC, tmp_path / "o"],
        "inspect": [SRC],
        "diff": [SRC, SRC],
    }[command]
    r = cli(command, *args, "--prefetch-attr", value)
    assert r.exit_code == 2  # a usage error
    assert r.output.startswith(f"error: {message}")
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bad_version_is_refused(tmp_path):
    r = cli("optimize", SRC, tmp_path / "o", "--prefetch-version", "0")
    assert (r.exit_code, r.output.strip()) == (2, "error: --prefetch-version must be at least 1")


def test_python_api_naming():
    naming = PrefetchNaming(
        domain="com.acme.npu",
        op_type="CmoPrefetch",
        version=2,
        max_size="size",
        offset="start",
        collective="tag",
        max_tokens="valid_tokens",
    )
    model, _ = optimize(two_layer_mlp(), OptimizeConfig(budget=10_000, naming=naming))
    nodes = prefetch_nodes(model)
    assert [(n.op_type, [a.name for a in n.attribute]) for n in nodes] == [
        ("CmoPrefetch", ["size", "start", "tag", "valid_tokens"])
    ] * 3
    assert onnx.helper.make_opsetid("com.acme.npu", 2) in model.opset_import
