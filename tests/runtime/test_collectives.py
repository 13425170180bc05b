"""AllReduce / AllGather kernels: exact fixed-order sums and concatenations across thread ranks."""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np
import pytest
from _rt_graphs import allreduce, model, tp_mlp, vi
from onnx import TensorProto, helper

from preserve_onnx.errors import PreserveError
from preserve_onnx.runtime import RankSession, library_path

BF16 = np.dtype(ml_dtypes.bfloat16)


def _weights(seed, ranks, shape):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(ranks)]


def _same_bytes(arrays):
    return all(a.dtype == arrays[0].dtype and a.tobytes() == arrays[0].tobytes() for a in arrays)


def test_library_path_points_at_built_library():
    path = library_path()
    assert path.is_absolute() and path.name == "libpreserve_ops.so" and path.is_file()


def test_matmul_allreduce_is_the_fixed_order_sum_on_two_ranks():
    w1, w2 = _weights(1, 2, (8, 16)), _weights(2, 2, (16, 4))
    x = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)
    session = RankSession([tp_mlp(w1[r], w2[r]) for r in range(2)])
    out = session.run({"x": x})
    expected = out[0]["mm"] + out[1]["mm"]
    assert out[0]["mm"].tobytes() != out[1]["mm"].tobytes()  # the ranks' partial sums differ
    for rank in range(2):
        assert out[rank]["ar"].dtype == np.float32 and out[rank]["ar"].shape == (3, 16)
        np.testing.assert_array_equal(out[rank]["ar"], expected)
    assert _same_bytes([o["ar"] for o in out])


def test_allreduce_with_different_inputs_per_rank():
    w1, w2 = _weights(4, 2, (8, 16)), _weights(5, 2, (16, 4))
    xs = [np.random.default_rng(10 + r).standard_normal((2, 8)).astype(np.float32) for r in range(2)]
    session = RankSession([tp_mlp(w1[r], w2[r]) for r in range(2)])
    out = session.run({}, {0: {"x": xs[0]}, 1: {"x": xs[1]}})
    np.testing.assert_array_equal(out[1]["ar"], out[0]["mm"] + out[1]["mm"])


def _allreduce_identity_model(elem, ranks_shape=("n", 5)):
    return model(
        [allreduce("x", "y")],
        [vi("x", elem, list(ranks_shape))],
        [vi("y", elem, None)],
    )


@pytest.mark.parametrize(
    ("elem", "dtype"),
    [
        (TensorProto.FLOAT, np.dtype(np.float32)),
        (TensorProto.FLOAT16, np.dtype(np.float16)),
        (TensorProto.BFLOAT16, BF16),
        (TensorProto.DOUBLE, np.dtype(np.float64)),
    ],
)
def test_allreduce_sums_in_rank_order_accumulating_in_float(elem, dtype):
    ranks = 3
    rng = np.random.default_rng(7)
    # Values of very different magnitudes make the summation order and the single final rounding visible.
    xs = [
        (rng.standard_normal((4, 5)) * 10.0 ** (2 * r)).astype(np.float32).astype(dtype) for r in range(ranks)
    ]
    acc = np.float64 if dtype == np.float64 else np.float32
    expected = xs[0].astype(acc)
    for r in range(1, ranks):
        expected = expected + xs[r].astype(acc)
    expected = expected.astype(dtype)
    session = RankSession([_allreduce_identity_model(elem)] * ranks)
    out = session.run({}, {r: {"x": xs[r]} for r in range(ranks)})
    for r in range(ranks):
        assert out[r]["y"].dtype == dtype and out[r]["y"].shape == (4, 5)
        assert out[r]["y"].tobytes() == expected.tobytes()
    if dtype != np.float64:
        # Summing pairwise in the narrow type (what an unordered kernel might do) differs here.
        naive = ((xs[2] + xs[1]) + xs[0]) if dtype == np.float32 else None
        if naive is not None:
            assert naive.tobytes() != expected.tobytes()


def test_allreduce_fp16_matmul_chain_two_ranks():
    w1 = [w.astype(np.float16) for w in _weights(8, 2, (8, 16))]
    w2 = [w.astype(np.float16) for w in _weights(9, 2, (16, 4))]
    x = np.random.default_rng(11).standard_normal((3, 8)).astype(np.float16)
    session = RankSession([tp_mlp(w1[r], w2[r], elem=TensorProto.FLOAT16) for r in range(2)])
    out = session.run({"x": x})
    expected = (out[0]["mm"].astype(np.float32) + out[1]["mm"].astype(np.float32)).astype(np.float16)
    for r in range(2):
        assert out[r]["ar"].tobytes() == expected.tobytes()


