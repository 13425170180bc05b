"""Prefetch's optional length input L (docs/design.md §3, "Live ranges"): the bytes each hint covers,
computed by hand, and outputs that stay the anchor whatever L says.

The KV-cache of most cases is float32 [B=2, H=2, S=8, D=4]: one position of one head is 4 x 4 = 16 bytes,
one (batch, head) block 8 x 16 = 128 bytes, blocks start at 0, 128, 256 and 384 (b0h0, b0h1, b1h0, b1h1).
"""

from __future__ import annotations

import numpy as np
import pytest
from _rt_graphs import allreduce, init, model, vi
from onnx import TensorProto, helper

from preserve_onnx.errors import PreserveError
from preserve_onnx.runtime import RankSession, compare_outputs
from preserve_onnx.runtime.library import PrefetchCounters, prefetch_counters, recording_prefetch_ranges

KV_SHAPE = (2, 2, 8, 4)
ANCHOR = np.arange(6, dtype=np.float32).reshape(2, 3)


def _prefetch(inputs, **attrs):
    return helper.make_node("Prefetch", inputs, ["y"], name="p", domain="preserve", **attrs)


def _session(
    l_type=TensorProto.INT64, l_shape=(2,), kv_shape=KV_SHAPE, with_l=True, anchor_shape=(2, 3), **attrs
):
    inputs = ["a", "kv", "L"] if with_l else ["a", "kv"]
    graph_inputs = [
        vi("a", TensorProto.FLOAT, list(anchor_shape)),
        vi("kv", TensorProto.FLOAT, list(kv_shape)),
    ]
    if with_l:
        graph_inputs.append(vi("L", l_type, list(l_shape)))
    return RankSession(
        model([_prefetch(inputs, **attrs)], graph_inputs, [vi("y", TensorProto.FLOAT, list(anchor_shape))])
    )


def _hint(session, lengths=None, kv_shape=KV_SHAPE, anchor=ANCHOR):
    """Runs once; returns (counters of that run, recorded ranges) and checks the output is the anchor."""
    feeds = {"a": anchor, "kv": np.zeros(kv_shape, np.float32)}
    if lengths is not None:
        feeds["L"] = lengths
    before = prefetch_counters()
    with recording_prefetch_ranges() as ranges:
        out = session.run(feeds)
    assert out[0]["y"].tobytes() == anchor.tobytes()
    return prefetch_counters() - before, ranges


def _issued(nbytes):
    return PrefetchCounters(issued=1, skipped_above=0, skipped_below=0, bytes=nbytes)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_per_sequence_lengths_hint_the_valid_positions_of_every_head(dtype):
    # b0 holds 3 positions (48 bytes per head), b1 holds 5 (80 bytes per head).
    session = _session(TensorProto.INT32 if dtype == np.int32 else TensorProto.INT64, seq_axis=2)
    counters, ranges = _hint(session, np.array([3, 5], dtype))
    assert ranges == [(0, 48), (128, 176), (256, 336), (384, 464)]
    assert counters == _issued(48 + 48 + 80 + 80)


def test_a_negative_seq_axis_counts_from_the_end():
    counters, ranges = _hint(_session(seq_axis=-2), np.array([3, 5], np.int64))
    assert ranges == [(0, 48), (128, 176), (256, 336), (384, 464)]
    assert counters.bytes == 256


def test_a_window_shorter_than_the_valid_length_hints_its_last_positions():
    # window 2: b0 positions [1, 3), b1 positions [3, 5).
    counters, ranges = _hint(_session(seq_axis=2, window=2), np.array([3, 5], np.int64))
    assert ranges == [(16, 48), (144, 176), (304, 336), (432, 464)]
    assert counters == _issued(4 * 32)


def test_a_window_longer_than_the_valid_length_hints_every_valid_position():
    # window 4: b0 has 3 valid positions (all of them), b1 has 5 (the last 4: [1, 5)).
    counters, ranges = _hint(_session(seq_axis=2, window=4), np.array([3, 5], np.int64))
    assert ranges == [(0, 48), (128, 176), (272, 336), (400, 464)]
    assert counters == _issued(48 + 48 + 64 + 64)


