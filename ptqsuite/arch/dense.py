"""Dense decoder-only transformers with the Llama block: pre-norm attention and gated MLP (Llama 1-3, Mistral,
Qwen2, Gemma; multi-head or grouped-query attention, with or without q/k/v biases)."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .base import Arch, LinearGroup

ATTENTION = (
    LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    LinearGroup("self_attn.v_proj", ("self_attn.o_proj",)),
)

LLAMA = Arch(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    groups=ATTENTION + (
        LinearGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        LinearGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    prologue=("model.embed_tokens", "model.rotary_emb"),
    residual_writers=("self_attn.o_proj", "mlp.down_proj"),
    online_rotated=("mlp.down_proj",),
    value_out=("self_attn.v_proj", "self_attn.o_proj"),
)


class GainRMSNorm(nn.Module):
    """RMSNorm with a plain gain ``n(x)·γ``, computed as Gemma's is (in float32, cast last); the gain is float32."""

    def __init__(self, gain: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(gain.float(), requires_grad=False), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


def plain_gains(model: nn.Module, arch: Arch) -> None:
    """Gemma's norms compute ``n(x)·(1 + w)``: each becomes a GainRMSNorm with ``γ = 1 + w`` (exact in float32), so
    every transform's norm identity (fold, scale) holds as written for Llama."""
    norm_type = type(model.get_submodule(arch.final_norm))
    for name, module in list(model.named_modules()):
        if type(module) is norm_type:
            model.set_submodule(name, GainRMSNorm(module.weight.detach().float() + 1.0, module.eps))


# Gemma (1): Llama's block with (1 + w) norm gains, a √hidden embedding scale (a scalar: it commutes with every
# rotation and scale) and a tied head. Gemma 2 and 3 add norms after attention and MLP, on the residual branch
# before the add: no gain there can be folded into a linear, so they need their own entry.
def _gemma_init(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
    """Random init in Gemma's conventions: norm weights w = 0 (gain 1); embeddings ~ N(0, 1/hidden), which the
    √hidden scale makes unit-scale inputs."""
    if name.endswith("norm.weight"):
        return torch.zeros_like(p)
    if "embed_tokens" in name:
        return torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5
    return None


GEMMA = replace(LLAMA, name="gemma", model_types=("gemma",), prepare=plain_gains, init=_gemma_init,
                notes="norm gains (1 + w) made plain gains on load")
