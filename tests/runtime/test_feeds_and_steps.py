"""Generated and file feeds, the decode loop's KV feedback, and bit-exact output comparison."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from _rt_graphs import allreduce, init, model, vi
from onnx import TensorProto, helper

from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.dims import DecodeLayout
from preserve_onnx.runtime import (
    RankSession,
    TensorMeta,
    compare_outputs,
    generate_feeds,
    layout_of,
    load_feeds,
    run_steps,
    save_outputs,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
VOCAB = 50
EMB = np.random.default_rng(100).standard_normal((VOCAB, 4)).astype(np.float32)


def _decoder(rank: int):
    """A one-layer toy decoder rank: the new token's embedding is appended to the KV-cache."""
    w = np.random.default_rng(200 + rank).standard_normal((4, VOCAB)).astype(np.float32)
    past = ["batch_size", 1, "past_sequence_length", 4]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Unsqueeze", ["e", "axes1"], ["kv_new"]),
        helper.make_node("Concat", ["past_key_values.0.key", "kv_new"], ["present.0.key"], axis=2),
        helper.make_node("Mul", ["kv_new", "two"], ["kv_new2"]),
        helper.make_node("Concat", ["past_key_values.0.value", "kv_new2"], ["present.0.value"], axis=2),
        helper.make_node("MatMul", ["e", "w"], ["partial"]),
        allreduce("partial", "logits"),
        helper.make_node("Identity", ["input_ids"], ["ids_seen"]),
        helper.make_node("Identity", ["position_ids"], ["pos_seen"]),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
    ]
    return model(
        nodes,
        [
            vi("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            vi("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
            vi("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            vi("past_key_values.0.key", TensorProto.FLOAT, past),
            vi("past_key_values.0.value", TensorProto.FLOAT, past),
        ],
        [
            vi("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB]),
            vi("present.0.key", TensorProto.FLOAT, None),
            vi("present.0.value", TensorProto.FLOAT, None),
            vi("ids_seen", TensorProto.INT64, None),
            vi("pos_seen", TensorProto.INT64, None),
            vi("mask_shape", TensorProto.INT64, None),
        ],
        [
            init("emb", EMB),
            init("w", w),
            init("axes1", np.array([1], np.int64)),
            init("two", np.array(2.0, np.float32)),
        ],
    )


@pytest.fixture(scope="module")
def decoder():
    return RankSession([_decoder(0), _decoder(1)])


def test_generate_feeds_binds_dims_and_splits_kv_per_rank(decoder):
    shared, per_rank = generate_feeds(decoder, batch=2, context=3, seed=0)
    assert sorted(shared) == ["attention_mask", "input_ids", "position_ids"]
    assert sorted(per_rank) == [0, 1]
    assert sorted(per_rank[1]) == ["past_key_values.0.key", "past_key_values.0.value"]
    assert shared["input_ids"].shape == (2, 1) and shared["input_ids"].dtype == np.int64
    assert shared["input_ids"].min() >= 0 and shared["input_ids"].max() < VOCAB  # vocab from logits
    np.testing.assert_array_equal(shared["attention_mask"], np.ones((2, 4), np.int64))
    np.testing.assert_array_equal(shared["position_ids"], [[3], [3]])
    key0, key1 = per_rank[0]["past_key_values.0.key"], per_rank[1]["past_key_values.0.key"]
    assert key0.shape == (2, 1, 3, 4) and key0.dtype == np.float32
    assert key0.tobytes() != key1.tobytes()
    assert 0 < np.abs(key0).max() < 1.0  # small normal values


def test_generate_feeds_is_deterministic_per_seed(decoder):
    a = generate_feeds(decoder, batch=1, context=5, seed=4)
    b = generate_feeds(decoder, batch=1, context=5, seed=4)
    c = generate_feeds(decoder, batch=1, context=5, seed=5)
    assert compare_outputs([a[0], *a[1].values()], [b[0], *b[1].values()]).identical
    assert not compare_outputs([a[1][0]], [c[1][0]]).identical


def test_generate_feeds_symbol_rules_and_special_inputs():
    metas = [
        TensorMeta(
            "attention_mask", np.dtype(np.int64), ("batch_size", "past_sequence_length + 1"), "tensor(int64)"
        ),
        TensorMeta(
            "past_key_values.0.key",
            np.dtype(np.float16),
            ("batch_size", 2, "past_sequence_length", 8),
            "tensor(float16)",
        ),
        TensorMeta("past_0", BF16, (None, 2, None, 8), "tensor(bfloat16)"),
        TensorMeta("seqlens_k", np.dtype(np.int32), ("batch_size",), "tensor(int32)"),
        TensorMeta("total_sequence_length", np.dtype(np.int32), (), "tensor(int32)"),
        TensorMeta("use_cache_branch", np.dtype(np.bool_), (1,), "tensor(bool)"),
        TensorMeta("inputs_embeds", np.dtype(np.float16), ("batch", "seq", 4), "tensor(float16)"),
        TensorMeta("step", np.dtype(np.int64), (1,), "tensor(int64)"),
    ]
    layout = DecodeLayout(
        kv_axes={"past_key_values.0.key": (0, 2), "past_0": (0, 2)},
        past=frozenset({"past_sequence_length"}),
        batch=frozenset({"batch_size"}),
    )
    shared, per_rank = generate_feeds([metas, metas], batch=3, context=7, seed=1, vocab=10, layout=layout)
    assert shared["attention_mask"].shape == (3, 8)
    assert per_rank[0]["past_key_values.0.key"].shape == (3, 2, 7, 8)
    assert per_rank[0]["past_key_values.0.key"].dtype == np.float16
    assert per_rank[1]["past_0"].shape == (3, 2, 7, 8) and per_rank[1]["past_0"].dtype == BF16
    np.testing.assert_array_equal(shared["seqlens_k"], np.array([7, 7, 7], np.int32))
    assert shared["total_sequence_length"].shape == () and int(shared["total_sequence_length"]) == 8
    assert shared["use_cache_branch"].tolist() == [True]
    assert shared["inputs_embeds"].shape == (3, 1, 4) and shared["inputs_embeds"].dtype == np.float16
    np.testing.assert_array_equal(shared["step"], [0])


def test_generate_feeds_puts_inputs_that_differ_between_ranks_per_rank():
    r0 = [
        TensorMeta("x", np.dtype(np.float32), (2, 4), "tensor(float)"),
        TensorMeta("y", np.dtype(np.float32), (3,), "tensor(float)"),
    ]
    r1 = [
        TensorMeta("x", np.dtype(np.float32), (2, 8), "tensor(float)"),
        TensorMeta("y", np.dtype(np.float32), (3,), "tensor(float)"),
    ]
    shared, per_rank = generate_feeds([r0, r1])
    assert list(shared) == ["y"]
    assert per_rank[0]["x"].shape == (2, 4) and per_rank[1]["x"].shape == (2, 8)


def test_generate_feeds_refuses_string_inputs():
    metas = [TensorMeta("prompt", np.dtype(object), (1,), "tensor(string)")]
    with pytest.raises(PreserveError, match="cannot generate input 'prompt' of type tensor\\(string\\)"):
        generate_feeds(metas)


def test_run_steps_feeds_present_back_and_advances_bookkeeping(decoder):
    shared, per_rank = generate_feeds(decoder, batch=2, context=3, seed=0)
    mask_before = shared["attention_mask"].copy()
    step1 = run_steps(decoder, shared, per_rank, 1)
    step2 = run_steps(decoder, shared, per_rank, 2)
    step3 = run_steps(decoder, shared, per_rank, 3)
    np.testing.assert_array_equal(shared["attention_mask"], mask_before)  # caller's feeds untouched

    ids1 = shared["input_ids"]
    ids2 = np.argmax(step1[0]["logits"][:, -1, :], axis=-1).reshape(2, 1)
    ids3 = np.argmax(step2[0]["logits"][:, -1, :], axis=-1).reshape(2, 1)
    np.testing.assert_array_equal(step2[1]["ids_seen"], ids2)
    np.testing.assert_array_equal(step3[0]["ids_seen"], ids3)
    np.testing.assert_array_equal(step3[0]["pos_seen"], [[5], [5]])
    np.testing.assert_array_equal(step3[1]["mask_shape"], [2, 6])
    for rank in range(2):
        key = step3[rank]["present.0.key"]
        value = step3[rank]["present.0.value"]
        assert key.shape == (2, 1, 6, 4)
        np.testing.assert_array_equal(key[:, :, :3], per_rank[rank]["past_key_values.0.key"])
        np.testing.assert_array_equal(value[:, :, :3], per_rank[rank]["past_key_values.0.value"])
        for k, ids in enumerate([ids1, ids2, ids3]):
            np.testing.assert_array_equal(key[:, 0, 3 + k, :], EMB[ids[:, 0]])
            np.testing.assert_array_equal(value[:, 0, 3 + k, :], 2 * EMB[ids[:, 0]])
    # Both ranks' logits are the same AllReduce result.
    assert step3[0]["logits"].tobytes() == step3[1]["logits"].tobytes()
    # Deterministic: the loop gives the same bytes again.
    assert compare_outputs(step3, run_steps(decoder, shared, per_rank, 3)).identical


def test_run_steps_needs_a_positive_step_count(decoder):
    with pytest.raises(PreserveError, match="steps must be at least 1, got 0"):
        run_steps(decoder, {}, {}, 0)


def test_the_decode_layout_comes_from_the_graph_not_the_names(decoder):
    layout = layout_of(decoder)
    assert dict(layout.feedback) == {
        "present.0.key": "past_key_values.0.key",
        "present.0.value": "past_key_values.0.value",
    }
    assert dict(layout.kv_axes) == {"past_key_values.0.key": (0, 2), "past_key_values.0.value": (0, 2)}
    assert layout_of(decoder) is layout  # once per session


def test_inputs_named_like_a_cache_are_not_kv_cache_without_the_structure():
    metas = [TensorMeta("past_key_values.0.key", np.dtype(np.float32), ("b", 2, "p", 8), "tensor(float)")]
    shared, per_rank = generate_feeds([metas, metas], batch=2, context=5, seed=1)
    assert shared["past_key_values.0.key"].shape == (2, 2, 1, 8) and per_rank == {0: {}, 1: {}}


def test_load_feeds_key_convention(tmp_path):
    path = tmp_path / "feeds.npz"
    np.savez(
        path,
        **{
            "x": np.ones(2, np.float32),
            "/model/odd/name": np.zeros(1, np.int64),
            "rank0/past": np.full(3, 0.5, np.float32),
            "rank1/past": np.full(3, 1.5, np.float32),
        },
    )
    shared, per_rank = load_feeds(path)
    assert sorted(shared) == ["/model/odd/name", "x"]
    assert sorted(per_rank) == [0, 1]
    np.testing.assert_array_equal(per_rank[1]["past"], [1.5, 1.5, 1.5])


def test_npz_feeds_drive_rank_sessions(tmp_path):
    m = model(
        [helper.make_node("Add", ["x", "past"], ["s"]), allreduce("s", "y")],
        [vi("x", TensorProto.FLOAT, [3]), vi("past", TensorProto.FLOAT, [3])],
        [vi("y", TensorProto.FLOAT, [3])],
    )
    path = tmp_path / "feeds.npz"
    np.savez(
        path,
        **{
            "x": np.array([1, 2, 3], np.float32),
            "rank0/past": np.array([10, 20, 30], np.float32),
            "rank1/past": np.array([100, 200, 300], np.float32),
        },
    )
    shared, per_rank = load_feeds(path)
    out = RankSession([m, m]).run(shared, per_rank)
    np.testing.assert_array_equal(out[0]["y"], [112, 224, 336])
    saved = save_outputs(tmp_path / "out.npz", out)
    with np.load(saved) as archive:
        assert sorted(archive.files) == ["rank0/y", "rank1/y"]
        np.testing.assert_array_equal(archive["rank1/y"], [112, 224, 336])


def test_bfloat16_survives_save_and_load(tmp_path):
    value = np.array([1.0, -2.5, 3.0e10], np.float32).astype(BF16)
    path = save_outputs(tmp_path / "o.npz", [{"y": value}, {"y": value * 2}])
    _, per_rank = load_feeds(path)
    assert per_rank[0]["y"].dtype == BF16 and per_rank[0]["y"].tobytes() == value.tobytes()
    assert per_rank[1]["y"].tobytes() == (value * 2).tobytes()


def test_bfloat16_from_a_plain_npz_feeds_a_bfloat16_model(tmp_path):
    m = model(
        [allreduce("x", "y")], [vi("x", TensorProto.BFLOAT16, [2])], [vi("y", TensorProto.BFLOAT16, [2])]
    )
    path = tmp_path / "f.npz"
    np.savez(path, x=np.array([1.5, 2.0], np.float32).astype(BF16))  # stored as raw |V2
    shared, per_rank = load_feeds(path)
    out = RankSession([m, m]).run(shared, per_rank)
    assert out[0]["y"].dtype == BF16
    assert out[0]["y"].tobytes() == np.array([3.0, 4.0], np.float32).astype(BF16).tobytes()


def test_load_feeds_errors_are_one_line(tmp_path):
    with pytest.raises(PreserveError, match="does not exist"):
        load_feeds(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(
        PreserveError,
        match=r"^inputs file .*bad\.npz is not an \.npz archive of named arrays "
        r"\(write one with numpy\.savez\)$",
    ):
        load_feeds(bad)
    single = tmp_path / "one.npy"
    np.save(single, np.ones(3, np.float32))
    with pytest.raises(
        PreserveError, match=r"one\.npy is not an \.npz archive .*: it holds one unnamed array"
    ):
        load_feeds(single)


def test_save_outputs_is_atomic_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.npz"
    save_outputs(target, [{"y": np.ones(2)}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]
    with pytest.raises(PreserveError, match="cannot write"):
        save_outputs(tmp_path / "no_dir" / "out.npz", [{"y": np.ones(2)}])


def test_compare_outputs_is_bytewise():
    a = [{"y": np.array([1.0, 2.0], np.float32)}, {"y": np.array([3.0], np.float32)}]
    same = [{"y": np.array([1.0, 2.0], np.float32)}, {"y": np.array([3.0], np.float32)}]
    result = compare_outputs(a, same)
    assert result.identical and result.worst == (0, "y", 0.0) and result.differing == ()

    ulp = np.nextafter(np.float32(3.0), np.float32(4.0))
    off = [{"y": np.array([1.0, 2.0], np.float32)}, {"y": np.array([ulp], np.float32)}]
    result = compare_outputs(a, off)
    assert not result.identical
    assert result.worst == (1, "y", float(ulp) - 3.0)
    assert result.differing == ((1, "y"),)


def test_compare_outputs_nan_signed_zero_shapes_and_missing():
    nan = np.array([np.nan, 1.0], np.float32)
    assert compare_outputs([{"y": nan}], [{"y": nan.copy()}]).identical
    one_side = compare_outputs([{"y": nan}], [{"y": np.array([0.0, 1.0], np.float32)}])
    assert not one_side.identical and one_side.worst == (0, "y", math.inf)
    zeros = compare_outputs([{"y": np.array([0.0], np.float32)}], [{"y": np.array([-0.0], np.float32)}])
    assert not zeros.identical and zeros.worst == (0, "y", 0.0)
    shapes = compare_outputs([{"y": np.zeros(2)}], [{"y": np.zeros(3)}])
    assert shapes.worst == (0, "y", math.inf)
    dtypes = compare_outputs([{"y": np.zeros(2, np.float32)}], [{"y": np.zeros(2, np.float16)}])
    assert not dtypes.identical and dtypes.worst == (0, "y", 0.0)
    missing = compare_outputs([{"y": np.zeros(1)}], [{"y": np.zeros(1)}, {"y": np.zeros(1)}])
    assert missing.differing == ((1, "y"),) and missing.worst == (1, "y", math.inf)
    bf = np.array([1.0, 2.0], np.float32).astype(BF16)
    assert compare_outputs([{"y": bf}], [{"y": bf.copy()}]).identical
    assert compare_outputs([], []).worst is None
