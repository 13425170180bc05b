"""The bad-input matrix: each row fails with one clear line and exit code 1, leaves the input
untouched and leaves nothing behind (no OUT, no temporary files)."""

import errno
import os
import shutil

import onnx
import pytest
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.model_io import load_model
from tests.builders import G, two_layer_mlp
from tests.conftest import SAMPLES
from tests.exporter_graphs import torchscript_decoder

runner = CliRunner()


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fails_cleanly(args, message, work):
    """Run the CLI; check exit 1, one line naming ``message``, no traceback, ``work`` unchanged except
    for files the test itself made, and no temporary files left anywhere in ``work``."""
    before = snapshot(work)
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    assert message in r.output, r.output
    assert "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert snapshot(work) == before  # input untouched, no output, no temp file
    return r


@pytest.fixture
def work(tmp_path):
    d = tmp_path / "work"
    shutil.copytree(SAMPLES / "llama-gqa" / "tp2", d / "in")
    return d


def save(model, path):
    path.write_bytes(model.SerializeToString())
    return path


def test_path_that_does_not_exist(work):
    fails_cleanly(["optimize", work / "nope", work / "out"], "no such file or directory", work)


def test_long_bracketed_path_is_one_literal_line(work, console_width):
    console_width(60)
    missing = work / ("[bold]" + "y" * 150) / "model.onnx"
    r = fails_cleanly(["optimize", missing, work / "out"], f"{missing}", work)
    assert r.output.startswith("error: ") and "[bold]" in r.output


def test_directory_without_rank_files(work):
    (work / "empty").mkdir()
    (work / "empty" / "config.json").write_text("{}")
    fails_cleanly(["optimize", work / "empty", work / "out"], "no rank models", work)


def test_directory_with_a_gap_in_rank_numbers(work):
    os.rename(work / "in" / "model_01.onnx", work / "in" / "model_02.onnx")
    fails_cleanly(
        ["optimize", work / "in", work / "out"], "rank 1 is missing from model_00.onnx, model_02.onnx", work
    )


def test_file_that_is_not_onnx(work):
    (work / "notes.onnx").write_text("these are my notes\n" * 10)
    fails_cleanly(["optimize", work / "notes.onnx", work / "out.onnx"], "not an ONNX model", work)


