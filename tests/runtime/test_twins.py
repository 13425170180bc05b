"""The 2-rank sharded samples against their unsharded twins: proves AllReduce and the sharding.

Tolerances (documented in the README): float32 logits within 1e-4 absolute, float16 within 2e-2;
the KV-cache a rank returns equals its heads' slice of the twin's within the same bounds. The qdq
sample runs at the 'basic' optimization level on both sides: at 'all', onnxruntime rewrites
DequantizeLinear+MatMul into MatMulNBits, which quantizes activations too, so sharded and unsharded
round differently (about 3%) — a property of onnxruntime, not of the sharding.
"""

import re

import numpy as np
import pytest

from preserve_onnx.runtime import RankSession, generate_feeds, run_steps
from tests.conftest import SAMPLE_VARIANTS, SAMPLES

TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 2e-2}


def head_axis(name: str) -> int:
    return 2 if re.fullmatch(r"(past|present)_\d+", name) else 1  # gpt's [2, B, N, S, H] vs [B, N, S, H]


@pytest.mark.parametrize("variant", SAMPLE_VARIANTS)
def test_sharded_ranks_match_the_unsharded_twin(variant):
    level = "basic" if variant == "llama-qdq" else "all"
    ranks = RankSession([SAMPLES / variant / "tp2" / f"model_0{r}.onnx" for r in (0, 1)], opt_level=level)
    twin = RankSession(SAMPLES / variant / "full" / "model.onnx", opt_level=level)
    shared, per_rank = generate_feeds(ranks, batch=2, context=8, seed=3)
    twin_feeds = {name: np.concatenate([per_rank[0][name], per_rank[1][name]], axis=head_axis(name))
                  for name in per_rank[0]}
    sharded = run_steps(ranks, shared, per_rank, 3)
    (full,) = run_steps(twin, shared, {0: twin_feeds}, 3)
    for name, expected in full.items():
        tol = TOL[expected.dtype]
        if name == "logits":
            for r in (0, 1):
                np.testing.assert_allclose(sharded[r][name], expected, atol=tol, rtol=0)
        else:
            halves = np.split(expected, 2, axis=head_axis(name))
            for r in (0, 1):
                np.testing.assert_allclose(sharded[r][name], halves[r], atol=tol, rtol=0)
    # Ranks agree with each other bit for bit on everything the AllReduce produced.
    assert sharded[0]["logits"].tobytes() == sharded[1]["logits"].tobytes()
