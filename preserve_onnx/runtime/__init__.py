"""Reference CPU runtime: run tensor-parallel rank models with the project's custom-op library.

Invariant: nothing here changes a value. The C++ kernels (``csrc/preserve_ops.cc``) make ``Prefetch``
a byte-exact pass-through and ``AllReduce`` a fixed-order sum, so a model optimized by preserve-onnx
must run bit-identical to its original; :func:`compare_outputs` checks exactly that.
"""

from preserve_onnx.runtime.compare import Comparison, TwinComparison, compare_outputs, max_abs_diff
from preserve_onnx.runtime.decode import run_steps
from preserve_onnx.runtime.feeds import generate_feeds, layout_of, load_feeds, save_outputs
from preserve_onnx.runtime.library import library_path
from preserve_onnx.runtime.runner import RunResult, run_models
from preserve_onnx.runtime.session import RankSession
from preserve_onnx.runtime.twin import run_twin
from preserve_onnx.runtime.values import TensorMeta

__all__ = [
    "Comparison",
    "RankSession",
    "RunResult",
    "TensorMeta",
    "TwinComparison",
    "compare_outputs",
    "generate_feeds",
    "layout_of",
    "library_path",
    "load_feeds",
    "max_abs_diff",
    "run_models",
    "run_steps",
    "run_twin",
    "save_outputs",
]
