"""The model registry: every model a case can name, how to get its weights, and how to evaluate it.

Kinds:
  hub       full-size Hugging Face models, resolved from a model directory ($PTQSUITE_MODEL_DIR / --model-dir) or
            the Hugging Face cache; downloaded only with --download-models. Missing weights skip the case.
  shipped   small real models whose files are in this package (ptqsuite/assets/models).
  pip-gguf  real models whose weights come from a Python package's GGUF file (see weights.py), converted once.
  random    deterministic tiny random-init models with a real architecture's layout, scaled down.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import arch as archs
from .paths import ASSETS


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    arch: str
    kind: str
    hub_id: str | None = None
    source: object = None  # kind-specific: an asset folder, a weights.PipGGUF, or a random config dict
    bos_per_window: bool = False  # eval protocol: prepend BOS to each window (models trained on BOS-led text)
    seed: int = 0
    notes: str = ""


class WeightsMissing(Exception):
    """The weights are not on this machine; the message says where we looked and how to provide them."""


@dataclass
class Loaded:
    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: object
    path: str


# Llama-3-8B's layout (GQA 4:1, RoPE θ = 500000, untied head, SwiGLU 3.5×, RMSNorm ε 1e-5) scaled down.
# Tiny models share stories260K's 512-token Llama tokenizer: the vocabulary is scaled down with the rest.
LLAMA3_TINY = dict(
    model_type="llama", hidden_size=256, intermediate_size=896, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=2, head_dim=32, rope_theta=500000.0, max_position_embeddings=2048, rms_norm_eps=1e-5,
    tie_word_embeddings=False, vocab_size=512, hidden_act="silu", bos_token_id=1, eos_token_id=2,
)


# The other llama-like layouts at the same scale, for checks that must hold on every supported architecture:
# Mistral (sliding-window attention, GQA) and Qwen2 (biases on q/k/v, tied embeddings).
MISTRAL_TINY = LLAMA3_TINY | dict(model_type="mistral", rope_theta=10000.0, sliding_window=64)
QWEN2_TINY = LLAMA3_TINY | dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                use_sliding_window=False)
# Llama-2's layout (multi-head attention: as many K/V heads as query heads, SwiGLU 2.6875x, RoPE θ = 10000) and
# Gemma's (GeGLU 8x (24576 / 3072), head_dim 256 > hidden / heads, (1 + w) norm gains, √hidden embedding scale),
# at the same scale. Gemma ties its head; the tiny one does not: a random tied embedding that the √hidden scale
# makes unit-scale dominates the residual stream, so every token predicts itself (qwen2-tiny-random has the tie).
LLAMA2_TINY = LLAMA3_TINY | dict(num_key_value_heads=8, intermediate_size=688, rope_theta=10000.0)
GEMMA_TINY = LLAMA3_TINY | dict(model_type="gemma", num_key_value_heads=8, head_dim=64, intermediate_size=2048,
                                rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                hidden_activation="gelu_pytorch_tanh", pad_token_id=0)


# Mixture-of-experts layouts at the same scale: Mixtral (8 experts, top-2; here 4, top-2) and Qwen1.5-MoE (60
# fine-grained experts, top-4, plus a sigmoid-gated shared expert 4x as wide; here 8, top-4). Routing is random at
# init, so every expert sees tokens; tests/test_moe.py also starves experts to exercise the fallback.
MIXTRAL_TINY = LLAMA3_TINY | dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2,
                                  intermediate_size=448, rope_theta=1000000.0, sliding_window=None)
QWEN2_MOE_TINY = QWEN2_TINY | dict(model_type="qwen2_moe", num_experts=8, num_experts_per_tok=4,
                                   moe_intermediate_size=128, shared_expert_intermediate_size=512,
                                   tie_word_embeddings=False, norm_topk_prob=False, decoder_sparse_step=1)

# Mamba-2.8B's layout (state 16, depthwise conv of width 4, expand 2, dt_rank = hidden/16, fp32 residual, RMSNorm
# ε 1e-5) scaled down; the SSM's parameters drawn as Mamba draws them (arch/mamba.py ``init``). Deviation: the head
# is untied. Tied to a random embedding, each position's own token scores √hidden standard deviations above the
# rest, so the model predicts its input with probability 1 and no metric sees quantization.
# MambaConfig's special ids default to 0 (GPT-NeoX's <|endoftext|>); here they are the shared tokenizer's: BOS 1,
# EOS 2, and padding 0 (<unk>: the tokenizer has no pad token, and a Mamba is only given padding in generation).
MAMBA_TINY = dict(
    model_type="mamba", hidden_size=128, num_hidden_layers=2, state_size=16, conv_kernel=4, expand=2,
    time_step_rank="auto", layer_norm_epsilon=1e-5, residual_in_fp32=True, tie_word_embeddings=False,
    use_bias=False, use_conv_bias=True, vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


# LLaVA-1.5's layout (a CLIP ViT tower read at its penultimate layer without the CLS token, a GELU MLP projector, a
# Llama language model) scaled down: the language model is LLAMA3_TINY with one more id, the image placeholder,
# beyond the shared tokenizer's 512 (LLaVA-1.5 adds <image> after Llama's 32000); the tower sees 32x32 images as
# 4x4 patches of 8 pixels: 16 image tokens.
LLAVA_TINY = dict(
    model_type="llava", text_config=LLAMA3_TINY | dict(vocab_size=513),
    vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=64,
                       intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu",
                       layer_norm_eps=1e-5),
    image_token_index=512, image_seq_length=16, projector_hidden_act="gelu", vision_feature_layer=-2,
    vision_feature_select_strategy="default", tie_word_embeddings=False,
)

def _registry() -> dict[str, ModelSpec]:
    from .weights import SMOLLM2

    def hub(name, family, hub_id, arch="llama"):
        return ModelSpec(name, family, arch, "hub", hub_id)

    def tiny(name, family, arch, config, layout):
        return ModelSpec(name, family, arch, "random", None, config, seed=0, notes=f"random-init, {layout}")

    specs = [
        hub("llama2-7b", "llama2", "meta-llama/Llama-2-7b-hf"),
        hub("llama3-8b", "llama3", "meta-llama/Meta-Llama-3-8B"),
        hub("llama3.1-8b", "llama3", "meta-llama/Llama-3.1-8B"),
        hub("mistral-7b", "mistral", "mistralai/Mistral-7B-v0.1"),
        hub("qwen2.5-7b", "qwen2", "Qwen/Qwen2.5-7B"),
        hub("gemma-7b", "gemma", "google/gemma-7b", "gemma"),
        hub("mixtral-8x7b", "mixtral", "mistralai/Mixtral-8x7B-v0.1", "mixtral"),
        hub("qwen1.5-moe-a2.7b", "qwen2_moe", "Qwen/Qwen1.5-MoE-A2.7B", "qwen2_moe"),
        ModelSpec("stories260k", "tinystories", "llama", "shipped", "karpathy/tinyllamas", "stories260K",
                  bos_per_window=True, notes="trained 260K-parameter Llama (TinyStories), MIT"),
        ModelSpec("smollm2-135m", "smollm2", "llama", "pip-gguf", "HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2,
                  notes="weights dequantized from GGUF Q4_1: RTN asym g32 is an artefact on this model"),
        tiny("llama3-tiny-random", "llama3", "llama", LLAMA3_TINY, "Llama-3 layout scaled down"),
        tiny("mistral-tiny-random", "mistral", "llama", MISTRAL_TINY, "Mistral layout (sliding window) scaled down"),
        tiny("qwen2-tiny-random", "qwen2", "llama", QWEN2_TINY,
             "Qwen2 layout (q/k/v biases, tied embeddings) scaled down"),
        tiny("llama2-tiny-random", "llama2", "llama", LLAMA2_TINY, "Llama-2 layout (multi-head attention) scaled down"),
        tiny("gemma-tiny-random", "gemma", "gemma", GEMMA_TINY,
             "Gemma layout ((1 + w) norms, scaled embedding, head_dim 64 x 8 > hidden; untied)"),
        tiny("mixtral-tiny-random", "mixtral", "mixtral", MIXTRAL_TINY, "Mixtral layout (4 experts, top-2) scaled down"),
        tiny("qwen2-moe-tiny-random", "qwen2_moe", "qwen2_moe", QWEN2_MOE_TINY,
             "Qwen1.5-MoE layout (8 fine-grained experts, top-4, gated shared expert)"),
        tiny("mamba-tiny-random", "mamba", "mamba", MAMBA_TINY,
             "Mamba layout (selective SSM, no attention) scaled down"),
        hub("mamba-2.8b", "mamba", "state-spaces/mamba-2.8b-hf", "mamba"),
        tiny("llava-tiny-random", "llava", "llava", LLAVA_TINY,
             "LLaVA-1.5 layout (CLIP tower, MLP projector, Llama) scaled down"),
        hub("llava-1.5-7b", "llava", "llava-hf/llava-1.5-7b-hf", "llava"),
    ]
    return {s.name: s for s in specs}


REGISTRY: dict[str, ModelSpec] = {}


def registry() -> dict[str, ModelSpec]:
    if not REGISTRY:
        REGISTRY.update(_registry())
    return REGISTRY


def get(name: str) -> ModelSpec:
    try:
        return registry()[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(registry())}") from None


@dataclass(frozen=True)
class Sources:
    """Where to look for weights: the user's settings, passed down from the plugin or the CLI."""

    model_dir: str | None = field(default_factory=lambda: os.environ.get("PTQSUITE_MODEL_DIR"))
    download: bool = False


