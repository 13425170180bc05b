"""`run --twin`: the 2-rank sharded samples against their single-device twins (docs/design.md §5, §8).

Tolerances (README, "run --twin"): float32 1e-4 absolute, float16 2e-2, bfloat16 0.16, integers exact.
The qdq sample runs at the 'basic' optimization level: above it, onnxruntime rewrites
DequantizeLinear+MatMul into MatMulNBits that quantize activations in 32-wide blocks along K, which
a rank's half of a row-parallel K does not align with, so sharded and single round differently
(a property of onnxruntime, not of the sharding; the FAILED line says so, tested below).
"""

import re
import shutil

import ml_dtypes
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.errors import PreserveError
from preserve_onnx.runtime import RankSession, generate_feeds
from preserve_onnx.runtime.compare import TwinCheck
from preserve_onnx.runtime.twin import (
    default_atol,
    input_split_axis,
    output_checks,
    quantizes_activations,
    run_twin,
    summarize,
)
from preserve_onnx.runtime.values import TensorMeta
from tests.conftest import SAMPLE_VARIANTS, SAMPLES

runner = CliRunner()
PASSED = re.compile(
    r"^PASSED: (\d+) outputs on (\d) rank\(s\) match (\S+) within tolerance after 3 step\(s\); "
    r"worst: rank (\d) '([\w.]+)' at step (\d), max abs diff (\S+) \(atol (\S+)\)$"
)
LEVEL = {"llama-qdq": "basic"}
# Every committed (ranks, single-device model) pair: our generator's samples, and the real exporters'
# samples with their `shard` outputs (sample_models/exporters/<name>/tp2, tp4).
EXPORTERS = SAMPLES / "exporters"
PAIRS = [(f"{v}/tp2", SAMPLES / v / "tp2", SAMPLES / v / "full") for v in SAMPLE_VARIANTS] + [
    (f"exporters/{e.name}/{tp.name}", tp, e / "full")
    for e in sorted(EXPORTERS.iterdir())
    if e.is_dir() and (e / "full").is_dir()
    for tp in sorted(e.glob("tp*"))
    if tp.is_dir()
]
ATOL = {onnx.TensorProto.FLOAT: 1e-4, onnx.TensorProto.FLOAT16: 2e-2}


def level(variant: str) -> str:
    return LEVEL.get(variant, "all")


def kv_names(variant: str) -> list[str]:
    if variant == "gpt-attention":
        return ["present_0", "present_1"]
    return [f"present.{i}.{kv}" for i in (0, 1) for kv in ("key", "value")]


def invoke(*args: str):
    return runner.invoke(app, ["run", *map(str, args)])


