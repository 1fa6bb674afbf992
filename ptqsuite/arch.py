"""Where things are in each architecture, as data. Methods ask this module, never hard-code module names.

A block's linears come in groups that read the same input: ``(source, linears)`` where ``source`` is the op whose
output feeds them (a norm, or the preceding linear). Transforms use the pairs (fold a norm into the q/k/v that
follow it, smooth up_proj into down_proj); mitigation iterates the linears in this order (true-sequential order).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LinearGroup:
    source: str
    linears: tuple[str, ...]
    scope: str | None = None  # the smallest module whose output judges a change to these linears (AWQ's
    # module2inspect): the attention for q/k/v, the MLP for gate/up; None: the linears themselves


@dataclass(frozen=True)
class Arch:
    name: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str
    head: str
    groups: tuple[LinearGroup, ...]
    prologue: tuple[str, ...] = ()  # modules that compute block 0's inputs (run on the compute device to capture them)
    attention: str = "self_attn"  # the module that applies RoPE and attends (K and V are quantized inside it)
    residual_writers: tuple[str, ...] = ()  # linears whose outputs are added to the residual stream
    online_rotated: tuple[str, ...] = ()  # linears whose inputs a rotation can only reach online (after a nonlinearity)
    value_out: tuple[str, str] | None = None  # (V projection, attention output projection): per-head rotatable

    def heads(self, model: nn.Module) -> tuple[int, int, int]:
        """(attention heads, key/value heads, head dim) from the config, as every llama-like model names them."""
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim

    def norm_groups(self) -> tuple[LinearGroup, ...]:
        """Groups fed by a norm (folded and smoothed into their linears), as opposed to those fed by a linear."""
        produced = {name for g in self.groups for name in g.linears}
        return tuple(g for g in self.groups if g.source not in produced)

    def block_list(self, model: nn.Module) -> list[nn.Module]:
        return list(model.get_submodule(self.blocks))

    def linears(self, block: nn.Module) -> list[tuple[str, nn.Linear]]:
        return [(name, block.get_submodule(name)) for g in self.groups for name in g.linears]

    def quantizable(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        """Every linear a weight recipe quantizes, with its full name. Embeddings and the head stay in high
        precision, as in GPTQ, AWQ and QuaRot's weight-only settings."""
        return [
            (f"{self.blocks}.{i}.{name}", linear)
            for i, block in enumerate(self.block_list(model))
            for name, linear in self.linears(block)
        ]


LLAMA = Arch(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    groups=(
        LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        LinearGroup("self_attn.v_proj", ("self_attn.o_proj",)),
        LinearGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        LinearGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    prologue=("model.embed_tokens", "model.rotary_emb"),
    residual_writers=("self_attn.o_proj", "mlp.down_proj"),
    online_rotated=("mlp.down_proj",),
    value_out=("self_attn.v_proj", "self_attn.o_proj"),
)

ARCHS = {a.name: a for a in (LLAMA,)}


def arch_of(model: nn.Module) -> Arch:
    model_type = model.config.model_type
    for arch in ARCHS.values():
        if model_type in arch.model_types:
            return arch
    supported = sorted(t for a in ARCHS.values() for t in a.model_types)
    raise NotImplementedError(f"no architecture adapter for model_type {model_type!r}; supported: {', '.join(supported)}")


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