def test_lengths_beyond_the_buffer_are_clamped_and_full_blocks_merge():
    # b0: 10 > 8 positions -> the whole of both heads, one contiguous range; b1: 0 positions -> nothing.
    counters, ranges = _hint(_session(seq_axis=2), np.array([10, 0], np.int64))
    assert ranges == [(0, 256)]
    assert counters == _issued(256)


def test_negative_lengths_hint_nothing_but_the_hint_counts_as_issued():
    counters, ranges = _hint(_session(seq_axis=2), np.array([-1, -7], np.int64))
    assert ranges == []
    assert counters == _issued(0)


def test_offset_and_max_size_across_a_block_boundary_count_live_bytes():
    # Live bytes: 48 (b0h0) + 48 (b0h1) + 80 + 80. Live bytes [40, 60) are the last 8 of b0h0 and the
    # first 12 of b0h1.
    counters, ranges = _hint(_session(seq_axis=2, offset=40, max_size=20), np.array([3, 5], np.int64))
    assert ranges == [(40, 48), (128, 140)]
    assert counters == _issued(20)


def test_a_partial_last_link_ends_at_the_last_live_byte():
    # Live bytes [200, 300) of 256: b1h1 starts at live byte 176, so X bytes [384 + 24, 464), 56 bytes.
    counters, ranges = _hint(_session(seq_axis=2, offset=200, max_size=100), np.array([3, 5], np.int64))
    assert ranges == [(408, 464)]
    assert counters == _issued(56)


def test_an_offset_past_the_live_bytes_hints_nothing():
    counters, ranges = _hint(_session(seq_axis=2, offset=256), np.array([3, 5], np.int64))
    assert (ranges, counters) == ([], _issued(0))


@pytest.mark.parametrize("l_shape, lengths", [((), np.array(4, np.int64)), ((1,), np.array([4], np.int32))])
def test_a_scalar_or_one_value_length_applies_to_every_sequence(l_shape, lengths):
    session = _session(
        TensorProto.INT64 if lengths.dtype == np.int64 else TensorProto.INT32, l_shape, seq_axis=2
    )
    counters, ranges = _hint(session, lengths)
    assert ranges == [(0, 64), (128, 192), (256, 320), (384, 448)]
    assert counters == _issued(4 * 64)


def test_any_batch_size_and_a_sequence_axis_right_after_the_batch():
    # [B=3, S=4, H=2, D=2] float32: one position of all heads is 16 bytes, one sequence 64 bytes.
    shape = (3, 4, 2, 2)
    session = _session(l_shape=(3,), kv_shape=shape, seq_axis=1, window=3)
    counters, ranges = _hint(session, np.array([1, 4, 2], np.int64), kv_shape=shape)
    # b0: [0, 1) -> [0, 16); b1: [1, 4) -> [64 + 16, 128); b2: [0, 2) -> [128, 160), contiguous with b1's.
    assert ranges == [(0, 16), (80, 160)]
    assert counters == _issued(16 + 48 + 32)


def test_seq_axis_zero_takes_one_length():
    shape = (8, 4)
    counters, ranges = _hint(
        _session(l_shape=(), kv_shape=shape, seq_axis=0, window=2), np.array(5, np.int64), kv_shape=shape
    )
    assert ranges == [(48, 80)]
    assert counters == _issued(32)


def test_without_l_the_hint_covers_offset_and_max_size_of_the_raw_tensor():
    counters, ranges = _hint(_session(with_l=False, offset=100, max_size=50))
    assert (ranges, counters) == ([(100, 150)], _issued(50))
    counters, ranges = _hint(_session(with_l=False))
    assert (ranges, counters) == ([(0, 512)], _issued(512))


def test_seq_axis_and_window_without_l_change_nothing():
    counters, ranges = _hint(_session(with_l=False, seq_axis=2, window=2, offset=8, max_size=8))
    assert (ranges, counters) == ([(8, 16)], _issued(8))


