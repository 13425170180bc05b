"""Single-device decoder exports made by REAL exporters, committed as samples (docs: README.md beside it).

Tiny random Hugging Face models are built from configs written here (no downloads, fixed seeds), saved with
`save_pretrained`, and exported with

- the onnxruntime-genai model builder (`python -m onnxruntime_genai.models.builder`), and
- `torch.onnx.export` (TorchScript exporter, dynamo=False; and the dynamo exporter where it works),

each into `sample_models/exporters/<name>/full/` exactly as the tool wrote it, with a `source.json` that
records the exporter, its version, the precision, the command and the Hugging Face config. Every export is
then run in onnxruntime (a prefill and a decode step with past) and compared with the Hugging Face model in
torch, whose logits for those token ids go to `<name>/reference.npz` (the tests run the committed export
on them).

Stage 2 (`--shard CLI`): `CLI shard <name>/full <name>/tp2 --tp 2` (and `--tp 4` where the sample says);
skipped with one line while `CLI shard --help` fails, and per model with shard's own one-line refusal
(no tpN folder). `--skip-export --shard CLI` runs stage 2 alone; `--only NAME ...` picks samples.

Runs only in its own environment (sample_models/exporters/requirements.txt; `make exporter-samples`), never in
`make test`, which only reads the committed files.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import transformers
from prefill_decode import prefill_and_decode, window_size  # beside this script: numpy and onnxruntime only

HERE = Path(__file__).resolve().parent
SEED = 20261201
VOCAB = 320  # distinct from every linear width: the builder finds the LM head by its output width
MAX_POS = 256

# Gemma 2 and Gemma 3 (FAMILIES below).
GEMMA_SIZES = dict(
    hidden_size=96,
    intermediate_size=192,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    query_pre_attn_scalar=32,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"],
)
# Hugging Face configs. Head size 16 (32 for Gemma): GroupQueryAttention on CPU needs a multiple of 16.
FAMILIES: dict[str, tuple[str, dict]] = {
    # 4 q heads / 2 KV heads: shardable at --tp 2.
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, head_dim=16
        ),
    ),
    # 8 q heads / 4 KV heads: shardable at --tp 2 and --tp 4 (int4: o_proj K 128 and down_proj K 384 are
    # multiples of 4 x block 32). Only in int4 (an fp32 one with its tp2/tp4 shards took 7 MB).
    "llama8h": (
        "LlamaConfig",
        dict(
            hidden_size=128, intermediate_size=384, num_attention_heads=8, num_key_value_heads=4, head_dim=16
        ),
    ),
    # q/k/v biases (Qwen2 always has them).
    "qwen2": (
        "Qwen2Config",
        dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2),
    ),
    # fused qkv_proj and gate_up_proj in the checkpoint itself. original_max_position_embeddings equal to
    # max_position_embeddings: the builder's Phi3MiniModel (plain rotary); otherwise it wants LongRoPE
    # factors.
    "phi3": (
        "Phi3Config",
        dict(
            hidden_size=64,
            intermediate_size=192,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            original_max_position_embeddings=MAX_POS,
        ),
    ),
    # The 2026 architectures (issue 16). Widths allow --tp 2 and --tp 4: q and KV heads, FFN and expert
    # widths divisible by 4; int4 K axes (o_proj 128, down 256, expert fc2 128) a whole number of 32-blocks
    # per rank at --tp 4; every width differs from the vocabulary (320).
    # gpt-oss: MoE (4 experts, top 2, swiglu with interleaved gate/up and clamp 7, expert biases), attention
    # sinks, q/k/v/o biases, alternating sliding (window 4: the 5-token prefill overflows it) and full
    # layers, YaRN rotary (the released parameters). Its experts are MXFP4-representable (see
    # mxfp4_experts): the builder's int4 path reads the checkpoint's MXFP4 blocks.
    "gptoss": (
        "GptOssConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            head_dim=16,
            num_attention_heads=8,
            num_key_value_heads=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            # rope_parameters: GptOssConfig's default, the released model's YaRN (factor 32 over 4096
            # positions); a factor fitted to 256 positions trips the builder's YaRN range assertion.
        ),
    ),
    # Qwen3: q/k RMSNorm over head_dim; head_dim 16 x 8 heads = 128, not hidden / heads (64 / 8).
    "qwen3": (
        "Qwen3Config",
        dict(
            hidden_size=64, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=16
        ),
    ),
    # Gemma 2: head_dim 32 with hidden 96 (8 x 32 = 256 != 96), alternating sliding (window 4) and full
    # layers, attention and final logit soft-capping, GELU-tanh MLP, sandwich norms, scaled embedding.
    "gemma2": ("Gemma2Config", GEMMA_SIZES),
    # Gemma 3: Gemma 2's sizes plus q/k norms, no soft-capping, a rotary base per layer type (1e6 full,
    # 1e4 sliding: two cos/sin caches). Exported through GEMMA3_SHIM (see there).
    "gemma3": ("Gemma3TextConfig", GEMMA_SIZES),
    # Qwen3.5-MoE (the text decoder of Qwen3_5MoeForConditionalGeneration; a 1-block vision tower rides
    # along in the checkpoint, the builder leaves it out): layer 0 Gated DeltaNet linear attention (conv
    # and recurrent state), layer 1 gated full attention with q/k norms and interleaved multimodal rotary
    # (partial, 8 of 16 dims); every layer MoE (4 experts, top 2) plus a sigmoid-gated shared expert.
    "qwen35moe": (
        "Qwen3_5MoeConfig",
        dict(
            text_config=dict(
                hidden_size=64,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=16,
                linear_num_key_heads=4,
                linear_num_value_heads=8,
                linear_key_head_dim=16,
                linear_value_head_dim=16,
                linear_conv_kernel_dim=4,
                moe_intermediate_size=128,
                shared_expert_intermediate_size=128,
                num_experts=4,
                num_experts_per_tok=2,
                layer_types=["linear_attention", "full_attention"],
                rope_parameters=dict(
                    rope_type="default",
                    rope_theta=10000.0,
                    partial_rotary_factor=0.5,
                    mrope_section=[2, 1, 1],
                    mrope_interleaved=True,
                ),
            ),
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                num_position_embeddings=16,
                patch_size=4,
            ),
        ),
    ),
}
# Families whose model class is not what AutoModelForCausalLM makes from the config (the builder keys on it).
MODEL_CLASSES = {"qwen35moe": "Qwen3_5MoeForConditionalGeneration"}
COMMON_CONFIG = dict(
    vocab_size=VOCAB,
    num_hidden_layers=2,
    max_position_embeddings=MAX_POS,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    rms_norm_eps=1e-5,
)


@dataclasses.dataclass(frozen=True)
class Sample:
    name: str
    family: str
    exporter: str  # "genai" | "torchscript" | "dynamo"
    precision: str  # fp32 | fp16 | int4
    extra_options: tuple[str, ...] = ()
    shard: tuple[int, ...] = (2,)
    what: str = ""
    ep: str = "cpu"  # the builder's -e: fp16 only for cuda (its `-p fp16 -e cpu` graph fails its decode step)


SAMPLES = [
    Sample("genai-llama-fp32", "llama", "genai", "fp32", what="Llama, GQA 4/2, fused qkv MatMul, fp32"),
    Sample(
        "genai-llama-fp16",
        "llama",
        "genai",
        "fp16",
        ep="cuda",
        what="Llama, GQA 4/2, fused qkv MatMul, fp16 (built for -e cuda; runs on onnxruntime's CPU too)",
    ),
    Sample(
        "genai-llama-int4",
        "llama",
        "genai",
        "int4",
        what="Llama, MatMulNBits int4 block 32, symmetric (no zero points)",
    ),
    Sample(
        "genai-llama-int4-zp",
        "llama",
        "genai",
        "int4",
        ("is_symmetric=false",),
        what="Llama, MatMulNBits uint4 block 32 with packed zero points",
    ),
    Sample(
        "genai-llama8h-int4-zp",
        "llama8h",
        "genai",
        "int4",
        ("is_symmetric=false",),
        shard=(2, 4),
        what="Llama 8/4, MatMulNBits uint4 with zero points: whole K blocks at --tp 2 and --tp 4",
    ),
    Sample("genai-qwen2-fp32", "qwen2", "genai", "fp32", what="Qwen2, fused qkv MatMul + qkv bias Add"),
    Sample(
        "genai-qwen2-sepqkv-fp32",
        "qwen2",
        "genai",
        "fp32",
        ("fuse_qkv=false",),
        what="Qwen2, separate q/k/v MatMul + bias Add each",
    ),
    # Without fuse_mlp_gate_up the builder splits Phi-3's gate_up_proj into two MatMuls (a graph like
    # Llama's).
    Sample(
        "genai-phi3-fp32",
        "phi3",
        "genai",
        "fp32",
        ("fuse_mlp_gate_up=true",),
        what="Phi-3: fused qkv MatMul, fused gate_up MatMul + Split",
    ),
    Sample(
        "genai-phi3-int4",
        "phi3",
        "genai",
        "int4",
        ("fuse_mlp_gate_up=true",),
        what="Phi-3: fused qkv and gate_up MatMulNBits int4 (symmetric) + Split",
    ),
    Sample(
        "torch-llama-fp32",
        "llama",
        "torchscript",
        "fp32",
        what="Llama through torch.onnx TorchScript: MatMul/Softmax/MatMul attention, KV through Concat",
    ),
    Sample(
        "torch-llama-dynamo-fp32",
        "llama",
        "dynamo",
        "fp32",
        what="Llama through torch.onnx's dynamo exporter",
    ),
    # Issue 16. `shard` refuses these until it handles MoE, q/k norms and hybrid layers: stage 2 prints
    # its one-line refusal and goes on (`--only NAME ...` picks samples).
    Sample(
        "genai-gptoss-fp32",
        "gptoss",
        "genai",
        "fp32",
        shard=(2,),  # tp4 is committed for the int4 variant
        what="gpt-oss: com.microsoft::MoE (swiglu_fusion 1, expert biases), GQA with attention sinks "
        "(in[11]), sliding layer with a window-sized cache (sliding_window_cache 1) then a full layer, "
        "q/k/v/o biases",
    ),
    Sample(
        "genai-gptoss-int4",
        "gptoss",
        "genai",
        "int4",
        shard=(2, 4),
        what="gpt-oss int4: com.microsoft::QMoE int4 block 32 (symmetric, from the checkpoint's MXFP4 "
        "experts), MatMulNBits linears, sinks, sliding + full layers",
    ),
    Sample(
        "genai-qwen3-int4",
        "qwen3",
        "genai",
        "int4",
        shard=(2, 4),
        what="Qwen3 int4: q/k RMSNorm as SimplifiedLayerNormalization between the qkv MatMulNBits and GQA",
    ),
    Sample(
        "genai-gemma2-fp32",
        "gemma2",
        "genai",
        "fp32",
        shard=(2,),
        what="Gemma 2: head_dim 32 at hidden 96, sliding layer (window-sized cache) + full layer, "
        "softcap 50, final logit softcap, GELU-tanh",
    ),
    Sample(
        "genai-gemma3-fp32",
        "gemma3",
        "genai",
        "fp32",
        shard=(2,),
        what="Gemma 3: q/k norms (SimplifiedLayerNormalization) + head_dim 32 at hidden 96, sliding layer "
        "(window-sized cache, local rotary cache) + full layer (global rotary cache); builder run through "
        "GEMMA3_SHIM",
    ),
    Sample(
        "genai-qwen35moe-int4",
        "qwen35moe",
        "genai",
        "int4",
        shard=(2, 4),
        what="Qwen3.5-MoE int4: Gated DeltaNet layer (CausalConvWithState, LinearAttention, conv/recurrent "
        "state) + gated GQA layer (q/k norms, MRotaryEmbedding); QMoE + shared expert through GatedAdd",
    ),
]


# ----------------------------------------------------------------------------------------------------
# Hugging Face side


def build_hf_model(family: str):
    class_name, overrides = FAMILIES[family]
    if "text_config" in overrides:  # a multimodal config: the common settings are the text decoder's
        overrides = dict(overrides, text_config={**COMMON_CONFIG, **overrides["text_config"]})
        config = getattr(transformers, class_name)(**overrides, tie_word_embeddings=False)
    else:
        config = getattr(transformers, class_name)(**COMMON_CONFIG, **overrides)
    config._attn_implementation = "eager"  # plain MatMul/Softmax/MatMul under torch.onnx
    torch.manual_seed(SEED)
    if family in MODEL_CLASSES:
        model = getattr(transformers, MODEL_CLASSES[family])(config).eval()
    else:
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Trained-looking norms and biases: a fresh model has all-ones norm weights and zero biases, which the
    # TorchScript exporter would fold into ONE shared initializer and which would hide a bias applied twice.
    # Expert banks' biases ([experts, width], gpt-oss) too.
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 or name.endswith("_bias"):
                base = 1.0 if "norm" in name else 0.0
                parameter.copy_(base + 0.1 * torch.randn(parameter.shape, generator=generator))
    if family == "gptoss":
        model.mxfp4 = mxfp4_experts(model)
    return model


MXFP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1 magnitudes; bit 3 of a code is the sign


def mxfp4_experts(model) -> dict[str, torch.Tensor]:
    """Random experts in gpt-oss's released MXFP4 form, with the model's float experts set to their exact
    values: ``model.layers.{i}.mlp.experts.{gate_up,down}_proj_blocks`` uint8 [E, N, K/32, 16] (two 4-bit
    codes a byte, low nibble first) and ``_scales`` uint8 [E, N, K/32] (exponents, bias 127). The
    builder's fp32 export reads the float weights, its int4 export the blocks; torch's reference is the
    same model for both."""
    generator = torch.Generator().manual_seed(SEED + 2)
    magnitudes = torch.tensor(MXFP4_VALUES)
    tensors = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(experts, name)  # [E, K, N]: Hugging Face keeps the input axis first
                e, k, n = weight.shape
                codes = torch.randint(0, 16, (e, n, k // 32, 32), generator=generator, dtype=torch.uint8)
                scales = torch.randint(119, 122, (e, n, k // 32), generator=generator, dtype=torch.uint8)
                values = magnitudes[(codes & 7).long()] * torch.where(codes >= 8, -1.0, 1.0)
                values = values * torch.pow(2.0, scales.float() - 127.0).unsqueeze(-1)
                weight.copy_(values.reshape(e, n, k).transpose(1, 2))
                prefix = f"model.layers.{i}.mlp.experts.{name}"
                tensors[f"{prefix}_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
                tensors[f"{prefix}_scales"] = scales
    return tensors


def save_hf_folder(model, folder: Path) -> None:
    """save_pretrained plus a tiny offline word-level tokenizer (the builder copies the tokenizer along)."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    model.save_pretrained(folder)
    if getattr(model, "mxfp4", None):  # gpt-oss: the MXFP4 expert blocks beside the float weights
        path = folder / "model.safetensors"
        save_file({**load_file(path), **model.mxfp4}, path, metadata={"format": "pt"})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    fast.save_pretrained(folder)


