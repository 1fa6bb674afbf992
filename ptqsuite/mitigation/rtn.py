"""Round-to-nearest: each weight to its nearest grid point. The baseline every other method must beat."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import QTensor
from ..granularity import to_groups

ROLE = "solve"
needs_calibration = False


@dataclass(frozen=True)
class Options:
    pass


def options(step) -> Options:
    from . import from_step

    return from_step(step, Options)


def solve(W: torch.Tensor, stats, spec, options: Options = Options(), clip=None) -> QTensor:
    params = spec.fmt.fit(to_groups(W, spec.gran), clip) if clip is not None else None
    return spec.fmt.quantize(W, spec.gran, params)
