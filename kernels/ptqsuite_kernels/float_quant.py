"""Scaled float quantization (FP8, MXFP4/MXFP8, NVFP4 and their variants) along the rows of ``x[M, K]``, in Triton.

``kernel(x, fmt, gran) -> (codes, scale, global_scale)`` equals ``reference(...)``, i.e. ``fmt.quantize(x, gran)``
(ptqsuite/formats/scaled.py) with ``gran`` ``PerToken()``/``PerChannel()`` (one group per row) or ``PerGroup(n)``
(groups of ``n`` consecutive columns, the last one a tail when ``n ∤ K``), bit for bit:

* ``codes`` uint8 ``[M, K]``: the elements' bit patterns (``Minifloat.encode``; E2M1 in the low 4 bits);
* ``scale`` fp32 ``[M, G]``: the block scales ``s`` as values (NaN for a group holding NaN or ±inf);
* ``global_scale``: NVFP4's fp32 tensor scale ``S`` as a 0-dim tensor, None for formats without one.

Per group, in this order (the spec's): ``amax = max|x|`` as the integer maximum of the magnitudes' bit patterns
(monotone for non-negative floats; NaN and inf patterns lie above every finite one, which flags the group); the
tensor scale ``S = T / (E.max · scale.max)`` (1 if that is 0) over ``T``, the largest finite group ``amax`` of the
tensor; ``ideal = (amax / S) / unit`` (1 for an all-zero group) with ``unit = 2^E.emax`` for floor rounding, else
``E.max``; ``s`` = ``ideal`` rounded into the scale format (E8M0: floor/ceil/nearest power of two in 2^-127..2^127;
a minifloat such as E4M3: the grid, saturating; an IEEE dtype: clamped to its normal range, then rounded);
``σ = s · S``; elements ``E.round(x / σ)``, ±0 where ``σ = 0`` (a block scale that underflowed), the NaN code where
``s`` is NaN.

Exactness, the same in the interpreter and on a GPU: every rounding is integer arithmetic on fp32 bit patterns
(minifloat_jit.py). The fp32 divisions and the product of the scale computation are done as correctly rounded
integer operations (subnormal results included), the element quotient ``x / σ`` divides the 24-bit significands
with ``div_rn`` (never ``/``, approximate on NVIDIA GPUs) and subtracts exponents: exact wherever the quotient is a
normal fp32, and anything smaller rounds to ±0 on every element grid. With an E8M0 scale (a power of two) and no
tensor scale the quotient is only an exponent shift.

Kernel: a program holds ``GROUPS`` groups as rows of a ``[GROUPS, BLOCK]`` tile and makes two passes over each
group in chunks of ``BLOCK`` columns (a row of up to 16384 columns per-token, or one chunk for blocks of 16/32):
the absmax, then the codes (the second read mostly hits L2). The tensor scale needs the whole tensor's maximum
first: the same kernel with ``STATS`` writes each group's absmax bits, and ``torch.amax`` over the finite ones
(an exact integer maximum, on the device) gives ``T``; the main pass computes ``S`` from it in every program.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ptqsuite.formats import FloatFormat, QTensor
from ptqsuite.formats.minifloat import IEEEScale, Minifloat, PowerOfTwo
from ptqsuite.granularity import PerChannel, PerGroup, from_groups, to_groups
from ptqsuite_kernels.minifloat_jit import (FP32_INF, INF, NAN, ONE, Grid, decode, div_by_significands, div_fp32,
                                            e8m0_round, fp32_bits, mul_fp32, pow2_bits, round_fp32, split, to_fp32,
                                            to_grid)
from ptqsuite_kernels.rounding import interpreted

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements of x a program holds at once (GROUPS x BLOCK). The interpreter pays per operation, not per element:
# there, bigger tiles only save time (the results do not depend on the tiling).
TILE, INTERPRETER_TILE = 4096, 65536
MAX_BLOCK = 2048  # longest chunk of a group: per-token rows loop over chunks


@dataclass(frozen=True)
class Spec:
    """The kernel's view of a FloatFormat: its constexprs (see `_quantize`) and whether it has a tensor scale."""

    constexprs: dict
    tensor_scale: bool  # the format has one (NVFP4); TENSOR in constexprs: it is not always 1
    stats: bool  # a first pass must find T


