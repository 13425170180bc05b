"""`estimate` and `explore` on the command line: every sample, a 70B-shaped export, traces, JSON keys."""

import csv
import json
import sys
import time

import pytest
from typer.testing import CliRunner

from preserve_onnx.cli import app
from tests.conftest import ROOT, SAMPLE_VARIANTS, SAMPLES

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


# Chrome trace event format (the JSON Object Format of "Trace Event Format", the document Perfetto and
# chrome://tracing read): phases used here and the fields each requires.
_PHASES = {"X": ("name", "ph", "ts", "dur", "pid", "tid"), "M": ("name", "ph", "pid", "args")}
_METADATA = {"process_name", "process_labels", "process_sort_index", "thread_name", "thread_sort_index"}


def check_chrome_trace(doc) -> dict:
    """Validate a trace document; returns {(pid, tid): [events]} of its complete events."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    assert doc.get("displayTimeUnit", "ms") in ("ms", "ns")
    tracks: dict = {}
    for e in doc["traceEvents"]:
        assert e["ph"] in _PHASES, e
        for key in _PHASES[e["ph"]]:
            assert key in e, (key, e)
        assert isinstance(e["pid"], int) and isinstance(e.get("tid", 0), int)
        assert isinstance(e["name"], str) and e["name"]
        if e["ph"] == "M":
            assert e["name"] in _METADATA and isinstance(e["args"], dict)
        else:
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0
            assert isinstance(e.get("args", {}), dict) and isinstance(e.get("cat", ""), str)
            tracks.setdefault((e["pid"], e["tid"]), []).append(e)
    return tracks


@pytest.mark.parametrize("variant", SAMPLE_VARIANTS)
def test_estimate_every_sample(variant, tmp_path):
    src = SAMPLES / variant / "tp2"
    r = cli("estimate", src, "--json", "--trace", tmp_path / "trace.json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    for key in (
        "baseline_s",
        "preserve_s",
        "speedup",
        "upper_bound_speedup",
        "windows",
        "upper_bound_s",
        "share_of_upper_bound",
        "hardware",
        "batch",
        "context",
        "ranks",
    ):
        assert key in doc
    assert doc["ranks"] == 2 and doc["hardware"] == "ascend-910b" and len(doc["windows"]) == 4
    assert 1.0 <= doc["speedup"] <= doc["upper_bound_speedup"]
    assert doc["baseline_s"] / doc["preserve_s"] == pytest.approx(doc["speedup"])
    for w in doc["windows"]:
        assert set(w) == {
            "graph",
            "collective",
            "collective_s",
            "budget_bytes",
            "planned_bytes",
            "overlapped_bytes",
            "saved_s",
            "upper_bound_bytes",
            "upper_bound_saved_s",
            "max_tokens",
            "tokens",
            "hinted_bytes",
        }
    tracks = check_chrome_trace(json.loads((tmp_path / "trace.json").read_text()))
    assert {pid for pid, _ in tracks} == {1, 2, 3}  # baseline, preserve, upper bound
    for (pid, tid), events in tracks.items():
        if tid in (1, 2):  # compute and communication are in-order streams: no overlap
            for a, b in zip(events, events[1:]):
                assert b["ts"] >= a["ts"] + a["dur"] - 1e-6
    assert (2, 3) in tracks  # the plan's timeline has prefetch spans


def test_estimate_table_on_a_sample():
    r = cli("estimate", SAMPLES / "llama-gqa" / "tp2")
    assert r.exit_code == 0, r.output
    assert "t_coll" in r.output and "upper bound" in r.output and "1.055x" in r.output


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory):
    """The full Llama-3-70B shape, 8 ranks, 80 layers (shape-only, about a second to write)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from make_big_model import make_big_model

    out = tmp_path_factory.mktemp("big70b")
    make_big_model(out, "llama3-70b", ranks=8)
    return out