def load(spec: ModelSpec, device: str | torch.device, dtype: torch.dtype, sources: Sources = Sources()) -> Loaded:
    """The model on ``device`` in ``dtype``, in the form its architecture entry names (``Arch.prepare``)."""
    from transformers import AutoTokenizer

    arch = archs.get(spec.arch)
    if spec.kind == "random":
        model, tok_dir = build_random(spec), ASSETS / "models" / "stories260K"
        model = model.to(device=device, dtype=dtype)
        path = f"random:{spec.name}:seed={spec.seed}"
    else:
        path = tok_dir = _weights_dir(spec, sources)
        model = _auto(arch).from_pretrained(path, dtype=dtype).to(device)
    if arch.prepare is not None:
        arch.prepare(model, arch)
    model.eval().requires_grad_(False)
    return Loaded(spec, model, AutoTokenizer.from_pretrained(tok_dir), str(path))


def _auto(arch: archs.Arch):
    import transformers

    return getattr(transformers, arch.loader)


def _weights_dir(spec: ModelSpec, sources: Sources) -> Path:
    if spec.kind == "shipped":
        return ASSETS / "models" / spec.source
    if spec.kind == "pip-gguf":
        from .weights import WeightsUnavailable, ensure

        try:
            return ensure(spec.source)
        except WeightsUnavailable as e:
            raise WeightsMissing(f"{spec.name}: {e}") from e
    if spec.kind == "hub":
        return _hub_dir(spec, sources)
    raise ValueError(f"model {spec.name!r} has unknown kind {spec.kind!r}")


