"""Chain safety (docs/design.md §9, docs/chain-safety.md): each tool a user chains with preserve-onnx, applied
to the committed real-exporter ranks before or after `optimize`, as a user would. Every cell checks that the
Prefetch chains are intact (verify-prefetches on every rank, Prefetch's function kept), that no link is stale
(or, after a quantizer, that optimize names the stale links and `--replan` mends them), and that
`run --against` the same tool applied to the original ranks is PASSED: bit-identical.

Tools run on both ranks of a sample; the tools' versions are pinned in pyproject.toml's `test` extra.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.config import PrefetchNaming
from preserve_onnx.model_io import is_rank_file, load_model
from preserve_onnx.passes import VerifyPrefetchesPass
from preserve_onnx.passes.insert_prefetches import prefetch_functions
from preserve_onnx.passes.verify_prefetches import stale_links
from tests.conftest import SAMPLES

runner = CliRunner()
EXPORTS = SAMPLES / "exporters"
RANKS = ("model_00.onnx", "model_01.onnx")


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


# -- the tools, each applied to one rank file -----------------------------------------------------------


def save(model: onnx.ModelProto, dst: Path) -> None:
    onnx.save(
        model,
        dst,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=dst.name + ".data",
        size_threshold=1024,
    )


def onnxslim_tool(src: Path, dst: Path) -> None:
    import onnxslim

    save(onnxslim.slim(onnx.load(src)), dst)


def graphsurgeon_tool(src: Path, dst: Path) -> None:
    import onnx_graphsurgeon as gs

    save(gs.export_onnx(gs.import_onnx(onnx.load(src))), dst)


def onnxoptimizer_tool(src: Path, dst: Path) -> None:
    import onnxoptimizer

    save(onnxoptimizer.optimize(onnx.load(src)), dst)


def shape_inference_tool(src: Path, dst: Path) -> None:
    save(onnx.shape_inference.infer_shapes(onnx.load(src)), dst)


def symbolic_shape_tool(src: Path, dst: Path) -> None:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # Without auto_merge / guess_output_rank: an untyped output fails it ("Incomplete symbolic shape
    # inference").
    save(SymbolicShapeInference.infer_shapes(onnx.load(src), auto_merge=False, guess_output_rank=False), dst)


def transformer_optimizer_tool(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    save(optimize_model(str(src), model_type="gpt2", opt_level=0).model, dst)


def offline_optimization_tool(src: Path, dst: Path) -> None:
    """onnxruntime's offline optimization (SessionOptions.optimized_model_filepath), the runtime's library
    registered as `run` registers it (a rank model's AllReduce needs it)."""
    import onnxruntime as ort

    from preserve_onnx.runtime.options import session_options

    options = session_options(
        rank=0,
        world=2,
        group=f"chain-{dst.parent.name}-{dst.name}",
        level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        threads=1,
        timeout_s=10,
        prefetch=("preserve", "Prefetch"),
    )
    options.optimized_model_filepath = str(dst)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", dst.name + ".data"
    )
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def quantize_dynamic_tool(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    # What its error message asks for on a rank model (a MatMul feeding an AllReduce, which ONNX shape
    # inference leaves untyped): "Unable to find data type for weight_name=... use DefaultTensorType".
    quantize_dynamic(
        src, dst, use_external_data_format=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}
    )


def matmul_nbits_tool(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=True)
    quantizer.process()
    save(quantizer.model.model, dst)


