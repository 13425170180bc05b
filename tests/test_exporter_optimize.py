"""The optimizer on the real exporters' rank models (sample_models/exporters/<name>/tp2, tp4: exports of
the onnxruntime-genai builder and torch.onnx, sharded by `shard`): optimize, then bit-identical under
`run --against`; `strip` gives the original back (`diff` says equal); the KV-cache is planned in every
window that reads it, whichever way it was recognised (attention slot or the structural rule)."""

from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.config import OptimizeConfig
from preserve_onnx.graph.index import is_collective
from preserve_onnx.inspection import inspect
from preserve_onnx.model_io import load_model
from tests.conftest import SAMPLES

runner = CliRunner()
RANK_FOLDERS = sorted(p for p in (SAMPLES / "exporters").glob("*/tp*") if p.is_dir())
IDS = [f"{p.parent.name}/{p.name}" for p in RANK_FOLDERS]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """One optimized copy per rank folder and option set, shared by the tests of this module."""
    made: dict[tuple, Path] = {}

    def get(src: Path, *options: str) -> Path:
        if (src, options) not in made:
            dest = tmp_path_factory.mktemp("opt") / src.name
            r = cli("optimize", src, dest, "-q", *options)
            assert r.exit_code == 0, r.output
            made[src, options] = dest
        return made[src, options]

    return get


def test_every_real_export_has_rank_folders():
    assert len(RANK_FOLDERS) >= 12 and any(p.name == "tp4" for p in RANK_FOLDERS)


@pytest.mark.parametrize("options", [(), ("--static-kv",)], ids=["live-kv", "static-kv"])
@pytest.mark.parametrize("src", RANK_FOLDERS, ids=IDS)
def test_optimized_real_ranks_are_bit_identical(src, options, optimized):
    r = cli("run", optimized(src, *options), "--against", src, "--steps", "2", "-q")
    assert r.exit_code == 0, r.output
    assert "bit-identical" in r.output and "PASSED" in r.output


@pytest.mark.parametrize("src", RANK_FOLDERS, ids=IDS)
def test_strip_gives_the_real_ranks_back(src, optimized, tmp_path):
    r = cli("diff", src, optimized(src))
    assert r.exit_code == 1, r.output  # the Prefetch nodes
    assert cli("strip", optimized(src), tmp_path / "back").exit_code == 0
    r = cli("diff", src, tmp_path / "back")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("src", RANK_FOLDERS, ids=IDS)
def test_kv_cache_is_planned_in_every_window_that_reads_it(src):
    """Each KV-cache input of a layer after the first is read in some window, and planned there whole
    (at batch 8 / context 4k the default budget holds a tiny model's layer of cache: Gemma's 2 KV heads
    of 64 per rank fill it alone at 16k)."""
    model_file = sorted(src.glob("*.onnx"))[0]
    found = inspect(model_file, OptimizeConfig(context=4096))
    kv_inputs = [
        vi.name for vi in load_model(model_file).graph.input if vi.name.startswith("past_key_values.")
    ]
    planned, candidates = set(), set()
    for window in found.plan.windows:
        kv = {c.tensor for c in window.candidates if c.kind == "kv_cache"}
        candidates |= kv
        prefetched = {p.tensor for p in window.prefetches if p.kind == "kv_cache" and p.max_size == 0}
        assert kv <= prefetched, (window.window.collective, kv - prefetched)
        planned |= prefetched
    # The first layer's cache is read before the first collective: no window overlaps it.
    later = {name for name in kv_inputs if not name.startswith("past_key_values.0.")}
    assert later and later == candidates == planned
    # Two layers, two AllReduces each; Qwen3.5-MoE's first layer (linear attention) has no o_proj
    # AllReduce, and its mixture-of-experts layers one after the experts and one after the shared expert.
    want = 5 if src.parent.name.startswith("genai-qwen35moe") else 4
    assert sum(is_collective(n) for n in load_model(model_file).graph.node) == want


