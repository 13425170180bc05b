import json

import onnx
import pytest
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.model_io import load_model
from tests.conftest import SAMPLE_VARIANTS, SAMPLES

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def check_prefetch_placement(model: onnx.ModelProto):
    """docs/design.md §3: each chain sits immediately before its collective, A -> P1 -> ... -> collective."""
    from preserve_onnx.graph.index import is_collective, iter_scopes

    count = 0
    for scope in iter_scopes(model):
        nodes = list(scope.graph.node)
        for i, n in enumerate(nodes):
            if n.op_type != "Prefetch":
                continue
            count += 1
            j = i
            while nodes[j].op_type == "Prefetch":
                assert nodes[j + 1].input[0] == nodes[j].output[0]
                j += 1
            assert is_collective(nodes[j])
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["collective"].decode() == nodes[j].name
            assert attrs["max_size"] >= 0 and attrs["offset"] >= 0
    return count


@pytest.mark.parametrize("variant", SAMPLE_VARIANTS)
def test_every_sample_optimizes_deterministically_and_strips_back(variant, tmp_path):
    src = SAMPLES / variant / "tp2"
    before = snapshot(src)
    r1 = cli("optimize", src, tmp_path / "a", "--report", tmp_path / "a.json")
    assert r1.exit_code == 0, r1.output
    r2 = cli("optimize", src, tmp_path / "b", "-q")
    assert r2.exit_code == 0, r2.output
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")  # byte-identical output
    assert snapshot(src) == before  # input untouched
    report = json.loads((tmp_path / "a.json").read_text())
    for rank, model_report in zip(("model_00.onnx", "model_01.onnx"), report["models"]):
        model = load_model(tmp_path / "a" / rank)
        assert check_prefetch_placement(model) == model_report["prefetch_count"] > 0
    assert cli("strip", tmp_path / "a", tmp_path / "s").exit_code == 0
    for rank in ("model_00.onnx", "model_01.onnx"):
        assert (tmp_path / "s" / rank).read_bytes() == (src / rank).read_bytes()


def test_report_schema(tmp_path):
    src = SAMPLES / "llama-gqa" / "tp2" / "model_00.onnx"
    r = cli("optimize", src, tmp_path / "o.onnx", "--report", tmp_path / "r.json", "--budget", "1MiB")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema"] == 1
    assert report["hardware"]["name"] == "ascend-910b"
    assert report["budget"] == 1 << 20
    (model,) = report["models"]
    assert model["ranks"] == 2  # from the sibling rank file
    window = model["windows"][0]
    assert set(window) >= {"collective", "budget_bytes", "prefetched_bytes", "prefetches"}
    assert window["collective"] == "/model/layers.0/attn/o_proj/AllReduce"
    assert set(window["prefetches"][0]) == {
        "node",
        "tensor",
        "kind",
        "consumer",
        "offset",
        "max_size",
        "bytes",
        "lengths",
        "seq_axis",
        "window",
        "min_tokens",
    }
    assert (
        sum(p["bytes"] for p in window["prefetches"]) == window["prefetched_bytes"] <= window["budget_bytes"]
    )


def test_output_beside_input_references_its_data_file(sample_copy):
    d = sample_copy("llama-gqa")
    r = cli("optimize", d / "model_00.onnx", d / "opt_00.onnx", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in d.iterdir()) == [
        "model_00.onnx",
        "model_00.onnx.data",
        "model_01.onnx",
        "model_01.onnx.data",
        "opt_00.onnx",
    ]


def test_dry_run_writes_nothing(tmp_path):
    r = cli("optimize", SAMPLES / "llama-gqa" / "tp2", tmp_path / "out", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "dry run, nothing written" in r.output
    assert list(tmp_path.iterdir()) == []


def test_out_equal_to_in_needs_in_place(sample_copy):
    d = sample_copy("llama-gqa")
    before = snapshot(d)
    r = cli("optimize", d, d)
    assert r.exit_code == 1 and "pass --in-place" in r.output
    assert snapshot(d) == before
    r = cli("optimize", d, d, "--in-place", "-q")
    assert r.exit_code == 0, r.output
    assert snapshot(d) != before


def test_prefetched_input_needs_replan(tmp_path):
    src = SAMPLES / "llama-gqa" / "tp2"
    assert cli("optimize", src, tmp_path / "once", "-q").exit_code == 0
    r = cli("optimize", tmp_path / "once", tmp_path / "twice")
    assert r.exit_code == 1
    assert "already contains 15 preserve::Prefetch nodes; pass --replan" in r.output
    assert not (tmp_path / "twice").exists()
    r = cli("optimize", tmp_path / "once", tmp_path / "twice", "--replan", "-q")
    assert r.exit_code == 0, r.output
    assert snapshot(tmp_path / "twice") == snapshot(tmp_path / "once")


def test_verbose_says_why_tensors_were_skipped(tmp_path):
    r = cli(
        "optimize",
        SAMPLES / "llama-gqa" / "tp2" / "model_00.onnx",
        tmp_path / "o.onnx",
        "-v",
        "--budget",
        "40KiB",
    )
    assert r.exit_code == 0, r.output
    assert "not prefetched" in r.output and "budget exhausted" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hardware", "tpu-v9"], "unknown hardware 'tpu-v9'"),
        (["--budget", "lots"], "not a size: 'lots'"),
        (["--collectives", "AllSum"], "--collectives: unknown 'AllSum'"),
        (["--disable", "no-such-pass"], "--disable: unknown pass 'no-such-pass'"),
        (["--disable", "plan-prefetches"], "'plan-prefetches' is an analysis that insert-prefetches needs"),
        (["--disable", "build-windows"], "'build-windows' is an analysis that collect-candidates needs"),
        (["--batch", "0"], "--batch must be at least 1"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    r = cli("optimize", SAMPLES / "llama-gqa" / "tp2", tmp_path / "out", *args)
    assert r.exit_code == 2  # a usage error, like the parser's own
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_input_and_usage_errors(tmp_path):
    r = cli("optimize", tmp_path / "nope.onnx", tmp_path / "out.onnx")
    assert r.exit_code == 1 and "no such file or directory" in r.output
    assert cli("optimize", "--no-such-flag").exit_code == 2


def test_disable_verify_pass(tmp_path):
    r = cli(
        "optimize", SAMPLES / "llama-gqa" / "tp2", tmp_path / "out", "--disable", "verify-prefetches", "-q"
    )
    assert r.exit_code == 0, r.output


def test_passes_and_hardware_listings():
    r = cli("passes")
    assert r.exit_code == 0
    for name in (
        "strip-prefetches",
        "build-windows",
        "collect-candidates",
        "plan-prefetches",
        "insert-prefetches",
        "verify-prefetches",
    ):
        assert name in r.output
    r = cli("hardware")
    assert r.exit_code == 0 and "ascend-910b" in r.output and "h100-sxm" in r.output


def test_module_entry_point():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "preserve_onnx", "passes"], capture_output=True, text=True)
    assert r.returncode == 0 and "insert-prefetches" in r.stdout