# ----------------------------------------------------------------------------------------------------
# exporters


# Builder 0.18 reads Gemma 3's rotary bases the transformers 4 way (a flat rope_parameters with the global
# base, and rope_local_base_freq); transformers 5 keeps one rope_parameters entry per layer type, so the
# builder stops at `KeyError: 'rope_type'` (and, given only the nested form, would fall back to base 10000
# for the global layers). This runs the builder with the config it loads given both forms; the graph is the
# builder's own. The Hugging Face folder is untouched (torch's reference reads the nested form).
BUILDER = "onnxruntime_genai.models.builder"
GEMMA3_SHIM = """
import runpy, sys, transformers
load = transformers.AutoConfig.from_pretrained
def from_pretrained(*args, **kwargs):
    loaded = load(*args, **kwargs)
    config = loaded[0] if isinstance(loaded, tuple) else loaded  # (config, unused kwargs) for model loading
    rope = getattr(config, "rope_parameters", None) or {}
    if config.model_type == "gemma3_text" and "sliding_attention" in rope:
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_parameters = {**rope["full_attention"], **rope}
    return loaded
transformers.AutoConfig.from_pretrained = from_pretrained
sys.argv[0] = "builder"
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""


def export_genai(sample: Sample, hf_dir: Path, out: Path, cache: Path) -> list[str]:
    shim = sample.family == "gemma3"
    command = [
        sys.executable,
        *(["-c", GEMMA3_SHIM] if shim else ["-m", BUILDER]),
        "-i",
        str(hf_dir),
        "-o",
        str(out),
        "-p",
        sample.precision,
        "-e",
        sample.ep,
        "-c",
        str(cache),
    ]
    if sample.extra_options:
        command += ["--extra_options", *sample.extra_options]
    # The builder stamps producer_version with `git rev-parse HEAD` run three folders above its package, which
    # is THIS repository when the venv lives in build/: hide git so it takes the wheel's own commit instead.
    env = dict(os.environ, GIT_DIR=os.devnull)
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(
            f"{sample.name}: the builder failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    shown = [
        "python",
        *(["-c", "GEMMA3_SHIM (make_exporter_samples.py)"] if shim else ["-m", BUILDER]),
        "-i",
        "HF_DIR",
        "-o",
        "OUT",
        "-p",
        sample.precision,
        "-e",
        sample.ep,
    ]
    return shown + (["--extra_options", *sample.extra_options] if sample.extra_options else [])


def torch_names(layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


class CacheWrapper(torch.nn.Module):
    """Flat tensors in and out around transformers' Cache objects (what exporters and runtimes feed)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = transformers.DynamicCache(config=self.model.config)
        for i, layer in enumerate(cache.layers):
            # Seeded directly: cache.update() would concatenate the past onto an empty tensor first, which
            # leaves a one-input Concat in front of the real KV Concat.
            layer.lazy_initialization(past[2 * i], past[2 * i + 1])
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def example_feeds(model, batch: int, seq: int, past: int, seed: int) -> list[torch.Tensor]:
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    kv_heads = config.num_key_value_heads
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [
        torch.randn(batch, kv_heads, past, head, generator=generator)
        for _ in range(2 * config.num_hidden_layers)
    ]
    return [ids, mask, positions, *kv]


