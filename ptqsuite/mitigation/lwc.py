"""OmniQuant's learnable weight clipping (LWC; Shao et al., 2024): per group, the ends of the INT range are
``σ(β) · min`` and ``σ(γ) · max`` (symmetric: ``σ(γ) · max|w|``), with ``γ, β`` learned block by block so that the
block with fake-quantized weights reproduces the full-precision block's outputs.

Faithful to the reference (OpenGVLab/OmniQuant, ``--lwc``): ``γ = β = 4`` at the start (``σ(4) ≈ 0.982``), rounding
with a straight-through estimator, scale clamped at 1e-5 while training, AdamW with lr 1e-2 and no weight decay,
mean-squared error between the quantized block's output on the quantized model's activations and the
full-precision block's output on the full-precision model's activations (two activation streams), ``epochs``
passes over the calibration set (20, the paper's W4A16 setting), one step per calibration sequence (batch size 1,
as the reference). Deviation: the learned ratios are then used by the recipe's solver through the format's
``fit(groups, (σ(β), σ(γ)))``, which rounds scales to fp16 as deployment does (the training graph does not).

INT formats only, as in OmniQuant: a float format's power-of-two or E4M3 scale does not follow a learned range
smoothly; use ``clip`` (the grid search) there.

Recipe: ``lwc+rtn-w4g128`` (OmniQuant weight-only), ``lwc5+gptq-w3``: ``lwc<epochs>``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..formats import IntFormat
from ..granularity import from_groups, to_groups

ROLE = "clip"
needs_calibration = True
DEFAULT_ARG = 20
INIT = 4.0


@dataclass(frozen=True)
class Options:
    epochs: int = DEFAULT_ARG
    lr: float = 1e-2


def options(step) -> Options:
    from . import from_step

    return from_step(step, Options, arg="epochs")


def unsupported(spec) -> str | None:
    if not isinstance(spec.fmt, IntFormat):
        return "LWC learns the ends of INT ranges (OmniQuant); for float formats use the clip search"
    return None


class LearnedClip(nn.Module):
    """A weight parametrization: the fake-quantized weight under learnable clipping, differentiable in ``γ, β``."""

    def __init__(self, W: torch.Tensor, spec):
        super().__init__()
        self.fmt, self.gran = spec.fmt, spec.gran
        g = to_groups(W.detach().float(), self.gran)
        self.register_buffer("lo", g.amin(-1, keepdim=True).clamp(max=0))
        self.register_buffer("hi", g.abs().amax(-1, keepdim=True) if self.fmt.symmetric
                             else g.amax(-1, keepdim=True).clamp(min=0))
        self.gamma = nn.Parameter(torch.full_like(self.hi, INIT))
        self.beta = None if self.fmt.symmetric else nn.Parameter(torch.full_like(self.lo, INIT))

    def clip(self):
        """The learned ratios in the form ``fit`` takes."""
        hi = torch.sigmoid(self.gamma).detach()
        return hi if self.beta is None else (torch.sigmoid(self.beta).detach(), hi)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        g = to_groups(W.float(), self.gran)
        hi = self.hi * torch.sigmoid(self.gamma)
        if self.beta is None:
            scale = (hi / self.fmt.qmax).clamp(min=1e-5)
            q = torch.clamp(_round(g / scale), self.fmt.qmin, self.fmt.qmax) * scale
        else:
            lo = self.lo * torch.sigmoid(self.beta)
            scale = ((hi - lo) / self.fmt.qmax).clamp(min=1e-5)
            zero = _round(-lo / scale)
            q = (torch.clamp(_round(g / scale) + zero, 0, self.fmt.qmax) - zero) * scale
        return from_groups(q, W.shape).to(W.dtype)


def _round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()  # straight-through estimator


def train(linears: list[tuple[str, nn.Linear]], inputs: list[torch.Tensor], targets: list[torch.Tensor], run,
          spec, options: Options = Options()) -> tuple[dict, list[float]]:
    """Learn the clipping of every linear in a block: one step per ``inputs[i]`` (the pipeline passes single
    sequences). ``run(x, i)`` is the block's output on input ``x``, the ``i``-th. Returns ``({linear name: clip}, mean loss per epoch)``; the block is left as it was."""
    clips = {name: LearnedClip(linear.weight, spec) for name, linear in linears}
    for (name, linear) in linears:
        parametrize.register_parametrization(linear, "weight", clips[name])
    history = []
    try:
        with torch.enable_grad():
            opt = torch.optim.AdamW([p for c in clips.values() for p in c.parameters()], lr=options.lr,
                                    weight_decay=0.0)
            for _ in range(options.epochs):
                total = 0.0
                for i, (x, y) in enumerate(zip(inputs, targets)):
                    loss = torch.nn.functional.mse_loss(run(x, i).float(), y.float())
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"LWC loss is {loss.item()} on calibration input {i}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item()
                history.append(total / len(inputs))
    finally:
        for name, linear in linears:
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
    return {name: c.clip() for name, c in clips.items()}, history
