"""Which elements share a scale. The only module that reshapes tensors for scales.

A granularity turns a 2-D tensor ``x[rows, cols]`` (a weight ``[out, in]`` or activations ``[tokens, features]``)
into groups ``g[R, G, n]`` whose last axis shares one scale, and back. Scales and zero points then have shape
``[R, G, 1]``.

``PerGroup(n)`` handles ``cols % n != 0`` with a *tail group* of ``cols % n`` elements. To keep one tensor shape,
the tail is padded to ``n`` by repeating its own last element: min, max and absmax of the group are unchanged,
so every order-statistic scale rule is exact. ``mask`` marks the real elements for statistics that are not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, 1, -1)

    def num_groups(self, rows: int, cols: int) -> int:
        return 1

    def __str__(self) -> str:
        return "per-tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per row: per output channel of a weight."""

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 1, x.shape[1])

    def num_groups(self, rows: int, cols: int) -> int:
        return rows

    def __str__(self) -> str:
        return "per-channel"


@dataclass(frozen=True)
class PerToken(PerChannel):
    """One scale per row of activations (a token). Same layout as PerChannel, named for the reader."""

    def __str__(self) -> str:
        return "per-token"


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``n`` consecutive elements of a row, with a shorter tail group if ``n`` does not divide it."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"group size must be a positive integer, got {self.n!r}")

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape
        pad = -cols % self.n
        if pad:
            x = torch.cat([x, x[:, -1:].expand(rows, pad)], dim=1)
        return x.reshape(rows, -1, self.n)

    def num_groups(self, rows: int, cols: int) -> int:
        return rows * math.ceil(cols / self.n)

    def __str__(self) -> str:
        return f"group-{self.n}"


Granularity = PerTensor | PerChannel | PerToken | PerGroup


def to_groups(x: torch.Tensor, gran: Granularity) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x.shape)}")
    return gran.to_groups(x)


def from_groups(g: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Inverse of `to_groups` for a tensor of the original ``shape``: drops tail padding."""
    rows, cols = shape
    return g.reshape(rows, -1)[:, :cols]


def mask(shape: tuple[int, int], gran: Granularity) -> torch.Tensor:
    """True for real elements of the grouped layout, False for tail padding."""
    rows, cols = shape
    col = torch.arange(cols).expand(rows, cols)
    grouped = to_groups(col, gran)
    position = grouped.shape[-1] * torch.arange(grouped.shape[1]).view(1, -1, 1) + torch.arange(grouped.shape[-1])
    return grouped == position if isinstance(gran, PerGroup) else torch.ones_like(grouped, dtype=torch.bool)