def export_torch(sample: Sample, model, out: Path) -> list[str]:
    wrapper = CacheWrapper(model).eval()
    layers = model.config.num_hidden_layers
    input_names, output_names = torch_names(layers)
    args = tuple(example_feeds(model, 2, 3, 5, SEED))
    out.mkdir(parents=True)
    path = out / "model.onnx"
    if sample.exporter == "torchscript":
        dynamic_axes = {
            "input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"},
        }
        for name in input_names[3:]:
            dynamic_axes[name] = {0: "batch_size", 2: "past_sequence_length"}
        for name in output_names[1:]:
            dynamic_axes[name] = {0: "batch_size", 2: "total_sequence_length"}
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            dynamo=False,
        )
        return [
            "torch.onnx.export(wrapper, args, 'model.onnx', input_names=..., output_names=..., "
            "dynamic_axes={batch_size, sequence_length, past_sequence_length, total_sequence_length}, "
            "dynamo=False)"
        ]
    batch = torch.export.Dim("batch_size", min=1, max=64)
    seq = torch.export.Dim("sequence_length", min=1, max=MAX_POS)
    past = torch.export.Dim("past_sequence_length", min=1, max=MAX_POS)
    total = torch.export.Dim("total_sequence_length", min=2, max=2 * MAX_POS)
    # forward(input_ids, attention_mask, position_ids, *past): the varargs are one tuple for torch.export
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple({0: batch, 2: past} for _ in range(2 * layers)),
    )
    program = torch.onnx.export(
        wrapper,
        args,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        dynamo=True,
    )
    program.save(str(path))
    return [
        "torch.onnx.export(wrapper, args, input_names=..., output_names=..., dynamic_shapes=(batch_size, "
        "sequence_length, past_sequence_length), dynamo=True).save('model.onnx')"
    ]


