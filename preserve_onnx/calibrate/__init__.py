"""`preserve-onnx calibrate`: measure on a CUDA GPU what the cost model assumes, and check the model.

Measured (docs/calibrate.md): the HBM streaming-read bandwidth, read bandwidth against working set
(the L2's bandwidth and its usable share), the fp16 peak of a cuBLAS product, the tokens per step at
which an fp16 GEMV turns compute-bound, and what a prefetch of a GEMV's weight beside a stand-in
collective (a spin kernel) saves. The result is a hardware profile in ``hardware.toml``'s format, the
published figures kept beside the measured ones, and each case's measured saving next to the cost
model's prediction.

CuPy is imported only when a measurement starts; everything but ``measure`` runs without a GPU.
"""

from __future__ import annotations

from typing import Callable

from preserve_onnx.calibrate.analysis import (
    Calibration,
    ComparisonRow,
    MaxTokens,
    evaluate_measurements,
    published_profile,
)
from preserve_onnx.calibrate.plan import Settings, device_index
from preserve_onnx.calibrate.profile import calibrated_toml, profile_toml
from preserve_onnx.calibrate.results import Measurements

__all__ = [
    "Calibration",
    "ComparisonRow",
    "MaxTokens",
    "Measurements",
    "Settings",
    "calibrate",
    "calibrated_toml",
    "evaluate_measurements",
    "profile_toml",
    "published_profile",
]


def calibrate(
    device: str = "cuda:0",
    name: str | None = None,
    settings: Settings = Settings(),
    command: str = "preserve-onnx calibrate",
    log: Callable[[str], None] = lambda _: None,
) -> Calibration:
    """Measure on ``device`` and check the cost model; ``name`` picks the published profile to start from
    (default: the built-in one the GPU's name matches)."""
    from preserve_onnx.calibrate.kernels import load_cupy
    from preserve_onnx.calibrate.measure import device_name, measure, open_device

    index = device_index(device)
    if name is not None:
        published = published_profile("", name)  # an unknown name fails before CuPy is imported
    cp = load_cupy()
    if name is None:  # an unknown GPU fails before a minute of measuring
        published = published_profile(device_name(open_device(cp, index)), None)
    m = measure(index, settings, command, log)
    return evaluate_measurements(m, published, settings)
