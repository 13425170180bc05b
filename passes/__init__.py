"""The pass library: one pass (or analysis) per module, installed as ``preserve_onnx.passes``.

Analyses return frozen data; transform passes return ``PassResult``. Passes never execute models and
never render output.
"""

from preserve_onnx.passes.build_windows import Window, build_windows
from preserve_onnx.passes.check_order import CheckOrderPass
from preserve_onnx.passes.collect_candidates import Candidate, Skipped, WindowCandidates, collect_candidates
from preserve_onnx.passes.drop_stale_weights import DropStaleWeightsPass
from preserve_onnx.passes.insert_prefetches import InsertPrefetchesPass
from preserve_onnx.passes.plan_prefetches import Plan, PlannedPrefetch, WindowPlan, plan_prefetches
from preserve_onnx.passes.strip_prefetches import StripPrefetchesPass
from preserve_onnx.passes.verify_prefetches import VerifyPrefetchesPass

__all__ = [
    "Candidate",
    "CheckOrderPass",
    "DropStaleWeightsPass",
    "InsertPrefetchesPass",
    "Plan",
    "PlannedPrefetch",
    "Skipped",
    "StripPrefetchesPass",
    "VerifyPrefetchesPass",
    "Window",
    "WindowCandidates",
    "WindowPlan",
    "build_windows",
    "collect_candidates",
    "plan_prefetches",
]
