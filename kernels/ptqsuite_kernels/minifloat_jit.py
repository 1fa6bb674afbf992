"""Triton helpers for minifloats (ptqsuite/formats/minifloat.py) in integer arithmetic on fp32 bit patterns.

Shared by float_quant.py (rounding onto element and scale grids) and fp4_gemm.py (decoding codes). Every helper
works on the bits of non-negative values (sign handled by the caller) and uses only integer operations, exact
conversions of integers below 2^24 to fp32, and ``div_rn`` on operands in ``[2^23, 2^24)``. So the results are
the same in the interpreter and on a GPU whatever the GPU does with subnormals: Triton has compiled libdevice
calls, div_rn among them, with flush-to-zero (triton-lang/triton#8557 stopped that for div_rn; triton 3.9 emits
``div.rn.f32``), which would turn an E8M0 scale of 2^-127 into a division by zero.

Representation: a finite magnitude is ``sig · 2^lsb`` with an integer ``sig`` (int32 or int64) and
``top = floor(log2 value)``; `split` gives ``sig`` in ``[2^23, 2^24)``, ``lsb = top − 23``, subnormal inputs
included. `to_grid` rounds such a value onto a minifloat grid with ``MAN`` mantissa bits and smallest normal
exponent ``EMIN``, by the rule of ``Minifloat.round`` (``e = max(top, EMIN)``, round ``value / 2^(e − MAN)`` to an
integer ``r``), and returns the code ``((e − EMIN) << MAN) + r``: a normal ``r`` in ``[2^MAN, 2^(MAN+1))`` puts
``e − EMIN + 1`` in the exponent field, a subnormal ``r < 2^MAN`` leaves it 0, and ``r = 2^(MAN+1)`` (rounded up
into the next binade) carries into it. With ``MAN = 23, EMIN = −126`` the code is the fp32 bit pattern itself,
subnormals and overflow to inf included: `div_fp32` and `mul_fp32` are correctly rounded fp32 operations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FP32_INF = 0x7F800000  # bit patterns, for host code
FP32_NAN = 0x7FC00000  # torch.nan's
FP32_ONE = 0x3F800000
# The same for jit code, which may only read module globals that are constexprs.
INF = tl.constexpr(FP32_INF)
NAN = tl.constexpr(FP32_NAN)
ONE = tl.constexpr(FP32_ONE)


@dataclass(frozen=True)
class Grid:
    """A minifloat grid as the kernels take it (constexprs): ``MAN`` mantissa bits, smallest normal exponent
    ``EMIN``, the largest finite magnitude code ``MAX_CODE``, ``NAN_CODE`` (-1: none), total ``BITS``."""

    bits: int
    man: int
    emin: int
    max_code: int
    nan_code: int

    @classmethod
    def of(cls, m) -> Grid:
        """The grid of a ``Minifloat`` (or an ``IEEEScale``'s dtype, fp16)."""
        if isinstance(m, torch.dtype):
            info = torch.finfo(m)
            max_code = int(torch.tensor(info.max, dtype=m).view(torch.int16))
            return cls(info.bits, -math.frexp(info.eps)[1] + 1, math.frexp(info.tiny)[1] - 1, max_code, -1)
        max_code = int(m.encode(torch.tensor([m.max]))[0])
        return cls(m.bits, m.man_bits, m.emin, max_code, -1 if m.nan_code is None else m.nan_code)


def fp32_bits(v: float) -> int:
    """The fp32 bit pattern of ``v`` (rounded to fp32, so possibly inf), as a Python int."""
    return int(torch.tensor(v, dtype=torch.float32).view(torch.int32))


@triton.jit
def to_fp32(x):
    """``x`` (fp32, fp16 or bf16) as fp32, exactly. bf16 moves its bits into fp32's high half: the interpreter
    (triton 3.9) converts bf16 subnormals wrongly (2^-126 · 0.9 becomes 2^-126 · 0.8)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def split(bits):
    """``(sig, top)`` with ``value = sig · 2^(top − 23)``, ``sig`` in ``[2^23, 2^24)`` (0 for zero), for the bits of
    a finite non-negative fp32. A subnormal ``m · 2^-149`` is normalized through ``float(m)``, exact and normal."""
    field = bits >> 23
    mant = bits & 0x7FFFFF
    lead = mant.to(tl.float32).to(tl.int32, bitcast=True)
    sig = tl.where(field > 0, mant, lead & 0x7FFFFF) | 0x800000
    top = tl.where(field > 0, field - 127, (lead >> 23) - 127 - 149)
    return tl.where(bits == 0, 0, sig), top


@triton.jit
def round_shift(sig, shift, above, MODE: tl.constexpr):
    """``sig / 2^shift`` rounded to an integer by MODE (``nearest``: half to even, ``floor``, ``ceil``), for
    ``1 ≤ shift`` and ``2^shift`` within sig's integer type. ``above`` (0 or 1): the exact value is larger than
    ``sig`` by less than one unit (a sticky bit), which breaks what would otherwise be a tie or exact."""
    base = sig >> shift
    rem = sig - (base << shift)
    half = (sig * 0 + 1) << (shift - 1)
    if MODE == "nearest":
        up = (rem > half) | ((rem == half) & ((above + (base & 1)) > 0))
    elif MODE == "ceil":
        up = (rem + above) > 0
    else:
        up = rem < 0  # floor: never (rem >= 0)
    return base + up.to(sig.dtype)


@triton.jit
def to_grid(sig, top, lsb, above, MAN: tl.constexpr, EMIN: tl.constexpr, MAX_CODE: tl.constexpr,
            MODE: tl.constexpr, MAX_SHIFT: tl.constexpr):
    """The magnitude code of ``sig · 2^lsb`` (+ ``above``, see `round_shift`) rounded by MODE onto the grid and
    saturated to ``MAX_CODE`` (module docstring). ``MAX_SHIFT``: past it every bit of ``sig`` is discarded
    (24 + 1 for a 24-bit sig), which keeps the shifts within the integer type."""
    e = tl.maximum(top, EMIN)
    shift = tl.minimum(e - MAN - lsb, MAX_SHIFT)
    code = ((e - EMIN) << MAN) + round_shift(sig, shift, above, MODE)
    return tl.where(sig == 0, 0, tl.minimum(code, MAX_CODE))


@triton.jit
def round_fp32(bits, MAN: tl.constexpr, EMIN: tl.constexpr, MAX_CODE: tl.constexpr, MODE: tl.constexpr):
    """The magnitude code of a finite non-negative fp32 (bits) rounded onto a grid narrower than fp32."""
    sig, top = split(bits)
    return to_grid(sig, top, top - 23, 0, MAN, EMIN, MAX_CODE, MODE, 25)


@triton.jit
def decode(code, BITS: tl.constexpr, MAN: tl.constexpr, EMIN: tl.constexpr, NAN_CODE: tl.constexpr):
    """fp32 values of minifloat codes (int32; sign bit ``BITS − 1``), as ``Minifloat.decode``. Normal: the fields
    moved into fp32's; subnormal ``m · 2^(EMIN − MAN)``: ``float(m)`` with the exponent lowered (exact)."""
    code = code.to(tl.int32)
    mag = code & ((1 << (BITS - 1)) - 1)
    field = mag >> MAN
    man = mag & ((1 << MAN) - 1)
    normal = ((field + (EMIN - 1 + 127)) << 23) | (man << (23 - MAN))
    sub = man.to(tl.float32).to(tl.int32, bitcast=True) + ((EMIN - MAN) << 23)
    bits = tl.where(field > 0, normal, tl.where(man > 0, sub, 0))
    if NAN_CODE >= 0:
        bits = tl.where(mag == NAN_CODE, NAN, bits)
    bits = bits | ((code >> (BITS - 1)) & 1) << 31
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e8m0_round(bits, MODE: tl.constexpr):
    """``k`` with ``2^k = E8M0.round(value, MODE)`` for the bits of a finite non-negative fp32, ``k`` in
    -127..127. Normal ``2^e · 1.m``: floor ``e``, ceil ``e + (m ≠ 0)``, nearest (in value, ties up) ``e + (1.m ≥
    1.5)``. Below 2^-126 the reference's frexp gives -127, or -126 for ceil above 2^-127 and nearest from
    1.5 · 2^-127 (bits 0x400000 and 0x600000); 0 gives -127."""
    field = bits >> 23
    mant = bits & 0x7FFFFF
    k = field - 127
    if MODE == "ceil":
        k += (mant != 0).to(tl.int32)
        tiny = tl.where(bits > 0x400000, -126, -127)
    elif MODE == "nearest":
        k += (mant >= 0x400000).to(tl.int32)
        tiny = tl.where(bits >= 0x600000, -126, -127)
    else:
        tiny = tl.zeros_like(bits) - 127
    k = tl.where(field > 0, k, tiny)
    return tl.minimum(tl.maximum(k, -127), 127)


@triton.jit
def pow2_bits(k):
    """fp32 bits of ``2^k`` for k in -127..127 (2^-127 is subnormal)."""
    return tl.where(k > -127, (k + 127) << 23, 0x400000)


@triton.jit
def div_fp32(a, b):
    """fp32 bits of ``a / b`` correctly rounded (nearest even, subnormal and inf results included), for the bits
    of finite ``a ≥ 0`` and ``b > 0``. Integer long division: ``q = ⌊A · 2^25 / B⌋`` of the significands has 25
    or 26 bits, the remainder is the sticky bit."""
    sa, ea = split(a)
    sb, eb = split(b)
    num = sa.to(tl.int64) << 25
    den = tl.maximum(sb, 1).to(tl.int64)
    q = num // den
    above = (num - q * den > 0).to(tl.int64)
    lsb = ea - eb - 25
    top = lsb + tl.where(q >= (1 << 25), 25, 24)
    return to_grid(q, top, lsb, above, 23, -126, INF, "nearest", 60).to(tl.int32)


@triton.jit
def mul_fp32(a, b):
    """fp32 bits of ``a · b`` correctly rounded, for the bits of finite non-negative ``a`` and ``b``: the 48-bit
    product of the significands, exact in int64, rounded once."""
    sa, ea = split(a)
    sb, eb = split(b)
    p = sa.to(tl.int64) * sb.to(tl.int64)
    lsb = ea + eb - 46
    top = lsb + tl.where(p >= (1 << 47), 47, 46)
    return to_grid(p, top, lsb, 0, 23, -126, INF, "nearest", 60).to(tl.int32)


@triton.jit
def div_by_significands(xbits, sbits):
    """``(sig, top)`` of ``RN(|x| / σ)`` for the bits of finite ``|x|`` and ``σ > 0``, exact wherever that quotient
    is a normal fp32 (the only place where rounding it onto an element grid can give anything but ±0): the
    significands are divided (``div_rn`` of two integers below 2^24, a quotient in (1/2, 2)), the exponents
    subtracted."""
    sx, ex = split(xbits)
    ss, es = split(sbits)
    q = tl.math.div_rn(sx.to(tl.float32), tl.maximum(ss, 1).to(tl.float32))
    sq, eq = split(q.to(tl.int32, bitcast=True))
    return sq, eq + ex - es
