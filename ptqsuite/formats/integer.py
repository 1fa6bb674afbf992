"""Integer formats INT(b, symmetric) with a granularity (see granularity.py), following the GPTQ reference quantizer:

* asymmetric: ``lo = min(min x, 0)``, ``hi = max(max x, 0)`` (the range always holds 0, so 0 is exact),
  ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``, ``q = clamp(round(x / s) + z, 0, 2^b - 1)``,
  ``x̂ = s · (q - z)``.
* symmetric: ``s = max|x| / (2^(b-1) - 1)``, ``q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)``, ``x̂ = s · q``
  (AWQ's, SmoothQuant's and LLM.int8()'s rule: ``±max|x|`` is exact, nothing clips, and quantizing a quantized
  tensor changes nothing. GPTQ's and torchao's ``max|x| / ((2^b - 1) / 2)`` clips the positive extreme and is
  not idempotent. RTN never emits ``-2^(b-1)``; error-feedback methods may.)

Scales are rounded to their storage dtype (fp16) *before* encoding, so fake quantization computes exactly what a
deployed kernel with fp16 scales computes. They are rounded toward zero: a grid never wider than the range puts the
range's extremes on the extreme codes (clipping them by at most ``qmax · 2^-10`` of a step). Symmetric formats
are then idempotent (refitting recovers the same scale). Asymmetric ones are too except at exact round-half ties
of the zero point and the top code, e.g. int2 ``[[-0.5, 2.5]]`` → ``[[0, 2]]`` → ``[[0, 1.9995]]`` (kept as a
strict xfail in tests/kernels/test_int_quant.py). A group whose range is 0 (all zeros) gets scale 1: its codes decode
to the exact input. Rounding is round-half-to-even (torch.round).

Special values: a group holding NaN or ±inf gets a NaN scale (codes 0), so the whole group decodes to NaN, as in
the scaled float formats; zeros decode to +0.0 (integer codes have no sign); subnormal inputs are ordinary values
(a group of them has its scale clamped to fp16's smallest normal, 6.1e-5, and decodes to zeros).

Effective bits per element count the codes plus the per-group metadata: a 16-bit scale, and for asymmetric
formats a ``b``-bit zero point (packed integer zeros, as GPTQ and AWQ store them):
``b + (16 + [asym]·b) / group_elements``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..granularity import Granularity, to_groups
from .qtensor import QTensor

SCALE_BITS = 16


@dataclass(frozen=True)
class IntFormat:
    bits: int
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.float16

    VALID_BITS = tuple(range(2, 9))

    def __post_init__(self) -> None:
        if self.bits not in self.VALID_BITS:
            raise ValueError(f"INT format bits must be one of {list(self.VALID_BITS)}, got {self.bits!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def fit(self, g: torch.Tensor, clip=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point for grouped values ``g[R, G, n]`` (statistics over the last axis). ``clip``: ratios
        ``[R, G, 1]`` in (0, 1] that shrink the range (``max|x|``, or ``min`` and ``max`` alike), or a pair
        ``(lo_ratio, hi_ratio)`` that shrinks each end of an asymmetric range on its own (OmniQuant's LWC)."""
        g = g.float()
        lo_ratio, hi_ratio = clip if isinstance(clip, tuple) else (clip, clip)
        if self.symmetric:
            amax = g.abs().amax(-1, keepdim=True)
            scale, zero = _shrink(amax, hi_ratio) / (2 ** (self.bits - 1) - 1), None
        else:
            lo = _shrink(g.amin(-1, keepdim=True).clamp(max=0), lo_ratio)
            hi = _shrink(g.amax(-1, keepdim=True).clamp(min=0), hi_ratio)
            scale = (hi - lo) / (2**self.bits - 1)
        finite = torch.isfinite(g).all(-1, keepdim=True)
        scale = self._stored(torch.where(scale > 0, scale, torch.ones_like(scale)))
        scale = torch.where(finite, scale, torch.nan)  # NaN or ±inf in a group: the whole group decodes to NaN
        if not self.symmetric:
            zero = torch.round(-lo / scale).clamp(0, self.qmax).nan_to_num(0.0)
        return scale, zero

    def encode(self, g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        q = torch.round(g.float() / scale)
        if zero is not None:
            q = q + zero
        return q.clamp(self.qmin, self.qmax).nan_to_num(0.0).to(torch.int16)

    def decode(self, q: QTensor) -> torch.Tensor:
        codes = q.codes.float()
        return q.scale * (codes - q.zero if q.zero is not None else codes)

    def quantize(self, x: torch.Tensor, gran: Granularity, params: tuple | None = None) -> QTensor:
        """``params``: the ``fit`` of another tensor to reuse (error-feedback methods fix scales as they go)."""
        g = to_groups(x, gran)
        scale, zero = params if params is not None else self.fit(g)
        return QTensor(self.encode(g, scale, zero), scale, zero, tuple(x.shape), self, gran)

    def project(self, g: torch.Tensor, params: tuple) -> torch.Tensor:
        """Grouped values rounded onto the grid ``params`` (a ``fit``) defines: decode(encode(g))."""
        scale, zero = params
        q = self.encode(g, scale, zero).float()
        return scale * (q - zero if zero is not None else q)

    def fake(self, x: torch.Tensor, gran: Granularity) -> torch.Tensor:
        """Quantize then dequantize, returned in ``x``'s dtype: what accuracy cases evaluate."""
        return self.quantize(x, gran).dequantize(x.dtype)

    def bits_per_element(self, shape: tuple[int, int], gran: Granularity) -> float:
        rows, cols = shape
        meta = SCALE_BITS + (0 if self.symmetric else self.bits)
        return self.bits + meta * gran.num_groups(rows, cols) / (rows * cols)

    def _stored(self, scale: torch.Tensor) -> torch.Tensor:
        """Round toward zero to the storage dtype, within its normal range (fp16: 6.1e-5 .. 65504)."""
        info = torch.finfo(self.scale_dtype)
        scale = scale.clamp(info.tiny, info.max)
        stored = scale.to(self.scale_dtype)
        stored = torch.where(stored.float() > scale, torch.nextafter(stored, torch.zeros_like(stored)), stored)
        return stored.float().clamp(min=info.tiny)

    def __str__(self) -> str:
        return f"int{self.bits}-{'sym' if self.symmetric else 'asym'}"


def _shrink(bound: torch.Tensor, ratio: torch.Tensor | None) -> torch.Tensor:
    return bound if ratio is None else bound * ratio
