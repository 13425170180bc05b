"""Tensor-parallel rank models from single-device decoder exports (docs/design.md §8).

Its own package beside the passes: it reads and writes weight bytes, which the optimizer never does.
"""

from preserve_onnx.shard.api import ShardResult, shard_model

__all__ = ["ShardResult", "shard_model"]
