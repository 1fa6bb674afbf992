"""Clipping search: shrink each group's range by the ratio, from a grid, that minimizes the group's output error on
the calibration inputs. AWQ's auto-clip (Lin et al., 2024; ``auto_clip_layer``): ratios ``1 − i/20`` for
``i < 10`` (down to 0.55), judged by ``‖X_g (w_g − q_g)ᵀ‖²``, the output error of the group's own columns ``g``.

AWQ computes that error on a subsample of calibration tokens; here it is the exact quadratic form in the group's
diagonal block of the Hessian, ``e_g H_gg e_gᵀ``, over every calibration token, at no extra cost. Per-channel
granularity has one group spanning the row, so its block is the whole ``H``; per-tensor sums the rows.

The shrink goes through the format's ``fit(groups, clip)``: an INT range's ends both move toward zero by the ratio
(GPTQ's ``Quantizer`` mse search shrinks the same way); a float format's block ``amax`` shrinks, its tensor
scale does not. A ratio of 1 is in the grid, so the searched clip is never worse than none, group by group
(ties keep the larger ratio). The search returns plain data, the ratios ``[R, G, 1]``: a solver (RTN, GPTQ) then
uses them for every fit of that group.

Recipe: ``clip+rtn-w4g128``, ``clip+gptq-w3``; ``clip<k>``: ``k`` ratios ``1 − i/(2k)``, ``i < k`` (default 10, at
most 20).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..granularity import PerGroup, PerTensor, from_groups, mask, to_groups
from .stats import Stats

ROLE = "clip"
needs_calibration = True
DEFAULT_ARG = 10
MAX_STEPS = 20


@dataclass(frozen=True)
class Options:
    steps: int = DEFAULT_ARG  # ratios 1, 1 - 1/(2·steps), ..., down to 1/2 + 1/(2·steps): AWQ's grid at 10


def options(step) -> Options:
    from . import from_step

    return from_step(step, Options, arg="steps", bounds=(1, MAX_STEPS))


def ratios(options: Options = Options()) -> list[float]:
    return [1 - i / (2 * options.steps) for i in range(options.steps)]


def search(W: torch.Tensor, stats: Stats, spec, options: Options = Options()) -> torch.Tensor:
    """The ratio per group ``[R, G, 1]`` with the least output error."""
    W = W.float()
    groups = to_groups(W, spec.gran)
    best_err = best = None
    for ratio in ratios(options):
        clip = torch.full_like(groups[..., :1], ratio)
        err = group_error(W, spec.fmt.project(groups, spec.fmt.fit(groups, clip)), stats.H, spec.gran)
        if best is None:
            best_err, best = err, clip
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better[..., None], clip, best)
    return best


def group_error(W: torch.Tensor, projected: torch.Tensor, H: torch.Tensor, gran) -> torch.Tensor:
    """``e_g H_gg e_gᵀ`` per group ``[R, G]`` for the error ``e = W − projected`` (grouped layout, tails padded)."""
    E = (to_groups(W, gran) - projected) * mask(tuple(W.shape), gran).to(W.device)
    if isinstance(gran, PerGroup):
        n, G = gran.n, E.shape[1]
        pad = G * n - H.shape[0]
        Hp = torch.nn.functional.pad(H, (0, pad, 0, pad))
        blocks = Hp.reshape(G, n, G, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, n, n]
        return torch.einsum("rgi,gij,rgj->rg", E, blocks, E)
    rows = from_groups(E, tuple(W.shape))
    per_row = ((rows @ H) * rows).sum(-1)
    return per_row.sum().reshape(1, 1) if isinstance(gran, PerTensor) else per_row[:, None]