@pytest.mark.parametrize(("ranks", "full"), [p[1:] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_every_committed_pair_passes_against_its_twin_on_the_cli(ranks, full):
    result = invoke(
        ranks,
        "--twin",
        full,
        "--steps",
        3,
        "--batch",
        2,
        "--context",
        8,
        "--opt-level",
        level(full.parent.name),
        "-q",
    )
    assert result.exit_code == 0, result.output
    match = PASSED.match(result.output.strip())
    assert match, result.output
    outputs, world, twin, _, name, _, diff, atol = match.groups()
    graph = onnx.load(next(full.glob("*.onnx")), load_external_data=False).graph
    assert int(world) == len(list(ranks.glob("*.onnx")))
    assert int(outputs) == int(world) * len(graph.output)
    assert twin == str(full)
    int8_activations = quantizes_activations(onnx.load(next(full.glob("*.onnx")), load_external_data=False))
    assert float(atol) == max(
        ATOL[graph.output[0].type.tensor_type.elem_type], 2e-2 if int8_activations else 0
    )
    assert name in [o.name for o in graph.output]
    assert 0 <= float(diff) <= float(atol)


@pytest.mark.parametrize("variant", SAMPLE_VARIANTS)
def test_kv_outputs_are_sharded_and_logits_replicated_bit_for_bit(variant):
    result = run_twin(
        SAMPLES / variant / "tp2",
        SAMPLES / variant / "full",
        steps=3,
        batch=2,
        context=8,
        seed=3,
        opt_level=level(variant),
    )
    assert result.twin.passed
    assert result.twin.failing == ()
    assert result.twin.sharded == tuple(sorted(kv_names(variant)))
    assert result.twin.outputs == 2 * (1 + len(kv_names(variant)))
    # The KV-cache grew by one token per step: 8 past + 3 new, one KV head per rank.
    present = result.outputs[1][kv_names(variant)[0]]
    assert present.shape == ((2, 2, 2, 11, 16) if variant == "gpt-attention" else (2, 1, 11, 16))
    # The ranks agree with each other bit for bit on everything the AllReduce produced.
    assert result.outputs[0]["logits"].tobytes() == result.outputs[1]["logits"].tobytes()


def test_feeds_from_a_file_are_concatenated_for_the_twin(tmp_path):
    tp2 = SAMPLES / "llama-gqa" / "tp2"
    with RankSession([tp2 / "model_00.onnx", tp2 / "model_01.onnx"]) as session:
        shared, per_rank = generate_feeds(session, batch=1, context=5, seed=11)
    arrays = dict(shared)
    arrays.update(
        {f"rank{r}/{name}": value for r, feeds in per_rank.items() for name, value in feeds.items()}
    )
    np.savez(tmp_path / "feeds.npz", **arrays)
    result = invoke(tp2, "--twin", SAMPLES / "llama-gqa" / "full", "--inputs", tmp_path / "feeds.npz")
    assert result.exit_code == 0, result.output
    assert "1x1x6x16" in result.output  # present: 5 past tokens + 1, one KV head per rank
    assert result.output.strip().splitlines()[-1].startswith("PASSED: 10 outputs on 2 rank(s) match ")


def corrupted_ranks(tmp_path):
    """llama-gqa's ranks with rank 1's layer-1 v_proj weight zeroed: only its new values go wrong."""
    ranks = tmp_path / "tp2"
    shutil.copytree(SAMPLES / "llama-gqa" / "tp2", ranks)
    model = onnx.load(ranks / "model_01.onnx")
    weight = next(t for t in model.graph.initializer if t.name == "model.layers.1.attn.v_proj.MatMul.weight")
    weight.CopyFrom(
        onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(weight)), weight.name)
    )
    (ranks / "model_01.onnx.data").unlink()
    onnx.save_model(model, ranks / "model_01.onnx", save_as_external_data=True, location="model_01.onnx.data")
    return ranks


def test_a_corrupted_rank_fails_naming_its_output(tmp_path):
    ranks = corrupted_ranks(tmp_path)
    full = SAMPLES / "llama-gqa" / "full"
    result = run_twin(ranks, full)
    # Rank 1 returns zeros for its KV head's new token of layer 1: the difference is that token's
    # values, which the intact rank 1 returns (within float32 rounding of the single model's).
    intact = run_twin(SAMPLES / "llama-gqa" / "tp2", full).outputs[1]["present.1.value"][:, :, -1]
    c = result.twin
    assert not c.passed
    assert (c.worst.step, c.worst.rank, c.worst.name) == (1, 1, "present.1.value")
    assert c.worst.diff == pytest.approx(float(np.abs(intact).max()), abs=1e-5)
    assert c.worst.diff > 1
    assert c.failing == ((0, "logits"), (1, "logits"), (1, "present.1.value"))
    cli = invoke(ranks, "--twin", full, "-q")
    assert cli.exit_code == 1
    assert cli.output.strip() == (
        f"FAILED: 3 of 10 outputs beyond tolerance of {full}; worst: rank 1 "
        f"'present.1.value', max abs diff {c.worst.diff:g} (atol 0.0001)"
    )


def test_atol_overrides_the_dtype_default(tmp_path):
    ranks = corrupted_ranks(tmp_path)
    full = SAMPLES / "llama-gqa" / "full"
    result = invoke(ranks, "--twin", full, "--atol", 100, "-q")
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("(atol 100)")


def test_qdq_above_basic_fails_with_the_onnxruntime_hint():
    variant = SAMPLES / "llama-qdq"
    result = invoke(variant / "tp2", "--twin", variant / "full", "-q")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"FAILED: 6 of 10 outputs beyond tolerance of {variant / 'full'}; worst: ")
    assert lines[1] == (
        "hint: at this --opt-level onnxruntime rewrites DequantizeLinear -> MatMul into MatMulNBits "
        "that quantize activations in 32-wide blocks, which a rank's share of K need not align "
        "with: compare with --opt-level basic"
    )


def error_line(result) -> str:
    (line,) = result.output.strip().splitlines()
    return line


def test_a_twin_with_other_inputs_is_refused():
    full = SAMPLES / "gpt-attention" / "full"
    result = invoke(SAMPLES / "llama-gqa" / "tp2", "--twin", full)
    assert result.exit_code == 1
    assert error_line(result) == (
        f"error: --twin {full / 'model.onnx'}: its inputs differ from rank 0's (only in the single model: "
        "past_0, past_1; only in the rank: past_key_values.0.key, past_key_values.0.value, "
        "past_key_values.1.key, past_key_values.1.value): is it the model the ranks were sharded from?"
    )


