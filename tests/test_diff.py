"""`diff`: the structural diff as data (diffing.diff) and the command (0 equal, 1 different, 2 trouble)."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from preserve_onnx import OptimizeConfig, PrefetchNaming, diff, optimize
from preserve_onnx.cli import app
from preserve_onnx.diffing import Change, Entry
from preserve_onnx.errors import PreserveError
from preserve_onnx.model_io import load_model
from preserve_onnx.passes import plan_prefetches
from tests.builders import MS, G, if_model, two_layer_mlp
from tests.conftest import SAMPLE_VARIANTS, SAMPLES

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows(model_diff):
    """Entries without their display-only fields: (kind, status, graph, name, changes)."""
    return [
        (e.kind, e.status, e.graph, e.name, tuple((c.field, c.before, c.after) for c in e.changes))
        for e in model_diff.entries
    ]


def only(d):
    (m,) = d.models
    return m


# -- a model against its optimized self ------------------------------------------------------------


def test_model_vs_optimized_self_is_exactly_the_prefetches_the_rewires_and_the_opset():
    m = two_layer_mlp()
    optimized, _ = optimize(m, OptimizeConfig(budget=10_000))
    d = only(diff(m, optimized))
    assert rows(d) == [
        ("opset", "added", "", "preserve", ()),
        ("function", "added", "", "preserve::Prefetch", ()),
        ("node", "added", "", "ar0/Prefetch/w1", ()),
        ("node", "added", "", "ar0/Prefetch/w2", ()),
        ("node", "added", "", "ar1/Prefetch/w3", ()),
        ("node", "changed", "", "ar0", (("input[0]", "h0", "ar0/Prefetch/w2/out"),)),
        ("node", "changed", "", "ar1", (("input[0]", "h2", "ar1/Prefetch/w3/out"),)),
    ]
    assert d.entries[2] == Entry(
        "node",
        "added",
        "",
        "ar0/Prefetch/w1",
        "preserve::Prefetch(h0, w1) -> ar0/Prefetch/w1/out  "
        "collective='ar0' max_size=0 max_tokens=470 offset=0",
        op="preserve::Prefetch",
        prefetch=True,
    )
    assert [e.name for e in d.prefetches_added] == ["ar0/Prefetch/w1", "ar0/Prefetch/w2", "ar1/Prefetch/w3"]
    assert [e.name for e in d.rewired_collectives] == ["ar0", "ar1"]
    assert d.counts() == {"opset added": 1, "function added": 1, "node added": 3, "node changed": 2}


def test_subgraph_changes_are_reported_in_their_graph():
    m = if_model()
    optimized, _ = optimize(m, OptimizeConfig(budget=10_000))
    assert rows(only(diff(m, optimized))) == [
        ("opset", "added", "", "preserve", ()),  # subgraphs in attribute order (make_node sorts them)
        ("function", "added", "", "preserve::Prefetch", ()),
        ("node", "added", "if:else_branch", "ar_else/Prefetch/w_outer", ()),
        (
            "node",
            "changed",
            "if:else_branch",
            "ar_else",
            (("input[0]", "x", "ar_else/Prefetch/w_outer/out"),),
        ),
        ("node", "added", "if:then_branch", "ar_then/Prefetch/w_outer", ()),
        (
            "node",
            "changed",
            "if:then_branch",
            "ar_then",
            (("input[0]", "x", "ar_then/Prefetch/w_outer/out"),),
        ),
    ]


def expected_rows(model, plan):
    """What diff(model, optimize(model)) must say, derived from the plan: nothing else."""
    added, changed = {}, {}
    for wp in plan.windows:
        if not wp.prefetches:
            continue
        for p in wp.prefetches:
            added.setdefault(wp.window.graph, []).append(("node", "added", wp.window.graph, p.node, ()))
        changed.setdefault(wp.window.graph, []).append(
            (
                "node",
                "changed",
                wp.window.graph,
                wp.window.collective,
                (("input[0]", wp.window.anchor, wp.prefetches[-1].output),),
            )
        )
    out = [("opset", "added", "", "preserve", ()), ("function", "added", "", "preserve::Prefetch", ())]
    for graph in added:  # plan order is graph order: main graph first, then subgraphs
        out += added[graph] + changed[graph]
    return out


@pytest.mark.parametrize("variant", SAMPLE_VARIANTS)
def test_every_sample_vs_its_optimized_self(variant, tmp_path):
    src = SAMPLES / variant / "tp2"
    assert cli("optimize", src, tmp_path / "opt", "-q").exit_code == 0
    d = diff(src, tmp_path / "opt")
    assert [m.b for m in d.models] == [str(tmp_path / "opt" / f) for f in ("model_00.onnx", "model_01.onnx")]
    assert d.only_a == d.only_b == ()
    for m in d.models:
        original = load_model(src / m.b.rsplit("/", 1)[1])
        plan = plan_prefetches(original, OptimizeConfig(), ranks=2)
        assert plan.prefetch_count > 0
        assert rows(m) == expected_rows(original, plan)


@pytest.mark.parametrize("variant", SAMPLE_VARIANTS)
def test_strip_of_optimize_diffs_equal_on_every_sample(variant, tmp_path):
    src = SAMPLES / variant / "tp2"
    assert cli("optimize", src, tmp_path / "opt", "-q").exit_code == 0
    assert cli("strip", tmp_path / "opt", tmp_path / "back").exit_code == 0
    r = cli("diff", src, tmp_path / "back")
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"equal: {src} vs {tmp_path / 'back'}: no differences"
    assert cli("diff", src, tmp_path / "back", "--data").exit_code == 0  # the copied data files too
    assert cli("diff", src, tmp_path / "opt").exit_code == 1


# -- what the diff sees --------------------------------------------------------------------------


def chain():
    g = G()
    g.input("x", ["batch", 4])
    g.node("Relu", ["x"], ["r"], name="relu")
    g.node("Mul", ["r", g.weight("s", (4,))], ["m"], name="mul")
    g.node("LeakyRelu", ["m"], ["y"], name="leaky", alpha=0.1)
    g.output("y", ["batch", 4])
    return g.model()


def test_equal_models_have_no_entries():
    d = diff(chain(), chain())
    assert d.equal and rows(only(d)) == []


def test_attribute_rewire_and_op_changes():
    a, b = chain(), chain()
    b.graph.node[2].attribute[0].f = 0.2
    b.graph.node[1].input[0] = "x"
    b.graph.node[0].op_type = "Sigmoid"
    assert rows(only(diff(a, b))) == [
        ("node", "changed", "", "relu", (("op_type", "Relu", "Sigmoid"),)),
        ("node", "changed", "", "mul", (("input[0]", "r", "x"),)),
        ("node", "changed", "", "leaky", (("attribute alpha", "0.1", "0.2"),)),
    ]


def test_attribute_added_and_removed():
    a, b = chain(), chain()
    del b.graph.node[2].attribute[:]
    b.graph.node[0].attribute.append(helper.make_attribute("note", "hi"))
    assert rows(only(diff(a, b))) == [
        ("node", "changed", "", "relu", (("attribute note", None, "'hi'"),)),
        ("node", "changed", "", "leaky", (("attribute alpha", "0.1", None),)),
    ]


def test_renamed_node_is_removed_and_added():
    a, b = chain(), chain()
    b.graph.node[0].name = "relu2"
    assert rows(only(diff(a, b))) == [
        ("node", "removed", "", "relu", ()),
        ("node", "added", "", "relu2", ()),
    ]


def unnamed():
    g = G()
    g.input("x", ["batch", 4])
    g.node("MatMul", ["x", g.weight("w0", (4, 4))], ["h"], name="")
    g.node("AllReduce", ["h"], ["a"], name="", domain=MS)
    g.node("MatMul", ["a", g.weight("w1", (4, 4))], ["y"], name="")
    g.output("y", ["batch", 4])
    return g.model()


def test_unnamed_nodes_are_matched_by_structure():
    m = unnamed()
    optimized, plan = optimize(m, OptimizeConfig(budget=10_000))
    assert plan.prefetch_count == 1
    d = only(diff(m, optimized))
    assert rows(d) == [
        ("opset", "added", "", "preserve", ()),
        ("function", "added", "", "preserve::Prefetch", ()),
        ("node", "added", "", "AllReduce_1/Prefetch/w1", ()),
        ("node", "changed", "", "(AllReduce -> a)", (("input[0]", "h", "AllReduce_1/Prefetch/w1/out"),)),
    ]
    assert [e.name for e in d.rewired_collectives] == ["(AllReduce -> a)"]


def test_unnamed_node_with_a_new_output_is_matched_by_its_inputs():
    a, b = unnamed(), unnamed()
    b.graph.node[0].output[0] = "h2"
    b.graph.node[1].input[0] = "h2"
    assert rows(only(diff(a, b))) == [
        ("node", "changed", "", "(MatMul -> h2)", (("output[0]", "h", "h2"),)),
        ("node", "changed", "", "(AllReduce -> a)", (("input[0]", "h", "h2"),)),
    ]


def test_unnamed_node_with_new_inputs_and_outputs_is_removed_and_added():
    a, b = unnamed(), unnamed()
    b.graph.node[0].output[0] = "h2"
    b.graph.node[0].input[0] = "a"  # (not a valid graph; the diff does not care)
    b.graph.node[1].input[0] = "h2"
    assert rows(only(diff(a, b))) == [
        ("node", "removed", "", "(MatMul -> h)", ()),
        ("node", "added", "", "(MatMul -> h2)", ()),
        ("node", "changed", "", "(AllReduce -> a)", (("input[0]", "h", "h2"),)),
    ]


def test_node_order_change_is_reported_once():
    a, b = chain(), chain()
    nodes = list(b.graph.node)
    del b.graph.node[:]
    b.graph.node.extend([nodes[1], nodes[0], nodes[2]])
    assert rows(only(diff(a, b))) == [
        ("graph", "changed", "", "(main)", (("node order", "mul after relu", "mul before relu"),)),
    ]


def test_initializer_metadata_and_inline_data():
    a, b = chain(), chain()
    b.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((2, 2), np.float16), "s"))
    b.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "extra"))
    d = only(diff(a, b))
    assert [(e.kind, e.status, e.name, [c.field for c in e.changes]) for e in d.entries] == [
        ("initializer", "added", "extra", []),
        ("initializer", "changed", "s", ["dims", "dtype", "data"]),
    ]
    assert d.entries[0].detail == "float[3] inline"
    assert d.entries[1].changes[:2] == (Change("dims", "[4]", "[2,2]"), Change("dtype", "float", "float16"))
    assert d.entries[1].changes[2].before.startswith("sha256:")
    c = chain()
    c.graph.initializer[0].raw_data = np.full(4, 7, np.float32).tobytes()
    assert rows(only(diff(a, c))) == [
        ("initializer", "changed", "", "s", (("data", _digest(a), _digest(c)),))
    ]


def _digest(m):
    from preserve_onnx.diffing import _inline_digest

    return _inline_digest(m.graph.initializer[0])


def test_opset_io_and_value_info_changes():
    a, b = chain(), chain()
    b.opset_import[0].version = 18
    b.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch"]))
    b.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 4]))
    b.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", 4]))
    b.ir_version = 10
    assert rows(only(diff(a, b))) == [
        ("model", "changed", "", "(model)", (("ir_version", "9", "10"),)),
        ("opset", "changed", "", "ai.onnx", (("version", "17", "18"),)),
        ("input", "added", "", "mask", ()),
        ("output", "changed", "", "y", (("type", "float[batch,4]", "float16[batch,4]"),)),
        ("value_info", "added", "", "r", ()),
    ]


def test_a_difference_the_diff_does_not_break_down_still_counts():
    a, b = chain(), chain()
    b.graph.sparse_initializer.add().values.name = "sp"
    assert rows(only(diff(a, b))) == [("model", "changed", "", "(protobuf)", ())]
    assert not diff(a, b).equal


def write_external(model, folder, data=None):
    """Save ``model`` into ``folder`` with its initializers in model.onnx.data."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        folder / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    if data is not None:
        (folder / "model.onnx.data").write_bytes(data)
    return folder / "model.onnx"


