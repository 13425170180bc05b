"""Prefetch kernel: a byte-exact pass-through that onnxruntime neither folds nor drops."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _rt_graphs import allreduce, init, model, prefetch, tp_mlp, vi
from onnx import TensorProto, helper

from preserve_onnx.errors import PreserveError
from preserve_onnx.runtime import RankSession, compare_outputs, library_path
from preserve_onnx.runtime import library as library_module


def _weights(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("level", ["all", "extended", "basic", "disable"])
def test_prefetch_chain_is_bit_identical_to_the_original(level):
    w1 = [_weights(r, (32, 64)) for r in range(2)]
    w2 = [_weights(10 + r, (64, 32)) for r in range(2)]
    x = _weights(20, (4, 32))
    original = RankSession([tp_mlp(w1[r], w2[r]) for r in range(2)], opt_level=level)
    optimized = RankSession([tp_mlp(w1[r], w2[r], with_prefetch=True) for r in range(2)], opt_level=level)
    a, b = original.run({"x": x}), optimized.run({"x": x})
    result = compare_outputs(a, b)
    assert result.identical, result
    assert result.worst == (0, "ar", 0.0)


def test_prefetch_is_bit_identical_for_fp16_and_keeps_dtype():
    w1 = [_weights(r, (16, 8), np.float16) for r in range(2)]
    w2 = [_weights(5 + r, (8, 16), np.float16) for r in range(2)]
    x = _weights(9, (2, 16), np.float16)
    models = [tp_mlp(w1[r], w2[r], elem=TensorProto.FLOAT16) for r in range(2)]
    optimized = [tp_mlp(w1[r], w2[r], elem=TensorProto.FLOAT16, with_prefetch=True) for r in range(2)]
    a = RankSession(models).run({"x": x})
    b = RankSession(optimized).run({"x": x})
    assert compare_outputs(a, b).identical
    assert b[0]["y"].dtype == np.float16


def test_prefetch_passes_any_type_through_exactly():
    # Anchor and X are different types; NaN payloads and -0.0 must survive bit for bit.
    anchor = np.array([np.nan, -0.0, 1.0, np.inf], np.float32)
    anchor.view(np.uint32)[0] = 0x7FC01234
    for elem, value in [
        (TensorProto.FLOAT, anchor),
        (TensorProto.BFLOAT16, anchor.astype(ml_dtypes.bfloat16)),
        (TensorProto.INT64, np.array([[1, -2], [3, 2**40]], np.int64)),
        (TensorProto.BOOL, np.array([True, False])),
    ]:
        m = model(
            [prefetch("a", "w", "y", max_size=4, offset=2)],
            [vi("a", elem, list(value.shape))],
            [vi("y", elem, list(value.shape))],
            [init("w", np.arange(10, dtype=np.int8))],
        )
        out = RankSession(m).run({"a": value})
        assert out[0]["y"].dtype == value.dtype
        assert out[0]["y"].tobytes() == value.tobytes()


def test_prefetch_of_a_kv_cache_input_and_offset_beyond_the_tensor():
    m = model(
        [
            prefetch("a", "past", "a1", offset=1 << 40),
            prefetch("a1", "past", "a2", max_size=1 << 40),
            allreduce("a2", "y"),
        ],
        [vi("a", TensorProto.FLOAT, [3]), vi("past", TensorProto.FLOAT16, ["b", 2, "s", 4])],
        [vi("y", TensorProto.FLOAT, [3])],
    )
    a = np.array([1.0, 2.0, 3.0], np.float32)
    out = RankSession([m, m]).run({"a": a, "past": np.zeros((1, 2, 5, 4), np.float16)})
    np.testing.assert_array_equal(out[1]["y"], a * 2)


def test_onnxruntime_keeps_prefetch_on_constant_inputs(tmp_path):
    # Both inputs are initializers: constant folding would replace the node if it could.
    m = model(
        [prefetch("c", "w", "c1"), helper.make_node("Add", ["x", "c1"], ["y"])],
        [vi("x", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, [2])],
        [init("c", np.array([1.0, 2.0], np.float32)), init("w", np.ones((4, 4), np.float32))],
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.register_custom_ops_library(str(library_path()))
    sess = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": np.zeros(2, np.float32)})[0], [1.0, 2.0])
    kept = onnx.load(tmp_path / "optimized.onnx")
    assert [(n.domain, n.op_type) for n in kept.graph.node] == [("preserve", "Prefetch"), ("", "Add")]


def test_prefetch_domain_and_op_are_configurable():
    w1 = [_weights(r, (8, 8)) for r in range(2)]
    w2 = [_weights(3 + r, (8, 8)) for r in range(2)]
    x = _weights(7, (1, 8))
    custom = [
        tp_mlp(w1[r], w2[r], with_prefetch=True, domain="vendor.cmo", op="CmoPrefetch") for r in range(2)
    ]
    plain = [tp_mlp(w1[r], w2[r]) for r in range(2)]
    b = RankSession(custom, prefetch_domain="vendor.cmo", prefetch_op="CmoPrefetch").run({"x": x})
    a = RankSession(plain).run({"x": x})
    assert compare_outputs(a, b).identical
    # With the names overridden, the default preserve::Prefetch is not registered.
    default_named = [tp_mlp(w1[r], w2[r], with_prefetch=True) for r in range(2)]
    with pytest.raises(PreserveError, match=r"^rank \d: .*Prefetch"):
        RankSession(default_named, prefetch_domain="vendor.cmo", prefetch_op="CmoPrefetch")


def test_prefetch_may_live_in_the_com_microsoft_domain():
    w1 = [_weights(r, (4, 4)) for r in range(2)]
    w2 = [_weights(3 + r, (4, 4)) for r in range(2)]
    ms = [tp_mlp(w1[r], w2[r], with_prefetch=True, domain="com.microsoft", op="Prefetch") for r in range(2)]
    out = RankSession(ms, prefetch_domain="com.microsoft").run({"x": np.ones((1, 4), np.float32)})
    np.testing.assert_array_equal(out[0]["ar"], out[0]["mm"] + out[1]["mm"])


def test_missing_library_is_a_one_line_preserve_error(monkeypatch, tmp_path):
    monkeypatch.setattr(library_module, "_LIB_DIR", tmp_path)
    with pytest.raises(PreserveError) as caught:
        library_path()
    assert str(caught.value) == (
        f"the runtime's custom-op library {tmp_path / 'libpreserve_ops.so'} is missing: reinstall "
        f"preserve-onnx from its source folder or sdist where g++ is installed, or run `make lib` in a clone"
    )


def test_library_that_the_install_could_not_build_names_the_reason(monkeypatch, tmp_path):
    """setup.py writes why it could not build the library into _lib/NOT_BUILT; `run` repeats it."""
    monkeypatch.setattr(library_module, "_LIB_DIR", tmp_path)
    (tmp_path / "NOT_BUILT").write_text(
        "no C++ compiler: install g++ (Debian/Ubuntu: apt-get install g++), or set CXX\n"
    )
    with pytest.raises(PreserveError) as caught:
        library_path()
    assert str(caught.value) == (
        "the runtime's custom-op library was not built when preserve-onnx was installed (no C++ compiler: "
        "install g++ (Debian/Ubuntu: apt-get install g++), or set CXX): provide what it names (a C++ "
        "compiler such as g++; onnxruntime's C headers: ORT_INCLUDE_DIR=<the include folder of onnxruntime's "
        "release archive or of Debian's libonnxruntime-dev>) and reinstall: pip install --force-reinstall "
        "--no-deps <preserve-onnx's source folder or sdist>"
    )


def _limited_mlp(w1, w2, max_tokens, attr="max_tokens"):
    """tp_mlp whose three Prefetch nodes carry a validity range (docs/design.md §3)."""
    m = tp_mlp(w1, w2, with_prefetch=True)
    for node in m.graph.node:
        if node.op_type == "Prefetch":
            node.attribute.append(helper.make_attribute(attr, max_tokens))
    return m


@pytest.mark.parametrize("attr", ["max_tokens", "vendor_tokens"])
def test_prefetch_skips_its_hint_above_max_tokens_and_outputs_stay_bit_identical(attr):
    from preserve_onnx.runtime.library import prefetch_counters

    w1 = [_weights(r, (16, 32)) for r in range(2)]
    w2 = [_weights(4 + r, (32, 16)) for r in range(2)]
    plain = RankSession([tp_mlp(w1[r], w2[r]) for r in range(2)])
    limited = RankSession(
        [_limited_mlp(w1[r], w2[r], 4, attr) for r in range(2)], prefetch_attrs=("max_size", "offset", attr)
    )
    for tokens, issued, skipped in [(4, 6, 0), (5, 0, 6), (1, 6, 0), (64, 0, 6)]:
        x = _weights(tokens, (tokens, 16))
        before = prefetch_counters()
        out = limited.run({"x": x})
        after = prefetch_counters()
        # 3 Prefetch nodes x 2 ranks: all hints issued at or below max_tokens, all skipped above it. Each
        # rank hints both halves of w2 (2 x 1 KiB) and all of w1 (2 KiB).
        assert after - before == (issued, skipped, 0, 4096 * issued // 3), tokens
        result = compare_outputs(plain.run({"x": x}), out)
        assert result.identical, result


def test_prefetch_without_max_tokens_always_issues_its_hint():
    from preserve_onnx.runtime.library import prefetch_counters

    w1, w2 = _weights(1, (8, 8)), _weights(2, (8, 8))
    session = RankSession(tp_mlp(w1, w2, with_prefetch=True))
    before = prefetch_counters()
    session.run({"x": _weights(3, (1000, 8))})
    after = prefetch_counters()
    assert after - before == (3, 0, 0, 128 + 128 + 256)  # w2 in two halves of 128 bytes, w1 whole
