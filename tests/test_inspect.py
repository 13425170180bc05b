"""`inspect`: collectives, windows, candidates and the plan optimize would make, without writing anything."""

import json

import pytest
from typer.testing import CliRunner

from preserve_onnx import OptimizeConfig, PrefetchNaming, inspect, inspect_path, optimize
from preserve_onnx.cli import app
from preserve_onnx.inspection import ExistingPrefetch
from preserve_onnx.passes import Candidate, Window
from tests.builders import MS, G, two_layer_mlp
from tests.conftest import SAMPLE_VARIANTS, SAMPLES

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_collectives_windows_and_candidates():
    ins = inspect(two_layer_mlp(), OptimizeConfig(budget=10_000))
    assert ins.collectives == (
        Window("", 1, "ar0", "AllReduce", "h0", True, (2, 3), 512),
        Window("", 4, "ar1", "AllReduce", "h2", True, (5,), 512),
    )
    assert [wp.candidates for wp in ins.plan.windows] == [
        (Candidate("w1", "weight", "mm1", 1, 2048), Candidate("w2", "weight", "mm2", 1, 2048)),
        (Candidate("w3", "weight", "mm3", 1, 1024),),
    ]
    planned = [p for wp in ins.plan.windows for p in wp.prefetches]
    assert [(p.node, p.tensor, p.offset, p.max_size, p.nbytes) for p in planned] == [
        ("ar0/Prefetch/w1", "w1", 0, 0, 2048),
        ("ar0/Prefetch/w2", "w2", 0, 0, 2048),
        ("ar1/Prefetch/w3", "w3", 0, 0, 1024),
    ]
    assert ins.prefetches == ()
    assert (ins.source, ins.ranks) == (None, 1)


@pytest.mark.parametrize("budget", [2_000, 4_096, 10_000])
def test_plan_is_exactly_what_optimize_plans(budget):
    config = OptimizeConfig(budget=budget, min_chunk=1024)
    assert inspect(two_layer_mlp(), config).plan == optimize(two_layer_mlp(), config)[1]


def test_an_optimized_model_shows_its_prefetches_and_the_same_plan():
    config = OptimizeConfig(budget=3_000, min_chunk=512)
    optimized, plan = optimize(two_layer_mlp(), config)
    ins = inspect(optimized, config)
    assert ins.prefetches == (
        ExistingPrefetch("", "ar0/Prefetch/w1", "h0", "w1", "ar0", 0, 0, 470),
        ExistingPrefetch("", "ar0/Prefetch/w2", "ar0/Prefetch/w1/out", "w2", "ar0", 0, 952, 470),
        ExistingPrefetch("", "ar1/Prefetch/w3", "h2", "w3", "ar1", 0, 0, 470),
    )
    assert ins.plan == plan  # planned as --replan would: on the model without its Prefetch nodes


def test_unselected_collectives_are_listed_and_bound_windows():
    g = G()
    g.input("x", ["batch", 16])
    g.allreduce("x", "a0", name="ar0")
    g.node("MatMul", ["a0", g.weight("w0", (16, 16))], ["h"], name="mm0")
    g.node("AllGather", ["h"], ["gathered"], name="ag", domain=MS, group_size=2, axis=1)
    g.node("MatMul", ["gathered", g.weight("w1", (32, 16))], ["y"], name="mm1")
    g.output("y")
    ins = inspect(g.model(), OptimizeConfig(budget=1 << 20))
    assert [(w.collective, w.op_type, w.selected, w.nodes) for w in ins.collectives] == [
        ("ar0", "AllReduce", True, (1,)),
        ("ag", "AllGather", False, (3,)),
    ]
    assert [(wp.window.collective, [p.tensor for p in wp.prefetches]) for wp in ins.plan.windows] == [
        ("ar0", ["w0"])
    ]
    both = inspect(g.model(), OptimizeConfig(budget=1 << 20, collectives=("AllReduce", "AllGather")))
    assert [(wp.window.collective, [p.tensor for p in wp.prefetches]) for wp in both.plan.windows] == [
        ("ar0", ["w0"]),
        ("ag", ["w1"]),
    ]


def test_inspect_path_of_a_rank_directory():
    inspections = inspect_path(SAMPLES / "llama-gqa" / "tp2", jobs=1)
    assert [(i.source.name, i.ranks, len(i.collectives)) for i in inspections] == [
        ("model_00.onnx", 2, 4),
        ("model_01.onnx", 2, 4),
    ]