def test_estimate_70b_in_seconds(big_dir):
    start = time.perf_counter()
    r = cli("estimate", big_dir, "--json")
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - start < 20
    doc = json.loads(r.output)
    assert (doc["ranks"], len(doc["windows"])) == (8, 160)
    assert round(doc["baseline_s"] * 1e3, 3) == 25.644
    assert round(doc["preserve_s"] * 1e3, 3) == 21.462
    assert round(doc["speedup"], 3) == 1.195
    assert round(doc["upper_bound_speedup"], 3) == 1.210
    # Time-bound window: achieved HBM 0.85 x 1.6 TB/s x t_coll (25 us HCCL + 2 x 7/8 x 128 KiB at 28 GB/s).
    w = doc["windows"][0]
    assert (w["budget_bytes"], w["planned_bytes"], w["overlapped_bytes"]) == (45141120, 45141120, 45141120)
    # fp16 weights on 910B: 320 TFLOPS x 2 B / (2 x 1.36 TB/s) = 235 tokens; the attention window
    # prefetches KV-cache too, which stays memory-bound: no limit.
    assert (w["max_tokens"], w["tokens"], doc["windows"][1]["max_tokens"]) == (235, 8, 0)


def test_sweep_grid(big_dir):
    start = time.perf_counter()
    r = cli("estimate", big_dir, "--json", "--sweep", "batch=1,8", "context=1k,128k", "ranks=2,8")
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - start < 30
    points = json.loads(r.output)
    assert [(p["batch"], p["context"], p["ranks"]) for p in points] == [
        (b, c, n) for b in (1, 8) for c in (1024, 131072) for n in (2, 8)
    ]
    assert all(set(p) >= {"batch", "context", "ranks", "speedup"} for p in points)
    best = max(points, key=lambda p: p["speedup"])
    assert (best["batch"], best["context"], best["ranks"]) == (8, 1024, 8)
    assert round(best["speedup"], 3) == 1.232
    # The default point of the grid is the plain estimate's.
    table = cli("estimate", big_dir, "--sweep", "batch=8 context=16k ranks=8")
    assert table.exit_code == 0 and "1.19x" in table.output


def test_explore(big_dir, tmp_path):
    r = cli("explore", big_dir, "--json", "--csv", tmp_path / "l2.csv")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    # With prefetching the best L2 is where 0.5 x usable L2 (0.85 x L2) reaches the time bound of
    # 45.1 MB: about 106 MB, the 104 MiB grid point (the paper's 8 MB -> 104 MB).
    assert (doc["best_l2_baseline_bytes"], doc["best_l2_preserve_bytes"]) == (2 << 20, 104 << 20)
    assert round(doc["perf_per_cost_gain"], 3) == 1.172
    assert doc["points"][0]["l2_bytes"] == 0 and doc["points"][-1]["l2_bytes"] == 256 << 20
    for p in doc["points"]:
        assert {"l2_bytes", "perf_per_cost_baseline", "perf_per_cost_preserve"} <= set(p)
    rows = list(csv.DictReader((tmp_path / "l2.csv").open()))
    assert len(rows) == len(doc["points"]) and int(rows[-1]["l2_bytes"]) == 256 << 20
    r = cli("explore", big_dir)
    assert r.exit_code == 0 and "104 MiB with it" in r.output