def _hub_dir(spec: ModelSpec, sources: Sources) -> Path:
    looked = []
    if sources.model_dir:
        for sub in (spec.name, spec.hub_id.split("/")[-1], spec.hub_id.replace("/", "--")):
            candidate = Path(sources.model_dir) / sub
            if (candidate / "config.json").is_file():
                return candidate
            looked.append(str(candidate))
    else:
        looked.append("model directory: not set ($PTQSUITE_MODEL_DIR or --model-dir)")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(spec.hub_id, local_files_only=not sources.download,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:  # huggingface_hub raises several types for 'not cached' and 'offline'
        looked.append(f"Hugging Face cache {constants.HF_HUB_CACHE} ({type(e).__name__})")
    raise WeightsMissing(
        f"{spec.name}: weights for {spec.hub_id} not found. Looked in: {'; '.join(looked)}. "
        f"Provide them with `hf download {spec.hub_id}` (into the HF cache), or put the model folder "
        f"at $PTQSUITE_MODEL_DIR/{spec.name}, or run with --download-models."
    )


def build_random(spec: ModelSpec) -> torch.nn.Module:
    """A model whose weights depend only on (config, seed, parameter name): stable across transformers versions,
    whose own init code changes. Linear weights ~ N(0, 1/fan_in) keep activations at unit scale, so the logits are
    far from uniform and quantization error shows in the metrics. Biases ~ N(0, 0.5²): nonzero, so every
    rewrite of a biased layer is exercised."""
    from transformers import AutoConfig

    arch = archs.get(spec.arch)
    config = AutoConfig.for_model(**spec.source)
    model = _auto(arch).from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + zlib.crc32(name.encode()))
            value = arch.init(name, p, gen) if arch.init is not None else None
            if value is not None:
                p.copy_(value)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.dim() == 1:
                p.fill_(1.0)  # norm gains
            else:
                std = p.shape[-1] ** -0.5  # fan-in (3-D expert stacks too); a tied embedding is also the head
                if "embed" in name and not config.tie_word_embeddings:
                    std = 1.0  # untied: unit-scale inputs (a tied one this large makes each token predict itself)
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