@pytest.mark.parametrize("variant", SAMPLE_VARIANTS)
def test_cli_json_is_the_optimize_report_plus_collectives(variant, tmp_path):
    src = SAMPLES / variant / "tp2"
    before = snapshot(src)
    r = cli("inspect", src, "--json", "--budget", "2MiB")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert (
        cli(
            "optimize",
            src,
            tmp_path / "o",
            "--dry-run",
            "-q",
            "--budget",
            "2MiB",
            "--report",
            tmp_path / "r.json",
        ).exit_code
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert doc["schema"] == 1
    for model in doc["models"]:
        assert [(c["op_type"], c["selected"]) for c in model.pop("collectives")] == [
            ("AllReduce", True)
        ] * len(model["windows"])
        assert model.pop("existing_prefetches") == []
        assert model.pop("stale_prefetches") is None  # no Prefetch node, nothing to be stale
    assert doc == report  # same schema, same plan, same settings
    assert snapshot(src) == before  # nothing written


def test_cli_json_of_an_optimized_model_lists_its_prefetches(tmp_path):
    src = SAMPLES / "llama-gqa" / "tp2" / "model_00.onnx"
    assert cli("optimize", src, tmp_path / "o.onnx", "--budget", "64KiB", "-q").exit_code == 0
    doc = json.loads(cli("inspect", tmp_path / "o.onnx", "--json", "--budget", "64KiB").output)
    (model,) = doc["models"]
    existing = model["existing_prefetches"]
    assert [p["node"] for p in existing] == [p["node"] for w in model["windows"] for p in w["prefetches"]]
    assert set(existing[0]) == {
        "graph",
        "node",
        "anchor",
        "tensor",
        "collective",
        "offset",
        "max_size",
        "max_tokens",
        "lengths",
        "seq_axis",
        "window",
        "min_tokens",
    }
    # The validity range read back from the nodes is the one the plan gives the window (fp32 on 910B).
    assert [p["max_tokens"] for p in existing[:3]] == [model["windows"][0]["max_tokens"]] * 3 == [470] * 3


@pytest.fixture
def wide(monkeypatch):
    """Rich tables 200 columns wide, so rows are one line each."""
    from preserve_onnx import cli as cli_module

    monkeypatch.setattr(cli_module.out, "_width", 200)


def test_cli_tables(wide):
    src = SAMPLES / "llama-gqa" / "tp2" / "model_00.onnx"
    r = cli("inspect", src, "--budget", "1MiB", "-v")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith(
        "model_00.onnx: 4 collectives, 4 planned, 11 prefetches, 1.1 MiB "
        "(--budget 1048576 B per window, 2 rank(s))"
    )
    assert any(
        "/model/layers.0/mlp/down_proj/AllReduce" in line and "16.0 MiB" in line and "100%" in line
        for line in lines
    )
    assert any("past_key_values.1.key" in line and "first 1008.0 KiB" in line for line in lines)
    assert any("past_key_values.1.value" in line and "budget exhausted" in line for line in lines)  # -v
    assert lines[-1].startswith(
        "done: 1 model(s), 4 collectives, 11 prefetches, 1.1 MiB would be planned; nothing written in "
    )


def test_cli_tables_show_existing_prefetches(tmp_path, wide):
    src = SAMPLES / "llama-gqa" / "tp2" / "model_00.onnx"
    assert cli("optimize", src, tmp_path / "o.onnx", "--budget", "64KiB", "-q").exit_code == 0
    r = cli("inspect", tmp_path / "o.onnx", "--budget", "64KiB")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    table = lines[
        lines.index(next(x for x in lines if x.startswith("Prefetch nodes already in the model"))) :
    ]
    rows = [x.split("│")[1:4] for x in table if x.startswith("│")]
    assert len(rows) == 10
    assert [c.strip() for c in rows[0]] == [
        "/model/layers.0/attn/o_proj/AllReduce",
        "model.layers.0.mlp.gate_proj.MatMul.weight",
        "whole",
    ]
    first = next(x for x in table if x.startswith("│"))
    assert first.split("│")[4].strip() == "470"  # the node's max_tokens


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["nope.onnx"], "error: nope.onnx: no such file or directory", 1),
        (
            [str(SAMPLES / "llama-gqa" / "tp2"), "--collectives", "Bogus"],
            "error: --collectives: unknown 'Bogus'",
            2,
        ),
        ([str(SAMPLES / "llama-gqa" / "tp2"), "--batch", "0"], "error: --batch must be at least 1", 2),
        ([str(SAMPLES / "llama-gqa" / "tp2"), "--hardware", "nope"], "error: unknown hardware 'nope'", 2),
        ([str(SAMPLES / "llama-gqa" / "tp2"), "--jobs", "0"], "error: --jobs must be at least 1", 2),
        ([str(SAMPLES / "llama-gqa" / "tp2"), "--ranks", "-2"], "error: --ranks must be at least 1", 2),
    ],
)
def test_cli_errors_are_one_line(args, message, code):
    r = cli("inspect", *args)
    assert r.exit_code == code
    assert r.output.startswith(message) and len(r.output.strip().splitlines()) == 1


def test_inspect_honours_vendor_naming():
    naming = PrefetchNaming(domain="com.acme", op_type="Cmo", max_size="size", offset="start")
    config = OptimizeConfig(budget=3_000, min_chunk=512, naming=naming)
    optimized, _ = optimize(two_layer_mlp(), config)
    assert [(p.node, p.max_size) for p in inspect(optimized, config).prefetches] == [
        ("ar0/Prefetch/w1", 0),
        ("ar0/Prefetch/w2", 952),
        ("ar1/Prefetch/w3", 0),
    ]
    assert inspect(optimized, OptimizeConfig(budget=3_000, min_chunk=512)).prefetches == ()


def test_explicit_ranks_win_over_the_directory_count():
    by_files = json.loads(cli("inspect", SAMPLES / "llama-gqa" / "tp2", "--json").output)
    forced = json.loads(cli("inspect", SAMPLES / "llama-gqa" / "tp2", "--json", "--ranks", "4").output)
    assert [m["ranks"] for m in by_files["models"]] == [2, 2]
    assert [m["ranks"] for m in forced["models"]] == [4, 4]


def test_collectives_in_branches_are_named_without_a_double_slash(wide):
    r = cli("inspect", SAMPLES / "merged-decoder" / "tp2" / "model_00.onnx")
    assert r.exit_code == 0
    rows = [x.split("│")[1].strip() for x in r.output.splitlines() if x.startswith("│")]
    assert "optimum::if:else_branch/else/model/layers.0/attn/o_proj/AllReduce" in rows
    assert not any("//" in x for x in rows)