def test_explore_plot(tmp_path):
    r = cli("explore", SAMPLES / "llama-gqa" / "tp2", "--plot", tmp_path / "l2.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "l2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name, magic", [("l2.svg", b"<?xml"), ("l2.pdf", b"%PDF")])
def test_explore_plot_format_follows_the_suffix(tmp_path, name, magic):
    r = cli("explore", SAMPLES / "llama-gqa" / "tp2", "--plot", tmp_path / name)
    assert r.exit_code == 0, r.output
    assert (tmp_path / name).read_bytes().startswith(magic)


def test_explore_plot_with_an_unknown_suffix_is_refused(tmp_path):
    r = cli(
        "explore", SAMPLES / "llama-gqa" / "tp2", "--csv", tmp_path / "ok.csv", "--plot", tmp_path / "l2.jpeg"
    )
    assert (r.exit_code, r.output.strip()) == (
        2,
        f"error: --plot {tmp_path / 'l2.jpeg'}: the name must end in .png, .svg, .pdf",
    )
    assert list(tmp_path.iterdir()) == []


def test_explore_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = cli("explore", SAMPLES / "llama-gqa" / "tp2", "--plot", tmp_path / "l2.png")
    assert r.exit_code == 1 and "--plot needs matplotlib" in r.output
    assert not (tmp_path / "l2.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sweep", "heads=2"], "key in batch, context, ranks"),
        (["--sweep", "batch=1,8,1"], "--sweep: 'batch=1,8,1' repeats a value"),
        (["batch=2"], "unexpected argument 'batch=2'"),
        (["--sweep", "batch=1", "--trace", "t.json"], "cannot be combined with --sweep"),
        (
            ["--sweep", "batch=1", "--all"],
            "--all lists the windows of one estimate; it cannot be combined with --sweep",
        ),
        (["--hardware", "tpu-v9"], "unknown hardware 'tpu-v9'"),
        (["--batch", "0"], "--batch must be at least 1"),
    ],
)
def test_estimate_errors_are_one_line(args, message):
    r = cli("estimate", SAMPLES / "llama-gqa" / "tp2", *args)
    assert r.exit_code == 2, r.output  # usage errors
    assert message in r.output and "Traceback" not in r.output


def test_explore_needs_area_figures(tmp_path):
    toml = tmp_path / "hw.toml"
    toml.write_text(
        "[bare]\nl2_bytes = 1000\nhbm_bw = 1e9\nl2_bw = 4e9\nlink_bw = 1e9\ncollective_alpha = 1e-6\n"
        "peak_flops = 1e12\nlaunch_overhead = 0\nmax_prefetch_bytes = 0\n"
    )
    r = cli("explore", SAMPLES / "llama-gqa" / "tp2", "--hardware", toml)
    assert r.exit_code == 1 and "has no area/cost figures" in r.output
    assert cli("estimate", SAMPLES / "llama-gqa" / "tp2", "--hardware", toml).exit_code == 0


def test_hardware_lists_every_profile(monkeypatch):
    from preserve_onnx import cli as cli_module

    monkeypatch.setattr(cli_module.out, "_width", 250)  # one line per row
    r = cli("hardware")
    assert r.exit_code == 0
    for name in ("ascend-910b", "h100-sxm", "h200", "b200", "mi300x", "tpu-v5e"):
        assert name in r.output
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
        for line in r.output.splitlines()
        if line.startswith("│") and line.split("│")[1].strip()
    }
    # usable L2 of nominal, achieved HBM of nominal, link per direction, implementations, fp16 max tokens
    assert rows["ascend-910b"][0:5] == [
        "163.2 MiB of 192.0 MiB",
        "1.36 of 1.60 TB/s",
        "6.4 TB/s",
        "28 GB/s",
        "hccl 25.0 us",
    ]
    assert rows["h100-sxm"][4:7] == ["nccl 22.0 us*, oneshot 7.0 us", "989 TF", "328"]
    assert rows["ascend-910b"][7] == "120.0 MiB" and rows["h100-sxm"][7] == "none"


@pytest.mark.parametrize(
    "naming",
    [[], ["--prefetch-domain", "com.acme", "--prefetch-op", "Cmo", "--prefetch-attr", "max_size=size"]],
)
def test_an_optimized_model_is_estimated_like_its_original(tmp_path, naming):
    src = SAMPLES / "llama-gqa" / "tp2"
    assert cli("optimize", src, tmp_path / "opt", "-q", *naming).exit_code == 0
    for command, keys in (
        ("estimate", ("baseline_s", "preserve_s", "upper_bound_speedup", "windows")),
        ("explore", ("points", "best_l2_baseline_bytes", "best_l2_preserve_bytes")),
    ):
        before, after = (cli(command, path, "--json", *naming) for path in (src, tmp_path / "opt"))
        assert before.exit_code == after.exit_code == 0, after.output
        b, a = json.loads(before.output), json.loads(after.output)
        for key in keys:
            assert a[key] == b[key], key
    # Told the wrong spelling, the vendor's nodes are not ours: they are costed as unknown operators.
    if naming:
        wrong = json.loads(cli("estimate", tmp_path / "opt", "--json").output)
        assert wrong["baseline_s"] != json.loads(cli("estimate", src, "--json").output)["baseline_s"]