def _scale_constexprs(fmt: FloatFormat) -> dict:
    scale = fmt.scale
    if isinstance(scale, PowerOfTwo):
        return dict(SCALE="e8m0")
    if isinstance(scale, Minifloat):  # saturating grid: no clamp
        grid, lo, hi = Grid.of(scale), 0, FP32_INF
    elif isinstance(scale, IEEEScale):  # clamped to the dtype's normal range, then rounded (fp32: already there)
        info = torch.finfo(scale.dtype)
        lo, hi = fp32_bits(info.tiny), fp32_bits(info.max)
        if scale.dtype == torch.float32:
            return dict(SCALE="fp32", LO=lo, HI=hi)
        grid = Grid.of(scale.dtype)
    else:
        raise TypeError(f"unsupported scale format {scale!r}")
    return dict(SCALE="grid", LO=lo, HI=hi, S_BITS=grid.bits, S_MAN=grid.man, S_EMIN=grid.emin,
                S_MAX=grid.max_code)


def spec(fmt: FloatFormat, gran) -> Spec:
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"expected a FloatFormat, got {type(fmt).__name__}")
    if not isinstance(gran, PerChannel | PerGroup):  # PerToken is a PerChannel
        raise ValueError(f"the float quantization kernel works along rows: PerToken(), PerChannel() or "
                         f"PerGroup(n), got {gran}")
    e = Grid.of(fmt.element)
    denom = fp32_bits(fmt.element.max * fmt.scale.max)
    # fp32(E.max · scale.max) overflows for E8M0 and fp32 scales: then S = T / inf = 0, i.e. S = 1, as in torch.
    tensor = fmt.tensor_scale and denom < FP32_INF
    unit = 2.0**fmt.element.emax if fmt.rounding == "floor" else fmt.element.max
    constexprs = dict(E_BITS=e.bits, E_MAN=e.man, E_EMIN=e.emin, E_MAX=e.max_code, E_NAN=max(e.nan_code, 0),
                      ROUNDING=fmt.rounding, UNIT=fp32_bits(unit), TENSOR=tensor, DENOM=denom,
                      POW2=isinstance(fmt.scale, PowerOfTwo) and not tensor,
                      SCALE="", LO=0, HI=0, S_BITS=0, S_MAN=0, S_EMIN=0, S_MAX=0) | _scale_constexprs(fmt)
    return Spec(constexprs, fmt.tensor_scale, tensor)


@triton.jit
def _block_scale(amax, S, UNIT: tl.constexpr, TENSOR: tl.constexpr, ROUNDING: tl.constexpr,
                 SCALE: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, S_BITS: tl.constexpr,
                 S_MAN: tl.constexpr, S_EMIN: tl.constexpr, S_MAX: tl.constexpr):
    """Bits of the block scale ``s`` of finite groups with absmax bits ``amax`` and tensor scale bits ``S``."""
    target = div_fp32(amax, S) if TENSOR else amax
    ideal = tl.where(amax > 0, div_fp32(target, amax * 0 + UNIT), ONE)
    # Branches, not early returns: the code after a return in a constexpr branch is still compiled.
    if SCALE == "e8m0":
        s = pow2_bits(e8m0_round(ideal, ROUNDING))
    else:
        s = tl.minimum(tl.maximum(ideal, LO), HI)  # bits of non-negative floats order as the floats
        if SCALE == "grid":
            code = round_fp32(s, S_MAN, S_EMIN, S_MAX, ROUNDING)
            s = decode(code, S_BITS, S_MAN, S_EMIN, -1).to(tl.int32, bitcast=True)
    return s


