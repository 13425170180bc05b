"""Prefill, then one decode step with the prefill's cache as past, on onnxruntime's CPU provider.

How `make_exporter_samples.py` checks a fresh export against torch and how
`tests/test_exporter_samples.py` checks the committed one: numpy and onnxruntime only, so both the
exporters' venv and the project's can import it.

Every graph input other than ``input_ids``, ``attention_mask`` and ``position_ids`` is a state that the
model hands back as an output of the same name with ``present`` for ``past_key_values`` / ``past``
(KV-cache, and the conv and recurrent states of linear-attention layers). The prefill's state is empty
or zero, sized from the input's own shape: ``batch_size`` is the batch, ``past_sequence_length`` 0,
``kv_cache_dim`` the head size, and ``past_sliding_length`` (the builder's window-sized cache of a
sliding-window layer, GroupQueryAttention ``sliding_window_cache=1``) the window from
``genai_config.json`` beside the model: onnxruntime refuses a window cache with fewer slots than the
window, and the kernel keeps the last ``window`` positions in it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

TOKENS = ("input_ids", "attention_mask", "position_ids")


def present_name(past: str) -> str:
    """``past_key_values.0.key`` -> ``present.0.key``; ``past.0.conv`` -> ``present.0.conv``."""
    for prefix in ("past_key_values.", "past."):
        if past.startswith(prefix):
            return "present." + past[len(prefix) :]
    raise ValueError(f"{past}: not a state input (past_key_values.* or past.*)")


def window_size(model: Path) -> int | None:
    config = Path(model).parent / "genai_config.json"
    if not config.exists():
        return None
    window = json.loads(config.read_text())["model"]["decoder"].get("sliding_window")
    return None if window is None else int(window["window_size"])


def prefill_and_decode(
    model: Path, ids: np.ndarray, layers: int, kv_heads: int, head: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(prefill outputs, decode outputs): ``ids[:, :-1]`` with an empty KV-cache, then ``ids[:, -1:]``
    with the prefill's ``present.*`` as ``past_key_values.*``. ``layers``/``kv_heads`` size a graph input
    whose head count is symbolic (none of the committed exports has one)."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    states = [name for name in inputs if name not in TOKENS]
    batch, prompt = ids.shape[0], ids.shape[1] - 1
    window = window_size(model)
    sizes = {"batch_size": batch, "past_sequence_length": 0, "kv_cache_dim": head}

    def empty(name: str) -> np.ndarray:
        shape = []
        for axis, dim in enumerate(inputs[name].shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif dim == "past_sliding_length":
                if window is None:
                    raise ValueError(f"{name}: a window-sized cache, no sliding_window in genai_config.json")
                shape.append(window)
            elif dim in sizes:
                shape.append(sizes[dim])
            elif axis == 1 and name.startswith("past_key_values."):
                shape.append(kv_heads)
            else:
                raise ValueError(f"{name}: cannot size dim {dim!r} of {inputs[name].shape}")
        dtype = np.float16 if "float16" in inputs[name].type else np.float32
        return np.zeros(shape, dtype)

    def feeds(step: np.ndarray, total: int, present: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {"input_ids": step, "attention_mask": np.ones((batch, total), np.int64)}
        if "position_ids" in inputs:
            positions = np.tile(np.arange(total - step.shape[1], total), (batch, 1)).astype(np.int64)
            if len(inputs["position_ids"].shape) == 3:  # multimodal rotary [3, batch, seq]: text = same ids
                positions = np.stack([positions] * inputs["position_ids"].shape[0])
            feed["position_ids"] = positions
        for name in states:
            feed[name] = present[present_name(name)]
        return feed

    assert len([s for s in states if s.startswith("past_key_values.")]) <= 2 * layers, states
    start = {present_name(name): empty(name) for name in states}
    first = dict(zip(names, session.run(None, feeds(ids[:, :prompt], prompt, start))))
    second = dict(zip(names, session.run(None, feeds(ids[:, prompt:], prompt + 1, first))))
    return first, second
