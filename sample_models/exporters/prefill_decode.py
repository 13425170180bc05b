"""Prefill, then one decode step with the prefill's cache as past, on onnxruntime's CPU provider.

How `make_exporter_samples.py` checks a fresh export against torch and how
`tests/test_exporter_samples.py` checks the committed one: numpy and onnxruntime only, so both the
exporters' venv and the project's can import it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def prefill_and_decode(model: Path, ids: np.ndarray, layers: int, kv_heads: int,
                       head: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(prefill outputs, decode outputs): ``ids[:, :-1]`` with an empty KV-cache, then ``ids[:, -1:]``
    with the prefill's ``present.*`` as ``past_key_values.*``."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    float_type = np.float16 if "float16" in inputs["past_key_values.0.key"].type else np.float32
    batch, prompt = ids.shape[0], ids.shape[1] - 1

    def feeds(step: np.ndarray, total: int, present: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {"input_ids": step, "attention_mask": np.ones((batch, total), np.int64)}
        if "position_ids" in inputs:
            feed["position_ids"] = np.tile(np.arange(total - step.shape[1], total), (batch, 1)).astype(np.int64)
        for i in range(layers):
            for kind in ("key", "value"):
                feed[f"past_key_values.{i}.{kind}"] = present[f"present.{i}.{kind}"]
        return feed

    empty = {f"present.{i}.{k}": np.zeros((batch, kv_heads, 0, head), float_type)
             for i in range(layers) for k in ("key", "value")}
    first = dict(zip(names, session.run(None, feeds(ids[:, :prompt], prompt, empty))))
    second = dict(zip(names, session.run(None, feeds(ids[:, prompt:], prompt + 1, first))))
    return first, second
