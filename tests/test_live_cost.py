"""The cost model on live ranges and expert banks (docs/design.md §4.7-4.8, §6): a windowed layer reads
min(context, W) positions, flat past W; a static link over a windowed buffer is credited only the live
bytes inside its raw range; bank links are charged in full, credited their read share f(T), and hinted
from min_tokens on. Exact numbers, computed by hand from the graphs of tests/passes/test_live_links.py."""

from __future__ import annotations

import json

import onnx
import pytest
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.config import OptimizeConfig
from preserve_onnx.cost.analysis import Link, analyze
from preserve_onnx.cost.estimate import evaluate, plan_chains
from preserve_onnx.passes._live import expert_share
from tests.passes.test_live_links import POSITION, gqa_model, moe_model

runner = CliRunner()
W = 32


def _gqa_op(analysis):
    (pos,) = [k for k, op in enumerate(analysis.ops) if op.op_type == "GroupQueryAttention"]
    return pos


def test_a_windowed_layer_reads_min_context_w_positions():
    for context, positions in ((16, 16), (32, 32), (100, 32), (1000, 32)):
        analysis = analyze(gqa_model(window=W), OptimizeConfig(batch=2, context=context, budget=1 << 20), 1)
        reads = {r.tensor: r.nbytes for r in analysis.ops[_gqa_op(analysis)].reads if r.kind == "kv_cache"}
        assert reads == {"past_key": 2 * positions * POSITION, "past_value": 2 * positions * POSITION}


def test_the_attention_op_costs_the_same_past_its_window():
    durations = []
    for context in (W, 100, 1000):
        cfg = OptimizeConfig(batch=2, context=context, budget=1 << 20)
        analysis = analyze(gqa_model(window=W), cfg, 1)
        est = evaluate(analysis, cfg.hardware, 1, cfg.budget)
        durations.append(est.baseline.durations[_gqa_op(analysis)])
        assert est.kv_read_bytes == 2 * 2 * W * POSITION
    assert durations[0] == durations[1] == durations[2]
    # Without a window the same layer grows with the context.
    small, big = (
        evaluate(
            a := analyze(gqa_model(), OptimizeConfig(batch=2, context=c, budget=1 << 20), 1),
            a.config.hardware,
            1,
            1 << 20,
        )
        for c in (W, 1000)
    )
    assert (small.kv_read_bytes, big.kv_read_bytes) == (2 * 2 * W * POSITION, 2 * 2 * 1000 * POSITION)


def test_a_static_link_is_credited_only_the_live_bytes_in_its_raw_range():
    # context 100, W 32: a block is 100 positions (6400 B), its live positions are [68, 100). Budget: the
    # qkv weight (8 KiB) and 6400 bytes more: with L, 6400 live bytes cover both blocks' 4096 live bytes
    # (whole link); the static link covers block 0 raw, of which 32 positions are live.
    qkv = 32 * 64 * 4
    for static, want in (
        (False, [Link("wqkv", qkv, qkv), Link("past_key", 4096, 4096), Link("past_value", 2304, 2304)]),
        (True, [Link("wqkv", qkv, qkv), Link("past_key", 6400, 2048)]),
    ):
        cfg = OptimizeConfig(batch=2, context=100, budget=qkv + 6400, static_kv=static, min_chunk=1)
        analysis = analyze(gqa_model(window=W), cfg, 1)
        (chain,) = plan_chains(analysis, cfg.hardware, 1, cfg.budget)
        assert list(chain) == want


def test_bank_links_are_charged_in_full_and_credited_their_read_share():
    cfg = OptimizeConfig(batch=6, budget=1 << 20)
    analysis = analyze(moe_model(), cfg, 1)
    share = expert_share(4, 32, 6)
    bank = 32 * 32 * 16 * 4
    (chain,) = plan_chains(analysis, cfg.hardware, 1, cfg.budget)
    assert list(chain) == [
        Link("gate", 2048, 2048),
        Link("fc1", bank, int(bank * share), 6),
        Link("fc2", bank, int(bank * share), 6),
        Link("shared", 1024, 1024),
    ]
    (moe,) = [op for op in analysis.ops if op.op_type == "MoE"]
    assert {r.tensor: r.nbytes for r in moe.reads} == {"fc1": int(bank * share), "fc2": int(bank * share)}


def test_bank_hints_switch_on_at_min_tokens():
    bank = 32 * 32 * 16 * 4
    hinted = {}
    for batch in range(1, 9):
        cfg = OptimizeConfig(batch=batch, budget=1 << 20)
        est = evaluate(analyze(moe_model(), cfg, 1), cfg.hardware, 1, cfg.budget)
        (w,) = est.windows
        assert w.planned_bytes == 2048 + 1024 + 2 * bank  # planned at every batch: the budget holds them
        hinted[batch] = w.hinted_bytes
    assert hinted == {b: 2048 + 1024 + (2 * bank if b >= 6 else 0) for b in range(1, 9)}


@pytest.fixture
def models(tmp_path):
    onnx.save(gqa_model(window=W), tmp_path / "gqa.onnx")
    onnx.save(moe_model(), tmp_path / "moe.onnx")
    return tmp_path


