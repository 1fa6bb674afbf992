"""Minifloats: the small floating-point encodings that scaled float formats store their elements and scales in.

A minifloat with ``E`` exponent bits, ``M`` mantissa bits and bias ``B`` holds

* normals ``(-1)^s · 2^(e - B) · (1 + m / 2^M)`` for exponent fields ``e ≥ 1``,
* subnormals ``(-1)^s · 2^(1 - B) · m / 2^M`` for ``e = 0`` (so ±0 too),

up to a largest finite value ``max`` that depends on how the format spends its top codes (OCP 8-bit FP spec v1.0
and OCP Microscaling spec v1.0):

=========  ===  ===  ====  ==========  =========================================
name        E    M    B     max         special codes
=========  ===  ===  ====  ==========  =========================================
e4m3        4    3    7     448         S.1111.111 is NaN; no infinities ("fn")
e5m2        5    2    15    57344       IEEE-like: S.11111.00 is ±inf, S.11111.xx NaN
e2m1        2    1    1     6           none: every code is a number
=========  ===  ===  ====  ==========  =========================================

``round(x, mode)`` maps fp32 values onto that grid:

* ``nearest``: round half to even (the specs' rounding), ``floor``/``ceil``: toward -inf/+inf on magnitudes
  (used for scales: round down or up so that nothing clips).
* saturating: finite values beyond ``max`` and ±inf become ``±max`` (the specs' saturation mode; the scaled
  formats never let an infinity reach an element, see scaled.py);
* NaN stays NaN; the sign of zero is kept (the formats have ±0).

The rounding is exact arithmetic on fp32: ``|x| = 2^e · f`` with ``e`` clamped to the smallest normal exponent,
``|x| / 2^(e - M)`` is an exact power-of-two scaling, and rounding that to an integer is rounding to the grid.

``E8M0`` is the MX scale: an unsigned exponent, ``2^(c - 127)`` for codes ``c`` in 0..254, code 255 is NaN; no
zero. Its ``round`` picks the power of two below (``floor``), above (``ceil``) or nearest in value (``nearest``,
ties up) and clamps to ``2^-127 .. 2^127``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ROUNDINGS = ("nearest", "floor", "ceil")
_ROUND = {"nearest": torch.round, "floor": torch.floor, "ceil": torch.ceil}


def _check_mode(mode: str) -> None:
    if mode not in ROUNDINGS:
        raise ValueError(f"unknown rounding {mode!r}; valid: {', '.join(ROUNDINGS)}")


def _exponent(a: torch.Tensor) -> torch.Tensor:
    """``floor(log2 a)`` for positive finite ``a``, exactly (frexp, not log2)."""
    return torch.frexp(a).exponent - 1


@dataclass(frozen=True)
class Minifloat:
    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max: float
    nan_code: int | None  # magnitude bits of the NaN code (sign bit added), None: no NaN
    inf_code: int | None = None  # magnitude bits of infinity, None: no infinities

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """The smallest normal exponent (subnormals share it)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """The exponent of the largest finite value: ``2^emax`` is the largest power of two on the grid."""
        return int(torch.frexp(torch.tensor(self.max)).exponent) - 1

    @property
    def tiny(self) -> float:
        """The smallest positive value (a subnormal)."""
        return 2.0 ** (self.emin - self.man_bits)

    def round(self, x: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
        """``x`` (any float dtype) onto this grid, as fp32: see the module docstring."""
        _check_mode(mode)
        x = x.float()
        a = x.abs()
        e = _exponent(torch.where(torch.isfinite(a) & (a > 0), a, torch.ones_like(a))).clamp(min=self.emin)
        quantum = torch.ldexp(torch.ones_like(a), e - self.man_bits)
        y = (_ROUND[mode](a / quantum) * quantum).clamp(max=self.max)
        return torch.where(torch.isnan(x), x, y.copysign(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Bit patterns (uint8, right-aligned) of values already on the grid; NaN becomes the NaN code, or 0 in a
        format without one (whose scaled formats carry NaN in the scale instead)."""
        a = x.float().abs()
        finite = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
        normal = finite >= 2.0**self.emin
        e = torch.where(normal, _exponent(finite.clamp(min=2.0**self.emin)), torch.full_like(finite, self.emin, dtype=torch.int32))
        mantissa = torch.ldexp(finite, self.man_bits - e) - normal.float() * 2**self.man_bits
        field = torch.where(normal, e + self.bias, torch.zeros_like(e))
        code = (field << self.man_bits) + mantissa.to(torch.int32)
        if self.inf_code is not None:
            code = torch.where(torch.isinf(a), self.inf_code, code)
        code = torch.where(torch.isnan(a), self.nan_code if self.nan_code is not None else 0, code)
        sign = (torch.signbit(x) & ~torch.isnan(x)).to(torch.int32)
        return ((sign << (self.bits - 1)) | code).to(torch.uint8)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Values (fp32) of bit patterns: the inverse of ``encode`` on the grid."""
        code = code.to(torch.int32)
        magnitude = code & ((1 << (self.bits - 1)) - 1)
        field = magnitude >> self.man_bits
        mantissa = (magnitude & ((1 << self.man_bits) - 1)).float()
        normal = field > 0
        significand = torch.where(normal, mantissa + 2**self.man_bits, mantissa)
        value = torch.ldexp(significand, torch.where(normal, field, 1) - self.bias - self.man_bits)
        if self.inf_code is not None:
            value = torch.where(magnitude == self.inf_code, torch.inf, value)
        if self.nan_code is not None:
            nan = magnitude >= self.nan_code if self.inf_code is None else magnitude > self.inf_code
            value = torch.where(nan, torch.nan, value)
        return torch.where(code >> (self.bits - 1) == 1, -value, value)

    def __str__(self) -> str:
        return self.name


E4M3 = Minifloat("e4m3", 4, 3, bias=7, max=448.0, nan_code=0x7F)
E5M2 = Minifloat("e5m2", 5, 2, bias=15, max=57344.0, nan_code=0x7F, inf_code=0x7C)
E2M1 = Minifloat("e2m1", 2, 1, bias=1, max=6.0, nan_code=None)
ELEMENTS = {f.name: f for f in (E4M3, E5M2, E2M1)}


@dataclass(frozen=True)
class PowerOfTwo:
    """E8M0: ``2^(c - 127)``, codes 0..254, 255 is NaN."""

    name: str = "e8m0"
    bits: int = 8
    bias: int = 127

    @property
    def max(self) -> float:
        return 2.0**self.bias

    def round(self, x: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
        """Positive ``x`` to a power of two (see the module docstring); NaN stays NaN."""
        _check_mode(mode)
        x = x.float()
        frac, exp = torch.frexp(x)  # x = frac · 2^exp, frac in [0.5, 1)
        k = {"floor": exp - 1, "ceil": torch.where(frac == 0.5, exp - 1, exp),
             "nearest": torch.where(frac >= 0.75, exp, exp - 1)}[mode]
        k = torch.where(x > 0, k, -self.bias).clamp(-self.bias, self.bias)  # 0 and below: the smallest scale
        k = torch.where(torch.isinf(x), self.bias, k)
        return torch.where(torch.isnan(x), x, torch.ldexp(torch.ones_like(x), k))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        code = (torch.frexp(x.float()).exponent - 1 + self.bias).clamp(0, 254)
        return torch.where(torch.isnan(x), 255, code).to(torch.uint8)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        code = code.to(torch.int32)
        value = torch.ldexp(torch.ones_like(code, dtype=torch.float32), code - self.bias)
        return torch.where(code == 255, torch.nan, value)

    def __str__(self) -> str:
        return self.name


E8M0 = PowerOfTwo()


@dataclass(frozen=True)
class IEEEScale:
    """A scale stored as an IEEE float (fp16, fp32), within its normal range ``tiny .. max``."""

    dtype: torch.dtype

    @property
    def name(self) -> str:
        return {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}[self.dtype]

    @property
    def bits(self) -> int:
        return torch.finfo(self.dtype).bits

    @property
    def max(self) -> float:
        return torch.finfo(self.dtype).max

    def round(self, x: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
        _check_mode(mode)
        info = torch.finfo(self.dtype)
        x = x.float()
        stored = x.clamp(info.tiny, info.max).to(self.dtype)
        if mode != "nearest":  # step back one ulp where nearest went the wrong way
            wrong = stored.float() > x if mode == "floor" else stored.float() < x
            toward = torch.full_like(stored, 0.0 if mode == "floor" else torch.inf)
            stored = torch.where(wrong, torch.nextafter(stored, toward), stored)
        return torch.where(torch.isnan(x), x, stored.float().clamp(info.tiny, info.max))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return code.float()

    def __str__(self) -> str:
        return self.name


FP16 = IEEEScale(torch.float16)
FP32 = IEEEScale(torch.float32)
SCALES = {f.name: f for f in (E8M0, E4M3, FP16, FP32)}
