"""Generated feeds on sliding-window models are deterministic (docs/runtime.md, "Sliding windows").

A GroupQueryAttention layer with ``sliding_window_cache=1`` (the onnxruntime-genai builder's Gemma 2 and
gpt-oss exports) keeps a window-sized, cache-relative past buffer, and onnxruntime computes it correctly
only when the buffer holds exactly W slots (ONNX notes: larger buffers leave garbage in unused slots of
``present.*``, and a model compared with itself then differed about one run in ten). The feeds give such a
buffer its W slots, as onnxruntime-genai does, whatever ``--context``; full-length layers keep the context.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from preserve_onnx.graph.dims import decode_layout
from preserve_onnx.model_io import resolve_single
from preserve_onnx.runtime import RankSession, compare_outputs, generate_feeds, run_steps
from tests.conftest import SAMPLES

GEMMA2 = SAMPLES / "exporters" / "genai-gemma2-fp32" / "full"


@pytest.fixture(scope="module")
def gemma2():
    with RankSession([resolve_single(GEMMA2)]) as session:
        yield session


def test_the_layout_gives_a_window_cache_its_window_and_other_layers_the_context():
    layout = decode_layout(onnx.load(resolve_single(GEMMA2), load_external_data=False))
    assert dict(layout.windows) == {"past_sliding_length": 4}  # layer 0: local_window_size 4, window cache
    assert layout.past == {"past_sequence_length"}  # layer 1: full attention, full-length buffer
    assert layout.values(batch=2, context=16)["past_sliding_length"] == 4


def test_feeds_hold_w_slots_for_the_window_layer_and_the_context_for_the_full_one(gemma2):
    shared, per_rank = generate_feeds(gemma2, batch=2, context=16, seed=0)
    assert per_rank[0]["past_key_values.0.key"].shape == (2, 4, 4, 32)
    assert per_rank[0]["past_key_values.1.key"].shape == (2, 4, 16, 32)
    assert shared["attention_mask"].shape == (2, 17)


@pytest.mark.parametrize("seed", range(20))
def test_a_sliding_window_model_run_twice_on_the_same_feeds_is_bit_identical(gemma2, seed):
    # The Gemma-2-like case of the bug report (past longer than the window), repeated with 20 seeds.
    shared, per_rank = generate_feeds(gemma2, batch=2, context=16, seed=seed)
    first = run_steps(gemma2, shared, per_rank, 2)
    second = run_steps(gemma2, shared, per_rank, 2)
    comparison = compare_outputs(first, second)
    assert comparison.identical, comparison
    for name in ("present.0.key", "present.0.value"):  # the window buffer stays W slots, all written
        assert first[0][name].shape == (2, 4, 4, 32)
        assert np.isfinite(first[0][name]).all()