def test_explore_checks_every_destination_before_writing(tmp_path):
    r = cli(
        "explore",
        SAMPLES / "llama-gqa" / "tp2",
        "--csv",
        tmp_path / "ok.csv",
        "--plot",
        tmp_path / "nodir" / "x.png",
    )
    assert r.exit_code == 1
    assert (
        r.output.strip()
        == f"error: cannot write {tmp_path / 'nodir' / 'x.png'}: folder {tmp_path / 'nodir'} "
        "does not exist"
    )
    assert list(tmp_path.iterdir()) == []


def test_markdown_diff_of_a_70b_export_fits_a_pull_request_comment(big_dir, tmp_path):
    # 8 ranks x 556 inserted Prefetch nodes: 663 KB of rows before the cap; GitHub takes 65536 chars.
    assert cli("optimize", big_dir, tmp_path / "opt", "-q").exit_code == 0
    r = cli("diff", big_dir, tmp_path / "opt", "--markdown")
    assert r.exit_code == 1
    assert 50_000 < len(r.output) <= 60_000 + 200
    lines = r.output.splitlines()
    assert lines[0] == f"### preserve-onnx diff: `{big_dir}` → `{tmp_path / 'opt'}`"
    shown = sum(1 for x in lines if x.startswith("#### "))
    assert 1 <= shown < 8
    assert any(x.startswith("| | | | | … ") and x.endswith(" more (see `diff --json`) |") for x in lines)
    assert lines[-1] == f"… {8 - shown} more differing model(s) (see `diff --json`)"


def test_sweep_speedup_falls_to_one_past_the_roofline_threshold(tmp_path):
    import onnx

    from tests.test_cost_model import fp16_mlp

    for rank in range(2):
        onnx.save(fp16_mlp(), tmp_path / f"model_0{rank}.onnx")
    # h100-sxm fp16: max_tokens = 989e12 / (2 x 0.9 x 3.35e12 / 2) = 328 tokens per step (batch x 1).
    r = cli("estimate", tmp_path, "--hardware", "h100-sxm", "--json", "--sweep", "batch=8,256,328,329,1024")
    assert r.exit_code == 0, r.output
    speedups = {p["batch"]: p["speedup"] for p in json.loads(r.output)}
    assert speedups[8] > speedups[256] > speedups[328] > 1.0
    assert speedups[329] == speedups[1024] == 1.0
    doc = json.loads(cli("estimate", tmp_path, "--hardware", "h100-sxm", "--json").output)
    assert [w["max_tokens"] for w in doc["windows"]] == [328, 0]
    table = cli("estimate", tmp_path, "--hardware", "h100-sxm@oneshot")
    assert table.exit_code == 0 and "h100-sxm@oneshot" in table.output and "328" in table.output
    past = cli("estimate", tmp_path, "--hardware", "h100-sxm", "--batch", "400")
    assert past.exit_code == 0 and "328 (skipped)" in past.output and "(1.000x)" in past.output


def test_an_unknown_collective_implementation_is_a_usage_error():
    r = cli("estimate", SAMPLES / "llama-gqa" / "tp2", "--hardware", "h100-sxm@mpi")
    assert (r.exit_code, r.output.strip()) == (
        2,
        "error: hardware 'h100-sxm' has no collective implementation 'mpi' (known: nccl, oneshot)",
    )
