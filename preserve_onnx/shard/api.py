"""``shard``: a single-device decoder export -> N tensor-parallel rank models (docs/design.md §8).

Output: ``OUT/model_00.onnx`` ... ``model_{N-1:02d}.onnx``, each with ``model_0r.onnx.data``, plus the
other files of MODEL's folder (tokenizer files, ...) copied unchanged, and ``genai_config.json`` with
the decoder's head counts per rank. Everything is built in a staged folder beside OUT
(model_io.staged_directory) and renamed into place: a refusal or a failure leaves nothing.
Weights are read through memory maps and written tensor by tensor; the model's weights are never held.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from preserve_onnx.errors import PreserveError, UsageError
from preserve_onnx.graph.index import iter_graphs
from preserve_onnx.model_io import external_info, load_model, resolve_single, staged_directory
from preserve_onnx.shard.cutting import rank_value
from preserve_onnx.shard.planning import ShardPlan, plan_shards
from preserve_onnx.shard.tensors import DataWriter, TensorReader


@dataclass(frozen=True)
class ShardResult:
    """What ``shard`` wrote: the rank files, and the layout it found (counts for the closing line)."""

    out: Path
    files: tuple[Path, ...]
    world: int
    column_parallel: int
    row_parallel: int
    vocab_parallel: bool
    bytes_written: int
    seconds: float
    expert_layers: int = 0  # MoE / QMoE nodes split on their intermediate axis (one AllReduce each)
    state_layers: int = 0  # state-carrying nodes (hybrid layers) computed whole on every rank

    @property
    def allreduces(self) -> int:
        """AllReduce nodes per rank: one per row-parallel linear and one per MoE layer."""
        return self.row_parallel + self.expert_layers


def _check_out(model_file: Path, out: Path) -> None:
    folder = model_file.parent.resolve()
    target = out.resolve()
    if target == folder or folder in target.parents:
        raise PreserveError(
            f"OUT {out} is inside MODEL's folder {model_file.parent}; choose a folder elsewhere"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PreserveError(f"OUT {out} exists and is not an empty folder")
    if not out.parent.is_dir():
        raise PreserveError(f"cannot write {out}: folder {out.parent} does not exist")


def _companions(model_file: Path, model: onnx.ModelProto) -> list[Path]:
    """Files of MODEL's folder to copy along: everything but ONNX files and the model's data files."""
    data = {
        external_info(t).get("location", "")
        for _, g in iter_graphs(model)
        for t in g.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    return sorted(
        p
        for p in model_file.parent.iterdir()
        if p.is_file() and p.suffix != ".onnx" and p.name not in data and not p.name.startswith(".")
    )


def genai_config(path: Path, tp: int) -> str:
    """onnxruntime-genai's config with the decoder's head counts per rank (what each rank model's
    KV-cache inputs hold); every other field unchanged."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PreserveError(f"{path}: not readable as JSON ({exc})") from None
    decoder = config.get("model", {}).get("decoder", {}) if isinstance(config, dict) else {}
    for key in ("num_attention_heads", "num_key_value_heads"):
        if isinstance(decoder.get(key), int):
            decoder[key] //= tp
    return json.dumps(config, indent=4) + "\n"


def _write_ranks(
    plan: ShardPlan, source: onnx.ModelProto, reader: TensorReader, world: int, folder: Path
) -> tuple[list[Path], int]:
    """Every rank's model and data file, in one pass over the source tensors (each is read once).
    Initializers of every graph are written (a subgraph may hold its own weights)."""
    models, writers = [], []
    try:
        for rank in range(world):
            model = onnx.ModelProto()
            model.CopyFrom(plan.model)
            models.append(model)
            writers.append(DataWriter(folder / f"model_{rank:02d}.onnx.data", f"model_{rank:02d}.onnx.data"))
        # Graphs in the same order in the source, the plan and every rank (the rewrite adds no subgraph).
        rank_graphs = [[g for _, g in iter_graphs(m)] for m in models]
        for index, ((_, planned), (_, original)) in enumerate(
            zip(iter_graphs(plan.model), iter_graphs(source))
        ):
            tensors = {t.name: t for t in original.initializer}
            for k, t in enumerate(planned.initializer):
                src = tensors.get(t.name)
                if src is None:  # a constant the rewrite added: already inline, same on every rank
                    continue
                full = reader.array(src)
                for rank in range(world):
                    value = rank_value(full, plan.cuts.get(t.name), world, rank, t.data_type, t.name)
                    target = rank_graphs[rank][index].initializer[k]
                    writers[rank].write(target, value, after_chunk=reader.release, locate=reader.locate)
                del full
                reader.release()
    finally:
        for writer in writers:
            writer.close()
    paths = []
    for rank, (model, writer) in enumerate(zip(models, writers)):
        if writer.size == 0:
            (folder / f"model_{rank:02d}.onnx.data").unlink()
        for key, value in (("preserve.shard.world", str(world)), ("preserve.shard.rank", str(rank))):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        paths.append(folder / f"model_{rank:02d}.onnx")
        paths[-1].write_bytes(model.SerializeToString())
    return paths, sum(w.size for w in writers)


def shard_model(
    model: Path, out: Path, tp: int, *, vocab_parallel: bool = False, dims: dict[str, int] | None = None
) -> ShardResult:
    """Write ``tp`` rank models of ``model`` into the new folder ``out``. PreserveError on any refusal."""
    start = time.perf_counter()
    if tp < 2:
        raise UsageError("--tp must be at least 2")
    model_file = resolve_single(Path(model))
    out = Path(out)
    _check_out(model_file, out)
    proto = load_model(model_file)
    reader = TensorReader(model_file.parent)
    plan = plan_shards(proto, tp, vocab_parallel=vocab_parallel, dims=dims, read=reader.array)
    with staged_directory(out) as tmp:  # OUT is absent or empty (checked): replaced when complete
        try:
            paths, total = _write_ranks(plan, proto, reader, tp, tmp)
        finally:
            reader.close()
        files = [out / p.name for p in paths]
        for extra in _companions(model_file, proto):
            if extra.name == "genai_config.json":
                (tmp / extra.name).write_text(genai_config(extra, tp))
            else:
                shutil.copy2(extra, tmp / extra.name)
    layouts = plan.layouts
    return ShardResult(
        out,
        tuple(files),
        tp,
        sum(len(x.columns) for x in layouts),
        sum(len(x.rows) for x in layouts),
        vocab_parallel,
        total,
        time.perf_counter() - start,
        sum(len(x.experts) for x in layouts),
        sum(len(x.state_layers) for x in layouts),
    )
