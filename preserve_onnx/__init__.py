"""preserve-onnx: PRESERVE prefetching for tensor-parallel ONNX LLM graphs.

Public API::

    model, plan = preserve_onnx.optimize("model_00.onnx", OptimizeConfig(budget=96 << 20))
    original = preserve_onnx.strip(model)
    report = preserve_onnx.inspect("model_00.onnx")          # collectives, windows, candidates, plan
    changes = preserve_onnx.diff("original/", "optimized/")  # structural diff; .equal, .models

The names are imported on first use (PEP 562), so ``import preserve_onnx.optimizer`` (a worker
process, the CLI's optimize) does not also load the diff and inspect modules.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "OptimizeConfig": "config",
    "PrefetchNaming": "config",
    "Diff": "diffing",
    "diff": "diffing",
    "PassError": "errors",
    "PreserveError": "errors",
    "HardwareProfile": "hardware",
    "load_profile": "hardware",
    "Inspection": "inspection",
    "inspect": "inspection",
    "inspect_path": "inspection",
    "load_model": "model_io",
    "save_model": "model_io",
    "optimize": "optimizer",
    "optimize_path": "optimizer",
    "strip": "optimizer",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'preserve_onnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"preserve_onnx.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