@triton.jit
def _encode(x, sigma, bad, E_BITS: tl.constexpr, E_MAN: tl.constexpr, E_EMIN: tl.constexpr,
            E_MAX: tl.constexpr, E_NAN: tl.constexpr, POW2: tl.constexpr):
    """Element codes of fp32 ``x`` with effective scale bits ``sigma``; ``bad``: the group's scale is NaN."""
    bits = x.to(tl.int32, bitcast=True)
    if POW2:  # σ = 2^k: x / σ is x with k off its exponent
        sig, top = split(bits & 0x7FFFFFFF)
        top -= split(sigma)[1]
    else:
        sig, top = div_by_significands(bits & 0x7FFFFFFF, sigma)
    code = to_grid(sig, top, top - 23, 0, E_MAN, E_EMIN, E_MAX, "nearest", 25)
    code = tl.where(sigma == 0, 0, code) | (((bits >> 31) & 1) << (E_BITS - 1))  # zeros keep their sign
    return tl.where(bad, E_NAN, code)  # x / NaN is NaN, encoded without a sign


@triton.jit
def _chunk(x_ptr, row, first, lane, live, group, K, stride_xm):
    """``x`` (fp32, 0 where off), columns and mask at offsets ``lane`` ([1, BLOCK]) into the groups that start at
    columns ``first`` of rows ``row``. Off: lanes past the group, the tail group's missing part, groups past the
    tensor's last (a 0 leaves the absmax as it is)."""
    col = first[:, None] + lane
    real = live[:, None] & (lane < group) & (col < K)
    x = to_fp32(tl.load(x_ptr + row[:, None] * stride_xm + col, mask=real, other=0.0))
    return x, col, real