def test_truncated_protobuf(work):
    data = (work / "in" / "model_00.onnx").read_bytes()
    (work / "in" / "model_00.onnx").write_bytes(data[: len(data) // 3])
    fails_cleanly(["optimize", work / "in", work / "out"], "model_00.onnx: not an ONNX model", work)


def test_graph_with_a_cycle(work):
    g = G()
    g.input("x", ["batch", 8])
    g.node("Add", ["x", "b"], ["a"], name="first")
    g.allreduce("a", "b", name="ar")
    g.output("b")
    save(g.model(), work / "cycle.onnx")
    fails_cleanly(
        ["optimize", work / "cycle.onnx", work / "out.onnx"], "the graph has a cycle (through node", work
    )


def test_graph_not_in_topological_order(work):
    m = two_layer_mlp()
    nodes = list(m.graph.node)
    nodes.reverse()
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    save(m, work / "unsorted.onnx")
    fails_cleanly(["optimize", work / "unsorted.onnx", work / "out.onnx"], "not in topological order", work)
    # inspect and a dry run refuse it the same way: they do not show a plan that optimize would not make
    r = fails_cleanly(["inspect", work / "unsorted.onnx"], "not in topological order", work)
    d = fails_cleanly(
        ["optimize", work / "unsorted.onnx", work / "out.onnx", "--dry-run"], "not in topological", work
    )
    assert r.output.startswith("error: check-order failed: node 0 ") and r.output == d.output


def test_missing_external_data_file_when_it_must_be_copied(work):
    os.remove(work / "in" / "model_01.onnx.data")
    fails_cleanly(
        ["optimize", work / "in" / "model_01.onnx", work / "out.onnx"], "model_01.onnx.data is missing", work
    )


@pytest.mark.parametrize("out", ["out", "in/model_01_opt.onnx"])  # a directory OUT; a file beside its data
def test_missing_external_data_file_of_a_rank_in_a_directory_or_beside_it(work, out):
    os.remove(work / "in" / "model_01.onnx.data")
    src = work / "in" if out == "out" else work / "in" / "model_01.onnx"
    fails_cleanly(["optimize", src, work / out], "model_01.onnx.data is missing", work)


def test_short_external_data_file_when_it_must_be_copied(work):
    data = work / "in" / "model_00.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    fails_cleanly(
        ["optimize", work / "in" / "model_00.onnx", work / "out.onnx"], "is short: 1000 bytes", work
    )


@pytest.mark.parametrize(
    "location, message",
    [
        ("/etc/passwd", "is absolute; only paths inside the model's folder are accepted"),
        ("../../etc/passwd", "escapes the model's folder; refused"),
    ],
)
def test_external_data_location_outside_the_folder(work, location, message):
    m = load_model(work / "in" / "model_00.onnx")
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    save(m, work / "in" / "model_00.onnx")
    fails_cleanly(["optimize", work / "in" / "model_00.onnx", work / "out.onnx"], message, work)


def test_unknown_dtype(work):
    m = two_layer_mlp()
    m.graph.initializer[1].data_type = 999  # w1, read in the first window
    save(m, work / "odd.onnx")
    fails_cleanly(
        ["optimize", work / "odd.onnx", work / "out.onnx"],
        "initializer 'w1': unsupported element type 999",
        work,
    )


def test_symbolic_dimension_that_cannot_be_bound(work):
    # A head size that neither --dim, nor an attention op, nor a present output fixes (a plain-operator
    # export with every KV dim symbolic): one line naming the dim, the tensor and --dim.
    m = torchscript_decoder(kv_dims=("batch_size", 2, "past_sequence_length", "head_dim"))
    for vi in m.graph.output:
        if vi.name.startswith("present."):
            vi.type.tensor_type.shape.dim[3].dim_param = "head_dim"
    save(m, work / "in" / "model_00.onnx")
    fails_cleanly(
        ["optimize", work / "in" / "model_00.onnx", work / "out.onnx"],
        "KV-cache input 'past_key_values.1.key': cannot bind symbolic dimension 'head_dim' (axis 3): "
        "give it with --dim head_dim=N",
        work,
    )


def test_kv_heads_left_symbolic_are_bound_from_the_attention_op(work):
    m = load_model(work / "in" / "model_00.onnx")
    for vi in m.graph.input:
        if vi.name.startswith("past_key_values"):
            vi.type.tensor_type.shape.dim[1].ClearField("dim_value")
            vi.type.tensor_type.shape.dim[1].dim_param = "kv_heads"
    save(m, work / "in" / "model_00.onnx")
    r = runner.invoke(app, ["inspect", str(work / "in" / "model_00.onnx"), "--json"])
    assert r.exit_code == 0, r.output
    assert "kv_cache" in r.output


def test_names_that_collide_with_the_optimizers_get_suffixes(tmp_path):
    g = G()
    g.input("x", ["batch", 8])
    g.allreduce("x", "a", name="ar")
    g.node("Relu", ["a"], ["ar/Prefetch/w"], name="ar/Prefetch/w/out")
    g.node("MatMul", ["ar/Prefetch/w", g.weight("w", (8, 8))], ["y"], name="mm")
    g.output("y", ["batch", 8])
    save(g.model(), tmp_path / "squat.onnx")
    r = runner.invoke(app, ["optimize", str(tmp_path / "squat.onnx"), str(tmp_path / "out.onnx"), "-q"])
    assert r.exit_code == 0, r.output
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [(n.name, n.output[0]) for n in out.graph.node][:1] == [("ar/Prefetch/w_1", "ar/Prefetch/w/out_1")]
    onnx.checker.check_model(out)  # still unique names, still valid


def test_input_that_already_has_prefetch_nodes(work):
    assert runner.invoke(app, ["optimize", str(work / "in"), str(work / "once"), "-q"]).exit_code == 0
    fails_cleanly(
        ["optimize", work / "once", work / "twice"], "pass --replan to strip them and plan again", work
    )


def test_out_equal_to_in(work):
    fails_cleanly(["optimize", work / "in", work / "in"], "OUT is IN", work)
    fails_cleanly(
        ["optimize", work / "in" / "model_00.onnx", work / "in" / "model_00.onnx"], "OUT is IN", work
    )


@pytest.mark.parametrize("command", ["optimize", "strip"])
def test_out_containing_in_is_refused(work, command, monkeypatch):
    (work / "notes.txt").write_text("the user's")
    message = "contains IN"
    fails_cleanly([command, work / "in", work], message, work)
    monkeypatch.chdir(work)
    fails_cleanly([command, "in", "."], "OUT . contains IN in: writing it would replace the input", work)
    monkeypatch.chdir(work / "in")
    fails_cleanly([command, ".", "../.."], message, work)


def test_out_inside_in_is_refused(work):
    fails_cleanly(["optimize", work / "in", work / "in" / "out"], "is inside IN", work)


def test_existing_out_with_files_not_from_in_is_refused(work):
    assert runner.invoke(app, ["optimize", str(work / "in"), str(work / "out"), "-q"]).exit_code == 0
    # A previous run's output is replaced as a whole...
    assert runner.invoke(app, ["optimize", str(work / "in"), str(work / "out"), "-q"]).exit_code == 0
    # ...but not when the user keeps something of their own in it.
    (work / "out" / "mine.txt").write_text("keep me")
    fails_cleanly(
        ["optimize", work / "in", work / "out"],
        f"OUT {work / 'out'} exists and holds 'mine.txt', which is not from IN",
        work,
    )


def test_out_in_a_read_only_folder(work, monkeypatch):
    (work / "ro").mkdir()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    # Running as root ignores directory modes, so the failure is injected where the file is created.
    monkeypatch.setattr("tempfile.mkstemp", denied)
    monkeypatch.setattr("tempfile.mkdtemp", denied)
    fails_cleanly(
        ["optimize", work / "in" / "model_00.onnx", work / "ro" / "out.onnx"], "Permission denied", work
    )
    fails_cleanly(["optimize", work / "in", work / "ro" / "out"], "Permission denied", work)


def test_disk_that_fills_up_while_writing(work, monkeypatch):
    assert runner.invoke(app, ["optimize", str(work / "in"), str(work / "out"), "-q"]).exit_code == 0
    previous = (work / "out" / "model_00.onnx").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    fails_cleanly(
        ["optimize", work / "in", work / "out", "--budget", "1MiB"], "No space left on device", work
    )
    fails_cleanly(
        ["optimize", work / "in" / "model_00.onnx", work / "one.onnx"], "No space left on device", work
    )
    assert (work / "out" / "model_00.onnx").read_bytes() == previous  # the old OUT survives


def test_interrupt_in_the_middle_of_a_rank_directory(work, monkeypatch):
    import preserve_onnx.optimizer as optimizer

    real = optimizer._optimize_one
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(optimizer, "_optimize_one", interrupted)
    fails_cleanly(
        ["optimize", work / "in", work / "out", "--jobs", "1"], "interrupted: nothing was written", work
    )
    assert len(calls) == 2


@pytest.mark.parametrize("where", ["nodir/r.json", "."])
def test_unwritable_report_fails_before_out_is_written(work, where):
    report = work / where
    message = (
        f"cannot write {report}: folder {report.parent} does not exist"
        if where != "."
        else f"cannot write {report}: it is a directory"
    )
    fails_cleanly(["optimize", work / "in", work / "out", "--report", report], message, work)


def test_run_inputs_that_are_not_an_npz(work):
    import numpy as np

    np.save(work / "feeds.npy", np.ones(3, np.float32))
    fails_cleanly(
        ["run", work / "in", "--inputs", work / "feeds.npy"],
        "is not an .npz archive of named arrays (write one with numpy.savez): it holds one unnamed "
        "array (.npy)",
        work,
    )
    (work / "notes.txt").write_text("hello")
    fails_cleanly(
        ["run", work / "in", "--inputs", work / "notes.txt"], "notes.txt is not an .npz archive", work
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "-1"], "--seed must be at least 0"),
        (["--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_run_bad_numbers_are_usage_errors(work, args, message):
    r = runner.invoke(app, ["run", str(work / "in"), *args])
    assert (r.exit_code, r.output.strip()) == (2, f"error: {message}")
