"""A quantized tensor: codes in groups plus the metadata to decode them. Shared by every format family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..granularity import Granularity, from_groups


@dataclass(frozen=True)
class QTensor:
    """Codes ``codes[R, G, n]`` (integers, or a minifloat's bit patterns) with per-group ``scale[R, G, 1]``
    (fp32 tensors holding values exactly representable in the format's scale dtype), an integer ``zero[R, G, 1]``
    for asymmetric INT formats, and a second-level fp32 ``global_scale`` (NVFP4). ``fmt.decode(self)`` gives the
    grouped values; ``dequantize`` restores the original shape."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: tuple[int, int]
    fmt: Any  # a format of this package
    gran: Granularity
    global_scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return from_groups(self.fmt.decode(self), self.shape).to(dtype)
