"""Stale Prefetch links (docs/design.md §9): a tool replaced a weight after optimize, the link still hints
the old one. inspect, diff and optimize name them with a count; optimize --replan plans on the new weights,
drops the initializers only the links read and leaves their bytes out of the output's data files."""

import json
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from preserve_onnx import OptimizeConfig, optimize, strip
from preserve_onnx.cli import app
from preserve_onnx.errors import PreserveError
from preserve_onnx.optimizer import optimize_path
from preserve_onnx.passes import DropStaleWeightsPass
from preserve_onnx.passes.verify_prefetches import StaleLink, stale_links
from tests.builders import if_model, two_layer_mlp

runner = CliRunner()
CONFIG = OptimizeConfig(budget=10_000)
LINE = (
    "2 of 3 Prefetch links are stale: no other node reads 'w1', 'w2' (a quantizer or converter changed "
    "the model after optimize); run optimize --replan"
)


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def requantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """What a quantizer does after optimize: mm1 and mm2 read new weights; w1 and w2 stay for the links."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        if node.name in ("mm1", "mm2"):
            old = node.input[1]
            new = numpy_helper.from_array(numpy_helper.to_array(inits[old]) * 0.5, old + "_q")
            out.graph.initializer.append(new)
            node.input[1] = new.name
    return out


@pytest.fixture
def stale_model():
    optimized, plan = optimize(two_layer_mlp(), CONFIG)
    assert [p.tensor for wp in plan.windows for p in wp.prefetches] == ["w1", "w2", "w3"]
    return requantized(optimized)


def test_an_optimized_model_has_no_stale_link():
    links = stale_links(optimize(two_layer_mlp(), CONFIG)[0])
    assert (links.total, links.stale, links.prefetch_only) == (3, (), ())


def test_stale_links_are_the_links_whose_weight_nothing_else_reads(stale_model):
    links = stale_links(stale_model)
    assert links.total == 3
    assert links.stale == (StaleLink("", "ar0/Prefetch/w1", "w1"), StaleLink("", "ar0/Prefetch/w2", "w2"))
    assert links.prefetch_only == ("w1", "w2")
    assert links.describe() == LINE


def test_a_link_whose_weight_a_node_now_computes_is_stale():
    """What the float16 converter does to KV-cache inputs: a Cast between the input and every reader."""
    optimized, _ = optimize(two_layer_mlp(), CONFIG)
    g = optimized.graph
    for node in g.node:
        node.input[:] = ["w3_cast" if name == "w3" else name for name in node.input]
    g.node.insert(0, onnx.helper.make_node("Identity", ["w3"], ["w3_cast"], name="cast"))
    links = stale_links(optimized)
    assert links.stale == (StaleLink("", "ar1/Prefetch/w3", "w3_cast", "computed"),)
    assert links.prefetch_only == ()  # w3 is still read (by the Identity): nothing to drop
    assert links.describe() == (
        "1 of 3 Prefetch links is stale: a node now computes 'w3_cast' (a quantizer "
        "or converter changed the model after optimize); run optimize --replan"
    )
    out, plan = optimize(optimized, OptimizeConfig(budget=10_000, replan=True))
    # w3 again, through the Identity (a constant-only chain)
    assert [p.tensor for wp in plan.windows for p in wp.prefetches] == ["w1", "w2", "w3"]
    assert stale_links(out).stale == ()


def test_a_weight_read_inside_a_subgraph_is_not_stale():
    optimized, _ = optimize(if_model(), CONFIG)
    links = stale_links(optimized)
    assert (links.total, len(links.stale)) == (2, 0)  # w_outer is read by the MatMuls in both branches


def test_a_stale_graph_input_is_named_but_never_dropped(stale_model):
    g = stale_model.graph
    w2 = next(t for t in g.initializer if t.name == "w2")
    g.initializer.remove(w2)
    g.input.append(onnx.helper.make_tensor_value_info("w2", onnx.TensorProto.FLOAT, list(w2.dims)))
    links = stale_links(stale_model)
    assert [s.tensor for s in links.stale] == ["w1", "w2"]
    assert links.prefetch_only == ("w1",)


def test_optimize_refuses_stale_links_without_replan(stale_model):
    with pytest.raises(PreserveError, match="^" + re.escape(LINE) + "; nothing was written$"):
        optimize(stale_model, CONFIG)


def test_replan_plans_on_the_new_weights_and_drops_the_old_ones(stale_model):
    out, plan = optimize(stale_model, OptimizeConfig(budget=10_000, replan=True))
    assert [p.tensor for wp in plan.windows for p in wp.prefetches] == ["w1_q", "w2_q", "w3"]
    assert [t.name for t in out.graph.initializer] == ["w0", "w3", "w1_q", "w2_q"]
    assert stale_links(out).stale == ()
    # Nothing else changed: without its links it is the requantized model without w1 and w2.
    expected = strip(stale_model)
    kept = [t for t in expected.graph.initializer if t.name not in ("w1", "w2")]
    del expected.graph.initializer[:]
    expected.graph.initializer.extend(kept)
    assert strip(out).SerializeToString() == expected.SerializeToString()


def test_replan_of_a_model_without_stale_links_drops_nothing():
    optimized, _ = optimize(two_layer_mlp(), CONFIG)
    again, _ = optimize(optimized, OptimizeConfig(budget=10_000, replan=True))
    assert again.SerializeToString() == optimized.SerializeToString()


def test_drop_keeps_a_named_initializer_that_is_still_read():
    m = two_layer_mlp()
    result = DropStaleWeightsPass(("w1",))(m)
    assert not result.modified and result.model is m and result.stats.names == ()


def test_drop_removes_only_the_named_unread_initializers():
    m = two_layer_mlp()
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((4, 4), np.float32), "unused"))
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((2, 8), np.float32), "stale"))
    m.graph.value_info.append(onnx.helper.make_tensor_value_info("stale", onnx.TensorProto.FLOAT, [2, 8]))
    result = DropStaleWeightsPass(("stale", "w1"))(m)
    assert result.modified and (result.stats.names, result.stats.nbytes) == (("stale",), 64)
    assert [t.name for t in result.model.graph.initializer] == ["w0", "w1", "w2", "w3", "unused"]
    assert len(result.model.graph.value_info) == 0


# -- files: the data of the dropped initializers is not copied along --------------------------------


def write_external(model: onnx.ModelProto, folder, name="model_00.onnx", location=None):
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(
        model,
        folder / name,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location or name + ".data",
        size_threshold=0,
    )
    return folder / name


@pytest.fixture
def stale_dir(tmp_path, stale_model):
    src = tmp_path / "in"
    write_external(stale_model, src)
    return src


def tensors(path):
    m = onnx.load(path)
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_replan_leaves_the_dropped_bytes_out_of_the_copied_data_file(stale_dir, tmp_path):
    before = (stale_dir / "model_00.onnx.data").stat().st_size
    (o,) = optimize_path(stale_dir, tmp_path / "out", OptimizeConfig(budget=10_000, replan=True))
    # IN packs w0 w1 w2 w3 w1_q w2_q (1, 2, 2, 1, 2, 2 KiB); OUT keeps w0 w3 w1_q w2_q, each at an offset
    # with the alignment it had (1024, 2048, 4096): 0, 1024, 2048, 4096.
    assert (o.dropped.names, o.dropped.nbytes, o.compacted) == (("w1", "w2"), 4096, 4096)
    data = tmp_path / "out" / "model_00.onnx.data"
    assert (before, data.stat().st_size) == (10240, 6144)
    written = onnx.load(tmp_path / "out" / "model_00.onnx", load_external_data=False)
    offsets = {
        t.name: int({e.key: e.value for e in t.external_data}["offset"]) for t in written.graph.initializer
    }
    assert offsets == {"w0": 0, "w3": 1024, "w1_q": 2048, "w2_q": 4096}
    got, want = tensors(tmp_path / "out" / "model_00.onnx"), tensors(stale_dir / "model_00.onnx")
    assert sorted(got) == ["w0", "w1_q", "w2_q", "w3"]
    for name in got:
        assert got[name].tobytes() == want[name].tobytes()
    assert stale_links(onnx.load(tmp_path / "out" / "model_00.onnx", load_external_data=False)).stale == ()


def test_replan_beside_in_keeps_ins_data_file(stale_dir):
    before = (stale_dir / "model_00.onnx.data").read_bytes()
    (o,) = optimize_path(
        stale_dir / "model_00.onnx", stale_dir / "replanned.onnx", OptimizeConfig(budget=10_000, replan=True)
    )
    assert o.dropped.names == ("w1", "w2") and o.compacted == 0  # IN's own file: left as it is
    assert (stale_dir / "model_00.onnx.data").read_bytes() == before
    assert sorted(tensors(stale_dir / "replanned.onnx")) == ["w0", "w1_q", "w2_q", "w3"]


def test_a_data_file_two_ranks_share_is_not_compacted(tmp_path, stale_model):
    src = tmp_path / "in"
    write_external(stale_model, src, "model_00.onnx", "shared.data")
    other = onnx.load(src / "model_00.onnx", load_external_data=False)
    onnx.save(other, src / "model_01.onnx")  # rank 1 reads the same file, at the same offsets
    size = (src / "shared.data").stat().st_size
    outcomes = optimize_path(src, tmp_path / "out", OptimizeConfig(budget=10_000, replan=True))
    assert [(o.dropped.names, o.compacted) for o in outcomes] == [(("w1", "w2"), 0)] * 2
    assert (tmp_path / "out" / "shared.data").stat().st_size == size
    assert sorted(tensors(tmp_path / "out" / "model_01.onnx")) == ["w0", "w1_q", "w2_q", "w3"]


# -- what inspect, diff and optimize say --------------------------------------------------------------


def test_cli_optimize_without_replan_names_the_stale_links(stale_dir, tmp_path):
    r = cli("optimize", stale_dir, tmp_path / "out", "--budget", "10000")
    assert r.exit_code == 1
    assert r.output.splitlines() == [f"error: model_00.onnx: {LINE}; nothing was written"]
    assert not (tmp_path / "out").exists()


def test_cli_optimize_replan_says_what_it_dropped(stale_dir, tmp_path):
    r = cli(
        "optimize",
        stale_dir,
        tmp_path / "out",
        "--budget",
        "10000",
        "--replan",
        "--report",
        tmp_path / "r.json",
    )
    assert r.exit_code == 0, r.output
    assert (
        "model_00.onnx: 2 of 3 Prefetch links were stale; re-planned on the new weights, dropped 2 "
        "initializers only they read (4.0 KiB), data files 4.0 KiB smaller"
    ) in r.output
    (model,) = json.loads((tmp_path / "r.json").read_text())["models"]
    assert model["replan"] == {
        "prefetch_links": 3,
        "stale_links": 2,
        "dropped_initializers": ["w1", "w2"],
        "dropped_bytes": 4096,
        "data_bytes_left_out": 4096,
    }


def test_cli_inspect_names_the_stale_links(stale_dir):
    r = cli("inspect", stale_dir / "model_00.onnx", "--budget", "10000")
    assert r.exit_code == 0, r.output
    assert f"model_00.onnx: {LINE}" in r.output
    doc = json.loads(cli("inspect", stale_dir / "model_00.onnx", "--budget", "10000", "--json").output)
    assert doc["models"][0]["stale_prefetches"] == {
        "total": 3,
        "prefetch_only_initializers": ["w1", "w2"],
        "stale": [
            {"graph": "", "node": "ar0/Prefetch/w1", "tensor": "w1", "reason": "unread"},
            {"graph": "", "node": "ar0/Prefetch/w2", "tensor": "w2", "reason": "unread"},
        ],
    }


def test_cli_diff_names_the_stale_links_of_each_side(stale_dir, tmp_path):
    original = write_external(two_layer_mlp(), tmp_path / "orig")
    b = stale_dir / "model_00.onnx"
    r = cli("diff", original, b)
    assert r.exit_code == 1
    assert r.output.splitlines()[0] == f"{b}: {LINE}"
    doc = json.loads(cli("diff", original, b, "--json").output)
    stale = doc["models"][0]["stale_prefetches"]
    assert stale["a"] is None and [s["tensor"] for s in stale["b"]["stale"]] == ["w1", "w2"]
    assert f"> `{b}: {LINE}`" in cli("diff", original, b, "--markdown").output.splitlines()
    assert "Prefetch links" not in cli("diff", original, original).output  # no links, no line


def test_a_data_file_only_the_dropped_initializers_used_is_not_written(tmp_path, stale_model):
    src = write_external(stale_model, tmp_path / "in")
    model = onnx.load(src, load_external_data=False)
    data = (tmp_path / "in" / "model_00.onnx.data").read_bytes()
    with open(tmp_path / "in" / "old.data", "wb") as f:  # w1 and w2 moved to a file of their own
        for t in model.graph.initializer:
            if t.name in ("w1", "w2"):
                info = {e.key: e.value for e in t.external_data}
                start, length = int(info["offset"]), int(info["length"])
                offset = f.tell()
                f.write(data[start : start + length])
                del t.external_data[:]
                entries = (("location", "old.data"), ("offset", str(offset)), ("length", str(length)))
                for key, value in entries:
                    t.external_data.add(key=key, value=value)
    onnx.save(model, src)
    (o,) = optimize_path(tmp_path / "in", tmp_path / "out", OptimizeConfig(budget=10_000, replan=True))
    assert (o.dropped.names, o.dropped.locations, o.compacted) == (("w1", "w2"), ("old.data",), 4096)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model_00.onnx", "model_00.onnx.data"]
    assert sorted(tensors(tmp_path / "out" / "model_00.onnx")) == ["w0", "w1_q", "w2_q", "w3"]


def test_a_short_data_file_is_refused_while_compacting(stale_dir, tmp_path):
    from preserve_onnx.optimizer import compact_data

    out = tmp_path / "out"
    out.mkdir()
    model = onnx.load(stale_dir / "model_00.onnx", load_external_data=False)
    (out / "model_00.onnx.data").write_bytes((stale_dir / "model_00.onnx.data").read_bytes()[:5000])
    with pytest.raises(PreserveError, match=r"model_00\.onnx\.data is short: 'w2' needs bytes up to 5120$"):
        compact_data(model, ("model_00.onnx.data",), out / "model_00.onnx", stale_dir / "model_00.onnx")
