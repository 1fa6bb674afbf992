"""Mamba (Gu & Dao, 2023), transformers' ``MambaForCausalLM``: a residual stream of pre-norm blocks whose mixer is a
selective state-space model instead of attention and an MLP.

In a block, ``norm`` feeds ``in_proj``, which writes ``x`` and the gate ``z``. ``x`` goes through the causal
depthwise ``conv1d`` and SiLU; ``x_proj`` reads that and writes ``(Δ, B, C)``, the first ``dt_rank`` columns (Δ)
projected by ``dt_proj``; the selective scan (``A = −exp(A_log)``, ``D``) turns ``x`` into ``y``, and ``out_proj``
reads ``y · SiLU(z)`` and writes to the residual stream. transformers 5 applies ``dt_proj`` as
``dt_proj.weight @ Δ`` without calling the module, so its input is taken from ``x_proj``'s output (``tap``).

Quantized: ``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj``. Kept in high precision: the convolution, ``A_log``,
``D`` and ``dt_proj``'s bias (as Quamba, Chiang et al. 2024, keeps the SSM's parameters), the embedding and the head.
There is no attention, so no KV cache and no per-head value rotation (QuaRot's R2, R3).
"""
from __future__ import annotations

import math

import torch

from .base import Arch, LinearGroup

# MambaConfig's time_step_min, time_step_max and time_step_floor: those of every released Mamba and of the tiny
# model. ``init`` gets no config, so they are fixed here.
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


def init(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
    """The SSM's parameters as Mamba's own init draws them (a random tiny Mamba is then a stable, input-selective
    SSM, not noise): S4D-real ``A = −(1..N)`` per channel, ``D = 1``, and ``dt_proj``'s bias ``softplus⁻¹(Δ)`` with
    Δ log-uniform in [DT_MIN, DT_MAX], so each channel starts with its own time scale. The depthwise convolution
    draws N(0, 1/fan_in) like the linears; everything else is left to ``models.build_random``."""
    if name.endswith(".A_log"):
        return torch.log(torch.arange(1, p.shape[1] + 1, dtype=torch.float32)).expand(p.shape)
    if name.endswith(".D"):
        return torch.ones(p.shape)
    if name.endswith(".dt_proj.bias"):
        u = torch.rand(p.shape, generator=gen)
        dt = torch.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=DT_FLOOR)
        return dt + torch.log(-torch.expm1(-dt))  # softplus(bias) = dt
    if name.endswith(".conv1d.weight"):
        return torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5  # [channels, 1, kernel]: fan-in = kernel
    return None


MAMBA = Arch(
    name="mamba",
    model_types=("mamba",),
    blocks="backbone.layers",
    embed="backbone.embeddings",
    final_norm="backbone.norm_f",
    head="lm_head",
    groups=(
        LinearGroup("norm", ("mixer.in_proj",), "mixer"),
        LinearGroup(None, ("mixer.x_proj",)),  # reads SiLU(conv1d(x)): nothing moves through the SiLU
        # reads Δ, x_proj's first dt_rank outputs; B and C go to the scan, so no scale moves through x_proj either
        LinearGroup("mixer.x_proj", ("mixer.dt_proj",), tap="mixer.x_proj"),
        LinearGroup(None, ("mixer.out_proj",)),  # reads y·SiLU(z): a gated product
    ),
    prologue=("backbone.embeddings",),
    attention=None,
    residual_writers=("mixer.out_proj",),
    # out_proj is called as a module, so its input can be rotated at run time (x ↦ x H/√n, the weight holding
    # W H/√n: exact, QuaRot's R4 before down_proj). It is the only rotation that reaches that input: the gate and
    # the scan are nonlinear in it. And it is where Mamba's activation outliers are: Quamba puts its Hadamard there.
    online_rotated=("mixer.out_proj",),
    value_out=None,
    init=init,
    notes="conv1d, A_log, D and dt_proj's bias kept in high precision; no attention, so no KV cache",
)