def test_allreduce_runs_repeatedly_and_in_several_collectives_per_step():
    # Two AllReduces in sequence: the generation counter must separate them.
    m = model(
        [allreduce("x", "a", "ar0"), helper.make_node("Mul", ["a", "x"], ["b"]), allreduce("b", "y", "ar1")],
        [vi("x", TensorProto.FLOAT, [3])],
        [vi("y", TensorProto.FLOAT, [3])],
    )
    xs = [np.array([1.0, 2.0, 3.0], np.float32), np.array([10.0, 20.0, 30.0], np.float32)]
    session = RankSession([m, m])
    for _ in range(5):
        out = session.run({}, {0: {"x": xs[0]}, 1: {"x": xs[1]}})
        a = xs[0] + xs[1]
        expected = a * xs[0] + a * xs[1]
        for r in range(2):
            np.testing.assert_array_equal(out[r]["y"], expected)


def test_allreduce_is_variadic():
    m = model(
        [helper.make_node("AllReduce", ["x", "z"], ["y", "w"], name="ar2", domain="com.microsoft")],
        [vi("x", TensorProto.FLOAT, [2]), vi("z", TensorProto.FLOAT16, [3])],
        [vi("y", TensorProto.FLOAT, [2]), vi("w", TensorProto.FLOAT16, [3])],
    )
    feeds = {
        r: {"x": np.array([1.5, -2.0], np.float32) * (r + 1), "z": np.array([1, 2, 3], np.float16) * (r + 1)}
        for r in range(2)
    }
    out = RankSession([m, m]).run({}, feeds)
    np.testing.assert_array_equal(out[1]["y"], np.array([4.5, -6.0], np.float32))
    np.testing.assert_array_equal(out[0]["w"], np.array([3, 6, 9], np.float16))
    assert out[0]["w"].dtype == np.float16


@pytest.mark.parametrize("axis", [0, -1, 1])
def test_allgather_concatenates_in_rank_order(axis):
    m = model(
        [
            helper.make_node(
                "AllGather", ["x"], ["y"], name="ag", domain="com.microsoft", group_size=2, axis=axis
            )
        ],
        [vi("x", TensorProto.FLOAT, [2, 3])],
        [vi("y", TensorProto.FLOAT, None)],
    )
    xs = [np.arange(6, dtype=np.float32).reshape(2, 3) + 100 * r for r in range(2)]
    session = RankSession([m, m])
    out = session.run({}, {r: {"x": xs[r]} for r in range(2)})
    expected = np.concatenate(xs, axis=axis)
    for r in range(2):
        assert out[r]["y"].shape == expected.shape
        np.testing.assert_array_equal(out[r]["y"], expected)
    static = session.output_meta[0][0].shape
    assert static == ((4, 3) if axis == 0 else (2, 6))


def test_allgather_bfloat16_last_axis():
    m = model(
        [
            helper.make_node(
                "AllGather", ["x"], ["y"], name="ag", domain="com.microsoft", group_size=2, axis=-1
            )
        ],
        [vi("x", TensorProto.BFLOAT16, ["b", 2])],
        [vi("y", TensorProto.BFLOAT16, None)],
    )
    xs = [np.array([[1.0, 2.0]], np.float32).astype(BF16) * (r + 1) for r in range(2)]
    out = RankSession([m, m]).run({}, {r: {"x": xs[r]} for r in range(2)})
    assert out[0]["y"].dtype == BF16
    assert out[0]["y"].tobytes() == np.array([[1.0, 2.0, 2.0, 4.0]], np.float32).astype(BF16).tobytes()


def test_allgather_rejects_group_size_other_than_world():
    m = model(
        [
            helper.make_node(
                "AllGather", ["x"], ["y"], name="ag", domain="com.microsoft", group_size=4, axis=0
            )
        ],
        [vi("x", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, None)],
    )
    with pytest.raises(PreserveError, match=r"^rank \d: .*group_size 4 differs from the world size 2"):
        RankSession([m, m]).run({"x": np.ones(2, np.float32)})