def test_output_that_cannot_be_written_is_one_line():
    import subprocess
    import sys

    src = str(SAMPLES / "llama-gqa" / "tp2")
    # A reader that went away (`... --json | head`): no message, no traceback, exit 1.
    p = subprocess.Popen(
        [sys.executable, "-m", "preserve_onnx", "inspect", src, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()
    assert p.wait(60) == 1 and p.stderr.read() == b""
    # A full disk under `> file`.
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [sys.executable, "-m", "preserve_onnx", "inspect", src, "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert (r.returncode, r.stderr) == (1, "error: No space left on device\n")


def test_closing_line_names_the_file_written_into_a_folder(tmp_path):
    src = SAMPLES / "llama-gqa" / "tp2" / "model_00.onnx"
    r = cli("optimize", src, tmp_path, "-q")
    assert r.exit_code == 0 and f"; wrote {tmp_path / 'model_00.onnx'} in " in r.output
    (tmp_path / "stripped").mkdir()
    r = cli("strip", tmp_path / "model_00.onnx", tmp_path / "stripped")
    assert (
        r.output.strip()
        == f"done: removed 15 Prefetch nodes; wrote {tmp_path / 'stripped' / 'model_00.onnx'}"
    )


def test_ctrl_c_during_a_real_run_is_one_line():
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    command = Path(sys.executable).parent / "preserve-onnx"
    p = subprocess.Popen(
        [str(command), "inspect", str(SAMPLES / "llama-gqa" / "tp2")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Before Python installs its SIGINT handler, the signal would simply kill the interpreter: wait
    # until the kernel says the process catches SIGINT (bit 1 of SigCgt), however slow the machine.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = Path(f"/proc/{p.pid}/status").read_text()
        caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (signal.SIGINT - 1)):
            break
        time.sleep(0.002)
    time.sleep(0.15)  # past the interpreter's own start-up (its site import), which is not ours to handle
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert (p.returncode, err.decode()) == (1, "interrupted: nothing was written\n")


@pytest.mark.parametrize("where", ["loading the command line", "parsing (typer's exit 130)", "parsing"])
def test_ctrl_c_before_a_command_runs_is_one_line(where, monkeypatch, capsys):
    import builtins

    from preserve_onnx import _entry, cli

    if where == "loading the command line":
        real_import = builtins.__import__

        def interrupted_import(name, *args, **kwargs):
            if name == "preserve_onnx.cli":
                raise KeyboardInterrupt
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", interrupted_import)
    else:

        def app(**_):  # cli.main passes standalone_mode=False
            if where == "parsing":
                raise KeyboardInterrupt
            raise SystemExit(130)

        monkeypatch.setattr(cli, "app", app)
    with pytest.raises(SystemExit) as info:
        _entry.main()
    assert info.value.code == 1
    assert capsys.readouterr().err == "interrupted: nothing was written\n"


def test_the_planning_options_are_one_group_on_every_command_that_plans():
    import typer.main

    from preserve_onnx.cli import _PLANNING_OPTIONS

    group = [name for name, _, _ in _PLANNING_OPTIONS]
    click_app = typer.main.get_command(app)
    for command, expected in (
        ("optimize", group),
        ("inspect", group),
        ("estimate", group),
        ("explore", [n for n in group if n != "budget"]),
    ):
        params = [p.name for p in click_app.commands[command].params]
        assert [p for p in params if p in group] == expected, command
    r = cli("explore", SAMPLES / "llama-gqa" / "tp2", "--budget", "1MiB")
    assert r.exit_code == 2  # explore sweeps the L2 size: the budget rule is its subject, not an option