@pytest.mark.parametrize(
    "tokens, expected",
    [
        (2, PrefetchCounters(0, 0, 1, 0)),
        (3, PrefetchCounters(1, 0, 0, 256)),
        (6, PrefetchCounters(1, 0, 0, 256)),
        (7, PrefetchCounters(0, 1, 0, 0)),
    ],
)
def test_min_tokens_skips_below_as_max_tokens_skips_above(tokens, expected):
    session = _session(anchor_shape=("t", 3), seq_axis=2, min_tokens=3, max_tokens=6)
    anchor = np.ones((tokens, 3), np.float32)
    counters, ranges = _hint(session, np.array([3, 5], np.int64), anchor=anchor)
    assert counters == expected
    assert len(ranges) == (4 if expected.issued else 0)


def test_l_keeps_a_chain_bit_identical_to_the_original_on_two_ranks():
    rng = np.random.default_rng(3)
    w = [rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2)]

    def rank(weight, with_prefetch):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm")]
        anchor = "mm"
        if with_prefetch:
            nodes.append(
                helper.make_node(
                    "Prefetch",
                    ["mm", "kv", "seqlens"],
                    ["mm_p"],
                    name="p",
                    domain="preserve",
                    seq_axis=2,
                    window=3,
                    max_size=100,
                )
            )
            anchor = "mm_p"
        nodes.append(allreduce(anchor, "y"))
        inputs = [vi("x", TensorProto.FLOAT, ["b", 8])]
        if with_prefetch:
            inputs += [vi("kv", TensorProto.FLOAT, ["b", 2, "s", 4]), vi("seqlens", TensorProto.INT32, ["b"])]
        return model(nodes, inputs, [vi("y", TensorProto.FLOAT, ["b", 8])], [init("w", weight)])

    feeds = {
        "x": rng.standard_normal((2, 8)).astype(np.float32),
        "kv": np.zeros((2, 2, 16, 4), np.float32),
        "seqlens": np.array([7, 16], np.int32),
    }
    plain = RankSession([rank(w[r], False) for r in range(2)], opt_level="all").run(
        {k: v for k, v in feeds.items() if k == "x"}
    )
    before = prefetch_counters()
    optimized = RankSession([rank(w[r], True) for r in range(2)], opt_level="all").run(feeds)
    # Live bytes per rank: b0 positions [4, 7), b1 [13, 16): 3 x 16 bytes per head, 4 heads; max_size 100.
    assert prefetch_counters() - before == PrefetchCounters(2, 0, 0, 200)
    assert compare_outputs(plain, optimized).identical


def test_vendor_spelled_seq_axis_window_and_min_tokens_are_read():
    m = model(
        [
            helper.make_node(
                "Prefetch", ["a", "kv", "L"], ["y"], name="p", domain="preserve", v_axis=2, v_win=2, v_min=5
            )
        ],
        [
            vi("a", TensorProto.FLOAT, ["t", 3]),
            vi("kv", TensorProto.FLOAT, list(KV_SHAPE)),
            vi("L", TensorProto.INT64, [2]),
        ],
        [vi("y", TensorProto.FLOAT, ["t", 3])],
    )
    session = RankSession(m, prefetch_attrs=("max_size", "offset", "max_tokens", "v_min", "v_axis", "v_win"))
    counters, _ = _hint(session, np.array([3, 5], np.int64))
    assert counters == PrefetchCounters(0, 0, 1, 0)  # 2 tokens < v_min 5
    counters, ranges = _hint(session, np.array([3, 5], np.int64), anchor=np.ones((5, 3), np.float32))
    assert ranges == [(16, 48), (144, 176), (304, 336), (432, 464)]
    assert counters == _issued(128)


