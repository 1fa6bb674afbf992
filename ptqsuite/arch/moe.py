"""Mixture-of-experts decoders: Mixtral (top-2 of 8 experts) and Qwen2-MoE / DeepSeekMoE style (fine-grained routed
experts plus a gated shared expert), with Llama's attention.

transformers 5 stores a block's experts as two 3-D tensors (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
applied by one of transformers' experts kernels (grouped GEMM by default, or the eager per-expert loop), so no
expert is an ``nn.Linear``: nothing can hook its inputs or swap its weight. ``prepare`` rewrites each such module
into ``Experts``, one ``ExpertMLP`` of three linears per expert, running the eager loop in its order: the logits of
transformers' eager implementation bit for bit, the grouped GEMM's to rounding (tests/test_moe.py). Each expert's
linears then see exactly the tokens routed to it, which is what calibration must collect per expert.

The router (``mlp.gate``) and Qwen2-MoE's shared-expert gate read the same normalized input as the experts: they
are ``kept`` in the groups, rewritten by every transform (a folded norm gain, a rotation, a migrated scale) and
never quantized, as in the MoE rows of GPTQ, AWQ and QuaRot's code.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Arch, LinearGroup
from .dense import ATTENTION


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: nn.Module, dtype, device):
        super().__init__()
        make = lambda i, o: nn.Linear(i, o, bias=False, dtype=dtype, device=device)  # noqa: E731
        self.gate_proj, self.up_proj, self.down_proj = make(hidden, intermediate), make(hidden, intermediate), \
            make(intermediate, hidden)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


LAYOUT = dict(is_concatenated=True, is_transposed=False, has_bias=False, has_gate=True, has_post_expert_norm=False)


class Experts(nn.ModuleList):
    """A block's experts, one module each, called as transformers' fused experts are:
    ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``."""

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "Experts":
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        n, two_i, hidden = gate_up.shape
        layout = {k: getattr(fused, k, v) for k, v in LAYOUT.items()}  # set by transformers' experts decorator
        if layout != LAYOUT or down.shape != (n, hidden, two_i // 2):
            raise NotImplementedError(
                f"{type(fused).__name__}: expected gate_up_proj [E, 2I, H] and down_proj [E, H, I] with {LAYOUT}, got "
                f"{tuple(gate_up.shape)}, {tuple(down.shape)} and {layout}; this expert layout needs its own adapter")
        experts = cls()
        for e in range(n):
            expert = ExpertMLP(hidden, two_i // 2, fused.act_fn, gate_up.dtype, gate_up.device)
            gate, up = gate_up[e].chunk(2, dim=0)  # F.linear(x, gate_up).chunk(2, -1): gate rows first
            expert.gate_proj.weight.data, expert.up_proj.weight.data = gate.clone(), up.clone()
            expert.down_proj.weight.data = down[e].clone()
            experts.append(expert.requires_grad_(False))
        return experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            slot, token = torch.where((top_k_index == e).T)  # transformers' order: by slot, then token
            if token.numel():
                y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def unfuse_experts(path: str):
    """``prepare`` for an entry whose blocks hold fused experts at ``path``."""
    def prepare(model: nn.Module, arch: Arch) -> None:
        for block in arch.block_list(model):
            fused = block.get_submodule(path)
            if not isinstance(fused, Experts):
                block.set_submodule(path, Experts.from_fused(fused))
    return prepare


EXPERT_MLP = (
    LinearGroup("post_attention_layernorm", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), "mlp",
                kept=("mlp.gate",), reader="mlp.gate"),
    LinearGroup("mlp.experts.{e}.up_proj", ("mlp.experts.{e}.down_proj",)),
)
COMMON = dict(
    blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm", head="lm_head",
    prologue=("model.embed_tokens", "model.rotary_emb"), value_out=("self_attn.v_proj", "self_attn.o_proj"),
    experts="mlp.experts", prepare=unfuse_experts("mlp.experts"),
)

MIXTRAL = Arch(
    name="mixtral", model_types=("mixtral",),
    groups=ATTENTION + EXPERT_MLP,
    residual_writers=("self_attn.o_proj", "mlp.experts.{e}.down_proj"),
    online_rotated=("mlp.experts.{e}.down_proj",),
    notes="router kept in high precision",
    **COMMON,
)

QWEN2_MOE = Arch(
    name="qwen2_moe", model_types=("qwen2_moe",),
    groups=ATTENTION + (
        LinearGroup("post_attention_layernorm", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), "mlp",
                    kept=("mlp.gate", "mlp.shared_expert_gate"), reader="mlp.gate"),
        EXPERT_MLP[0],
        LinearGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",)),
        EXPERT_MLP[1],
    ),
    residual_writers=("self_attn.o_proj", "mlp.shared_expert.down_proj", "mlp.experts.{e}.down_proj"),
    online_rotated=("mlp.shared_expert.down_proj", "mlp.experts.{e}.down_proj"),
    notes="router and shared-expert gate kept in high precision",
    **COMMON,
)