def test_external_bytes_are_compared_only_with_data(tmp_path):
    a = write_external(chain(), tmp_path / "a")
    size = (tmp_path / "a" / "model.onnx.data").stat().st_size
    b = write_external(chain(), tmp_path / "b", data=b"\x00" * size)  # same metadata, other bytes
    assert diff(a, b).equal
    d = only(diff(a, b, data=True))
    assert [(e.kind, e.status, e.name, [c.field for c in e.changes]) for e in d.entries] == [
        ("initializer", "changed", "s", ["data"])
    ]
    assert cli("diff", a, b).exit_code == 0
    assert cli("diff", a, b, "--data").exit_code == 1


def test_external_location_changes_are_metadata(tmp_path):
    a = write_external(chain(), tmp_path / "a")
    m = load_model(a)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "other.data"
    shutil.copy(tmp_path / "a" / "model.onnx.data", tmp_path / "a" / "other.data")
    onnx.save_model(m, tmp_path / "a" / "moved.onnx")
    assert rows(only(diff(a, tmp_path / "a" / "moved.onnx"))) == [
        ("initializer", "changed", "", "s", (("external location", "model.onnx.data", "other.data"),))
    ]
    assert only(diff(a, tmp_path / "a" / "moved.onnx", data=True)).entries[0].changes == (
        Change("external location", "model.onnx.data", "other.data"),
    )  # same bytes