def test_single_model_is_a_world_of_one_and_allreduce_is_identity():
    w1, w2 = _weights(12, 1, (8, 16)), _weights(13, 1, (16, 4))
    session = RankSession(tp_mlp(w1[0], w2[0]))
    assert session.world_size == 1
    x = np.random.default_rng(14).standard_normal((2, 8)).astype(np.float32)
    out = session.run({"x": x})
    assert len(out) == 1
    assert out[0]["ar"].tobytes() == out[0]["mm"].tobytes()


def test_models_from_files(tmp_path):
    import onnx

    w1, w2 = _weights(15, 2, (8, 16)), _weights(16, 2, (16, 4))
    paths = []
    for r in range(2):
        paths.append(tmp_path / f"model_{r:02d}.onnx")
        onnx.save(tp_mlp(w1[r], w2[r]), paths[-1])
    session = RankSession(paths)
    x = np.ones((1, 8), np.float32)
    out = session.run({"x": x})
    np.testing.assert_array_equal(out[0]["ar"], out[0]["mm"] + out[1]["mm"])
    assert session.input_names(1) == ["x"]
    assert session.input_meta[0][0].shape == ("batch", 8)
    assert session.output_names(0) == ["mm", "ar", "y"]


def test_failing_rank_raises_within_seconds_and_session_recovers():
    w1, w2 = _weights(17, 2, (8, 16)), _weights(18, 2, (16, 4))
    session = RankSession([tp_mlp(w1[r], w2[r]) for r in range(2)], timeout_s=60)
    x = np.ones((2, 8), np.float32)
    start = time.monotonic()
    with pytest.raises(
        PreserveError, match=r"^rank 1: Got invalid dimensions for input: x .*Got: 7 Expected: 8"
    ):
        session.run({"x": x}, {1: {"x": np.ones((2, 7), np.float32)}})
    assert time.monotonic() - start < 10
    # The group was reset: the next run works.
    out = session.run({"x": x})
    np.testing.assert_array_equal(out[0]["ar"], out[0]["mm"] + out[1]["mm"])


def test_timeout_names_the_collective_rank_and_what_it_waited_for():
    with_ar = model(
        [allreduce("x", "y", "the_allreduce")],
        [vi("x", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, [2])],
    )
    without = model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [vi("x", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, [2])],
    )
    session = RankSession([with_ar, without], timeout_s=1)
    start = time.monotonic()
    with pytest.raises(PreserveError) as info:
        session.run({"x": np.ones(2, np.float32)})
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 10
    message = str(info.value)
    assert message.startswith(f"rank 0: AllReduce 'the_allreduce' (rank 0 of 2, group {session.group}): ")
    assert message.endswith("timed out after 1000 ms waiting for rank(s) 1 to enter the collective")
    assert "\n" not in str(info.value)


def test_ranks_in_different_collectives_fail_on_every_rank():
    ar = model(
        [allreduce("x", "y", "ar")], [vi("x", TensorProto.FLOAT, [2])], [vi("y", TensorProto.FLOAT, None)]
    )
    ag = model(
        [
            helper.make_node(
                "AllGather", ["x"], ["y"], name="ag", domain="com.microsoft", group_size=2, axis=0
            )
        ],
        [vi("x", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, None)],
    )
    with pytest.raises(PreserveError, match=r"rank 0 is in AllReduce 'ar' but rank 1 is in AllGather 'ag'"):
        RankSession([ar, ag]).run({"x": np.ones(2, np.float32)})


def test_allreduce_shape_mismatch_between_ranks_is_an_error():
    m = model([allreduce("x", "y")], [vi("x", TensorProto.FLOAT, ["n"])], [vi("y", TensorProto.FLOAT, None)])
    feeds = {0: {"x": np.ones(2, np.float32)}, 1: {"x": np.ones(3, np.float32)}}
    with pytest.raises(PreserveError, match=r"input 0 is float32\[2\] on rank 0 but float32\[3\] on rank 1"):
        RankSession([m, m]).run({}, feeds)


def test_unknown_feed_names_and_ranks_are_refused():
    m = _allreduce_identity_model(TensorProto.FLOAT)
    session = RankSession([m, m])
    with pytest.raises(PreserveError, match="feed 'nope' is not an input of any rank model"):
        session.run({"nope": np.ones(1)})
    with pytest.raises(PreserveError, match="feeds given for rank 2, but the world has 2 rank"):
        session.run({}, {2: {"x": np.ones((1, 5), np.float32)}})
    with pytest.raises(PreserveError, match="rank 0: no feed for input 'x'"):
        session.run({})