def float16_tool(src: Path, dst: Path) -> None:
    """onnxruntime's float16 conversion as its OnnxModel runs it: types from symbolic shape inference, and
    sorted when saved (the bare convert_float_to_float16 appends its input Casts after their readers, which
    optimize refuses: the graph is not in topological order)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(src))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst), use_external_data_format=True)


@dataclass(frozen=True)
class Tool:
    apply: Callable[[Path, Path], None]
    samples: tuple[str, ...]
    stales_links: bool = False  # after optimize its links go stale (it replaces weights or rewires inputs)
    drops_functions: bool = False  # writes no model-local function: --replan puts Prefetch's back


TOOLS = {
    "onnxslim": Tool(onnxslim_tool, ("torch-llama-fp32", "genai-llama-fp32")),
    "graphsurgeon": Tool(graphsurgeon_tool, ("torch-llama-dynamo-fp32", "genai-llama-int4")),
    "onnxoptimizer": Tool(onnxoptimizer_tool, ("torch-llama-fp32",)),
    "shape-inference": Tool(shape_inference_tool, ("torch-llama-dynamo-fp32", "genai-qwen2-fp32")),
    "symbolic-shape-inference": Tool(symbolic_shape_tool, ("torch-llama-fp32", "torch-llama-dynamo-fp32")),
    "transformer-optimizer": Tool(transformer_optimizer_tool, ("torch-llama-fp32",)),
    "offline-optimization": Tool(
        offline_optimization_tool, ("torch-llama-fp32", "genai-llama-fp32"), drops_functions=True
    ),
    "quantize-dynamic": Tool(
        quantize_dynamic_tool, ("torch-llama-fp32", "genai-llama-fp32"), stales_links=True
    ),
    "matmul-nbits": Tool(matmul_nbits_tool, ("torch-llama-fp32", "genai-llama-fp32"), stales_links=True),
    "float16": Tool(float16_tool, ("torch-llama-fp32", "genai-llama-fp32"), stales_links=True),
}
CELLS = [(tool, sample) for tool, t in TOOLS.items() for sample in t.samples]


def test_the_expected_table_covers_every_cell():
    assert list(EXPECTED) == CELLS


def apply_dir(tool: str, src: Path, dst: Path) -> Path:
    """``tool`` on every rank file of ``src`` into ``dst``; the folder's other files are copied along."""
    dst.mkdir(parents=True)
    for entry in sorted(src.iterdir()):
        if not is_rank_file(entry.name) and not entry.name.endswith(".data"):
            shutil.copy(entry, dst / entry.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            for name in RANKS:
                TOOLS[tool].apply(src / name, dst / name)
        finally:
            logging.disable(logging.NOTSET)
    return dst


# -- what every cell checks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    prefetches: int  # per rank (the same on both)
    stale: int
    function: bool  # Prefetch's definition is still in the model


def chain(folder: Path) -> Chain:
    """Verifies every rank's Prefetch chains (well formed, each ending at its collective) and counts them;
    a rank with stale links is only counted (verify refuses a link to a computed tensor by design)."""
    seen = set()
    for name in RANKS:
        model = load_model(folder / name)
        links = stale_links(model)
        if not links.stale:
            # verify raises on a broken chain
            assert VerifyPrefetchesPass(model)(model).stats.prefetches == links.total
        seen.add(Chain(links.total, len(links.stale), bool(prefetch_functions(model, PrefetchNaming()))))
    assert len(seen) == 1, seen
    return seen.pop()


# The float16 converter puts a Cast between each KV-cache input and its reader, which hides the builder
# export's kv_cache_dim from run's feed binding (its own limit, not the chain's): given here as a user would.
RUN_ARGS = {("float16", "genai-llama-fp32"): ("--dim", "kv_cache_dim=16")}


def passed(folder: Path, against: Path, tool: str, sample: str) -> str:
    r = cli("run", folder, "--against", against, "-q", *RUN_ARGS.get((tool, sample), ()))
    assert r.exit_code == 0, r.output
    return r.output.splitlines()[0]


PASSED = "PASSED: 10 outputs on 2 rank(s) bit-identical to {} after 1 step(s) (max abs diff 0)"


@pytest.fixture(scope="module", autouse=True)
def _tools_write_into_a_temporary_folder(tmp_path_factory):
    """Some tools write scratch files into the current directory (symbolic shape inference's
    sym_shape_infer_temp.onnx, the transformer optimizer's external data under a random name): run the
    module elsewhere, so that the checkout stays clean."""
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(here)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Results shared by the cells: optimized samples and each tool applied to each original sample."""
    root = tmp_path_factory.mktemp("chain")
    cache: dict[tuple, Path] = {}

    def optimized(sample: str) -> Path:
        if ("opt", sample) not in cache:
            dst = root / f"opt-{sample}"
            assert cli("optimize", EXPORTS / sample / "tp2", dst, "-q").exit_code == 0
            cache["opt", sample] = dst
        return cache["opt", sample]

    def tooled(tool: str, sample: str) -> Path:
        if ("tool", tool, sample) not in cache:
            cache["tool", tool, sample] = apply_dir(tool, EXPORTS / sample / "tp2", root / f"{tool}-{sample}")
        return cache["tool", tool, sample]

    return root, optimized, tooled


# Per rank: (stale links the tool leaves after optimize, Prefetch links at the end of "tool after optimize"
# (after --replan where the tool stales links or drops the function), links of "optimize after the tool").
# optimize alone plans 13 links per rank on every sample here but genai-llama-int4 (22).
EXPECTED = {
    ("onnxslim", "torch-llama-fp32"): (0, 13, 13),
    ("onnxslim", "genai-llama-fp32"): (0, 13, 13),
    ("graphsurgeon", "torch-llama-dynamo-fp32"): (0, 13, 13),
    ("graphsurgeon", "genai-llama-int4"): (0, 22, 22),
    ("onnxoptimizer", "torch-llama-fp32"): (0, 13, 13),
    ("shape-inference", "torch-llama-dynamo-fp32"): (0, 13, 13),
    ("shape-inference", "genai-qwen2-fp32"): (0, 13, 13),
    ("symbolic-shape-inference", "torch-llama-fp32"): (0, 13, 13),
    ("symbolic-shape-inference", "torch-llama-dynamo-fp32"): (0, 13, 13),
    ("transformer-optimizer", "torch-llama-fp32"): (0, 13, 13),
    ("offline-optimization", "torch-llama-fp32"): (0, 13, 13),
    ("offline-optimization", "genai-llama-fp32"): (0, 13, 13),
    # The quantizers replace 11 of the TorchScript export's 13 linked weights (9 of the builder's); the
    # re-plan links the quantized weights, their scales and zero points.
    ("quantize-dynamic", "torch-llama-fp32"): (11, 24, 24),
    ("quantize-dynamic", "genai-llama-fp32"): (9, 22, 22),
    ("matmul-nbits", "torch-llama-fp32"): (11, 24, 24),
    ("matmul-nbits", "genai-llama-fp32"): (9, 22, 22),
    # The converter casts the two KV-cache inputs the links read; on the builder export the re-plan fits
    # 11 links in the budget (float16 KV behind a Cast).
    ("float16", "torch-llama-fp32"): (2, 13, 13),
    ("float16", "genai-llama-fp32"): (2, 11, 11),
}


def data_sizes(folder: Path) -> list[int]:
    return [(folder / f"{name}.data").stat().st_size for name in RANKS]


@pytest.mark.parametrize("tool, sample", CELLS)
def test_tool_after_optimize(tool, sample, work, tmp_path):
    _, optimized, tooled = work
    stale, final, _ = EXPECTED[tool, sample]
    opt = optimized(sample)
    planned = 22 if sample == "genai-llama-int4" else 13
    assert chain(opt) == Chain(planned, 0, True)
    out = apply_dir(tool, opt, tmp_path / "after")
    # The tool keeps every link and its chain; a quantizer's links now hint weights nothing reads.
    assert chain(out) == Chain(planned, stale, not TOOLS[tool].drops_functions)
    if TOOLS[tool].stales_links:
        refused = cli("optimize", out, tmp_path / "refused", "-q")
        assert refused.exit_code == 1
        head = f"error: model_00.onnx: {stale} of {planned} Prefetch links are stale: "
        assert refused.output.startswith(head)
        assert refused.output.endswith("; run optimize --replan; nothing was written\n")
    if TOOLS[tool].stales_links or TOOLS[tool].drops_functions:
        r = cli("optimize", out, tmp_path / "replanned", "--replan", "-q")
        assert r.exit_code == 0, r.output
        out = tmp_path / "replanned"
    assert chain(out) == Chain(final, 0, True)
    reference = tooled(tool, sample)
    assert passed(out, reference, tool, sample) == PASSED.format(reference)
    # The initializers only stale links read are gone, data included: the files are the tool's own size.
    assert data_sizes(out) == data_sizes(reference)


@pytest.mark.parametrize("tool, sample", CELLS)
def test_tool_before_optimize(tool, sample, work, tmp_path):
    reference = work[2](tool, sample)
    r = cli("optimize", reference, tmp_path / "opt", "-q")
    assert r.exit_code == 0, r.output
    assert chain(tmp_path / "opt") == Chain(EXPECTED[tool, sample][2], 0, True)
    assert passed(tmp_path / "opt", reference, tool, sample) == PASSED.format(reference)


# -- the measured failures, each on its own ------------------------------------------------------


def prefetch_outputs(model: onnx.ModelProto) -> list[str]:
    return [n.output[0] for n in model.graph.node if n.op_type == "Prefetch"]


@pytest.mark.parametrize("sample", ["torch-llama-fp32", "torch-llama-dynamo-fp32"])
def test_both_shape_inferences_type_every_prefetch_output(sample, work):
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(work[1](sample) / "model_00.onnx")
    outputs = prefetch_outputs(model)
    assert len(outputs) == 13
    for inferred in (
        onnx.shape_inference.infer_shapes(model),
        SymbolicShapeInference.infer_shapes(model, auto_merge=False, guess_output_rank=False),
    ):
        types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
        assert [types.get(name) for name in outputs] == [onnx.TensorProto.FLOAT] * 13


def test_symbolic_shape_inference_fails_without_the_function(work):
    """The negative: the issue's "Incomplete symbolic shape inference" on a rank without the definition."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(work[1]("torch-llama-fp32") / "model_00.onnx")
    del model.functions[:]
    with pytest.raises(Exception, match="^Incomplete symbolic shape inference$"):
        SymbolicShapeInference.infer_shapes(model, auto_merge=False, guess_output_rank=False)


def test_the_transformer_optimizer_fuses_what_it_fuses_on_the_original(work):
    from onnxruntime.transformers.optimizer import optimize_model

    def fused(path: Path) -> dict[str, int]:
        logging.disable(logging.WARNING)
        try:
            stats = optimize_model(str(path), model_type="gpt2", opt_level=0).get_fused_operator_statistics()
        finally:
            logging.disable(logging.NOTSET)
        return {op: n for op, n in stats.items() if n}

    original = fused(EXPORTS / "torch-llama-fp32" / "tp2" / "model_00.onnx")
    assert original == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4}
    assert fused(work[1]("torch-llama-fp32") / "model_00.onnx") == original


def test_the_registered_kernel_runs_not_the_function(work, tmp_path):
    """onnxruntime resolves Prefetch to the runtime library's kernel, not to the model's function (which a
    runtime without the op would inline): the same hints with and without the function."""
    from preserve_onnx.runtime.library import prefetch_counters

    opt = work[1]("torch-llama-fp32")
    bare = tmp_path / "bare"
    shutil.copytree(opt, bare)
    for name in RANKS:
        model = onnx.load(bare / name, load_external_data=False)
        del model.functions[:]
        onnx.save(model, bare / name)
    issued = []
    for folder in (opt, bare):
        before = prefetch_counters()
        assert passed(folder, EXPORTS / "torch-llama-fp32" / "tp2", "", "").startswith("PASSED")
        issued.append((prefetch_counters() - before).issued)
    assert issued == [26, 26]  # 13 links on each of 2 ranks, one step
