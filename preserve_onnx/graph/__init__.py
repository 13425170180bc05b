"""The graph facts every command uses (docs/design.md §2): one layer that the passes, ``shard``, the cost
model and the runtime import, so no module re-derives them.

- :mod:`preserve_onnx.graph.index`: graphs and scopes, tensor sizes, attributes, :class:`GraphIndex`;
- :mod:`preserve_onnx.graph.structure`: the consumer table, the attention-op table, the structural
  KV-cache, attention cores, linear layers' widths;
- :mod:`preserve_onnx.graph.dims`: symbolic-dim binding and message sizes.

Nothing here reads weight bytes except :meth:`GraphIndex.constant` through the reader ``shard`` gives it.
"""