def test_more_attribute_names_than_the_kernel_reads_are_refused():
    m = model(
        [_prefetch(["a", "kv"])],
        [vi("a", TensorProto.FLOAT, [1]), vi("kv", TensorProto.FLOAT, [1])],
        [vi("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(PreserveError) as caught:
        RankSession(m, prefetch_attrs=("a", "b", "c", "d", "e", "f", "g"))
    assert str(caught.value) == (
        "Prefetch has 6 attributes the runtime reads (max_size, offset, max_tokens, "
        "min_tokens, seq_axis, window), got 7 names"
    )


@pytest.mark.parametrize(
    "attrs, l_type, l_shape, lengths, message",
    [
        (
            {},
            TensorProto.INT64,
            (2,),
            np.array([3, 5], np.int64),
            "the length input L needs the attribute 'seq_axis' (docs/design.md §3)",
        ),
        (
            {"seq_axis": 4},
            TensorProto.INT64,
            (2,),
            np.array([3, 5], np.int64),
            "seq_axis 4 is out of range for X of rank 4",
        ),
        (
            {"seq_axis": 2, "window": -1},
            TensorProto.INT64,
            (2,),
            np.array([3, 5], np.int64),
            "'window' must be 0 (all valid positions) or positive, got -1",
        ),
        (
            {"seq_axis": 2},
            TensorProto.FLOAT,
            (2,),
            np.array([3, 5], np.float32),
            "the length input L must be int32 or int64, got float32",
        ),
        (
            {"seq_axis": 2},
            TensorProto.INT64,
            (3,),
            np.array([3, 5, 1], np.int64),
            "L has 3 values for 2 sequences (X's axis 0)",
        ),
        (
            {"seq_axis": 0},
            TensorProto.INT64,
            (2,),
            np.array([3, 5], np.int64),
            "L has 2 values for 1 sequence (seq_axis 0)",
        ),
        (
            {"seq_axis": 2},
            TensorProto.INT64,
            (1, 2),
            np.array([[3, 5]], np.int64),
            "the length input L must be a scalar or one value per sequence, got shape [1, 2]",
        ),
    ],
)
def test_bad_lengths_or_attributes_are_one_line_errors(attrs, l_type, l_shape, lengths, message):
    session = _session(l_type, l_shape, **attrs)
    with pytest.raises(PreserveError) as caught:
        session.run({"a": ANCHOR, "kv": np.zeros(KV_SHAPE, np.float32), "L": lengths})
    assert str(caught.value) == f"rank 0: Prefetch: {message}"


def test_the_standalone_runner_runs_prefetches_with_l(tmp_path):
    """`optimize --with-runtime`'s run_ranks.py (onnxruntime and numpy only) takes the three-input form."""
    import json
    import subprocess
    import sys

    import onnx

    from preserve_onnx.runtime.bundle import write_runtime

    rng = np.random.default_rng(5)
    original, optimized = tmp_path / "original", tmp_path / "optimized"
    for folder in (original, optimized):
        folder.mkdir()
    for r in range(2):
        weight = init("w", rng.standard_normal((8, 8)).astype(np.float32))
        inputs = [
            vi("x", TensorProto.FLOAT, ["batch", 8]),
            vi("past", TensorProto.FLOAT, ["batch", 2, "past", 4]),
            vi("seqlens", TensorProto.INT32, ["batch"]),
        ]
        head = [
            helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
            helper.make_node("ReduceSum", ["past"], ["s"], name="sum", keepdims=0),
        ]
        outputs = [
            vi("y", TensorProto.FLOAT, ["batch", 8]),
            vi("s", TensorProto.FLOAT, []),
            vi("n", TensorProto.INT32, ["batch"]),
        ]
        tail = [helper.make_node("Identity", ["seqlens"], ["n"], name="n")]
        onnx.save(
            model(head + [allreduce("mm", "y")] + tail, inputs, outputs, [weight]),
            original / f"model_{r:02d}.onnx",
        )
        chain = [
            helper.make_node(
                "Prefetch",
                ["mm", "past", "seqlens"],
                ["mm_p"],
                name="p",
                domain="preserve",
                seq_axis=2,
                window=4,
                max_size=64,
            )
        ]
        onnx.save(
            model(head + chain + [allreduce("mm_p", "y")] + tail, inputs, outputs, [weight]),
            optimized / f"model_{r:02d}.onnx",
        )
    _, script = write_runtime(optimized)
    naming = json.loads(
        next(line for line in script.read_text().splitlines() if line.startswith("NAMING = ")).removeprefix(
            "NAMING = "
        )
    )
    assert {k: naming[k] for k in ("min_tokens", "seq_axis", "window")} == {
        "min_tokens": "min_tokens",
        "seq_axis": "seq_axis",
        "window": "window",
    }
    run = subprocess.run(
        [sys.executable, str(script), "--against", str(original), "--batch", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "PASSED" in run.stdout