def test_a_twin_of_another_dtype_is_refused():
    full = SAMPLES / "llama-gqa-fp16" / "full"
    result = invoke(SAMPLES / "llama-gqa" / "tp2", "--twin", full)
    assert result.exit_code == 1
    assert error_line(result) == (
        f"error: --twin {full / 'model.onnx'}: input 'past_key_values.0.key' is "
        "float16 there but float32 on rank 0"
    )


def test_ranks_of_another_count_are_refused(tmp_path):
    tp2 = SAMPLES / "llama-gqa" / "tp2"
    for r in range(4):  # four ranks of one KV head each cannot be a split of two KV heads
        for suffix in ("", ".data"):
            shutil.copy(tp2 / f"model_0{r % 2}.onnx{suffix}", tmp_path / f"model_0{r}.onnx{suffix}")
    full = SAMPLES / "llama-gqa" / "full" / "model.onnx"
    result = invoke(tmp_path, "--twin", full)
    assert result.exit_code == 1
    assert error_line(result) == (
        f"error: --twin {full}: input 'past_key_values.0.key' is [batch_size, 2, past_sequence_length, 16] "
        "in the single model but [batch_size, 1, past_sequence_length, 16] on rank 0 of 4: not 4 shards of "
        "it on one axis (are these the ranks of a 4-way split of that model?)"
    )


@pytest.mark.parametrize(
    ("twin", "message"),
    [
        ("tp2", "the folder holds 2 .onnx files; name the single-device model's file"),
        (
            "tp2/model_00.onnx",
            "it has collectives (AllReduce '/model/layers.0/attn/o_proj/AllReduce'): it is a rank "
            "model, not the single-device model the ranks were sharded from",
        ),
        ("missing.onnx", "no such file or directory"),
    ],
)
def test_a_twin_that_is_not_one_single_device_model_is_refused(twin, message):
    variant = SAMPLES / "llama-gqa"
    result = invoke(variant / "tp2", "--twin", variant / twin)
    assert result.exit_code == 1
    assert error_line(result) == f"error: --twin {variant / twin}: {message}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--against", "tp2"], "--twin and --against are two different checks: give one of them"),
        (
            ["--backend", "mpi"],
            "--twin runs on the threads backend only (the single-device model runs in the same "
            "process as the ranks)",
        ),
        (["--atol", "-1"], "--atol must be at least 0"),
    ],
)
def test_option_conflicts_are_usage_errors(args, message):
    variant = SAMPLES / "llama-gqa"
    args = [str(variant / a) if a == "tp2" else a for a in args]
    result = invoke(variant / "tp2", "--twin", variant / "full", *args)
    assert result.exit_code == 2
    assert error_line(result) == f"error: {message}"


def test_atol_without_twin_is_a_usage_error():
    result = invoke(SAMPLES / "llama-gqa" / "tp2", "--atol", "1")
    assert result.exit_code == 2
    assert error_line(result) == "error: --atol is --twin's tolerance: give --twin too"


def meta(name, *shape):
    return TensorMeta(name, np.dtype(np.float32), shape, "tensor(float)")


@pytest.mark.parametrize(
    ("ranks", "single", "axis"),
    [
        ([("b", 1, "p", 16)] * 2, ("b", 2, "p", 16), 1),  # [batch, kv heads, past, head size]
        ([(2, "b", 2, "p", 16)] * 2, (2, "b", 4, "p", 16), 2),  # GPT's [2, batch, heads, past, head size]
        ([("b", 2, 8)] * 2, ("b", 2, 8), None),  # replicated
        ([("b", 1, 8), ("b", 3, 8)], ("b", 4, 8), 1),  # uneven shards still add up
        ([("b", "h", 8)] * 2, ("b", "h", 8), None),  # symbolic on both sides: same symbol, same size
    ],
)
def test_the_split_axis_is_where_the_sizes_differ(ranks, single, axis):
    assert input_split_axis("x", [meta("x", *s) for s in ranks], meta("x", *single)) == axis


@pytest.mark.parametrize(
    ("ranks", "single"),
    [
        ([("b", 1, "p", 16)] * 3, ("b", 2, "p", 16)),  # 3 x 1 != 2
        ([("b", 1, 8)] * 2, ("b", 2, 16)),  # two axes differ
        ([("b", 1)] * 2, ("b", 2, 16)),  # another rank
    ],
)
def test_shapes_that_are_no_split_are_refused(ranks, single):
    with pytest.raises(PreserveError, match=r"^input 'x' "):
        input_split_axis("x", [meta("x", *s) for s in ranks], meta("x", *single))