def test_sweep_json_shows_windowed_reads_flat_past_w(models):
    r = runner.invoke(
        app,
        [
            "estimate",
            str(models / "gqa.onnx"),
            "--sweep",
            "context=16,32,64,128",
            "batch=2",
            "--budget",
            "1MiB",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    points = json.loads(r.output)
    assert [(p["context"], p["kv_read_bytes"]) for p in points] == [
        (16, 2 * 2 * 16 * POSITION),
        (32, 2 * 2 * W * POSITION),
        (64, 2 * 2 * W * POSITION),
        (128, 2 * 2 * W * POSITION),
    ]


def test_sweep_json_and_grid_show_banks_switching_on_at_min_tokens(models):
    args = ["estimate", str(models / "moe.onnx"), "--sweep", "batch=5,6", "--budget", "1MiB"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert [(p["batch"], p["hinted_bytes"]) for p in json.loads(r.output)] == [
        (5, 3072),
        (6, 3072 + 2 * 65536),
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = [
        [c.strip() for c in line.strip("│ ").split("│")]
        for line in r.output.splitlines()
        if line.startswith("│")
    ]
    assert [(row[0], row[-1]) for row in rows] == [("5", "3.0 KiB"), ("6", "131.0 KiB")]


def test_estimate_json_reports_kv_read_and_hinted_bytes(models):
    r = runner.invoke(
        app,
        [
            "estimate",
            str(models / "gqa.onnx"),
            "--batch",
            "2",
            "--context",
            "100",
            "--budget",
            "1MiB",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    qkv, wo = 32 * 64 * 4, 32 * 32 * 4
    assert (doc["kv_read_bytes"], doc["hinted_bytes"]) == (
        2 * 2 * W * POSITION,
        qkv + 2 * 2 * W * POSITION + wo,
    )
    assert doc["windows"][0]["hinted_bytes"] == doc["hinted_bytes"]
    r = runner.invoke(
        app,
        [
            "estimate",
            str(models / "gqa.onnx"),
            "--batch",
            "2",
            "--context",
            "100",
            "--budget",
            "1MiB",
            "--json",
            "--static-kv",
        ],
    )
    # Static links fetch the raw buffer: 100 positions a block, of which the step reads 32.
    assert json.loads(r.output)["hinted_bytes"] == qkv + 2 * 2 * 100 * POSITION + wo


# -- the options and the -v notes on the command line -----------------------------------------------


def test_explore_static_kv_credits_less_on_a_windowed_layer(models):
    """At 2 MiB of L2 the chain moves part of the KV-cache: live links move the window's positions, static
    links the buffer's first positions, which a windowed step does not read."""
    docs = [
        json.loads(
            runner.invoke(
                app,
                ["explore", str(models / "gqa.onnx"), "--batch", "2", "--context", "4096", "--json", *extra],
            ).output
        )
        for extra in ([], ["--static-kv"])
    ]
    live, static = ({p["l2_bytes"]: p["preserve_s"] for p in d["points"]} for d in docs)
    assert static[2 << 20] > live[2 << 20]


def test_inspect_shows_the_live_range_and_the_static_setting(models):
    r = runner.invoke(app, ["inspect", str(models / "gqa.onnx"), "-v", "--batch", "2", "--context", "100"])
    assert r.exit_code == 0, r.output
    assert "L=seqlens_k axis 2 window 32" in r.output
    doc = json.loads(
        runner.invoke(app, ["inspect", str(models / "gqa.onnx"), "--json", "--static-kv"]).output
    )
    assert doc["settings"]["static_kv"] is True
    assert {p["lengths"] for w in doc["models"][0]["windows"] for p in w["prefetches"]} == {None}
    doc = json.loads(runner.invoke(app, ["inspect", str(models / "gqa.onnx"), "--json"]).output)
    assert [
        (p["tensor"], p["lengths"], p["seq_axis"], p["window"])
        for p in doc["models"][0]["windows"][0]["prefetches"]
        if p["kind"] == "kv_cache"
    ] == [("past_key", "seqlens_k", 2, W), ("past_value", "seqlens_k", 2, W)]


def test_optimize_verbose_says_why_a_kv_link_keeps_two_inputs(tmp_path, console_width):
    console_width(400)
    onnx.save(gqa_model(seqlens_after=True), tmp_path / "m.onnx")
    r = runner.invoke(
        app,
        [
            "optimize",
            str(tmp_path / "m.onnx"),
            str(tmp_path / "o.onnx"),
            "-v",
            "--batch",
            "2",
            "--context",
            "100",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (
        r.output.count(
            "two-input form: seqlens_k 'seqlens_k' is made by cast (node 4), after the collective ar: "
            "the Prefetch would read it before it exists"
        )
        == 2
    )


def test_diff_shows_the_length_input_and_its_attributes(models, tmp_path, console_width):
    console_width(400)
    for name, extra in (("static.onnx", ["--static-kv"]), ("live.onnx", [])):
        r = runner.invoke(
            app,
            [
                "optimize",
                str(models / "gqa.onnx"),
                str(tmp_path / name),
                "-q",
                "--batch",
                "2",
                "--context",
                "100",
                "--budget",
                "1MiB",
                *extra,
            ],
        )
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["diff", str(tmp_path / "static.onnx"), str(tmp_path / "live.onnx")])
    assert r.exit_code == 1, r.output
    assert [line.strip() for line in r.output.splitlines() if line.strip().startswith("~")] == [
        f"~ node ar/Prefetch/{x}: input[2]: (none) -> seqlens_k; attribute seq_axis: (none) -> 2; "
        f"attribute window: (none) -> {W}"
        for x in ("past_key", "past_value")
    ]