def test_data_needs_paths_for_external_tensors(tmp_path):
    a = write_external(chain(), tmp_path / "a")
    b = load_model(a)
    b.graph.node[0].name = "x"
    with pytest.raises(PreserveError, match="--data needs the model's folder"):
        diff(b, a, data=True)


def test_directories_pair_files_by_name(sample_copy, tmp_path):
    a = sample_copy("llama-gqa")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (b / "model_01.onnx").rename(b / "model_02.onnx")
    d = diff(a, b)
    assert [m.b for m in d.models] == [str(b / "model_00.onnx")]
    assert d.models[0].equal
    assert (d.only_a, d.only_b) == (("model_01.onnx",), ("model_02.onnx",))
    assert not d.equal


def test_vendor_naming_marks_prefetch_nodes():
    naming = PrefetchNaming(domain="com.acme", op_type="Cmo")
    optimized, _ = optimize(two_layer_mlp(), OptimizeConfig(budget=10_000, naming=naming))
    assert len(only(diff(two_layer_mlp(), optimized, naming=naming)).prefetches_added) == 3
    assert len(only(diff(two_layer_mlp(), optimized)).prefetches_added) == 0  # not spelled like ours


# -- the command ---------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path):
    m = two_layer_mlp()
    onnx.save_model(m, tmp_path / "a.onnx")
    onnx.save_model(optimize(m, OptimizeConfig(budget=10_000))[0], tmp_path / "b.onnx")
    return tmp_path / "a.onnx", tmp_path / "b.onnx"