@pytest.mark.parametrize("src", RANK_FOLDERS, ids=IDS)
def test_every_gqa_kv_link_carries_its_nodes_seqlens_k(src, optimized):
    """docs/design.md §4.7: every Prefetch of a GroupQueryAttention KV input reads that node's seqlens_k as
    L, with seq_axis 2 and window = local_window_size on a full-length buffer (0 on a window-cache node);
    every other link has two inputs; --static-kv gives two inputs everywhere."""
    for rank in sorted(optimized(src).glob("*.onnx")):
        model = load_model(rank)
        gqa = {}
        for node in model.graph.node:
            if node.op_type == "GroupQueryAttention":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                w = attrs.get("local_window_size", -1)
                window = w if w > 0 and not attrs.get("sliding_window_cache", 0) else 0
                gqa.update({node.input[3]: (node.input[5], window), node.input[4]: (node.input[5], window)})
        links = [n for n in model.graph.node if n.op_type == "Prefetch"]
        for link in links:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in link.attribute}
            if link.input[1] in gqa:
                lengths, window = gqa[link.input[1]]
                assert (list(link.input)[2:], attrs["seq_axis"], attrs["window"]) == ([lengths], 2, window)
            else:
                assert len(link.input) == 2 and "seq_axis" not in attrs
        with_l = [n for n in links if len(n.input) == 3]
        assert len(with_l) == sum(1 for n in links if n.input[1] in gqa)
        assert bool(with_l) == bool(gqa)  # every builder export plans its later layers' KV-cache
        static = load_model(optimized(src, "--static-kv") / rank.name)
        assert {len(n.input) for n in static.graph.node if n.op_type == "Prefetch"} == {2}


def test_the_runtime_hints_the_live_bytes_of_a_builder_export(optimized):
    """docs/design.md §4.7 on a real builder export (2 ranks, 1 KV head of 16 floats per rank, so one
    position of a (batch, head) block is 64 bytes): a past of 8 positions in which sequence 0 holds 4
    valid ones (attention mask 5 of 9, seqlens_k 4) and sequence 1 all 8. Every KV link hints
    (4 + 8) x 64 bytes, every weight link its tensor; outputs stay bit-identical."""
    import numpy as np

    from preserve_onnx.graph.index import initializer_nbytes
    from preserve_onnx.runtime import RankSession
    from preserve_onnx.runtime.library import prefetch_counters

    src = SAMPLES / "exporters" / "genai-llama-fp32" / "tp2"
    out = optimized(src)
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": np.array([[3], [7]], np.int64),
        "attention_mask": np.array([[1] * 5 + [0] * 4, [1] * 9], np.int64),
    }
    rank_feeds = {
        r: {
            f"past_key_values.{i}.{kind}": rng.standard_normal((2, 1, 8, 16)).astype(np.float32)
            for i in range(2)
            for kind in ("key", "value")
        }
        for r in range(2)
    }
    expected = 0
    for rank in sorted(out.glob("*.onnx")):
        model = onnx.load(rank, load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        for node in (n for n in model.graph.node if n.op_type == "Prefetch"):
            size = next(a.i for a in node.attribute if a.name == "max_size")
            if len(node.input) == 3:
                assert size == 0
                expected += (4 + 8) * 64
            else:
                expected += size or initializer_nbytes(inits[node.input[1]])
    with RankSession(sorted(src.glob("*.onnx"))) as session:
        original = session.run(feeds, rank_feeds)
    with RankSession(sorted(out.glob("*.onnx"))) as session:
        before = prefetch_counters()
        outputs = session.run(feeds, rank_feeds)
        counters = prefetch_counters() - before
    assert all(o[k].tobytes() == e[k].tobytes() for o, e in zip(outputs, original) for k in e)
    assert (counters.skipped_above, counters.skipped_below) == (0, 0)
    assert counters.bytes == expected
    links = [
        n
        for n in onnx.load(out / "model_00.onnx", load_external_data=False).graph.node
        if n.op_type == "Prefetch"
    ]
    assert sum(len(n.input) == 3 for n in links) == 2