def test_bad_model_is_a_preserve_error():
    broken = model(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="nowhere")],
        [vi("x", TensorProto.FLOAT, [1])],
        [vi("y", TensorProto.FLOAT, [1])],
        opsets=[helper.make_opsetid("", 17), helper.make_opsetid("nowhere", 1)],
    )
    with pytest.raises(PreserveError, match=r"^rank 0: .*NoSuchOp"):
        RankSession([broken])


@pytest.mark.parametrize("level", ["all", "ORT_ENABLE_EXTENDED", "basic", "disable", 99, 0, "layout"])
def test_opt_levels_by_name_or_value(level):
    m = _allreduce_identity_model(TensorProto.FLOAT)
    out = RankSession([m, m], opt_level=level).run({"x": np.ones((1, 5), np.float32)})
    np.testing.assert_array_equal(out[0]["y"], np.full((1, 5), 2.0, np.float32))


def test_unknown_opt_level_and_bad_arguments():
    m = _allreduce_identity_model(TensorProto.FLOAT)
    with pytest.raises(PreserveError, match="unknown optimization level 'fast'"):
        RankSession([m], opt_level="fast")
    with pytest.raises(PreserveError, match="at least one model"):
        RankSession([])
    with pytest.raises(PreserveError, match="timeout_s must be positive"):
        RankSession([m], timeout_s=0)


def test_closed_session_refuses_to_run():
    m = _allreduce_identity_model(TensorProto.FLOAT)
    with RankSession([m, m]) as session:
        pass
    with pytest.raises(PreserveError, match="this RankSession is closed"):
        session.run({"x": np.ones((1, 5), np.float32)})


def test_four_ranks_many_runs_and_concurrent_callers():
    import threading

    m = _allreduce_identity_model(TensorProto.FLOAT)
    session = RankSession([m] * 4)
    failures = []

    def caller(seed):
        rng = np.random.default_rng(seed)
        for _ in range(20):
            xs = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(4)]
            out = session.run({}, {r: {"x": xs[r]} for r in range(4)})
            expected = ((xs[0] + xs[1]) + xs[2]) + xs[3]
            if not all(o["y"].tobytes() == expected.tobytes() for o in out):
                failures.append(seed)

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []


def _collective_chain(length):
    """x -> (AllReduce, Mul by x, AllGather on axis 0 every third step, Slice back) ``length`` times."""
    nodes, cur = [], "x"
    for i in range(length):
        nodes.append(allreduce(cur, f"s{i}", f"ar{i}"))
        nodes.append(helper.make_node("Mul", [f"s{i}", "scale"], [f"m{i}"]))
        cur = f"m{i}"
        if i % 3 == 2:
            nodes.append(
                helper.make_node(
                    "AllGather", [cur], [f"g{i}"], name=f"ag{i}", domain="com.microsoft", group_size=8, axis=0
                )
            )
            nodes.append(helper.make_node("Slice", [f"g{i}", "zero", "two"], [f"c{i}"]))
            cur = f"c{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    inits = [
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("two", TensorProto.INT64, [1], [2]),
    ]
    return model(
        nodes,
        [vi("x", TensorProto.FLOAT, [2, 3]), vi("scale", TensorProto.FLOAT, [2, 3])],
        [vi("y", TensorProto.FLOAT, None)],
        initializers=inits,
    )


def _chain_expected(xs, scales, length):
    cur = xs
    for i in range(length):
        total = cur[0].copy()
        for c in cur[1:]:
            total += c
        cur = [total * s for s in scales]
        if i % 3 == 2:
            cur = [np.concatenate(cur, axis=0)[:2] for _ in cur]
    return cur


def test_eight_oversubscribed_ranks_through_a_long_chain_of_collectives():
    # 8 ranks on this 2-core machine, 31 AllReduce + 10 AllGather per run, every result bit-exact.
    length = 31
    session = RankSession([_collective_chain(length)] * 8, timeout_s=60)
    rng = np.random.default_rng(5)
    for _ in range(6):
        xs = [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(8)]
        scales = [rng.uniform(0.2, 0.4, (2, 3)).astype(np.float32) for _ in range(8)]
        out = session.run({}, {r: {"x": xs[r], "scale": scales[r]} for r in range(8)})
        expected = _chain_expected(xs, scales, length)
        for r in range(8):
            assert out[r]["y"].tobytes() == expected[r].tobytes()