def test_output_checks_compare_replicated_whole_and_sharded_by_slice():
    full = {
        "logits": np.array([[1.0, 2.0]], np.float32),
        "kv": np.arange(8, dtype=np.float32).reshape(1, 4, 2),
        "ids": np.array([3, 4], np.int64),
        "odd": np.zeros((2, 2), np.float32),
    }
    got = [
        {
            "logits": np.array([[1.0, 2.5]], np.float32),
            "kv": full["kv"][:, :3],
            "ids": np.array([3, 4]),
            "odd": np.zeros((3, 3), np.float32),
        },
        {
            "logits": np.array([[1.0, 2.0]], np.float32),
            "kv": full["kv"][:, 3:] + 1e-5,
            "ids": np.array([3, 5]),
            "odd": np.zeros((3, 3), np.float32),
        },
    ]
    checks, sharded = output_checks(2, full, got, None)
    assert sharded == {"kv"}
    assert [(c.rank, c.name, c.diff, c.atol) for c in checks] == [
        (0, "logits", 0.5, 1e-4),
        (1, "logits", 0.0, 1e-4),
        (0, "kv", 0.0, 1e-4),
        (1, "kv", pytest.approx(1e-5, rel=1e-2), 1e-4),
        (0, "ids", 0.0, 0.0),
        (1, "ids", 1.0, 0.0),
        (0, "odd", np.inf, 1e-4),
        (1, "odd", np.inf, 1e-4),
    ]
    c = summarize(checks, 8, sharded)
    assert not c.passed
    assert c.failing == ((0, "logits"), (0, "odd"), (1, "ids"), (1, "odd"))
    assert (c.worst.rank, c.worst.name) == (1, "ids")  # an integer off by one: infinitely beyond exact
    assert c.sharded == ("kv",)


def test_worst_is_measured_against_each_tolerance():
    checks = [TwinCheck(1, 0, "half", 1e-2, 2e-2), TwinCheck(1, 0, "single", 9e-5, 1e-4)]
    c = summarize(checks, 2, set())
    assert c.passed
    assert c.worst.name == "single"  # 90% of its tolerance, against 50%


def test_default_tolerances():
    assert default_atol(np.float32, "x") == 1e-4
    assert default_atol(np.float16, "x") == 2e-2
    assert default_atol(ml_dtypes.bfloat16, "x") == 1.6e-1
    assert default_atol(np.float64, "x") == 1e-9
    assert default_atol(np.int64, "x") == 0.0
    assert default_atol(np.bool_, "x") == 0.0
    # A model whose MatMulNBits quantize activations (accuracy_level 4): float outputs get at least 2e-2.
    assert default_atol(np.float32, "x", 2e-2) == 2e-2
    assert default_atol(ml_dtypes.bfloat16, "x", 2e-2) == 1.6e-1
    assert default_atol(np.int64, "x", 2e-2) == 0.0
    with pytest.raises(
        PreserveError,
        match=r"^output 'x' is float8_e4m3fn, which has no default tolerance: "
        r"give --atol$",
    ):
        default_atol(ml_dtypes.float8_e4m3fn, "x")


@pytest.mark.parametrize(
    ("attributes", "expected"), [({"accuracy_level": 4}, True), ({"accuracy_level": 1}, False), ({}, False)]
)
def test_int8_activations_are_recognised_by_accuracy_level_4(attributes, expected):
    node = onnx.helper.make_node(
        "MatMulNBits",
        ["a", "b", "s"],
        ["y"],
        domain="com.microsoft",
        K=32,
        N=8,
        bits=4,
        block_size=32,
        **attributes,
    )
    graph = onnx.helper.make_graph([node], "g", [], [])
    assert quantizes_activations(onnx.helper.make_model(graph)) is expected
    # The same op inside an If branch counts too.
    branch = onnx.helper.make_node("If", ["c"], ["y"], then_branch=graph, else_branch=graph)
    assert (
        quantizes_activations(onnx.helper.make_model(onnx.helper.make_graph([branch], "g", [], [])))
        is expected
    )


def test_one_rank_file_runs_its_whole_family_against_the_twin():
    variant = SAMPLES / "llama-gqa"
    result = invoke(variant / "tp2" / "model_01.onnx", "--twin", variant / "full" / "model.onnx", "-q")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        f"PASSED: 10 outputs on 2 rank(s) match {variant / 'full' / 'model.onnx'} "
    )