def test_cli_exit_codes(pair, tmp_path):
    a, b = pair
    assert cli("diff", a, a).exit_code == 0
    assert cli("diff", a, b).exit_code == 1
    missing = cli("diff", a, tmp_path / "nope.onnx")
    assert missing.exit_code == 2
    assert missing.output.strip() == f"error: {tmp_path / 'nope.onnx'}: no such file or directory"
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert cli("diff", a, tmp_path / "junk.onnx").exit_code == 2
    r = cli("diff", a, tmp_path)
    assert (r.exit_code, r.output.strip()) == (
        2,
        f"error: cannot diff a file against a directory ({a} vs {tmp_path})",
    )
    r = cli("diff", tmp_path, a)
    assert (r.exit_code, r.output.strip()) == (
        2,
        f"error: cannot diff a directory against a file ({tmp_path} vs {a})",
    )
    assert cli("diff", a, b, "--json", "--markdown").exit_code == 2
    assert cli("diff", a).exit_code == 2  # usage


def test_cli_internal_error_is_trouble_not_different(pair, monkeypatch):
    import preserve_onnx.diffing

    def boom(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(preserve_onnx.diffing, "diff", boom)
    r = cli("diff", *pair)
    assert r.exit_code == 2
    assert "internal error: RuntimeError: bug" in r.output


def test_cli_human_summary(pair):
    a, b = pair
    r = cli("diff", a, b)
    assert r.output.splitlines()[0] == (
        f"{a} -> {b}: 3 Prefetch nodes added, 2 collectives rewired, 1 opset import added, 1 function added"
    )
    assert "  ~ node ar0: input[0]: h0 -> ar0/Prefetch/w2/out" in r.output.splitlines()
    assert r.output.splitlines()[-1] == f"different: {a} vs {b}: 1 of 1 model(s) differ"


def test_cli_json(pair):
    a, b = pair
    r = cli("diff", a, b, "--json")
    assert r.exit_code == 1
    doc = json.loads(r.output)
    assert {k: doc[k] for k in ("schema", "a", "b", "equal", "only_a", "only_b")} == {
        "schema": 1,
        "a": str(a),
        "b": str(b),
        "equal": False,
        "only_a": [],
        "only_b": [],
    }
    (model,) = doc["models"]
    assert model["summary"] == [
        "3 Prefetch nodes added",
        "2 collectives rewired",
        "1 opset import added",
        "1 function added",
    ]
    assert model["counts"] == {"opset added": 1, "function added": 1, "node added": 3, "node changed": 2}
    assert model["entries"][5] == {
        "kind": "node",
        "status": "changed",
        "graph": "",
        "name": "ar0",
        "detail": "com.microsoft::AllReduce(ar0/Prefetch/w2/out) -> a0",
        "changes": [{"field": "input[0]", "before": "h0", "after": "ar0/Prefetch/w2/out"}],
        "op": "com.microsoft::AllReduce",
        "prefetch": False,
    }
    assert json.loads(cli("diff", a, a, "--json").output)["equal"] is True


def test_cli_markdown(pair):
    a, b = pair
    r = cli("diff", a, b, "--markdown")
    assert r.exit_code == 1
    # The report verbatim: its table rows are as wide as the nodes they show.
    assert (
        r.output
        == f"""### preserve-onnx diff: `{a}` → `{b}`

**1 of 1 model(s) differ**

#### `{b}`

3 Prefetch nodes added, 2 collectives rewired, 1 opset import added, 1 function added

<details><summary>changes</summary>

| | kind | graph | name | change |
|---|---|---|---|---|
| + | opset |  | `preserve` | `version 1` |
| + | function |  | `preserve::Prefetch` | `(A, X, L) -> Y: Identity` |
| + | node |  | `ar0/Prefetch/w1` | `preserve::Prefetch(h0, w1) -> ar0/Prefetch/w1/out  collective='ar0' max_size=0 max_tokens=470 offset=0` |
| + | node |  | `ar0/Prefetch/w2` | `preserve::Prefetch(ar0/Prefetch/w1/out, w2) -> ar0/Prefetch/w2/out  collective='ar0' max_size=0 max_tokens=470 offset=0` |
| + | node |  | `ar1/Prefetch/w3` | `preserve::Prefetch(h2, w3) -> ar1/Prefetch/w3/out  collective='ar1' max_size=0 max_tokens=470 offset=0` |
| ~ | node |  | `ar0` | input[0]: `h0` → `ar0/Prefetch/w2/out` |
| ~ | node |  | `ar1` | input[0]: `h2` → `ar1/Prefetch/w3/out` |

</details>
"""  # noqa: E501
    )
    assert (
        cli("diff", a, a, "--markdown").output == f"### preserve-onnx diff: `{a}` → `{a}`\n\n"
        "**No differences** in 1 model(s).\n"
    )


def test_markdown_cells_cannot_break_the_table():
    from preserve_onnx.report_ci import diff_markdown

    a, b = chain(), chain()
    b.graph.node[0].name = "a|b`c"
    text = diff_markdown(diff(a, b))
    assert "| + | node |  | `a\\|b'c` |" in text
    # A line break inside a value (a doc_string) would end the row and spill the rest out of the table.
    a, b = chain(), chain()
    b.graph.node[0].doc_string = "line1\nline2 | </details>\r\nend"
    rows = [x for x in diff_markdown(diff(a, b)).splitlines() if "doc_string" in x]
    assert (
        len(rows) == 1
        and rows[0].startswith("| ~ | node |")
        and rows[0].endswith("doc_string: `(none)` → `line1↵line2 \\| </details>↵end` |")
    )


def test_same_values_in_another_tensor_field_are_equal_and_other_values_differ():
    import numpy as np
    from onnx import numpy_helper

    a, b = chain(), chain()
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    a.graph.initializer.append(numpy_helper.from_array(values, "extra"))  # raw_data
    b.graph.initializer.append(
        helper.make_tensor("extra", TensorProto.FLOAT, [2, 3], values.ravel().tolist())
    )
    # float_data holding the same numbers: not a value change, only the encoding differs
    (model,) = diff(a, b).models
    assert [(e.kind, e.status, e.name) for e in model.entries] == [("model", "changed", "(protobuf)")]
    b.graph.initializer[-1].float_data[0] = 7.0
    (model,) = diff(a, b).models
    assert [(e.kind, e.status, e.name) for e in model.entries] == [("initializer", "changed", "extra")]