def test_rank_failing_after_an_odd_number_of_collectives_then_the_session_recovers():
    # Rank 1 fails in a Reshape after 3 collectives, while rank 0 waits in the 4th: the reset must put
    # both back in step (collectives alternate between two buffer sets).
    nodes = [
        allreduce("x", "a0", "ar0"),
        allreduce("a0", "a1", "ar1"),
        allreduce("a1", "a2", "ar2"),
        helper.make_node("Reshape", ["a2", "shape"], ["r"]),
        allreduce("r", "y", "ar3"),
    ]
    m = model(
        nodes,
        [vi("x", TensorProto.FLOAT, [4]), vi("shape", TensorProto.INT64, [1])],
        [vi("y", TensorProto.FLOAT, None)],
    )
    session = RankSession([m, m], timeout_s=60)
    x = np.arange(4, dtype=np.float32)
    good = np.array([4], np.int64)
    with pytest.raises(PreserveError, match=r"^rank 1: .*Reshape"):
        session.run({"x": x, "shape": good}, {1: {"shape": np.array([3], np.int64)}})
    for _ in range(3):
        out = session.run({"x": x, "shape": good})
        for r in range(2):
            assert out[r]["y"].tobytes() == (x * 16).tobytes()


def test_ctrl_c_during_a_run_leaves_the_session_usable():
    import _thread
    import threading

    with_ar = model(
        [allreduce("x", "y", "the_allreduce")],
        [vi("x", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, [2])],
    )
    without = model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [vi("x", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, [2])],
    )
    session = RankSession([with_ar, without], timeout_s=3)  # rank 0 waits for a rank 1 that never comes
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        session.run({"x": np.ones(2, np.float32)})
    assert time.monotonic() - start < 2
    # The group was reset once the ranks returned: the next run is a fresh wait, not "group aborted".
    with pytest.raises(PreserveError, match=r"timed out after 3000 ms waiting for rank\(s\) 1 to enter"):
        session.run({"x": np.ones(2, np.float32)})


def test_a_rank_that_outlives_its_failed_run_is_waited_for_before_the_next(monkeypatch):
    # Rank 1 fails at once; rank 0 is deep in a chain of MatMuls and only notices at its AllReduce,
    # long after the (shortened) grace period. The next run must not start rank 0 a second time while
    # the old rank 0 still runs: it waits, then refuses; once the old one returned, runs work again.
    from _rt_graphs import init

    import preserve_onnx.runtime.session as session_module

    monkeypatch.setattr(session_module, "_ABORT_GRACE_S", 0.2)
    n = 1000
    nodes, cur = [], "x"
    for i in range(24):  # about 50 GFLOP: a second or more on one core
        nodes.append(helper.make_node("MatMul", [cur, "w"], [f"m{i}"]))
        cur = f"m{i}"
    nodes.append(allreduce(cur, "y", "ar"))
    w = np.eye(n, dtype=np.float32)
    m = model(nodes, [vi("x", TensorProto.FLOAT, [n, n])], [vi("y", TensorProto.FLOAT, None)], [init("w", w)])
    session = RankSession([m, m], timeout_s=60, intra_op_threads=1)
    x = np.ones((n, n), np.float32)
    with pytest.raises(PreserveError, match=r"^rank 1: .*\(rank 0 did not stop within 0 s\)$"):
        session.run({"x": x}, {1: {"x": np.ones((n, 3), np.float32)}})
    with pytest.raises(PreserveError, match="^rank 0 of an earlier run is still running"):
        session.run({"x": x})
    deadline = time.monotonic() + 30
    while True:  # the old rank 0 returns once its MatMuls are done
        try:
            out = session.run({"x": x})
            break
        except PreserveError as exc:
            assert "still running" in str(exc) and time.monotonic() < deadline
    assert out[0]["y"].tobytes() == out[1]["y"].tobytes() == (2 * x).tobytes()


def test_a_session_that_ran_is_freed_with_its_threads():
    import gc
    import threading
    import weakref

    before = set(threading.enumerate())
    m = _allreduce_identity_model(TensorProto.FLOAT)
    session = RankSession([m, m])
    session.run({"x": np.ones((1, 5), np.float32)})
    mine = [t for t in threading.enumerate() if t not in before and t.name.startswith("preserve-rank-")]
    assert len(mine) == 2  # one persistent thread per rank
    ref = weakref.ref(session)
    del session
    gc.collect()
    assert ref() is None
    for t in mine:
        t.join(5)
        assert not t.is_alive()
