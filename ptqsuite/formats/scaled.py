"""Scaled float formats: minifloat elements sharing a scale per group. FP8, MXFP4/MXFP8 and NVFP4 are presets.

A format is an element minifloat (E4M3, E5M2, E2M1; minifloat.py), a scale format (E8M0, E4M3, FP16, FP32), a
scale rounding rule, and optionally NVFP4's second-level fp32 tensor scale. The granularity (granularity.py) says
which elements share a scale: per tensor, channel or token for FP8; blocks of 32 (MX) or 16 (NVFP4) along a row,
``PerGroup(n)``, where arXiv 2507.17417 varies the block size.

For a group ``g`` with ``amax = max|g|`` and element format ``E`` (largest value ``E.max``, largest power of two
``2^E.emax``):

* tensor scale (NVFP4 only): ``S = T / (E.max · scale.max)`` in fp32 over the finite groups' maximum ``T``
  (``S = 1`` if ``T = 0``), so the largest block scale lands on the scale format's maximum; else ``S = 1``.
  With a tensor scale and an E8M0 or FP32 block scale (not a preset) ``E.max · scale.max`` overflows fp32, ``S``
  is 0 and falls back to 1: such variants have no working second level (the kernels reproduce this);
* block scale ``s``, rounded into the scale format by the rule:

  ===========  =================================================  ===========================================
  rounding     ``s``                                              clipping
  ===========  =================================================  ===========================================
  ``floor``    round down ``(amax / S) / 2^E.emax``               OCP MX v1.0: ``2^(⌊log2 amax⌋ - E.emax)`` for
                                                                  E8M0. ``amax / s < 2^(E.emax+1)`` can exceed
                                                                  ``E.max`` (E2M1: (6, 8) saturate to 6)
  ``ceil``     round up ``(amax / S) / E.max``                    never: ``amax / s ≤ E.max``
  ``nearest``  round to nearest even ``(amax / S) / E.max``       by at most half a scale step (NVFP4, FP8)
  ===========  =================================================  ===========================================

* the effective scale ``σ = s · S`` (one fp32 product), elements ``q = E.round(x / σ)`` (correctly rounded fp32
  division, then round-half-even and saturation onto the element grid), and ``x̂ = q · σ``.

Special values, defined the same way for every preset:

* an all-zero group gets ``s = round(1)``, and decodes to zeros; a group whose scale underflows to 0 (E4M3 scales
  below 2^-10) is flushed to zeros;
* zeros keep their sign (the element formats have ±0); subnormal inputs are values like any other: they decode
  to the nearest grid point of their group, usually ±0;
* a group holding NaN or ±inf has a NaN scale (E8M0's code 255, as the MX spec makes ``X = NaN``), so the whole
  group decodes to NaN; finite groups of the same tensor are unaffected;
* finite values beyond ``E.max · σ`` saturate to ``±E.max · σ``.

Effective bits per element: ``E.bits + scale.bits · groups / numel (+ 32 / numel with a tensor scale)``: MXFP4
4.25, MXFP8 8.25, NVFP4 4.5 (+ 32 per tensor), FP8 per channel ``8 + 32 / in_features``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..granularity import Granularity, to_groups
from .minifloat import E2M1, E4M3, E5M2, E8M0, FP32, ROUNDINGS, IEEEScale, Minifloat, PowerOfTwo
from .qtensor import QTensor

TENSOR_SCALE_BITS = 32


@dataclass(frozen=True)
class FloatFormat:
    element: Minifloat
    scale: Minifloat | PowerOfTwo | IEEEScale = FP32
    rounding: str = "nearest"
    tensor_scale: bool = False

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"scale rounding must be one of {list(ROUNDINGS)}, got {self.rounding!r}")

    @property
    def bits(self) -> int:
        return self.element.bits

    def fit(self, g: torch.Tensor, clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block scales ``s[R, G, 1]`` and the tensor scale ``S`` (or None) for grouped values ``g[R, G, n]``.
        ``clip``: ratios ``[R, G, 1]`` in (0, 1] that shrink each group's ``amax`` before its block scale is chosen;
        the tensor scale stays that of the unclipped tensor, so groups clipped differently share one ``S``."""
        amax = g.float().abs().amax(-1, keepdim=True)
        finite = torch.isfinite(amax)
        S = self._tensor_scale(amax[finite]) if self.tensor_scale else None
        if clip is not None:
            amax = amax * clip
        target = amax / S if S is not None else amax
        unit = 2.0**self.element.emax if self.rounding == "floor" else self.element.max
        ideal = torch.where(amax > 0, target / unit, torch.ones_like(amax))
        s = self.scale.round(torch.where(finite, ideal, torch.ones_like(ideal)), self.rounding)
        return torch.where(finite, s, torch.nan), S

    def _tensor_scale(self, amax: torch.Tensor) -> torch.Tensor:
        T = amax.max() if amax.numel() else torch.zeros(())
        S = T / (self.element.max * self.scale.max)
        return torch.where(S > 0, S, torch.ones_like(S))

    def sigma(self, s: torch.Tensor, S: torch.Tensor | None) -> torch.Tensor:
        """The effective scale ``s · S`` (fp32) that elements are divided by and multiplied with."""
        return s * S if S is not None else s

    def encode(self, g: torch.Tensor, s: torch.Tensor, S: torch.Tensor | None) -> torch.Tensor:
        sigma = self.sigma(s, S)
        x = torch.where(sigma != 0, g.float() / sigma, torch.zeros_like(g, dtype=torch.float32).copysign(g.float()))
        return self.element.encode(self.element.round(x))

    def decode(self, q: QTensor) -> torch.Tensor:
        return self.element.decode(q.codes) * self.sigma(q.scale, q.global_scale)

    def quantize(self, x: torch.Tensor, gran: Granularity, params: tuple | None = None) -> QTensor:
        """``params``: the ``fit`` of another tensor to reuse (error-feedback methods fix scales as they go)."""
        g = to_groups(x, gran)
        s, S = params if params is not None else self.fit(g)
        return QTensor(self.encode(g, s, S), s, None, tuple(x.shape), self, gran, S)

    def project(self, g: torch.Tensor, params: tuple) -> torch.Tensor:
        """Grouped values rounded onto the grid ``params`` (a ``fit``) defines: decode(encode(g))."""
        s, S = params
        return self.element.decode(self.encode(g, s, S)) * self.sigma(s, S)

    def fake(self, x: torch.Tensor, gran: Granularity) -> torch.Tensor:
        """Quantize then dequantize, returned in ``x``'s dtype."""
        return self.quantize(x, gran).dequantize(x.dtype)

    def bits_per_element(self, shape: tuple[int, int], gran: Granularity) -> float:
        rows, cols = shape
        meta = self.scale.bits * gran.num_groups(rows, cols) + (TENSOR_SCALE_BITS if self.tensor_scale else 0)
        return self.element.bits + meta / (rows * cols)

    def __str__(self) -> str:
        tensor = "+fp32" if self.tensor_scale else ""
        return f"{self.element}-scale{self.scale}{tensor}-{self.rounding}"


FP8 = FloatFormat(E4M3)
FP8_E5M2 = FloatFormat(E5M2)
MXFP4 = FloatFormat(E2M1, E8M0, "floor")
MXFP8 = FloatFormat(E4M3, E8M0, "floor")
NVFP4 = FloatFormat(E2M1, E4M3, "nearest", tensor_scale=True)