# ----------------------------------------------------------------------------------------------------
# checks: the export against the Hugging Face model in torch, prefill then one decode step with past


TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "int4": 5e-1}


def check_export(sample: Sample, model, folder: Path) -> dict:
    config = getattr(model.config, "text_config", model.config)
    generator = torch.Generator().manual_seed(SEED + 7)
    batch, prompt = 2, 5
    ids = torch.randint(3, VOCAB, (batch, prompt + 1), generator=generator)
    with torch.no_grad():
        reference = model(input_ids=ids).logits.numpy()
    kv_heads = config.num_key_value_heads
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    first, second = prefill_and_decode(
        folder / "model.onnx", ids.numpy(), config.num_hidden_layers, kv_heads, head
    )
    prefill = float(np.abs(first["logits"].astype(np.float32) - reference[:, :prompt]).max())
    decode = float(np.abs(second["logits"].astype(np.float32) - reference[:, prompt:]).max())
    # The decode step's cache: the whole context, or the window for a sliding layer with a window-sized cache
    # (its graph input's sequence dim is `past_sliding_length`); linear-attention layers have none.
    window = window_size(folder / "model.onnx")
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    for i, kind in enumerate(layer_types):
        if f"present.{i}.key" in second:
            length = window if kind == "sliding_attention" and window else prompt + 1
            shape = second[f"present.{i}.key"].shape
            assert shape == (batch, kv_heads, length, head), (i, shape)
    worst = max(prefill, decode)
    if not worst <= TOLERANCE[sample.precision]:
        raise SystemExit(
            f"{sample.name}: onnxruntime differs from torch by {worst} "
            f"(tolerance {TOLERANCE[sample.precision]})"
        )
    return {
        "prefill_max_abs_diff": prefill,
        "decode_max_abs_diff": decode,
        "input_ids": ids.numpy(),
        "logits": reference.astype(np.float32),
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with a fixed timestamp in the zip entries, so the same arrays give the same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            archive.writestr(
                zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue()
            )


def check_genai_runtime(folder: Path) -> list[int]:
    """The folder is a working onnxruntime-genai package: greedy-generate a few tokens with it."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([[1, 17, 42, 99]])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


# ----------------------------------------------------------------------------------------------------


def versions() -> dict:
    import importlib.metadata as md

    return {
        name: md.version(name)
        for name in ("torch", "transformers", "onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "numpy")
    }


def make_sample(sample: Sample, root: Path, work: Path) -> None:
    model = build_hf_model(sample.family)
    hf_dir = work / f"hf-{sample.family}"
    if not hf_dir.exists():
        save_hf_folder(model, hf_dir)
    staging = work / sample.name
    if sample.exporter == "genai":
        command = export_genai(sample, hf_dir, staging, work / "cache")
    else:
        command = export_torch(sample, model, staging)
    numbers = check_export(sample, model, staging)
    # onnxruntime-genai's CPU package cannot open a package whose genai_config asks for cuda.
    tokens = check_genai_runtime(staging) if sample.exporter == "genai" and sample.ep == "cpu" else None
    # the config.json the exporters read (save_pretrained fills in architectures and dtype)
    config = json.loads((hf_dir / "config.json").read_text())
    source = {
        "name": sample.name,
        "what": sample.what,
        "exporter": {
            "genai": "onnxruntime-genai model builder",
            "torchscript": "torch.onnx (TorchScript)",
            "dynamo": "torch.onnx (dynamo)",
        }[sample.exporter],
        "precision": sample.precision,
        "command": command,
        "versions": versions(),
        "seed": SEED,
        "hf_config": config,
        "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir())},
    }
    (staging / "source.json").write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    target = root / sample.name / "full"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    shutil.move(str(staging), str(target))
    # torch's logits for fixed token ids, beside full/: tests run the committed export on them in onnxruntime.
    write_npz(
        root / sample.name / "reference.npz", {"input_ids": numbers["input_ids"], "logits": numbers["logits"]}
    )
    print(
        f"{sample.name}: {sum(source['files'].values())} bytes, "
        f"vs torch prefill {numbers['prefill_max_abs_diff']:.2e}"
        f" decode {numbers['decode_max_abs_diff']:.2e}" + (f", genai generated {tokens}" if tokens else "")
    )


def shard_stage(samples: list[Sample], root: Path, cli: str) -> None:
    """Stage 2: rank models from each export with `preserve-onnx shard` (skipped while it is missing)."""
    probe = subprocess.run([cli, "shard", "--help"], check=False, capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"shard stage skipped: `{cli} shard --help` failed (the shard command is not available)")
        return
    for sample in samples:
        for tp in sample.shard:
            out = root / sample.name / f"tp{tp}"
            if out.exists():
                shutil.rmtree(out)
            command = [cli, "shard", str(root / sample.name / "full"), str(out), "--tp", str(tp)]
            result = subprocess.run(command, check=False, capture_output=True, text=True)
            if result.returncode == 0:
                print(f"{sample.name} --tp {tp}: ok")
                continue
            # A model that shard cannot split (yet) is skipped with its one-line refusal, not an error here:
            # no tpN folder, the next sample goes on.
            if out.exists():
                shutil.rmtree(out)
            said = (result.stdout + result.stderr).strip().splitlines()
            reason = said[-1] if said else f"exit status {result.returncode}"
            print(f"{sample.name} --tp {tp}: skipped, shard refused it: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=HERE, help="root of the sample folders (default: beside this file)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="names of the samples to make (default: all)")
    parser.add_argument(
        "--shard",
        metavar="CLI",
        default=None,
        help="stage 2: run CLI shard on every sample (e.g. .venv/bin/preserve-onnx)",
    )
    parser.add_argument("--skip-export", action="store_true", help="only stage 2, on the committed exports")
    args = parser.parse_args()
    chosen = [s for s in SAMPLES if args.only is None or s.name in args.only]
    unknown = set(args.only or ()) - {s.name for s in SAMPLES}
    if unknown:
        parser.error(f"unknown sample(s): {', '.join(sorted(unknown))}")
    failed = []
    if not args.skip_export:
        with tempfile.TemporaryDirectory(prefix="exporter-samples-") as work:
            for sample in chosen:
                try:
                    make_sample(sample, args.out, Path(work))
                except Exception as error:  # report every sample, then fail
                    print(f"{sample.name}: FAILED: {type(error).__name__}: {str(error)[-2000:]}")
                    failed.append(sample.name)
                except SystemExit as error:
                    print(f"FAILED: {error}")
                    failed.append(sample.name)
    if args.shard:
        shard_stage([s for s in chosen if s.name not in failed], args.out, args.shard)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