@triton.jit(do_not_specialize=["K", "group", "groups_per_row", "total_groups", "stride_xm"])
def _quantize(x_ptr, codes_ptr, scale_ptr, amax_ptr, tmax_ptr, gscale_ptr, K, group, groups_per_row, total_groups,
              stride_xm, STATS: tl.constexpr, GROUPS: tl.constexpr, BLOCK: tl.constexpr,
              E_BITS: tl.constexpr, E_MAN: tl.constexpr, E_EMIN: tl.constexpr, E_MAX: tl.constexpr,
              E_NAN: tl.constexpr, ROUNDING: tl.constexpr, UNIT: tl.constexpr, TENSOR: tl.constexpr,
              DENOM: tl.constexpr, POW2: tl.constexpr, SCALE: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
              S_BITS: tl.constexpr, S_MAN: tl.constexpr, S_EMIN: tl.constexpr, S_MAX: tl.constexpr):
    # A group a row of the tile: group g of row r starts at column g · group (per-token: group = K).
    pid = tl.program_id(0)
    gid = pid.to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    live = gid < total_groups
    row = gid // groups_per_row
    first = (gid % groups_per_row) * group
    lane = tl.arange(0, BLOCK)[None, :]

    amax = tl.zeros((GROUPS,), dtype=tl.int32)
    for k0 in range(0, group, BLOCK):
        x, col, real = _chunk(x_ptr, row, first, k0 + lane, live, group, K, stride_xm)
        amax = tl.maximum(amax, tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1))
    if STATS:
        tl.store(amax_ptr + gid, amax, mask=live)
    else:
        bad = amax >= INF  # NaN or ±inf in the group
        S = tl.zeros((GROUPS,), dtype=tl.int32) + ONE
        if TENSOR:
            S = div_fp32(tl.load(tmax_ptr + gid * 0), S * 0 + DENOM)
            S = tl.where(S > 0, S, ONE)
            tl.store(gscale_ptr + gid * 0, S.to(tl.float32, bitcast=True), mask=(gid == 0))
        s = _block_scale(tl.where(bad, ONE, amax), S, UNIT, TENSOR, ROUNDING, SCALE, LO, HI, S_BITS, S_MAN,
                         S_EMIN, S_MAX)
        sigma = mul_fp32(s, S) if TENSOR else s
        tl.store(scale_ptr + gid, tl.where(bad, NAN, s).to(tl.float32, bitcast=True), mask=live)
        for k0 in range(0, group, BLOCK):
            x, col, real = _chunk(x_ptr, row, first, k0 + lane, live, group, K, stride_xm)
            codes = _encode(x, sigma[:, None], bad[:, None], E_BITS, E_MAN, E_EMIN, E_MAX, E_NAN, POW2)
            tl.store(codes_ptr + row[:, None] * K + col, codes.to(tl.uint8), mask=real)


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"expected one of {DTYPES}, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("expected at least one column (a group's absmax needs an element)")


def kernel(x: torch.Tensor, fmt: FloatFormat, gran) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``x[M, K]``: ``(codes uint8 [M, K], scale fp32 [M, G], global_scale fp32 0-dim or None)``."""
    s = spec(fmt, gran)
    _check(x)
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    group = gran.n if isinstance(gran, PerGroup) else k
    per_row = triton.cdiv(k, group)
    codes = torch.empty(m, k, dtype=torch.uint8, device=x.device)
    scale = torch.empty(m, per_row, dtype=torch.float32, device=x.device)
    gscale = torch.ones((), dtype=torch.float32, device=x.device) if s.tensor_scale else None
    if m == 0:
        return codes, scale, gscale
    block = min(triton.next_power_of_2(min(group, k)), MAX_BLOCK)
    tile = INTERPRETER_TILE if interpreted() else TILE
    groups = min(max(1, tile // block), triton.next_power_of_2(m * per_row))
    grid = (triton.cdiv(m * per_row, groups),)
    args = (k, group, per_row, m * per_row, x.stride(0))
    tmax = torch.zeros(1, dtype=torch.int32, device=x.device)
    if s.stats:
        amax = torch.empty(m * per_row, dtype=torch.int32, device=x.device)
        _quantize[grid](x, codes, scale, amax, tmax, scale, *args, STATS=True, GROUPS=groups, BLOCK=block,
                        **s.constexprs)
        tmax = torch.where(amax < FP32_INF, amax, 0).amax().reshape(1)
    _quantize[grid](x, codes, scale, tmax, tmax, gscale if gscale is not None else scale, *args, STATS=False,
                    GROUPS=groups, BLOCK=block, **s.constexprs)
    return codes, scale, gscale


def reference(x: torch.Tensor, fmt: FloatFormat, gran) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``fmt.quantize(x, gran)`` on the CPU (as int_quant.reference, for torch's approximate division on CUDA),
    reshaped to the kernel's ``(codes [M, K], scale [M, G], global_scale)`` on ``x``'s device."""
    spec(fmt, gran)
    q = fmt.quantize(x.cpu(), gran)
    codes = from_groups(q.codes, x.shape).to(x.device)
    gscale = None if q.global_scale is None else q.global_scale.reshape(()).to(x.device)
    return codes, q.scale.reshape(x.shape[0], -1).to(x.device), gscale


def to_qtensor(x_shape: tuple[int, int], codes: torch.Tensor, scale: torch.Tensor, gscale: torch.Tensor | None,
               fmt: FloatFormat, gran) -> QTensor:
    """The QTensor the kernel's outputs stand for (tail groups padded as ``to_groups`` pads)."""
    return QTensor(to_groups(codes, gran), scale.unsqueeze(-1), None, tuple(x_shape), fmt, gran, gscale)


def fake(x: torch.Tensor, fmt: FloatFormat, gran) -> torch.Tensor:
    """Quantize with the kernel, dequantize with torch (``fmt.decode``): ``fmt.fake(x, gran)``, in ``x``'s dtype."""
    return to_qtensor(tuple(x.shape), *kernel(x, fmt, gran), fmt, gran).dequantize(x.dtype)
