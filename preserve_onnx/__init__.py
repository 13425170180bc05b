"""preserve-onnx: PRESERVE prefetching for tensor-parallel ONNX LLM graphs.

Public API::

    model, plan = preserve_onnx.optimize("model_00.onnx", OptimizeConfig(budget=96 << 20))
    original = preserve_onnx.strip(model)
    report = preserve_onnx.inspect("model_00.onnx")          # collectives, windows, candidates, plan
    changes = preserve_onnx.diff("original/", "optimized/")  # structural diff; .equal, .models
"""

from preserve_onnx.config import OptimizeConfig, PrefetchNaming
from preserve_onnx.diffing import Diff, diff
from preserve_onnx.errors import PassError, PreserveError
from preserve_onnx.hardware import HardwareProfile, load_profile
from preserve_onnx.inspection import Inspection, inspect, inspect_path
from preserve_onnx.model_io import load_model, save_model
from preserve_onnx.optimizer import optimize, optimize_path, strip

__all__ = [
    "Diff", "HardwareProfile", "Inspection", "OptimizeConfig", "PassError", "PrefetchNaming", "PreserveError",
    "diff", "inspect", "inspect_path", "load_model", "load_profile", "optimize", "optimize_path", "save_model",
    "strip",
]
__version__ = "0.1.0"
