"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights with per-channel scales.

For each group of linears fed by a norm, with ``max|X_j|`` channel j's largest input magnitude over the
calibration tokens and ``max|W_j|`` the largest weight in input column j over the group's linears,

    s_j = max|X_j|^α / max|W_j|^(1−α),

the norm writes ``x / s`` (its gain divided by s) and the linears hold ``W diag s``: the product is unchanged, the
activations' channel ranges are flattened by α, the weights' stretched by 1−α. As the reference implementation
does for Llama (``smooth_lm``), only norm-fed groups (q/k/v, gate/up) are smoothed; ``smooth<α·100>`` sets α,
default 0.5 (the paper's default). Both maxima are clamped below at 1e-5, as in the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blockwise import walk
from ..mitigation import from_step
from . import algebra

ROLE = "transform"
needs_calibration = True
DEFAULT_ARG = 50


@dataclass(frozen=True)
class Options:
    alpha: int = 50  # migration strength in percent: smooth<alpha>

    @property
    def migration(self) -> float:
        return self.alpha / 100


def options(step) -> Options:
    return from_step(step, Options, arg="alpha", bounds=(0, 100))


@dataclass(frozen=True)
class State:
    scales: dict  # "<block index>.<source>" -> s [channels], float32
    act_absmax: dict  # same keys: max|X_j| over the calibration tokens (kept: it shows the outliers)


def input_absmax(model, arch, calibration, device) -> dict[str, torch.Tensor]:
    """Per norm-fed group, each input channel's largest magnitude over the calibration tokens (observed where every
    token is read: a router rather than an expert)."""
    sources = {g.observed: g.source for g in arch.norm_groups(arch.block_list(model)[0])}
    absmax = {}

    def on_call(b, name, args, kw):
        m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float().cpu()
        key = f"{b}.{sources[name]}"
        absmax[key] = torch.maximum(absmax[key], m) if key in absmax else m

    for _ in walk(model, arch, calibration, device, tuple(sources), on_call):
        pass
    return absmax


def fit(model, arch, calibration, recipe, options: Options, device=None) -> State:
    absmax = input_absmax(model, arch, calibration, device or next(model.parameters()).device)
    scales = {}
    for b, block in enumerate(arch.block_list(model)):
        for g in arch.norm_groups(block):
            key = f"{b}.{g.source}"
            w_max = torch.stack([block.get_submodule(n).weight.detach().abs().amax(0).float().cpu()
                                 for n in g.linears]).amax(0)
            a = options.migration
            scales[key] = absmax[key].clamp(min=1e-5) ** a / w_max.clamp(min=1e-5) ** (1 - a)
    return State(scales, absmax)


def apply(model, arch, state: State) -> None:
    for b, block in enumerate(arch.block_list(model)):
        for g in arch.norm_groups(block):
            algebra.migrate(block.get_submodule(g.source), algebra.readers(block, g), state.scales[f"{b}.{g.source}"])
