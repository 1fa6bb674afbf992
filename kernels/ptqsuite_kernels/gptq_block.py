"""One block of GPTQ's inner loop (ptqsuite/mitigation/gptq.py) in Triton: ``kernel(W1, Hinv1, fmt, params) ->
(Q1, Err1)`` equals ``reference`` (``gptq.block_reference``) bit for bit, for ``W1`` fp32 ``[R, B]``, the block's
fp32 Cholesky rows ``Hinv1[B, B]`` and any ``IntFormat`` or ``FloatFormat`` with its ``fit`` gathered per column
(``[R, B, 1]`` fp32 tensors; NVFP4's tensor scale a 0-dim fp32 tensor). For each column ``i`` in order:

* ``q = fmt.project(w)`` for ``w = W1[:, i]`` with column ``i``'s parameters. INT: ``c = clamp(round_half_even(w /
  scale) + zero, qmin, qmax)``, 0 where that is NaN, then ``scale · (c − zero)``. Float: ``σ = s · S`` (one fp32
  product; ``s`` without a tensor scale), the element ``E.round(w / σ)`` (±0 with ``w``'s sign where ``σ = 0``,
  NaN where ``σ`` or ``w`` is NaN: E2M1 has no NaN and encodes it as +0), decoded, times ``σ``;
* ``err = (w − q) / Hinv1[i, i]``, and ``W1[:, j] −= err · Hinv1[i, j]`` for the columns ``j > i`` (the
  reference also updates column ``i``, which is never read again);
* ``Q1[:, i] = q``, ``Err1[:, i] = err``.

Exactness, the same in the interpreter and on a GPU, wherever torch computes each step as its own fp32 operation:

* every division is ``tl.math.div_rn`` (``/`` is approximate on NVIDIA GPUs), except ``w / σ`` of the float path:
  the element is rounded from the quotient's 24-bit significand, computed as in float_quant.py (significands
  divided by ``div_rn``, exponents subtracted; with an E8M0 scale and no tensor scale, only an exponent shift),
  then rounded onto the element grid with integer arithmetic (minifloat_jit.py);
* ``div_rn`` is ``div.rn.f32`` from triton 3.6 on (the PTX of this kernel, triton 3.6 and 3.9). Older Triton
  compiled it through libdevice with flush-to-zero (minifloat_jit.py), which would turn a subnormal ``w − q`` (tiny
  MXFP4 groups have subnormal steps) or quotient into ±0: there (``EXACT_DIV``) ``err`` is redone by integer long
  division (`minifloat_jit.div_fp32`) wherever either may be subnormal, at twice the INT loop's instructions.
  ``w / scale`` needs no such care: a subnormal quotient rounds to the code 0 either way. Nor does
  round_half_even's ``floor``, compiled with FTZ (``cvt.rmi.ftz``) by every version: flushing ``w / scale`` to
  ±0 gives the same code;
* ``W − err · h`` is a rounded product, then a rounded difference, as torch's two kernels: the launch sets
  ``enable_fp_fusion=False``, or the GPU compiler contracts them into an FMA (one rounding);
* a column is read out of the register tile as the integer ``tl.sum`` of its bit patterns and zeros everywhere
  else: every bit pattern, ``−0.0`` and NaN included, comes out as it was. A float sum padded with ``+0.0`` turns
  ``−0.0`` into ``+0.0``; padded with ``−0.0`` it would not, but the interpreter sums with numpy, which starts
  from ``+0.0``;
* NaN and ±inf are recognized by their bits (rounding.py: a GPU compiles ``x != x`` away), INT codes are converted
  to integers and back (never ``−0.0``, as torch's int16 codes), rounding is rounding.round_half_even.

NaN: a group holding NaN or ±inf has a NaN scale, so its ``q`` and ``err`` are NaN and the row's later columns turn
NaN through the update; NaN weights then meet finite scales (INT code 0, E2M1's +0, E4M3's and E5M2's NaN code).
NaN bit patterns (sign, payload) are the hardware's: a GPU returns its canonical NaN, so NaN is compared as NaN.

Tiling: rows are independent, so a program owns ``BLOCK_R`` rows and holds them as a ``[BLOCK_R, BLOCK_B]`` tile
(``BLOCK_B`` the power of two ≥ ``B``, at least 16, masked) in registers for the whole block: one load of ``W1``,
``B`` column steps (each reads its parameters ``[BLOCK_R]`` and ``Hinv1[i, :]``, L1/L2 hits after the first
program), one store each of ``Q1`` (column ``i`` of the tile is overwritten by ``q`` once processed) and ``Err1``.
With 16 rows and 4 warps, Triton lays a warp on a row (32 lanes × 4 columns): the column read-out is a shuffle
reduction within the warp, and the loop has no barrier and no layout conversion (PTX, triton 3.6 and 3.9), provided
``Hinv1[i, :]`` is loaded as a ``[BLOCK_R, BLOCK_B]`` tile (a ``[1, BLOCK_B]`` load is laid across the warps and
converted on every step). A column's quantization runs on every lane of its row's warp: per row and column about
80 (INT) or 150 (float) warp instructions, the update's ``R · B²`` multiply-subtracts included, and no launches
(the torch loop: ~15 kernels per column).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ptqsuite.formats import FloatFormat, IntFormat
from ptqsuite.formats.minifloat import PowerOfTwo
from ptqsuite.mitigation.gptq import block_reference as reference
from ptqsuite_kernels.minifloat_jit import INF, ONE, Grid, decode, div_by_significands, div_fp32, split, to_grid
from ptqsuite_kernels.rounding import interpreted, round_half_even

__all__ = ["kernel", "reference"]

# Rows a program holds (GPU). The interpreter pays per operation, not per element: there, one program takes up to
# INTERPRETER_TILE elements (the results do not depend on the tiling).
BLOCK_R, NUM_WARPS = 16, 4
INTERPRETER_TILE = 1 << 17
MIN_BLOCK_B = 16  # narrower blocks (a layer's tail) share the 16-wide tile: fewer variants to compile
MIN_NORMAL = tl.constexpr(0x00800000)  # fp32 bits of 2^-126 (a constexpr: jit code reads no other globals)
# div_rn flushes subnormals before triton 3.6 (module docstring; PTX of triton 3.5: div.rn.ftz.f32).
EXACT_DIV = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 6)


@triton.jit
def _isnan(bits):
    """Whether the fp32 with these bits is NaN."""
    return (bits & 0x7FFFFFFF) > 0x7F800000


@triton.jit
def _project_int(w, scale, zero, qmin, qmax, ZERO: tl.constexpr):
    """``IntFormat.project``: ``w`` onto the grid of ``scale`` (and ``zero`` when ZERO), codes ``qmin..qmax``."""
    t = round_half_even(tl.math.div_rn(w, scale))
    if ZERO:
        t = t + zero
    nan = _isnan(t.to(tl.int32, bitcast=True))
    c = tl.minimum(tl.maximum(t, qmin), qmax)
    c = tl.where(nan, 0.0, c).to(tl.int32).to(tl.float32)  # nan_to_num(0), then the int16 codes torch stores
    if ZERO:
        c = c - zero
    return scale * c


@triton.jit
def _project_float(w, s, S, TENSOR: tl.constexpr, POW2: tl.constexpr, E_BITS: tl.constexpr, E_MAN: tl.constexpr,
                   E_EMIN: tl.constexpr, E_MAX: tl.constexpr, E_NAN: tl.constexpr):
    """``FloatFormat.project``: ``w`` onto the element grid scaled by ``σ = s · S`` (``s`` unless TENSOR).
    ``E_NAN``: the element's NaN code, -1 for none (E2M1: NaN encodes as +0)."""
    if TENSOR:
        sigma = s * S
    else:
        sigma = s
    sbits = sigma.to(tl.int32, bitcast=True)
    bits = w.to(tl.int32, bitcast=True)
    if POW2:  # σ = 2^k: w / σ is w with k off its exponent
        sig, top = split(bits & 0x7FFFFFFF)
        top -= split(sbits)[1]
    else:
        sig, top = div_by_significands(bits & 0x7FFFFFFF, sbits)
    code = to_grid(sig, top, top - 23, 0, E_MAN, E_EMIN, E_MAX, "nearest", 25)
    zero = (sbits & 0x7FFFFFFF) == 0  # x = ±0 with w's sign (NaN's sign too)
    code = tl.where(zero, 0, code) | (((bits >> 31) & 1) << (E_BITS - 1))
    nan = ~zero & (_isnan(sbits) | _isnan(bits))  # x = w / σ is NaN: the NaN code, without a sign
    if E_NAN >= 0:
        code = tl.where(nan, E_NAN, code)
    else:
        code = tl.where(nan, 0, code)
    return decode(code, E_BITS, E_MAN, E_EMIN, E_NAN) * sigma


@triton.jit
def _divide(n, d, EXACT: tl.constexpr):
    """``n / d`` in fp32, correctly rounded. EXACT: subnormals kept even where ``div_rn`` flushes them (module
    docstring): redone by integer long division where ``n``, ``d`` or the quotient may be subnormal (finite ``n``,
    finite nonzero ``d``)."""
    r = tl.math.div_rn(n, d)
    if EXACT:
        nb = n.to(tl.int32, bitcast=True)
        db = d.to(tl.int32, bitcast=True)
        na, da, ra = nb & 0x7FFFFFFF, db & 0x7FFFFFFF, r.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        small = (na < MIN_NORMAL) | (da < MIN_NORMAL) | (ra <= MIN_NORMAL)
        exact = (na > 0) & (na < INF) & (da > 0) & (da < INF) & small
        quotient = div_fp32(tl.where(exact, na, 0), tl.where(exact, da, ONE))
        r = tl.where(exact, (quotient | (((nb ^ db) >> 31) << 31)).to(tl.float32, bitcast=True), r)
    return r


# Sizes, row strides and code bounds are plain arguments, so that a GPU compiles one variant per format family, tile
# and column strides (unit strides stay specialized: vector loads).
@triton.jit(do_not_specialize=["R", "B", "stride_wr", "stride_hr", "stride_ar", "stride_zr", "qmin", "qmax"])
def _block(w_ptr, h_ptr, q_ptr, e_ptr, a_ptr, z_ptr, s_ptr, R, B,
           stride_wr, stride_wc, stride_hr, stride_hc, stride_ar, stride_ac, stride_zr, stride_zc, qmin, qmax,
           FAMILY: tl.constexpr, ZERO: tl.constexpr, TENSOR: tl.constexpr, POW2: tl.constexpr,
           E_BITS: tl.constexpr, E_MAN: tl.constexpr, E_EMIN: tl.constexpr, E_MAX: tl.constexpr, E_NAN: tl.constexpr,
           EXACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    # a: the per-column scale (INT) or block scale s (float), z: the INT zero point, s: the float tensor scale S.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < R
    col = tl.arange(0, BLOCK_B)[None, :]
    real = live[:, None] & (col < B)
    W = tl.load(w_ptr + rows[:, None] * stride_wr + col * stride_wc, mask=real, other=0.0)
    E = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    S = 1.0
    if TENSOR:
        S = tl.load(s_ptr)
    for i in range(0, B):
        w = tl.sum(tl.where(col == i, W.to(tl.int32, bitcast=True), 0), axis=1).to(tl.float32, bitcast=True)
        a = tl.load(a_ptr + rows * stride_ar + i * stride_ac, mask=live, other=1.0)
        if FAMILY == "int":
            z = 0.0
            if ZERO:
                z = tl.load(z_ptr + rows * stride_zr + i * stride_zc, mask=live, other=0.0)
            q = _project_int(w, a, z, qmin, qmax, ZERO)
        else:
            q = _project_float(w, a, S, TENSOR, POW2, E_BITS, E_MAN, E_EMIN, E_MAX, E_NAN)
        d = tl.load(h_ptr + i * stride_hr + i * stride_hc)
        err = _divide(w - q, d, EXACT)
        # Hinv1[i, :] for every row of the tile (the same addresses: L1 hits), so that it comes in W's layout.
        h = tl.load(h_ptr + i * stride_hr + (col + 0 * rows[:, None]) * stride_hc, mask=real, other=0.0)
        W = tl.where(col > i, W - err[:, None] * h, tl.where(col == i, q[:, None], W))
        E = tl.where(col == i, err[:, None], E)
    out = rows[:, None] * B + col
    tl.store(q_ptr + out, W, mask=real)
    tl.store(e_ptr + out, E, mask=real)


def _columns(p: Any, rows: int, block: int, name: str) -> torch.Tensor:
    """A parameter as an fp32 ``[rows, block]`` view (``[R, B, 1]``; broadcast dimensions get stride 0)."""
    if not isinstance(p, torch.Tensor) or p.dtype != torch.float32:
        raise TypeError(f"{name}: expected an fp32 tensor, got {getattr(p, 'dtype', type(p).__name__)}")
    if p.dim() == 0:
        p = p.reshape(1, 1, 1)
    if p.dim() != 3 or p.shape[2] != 1:
        raise ValueError(f"{name}: expected a [rows, block, 1] tensor (a fit gathered per column), got "
                         f"{tuple(p.shape)}")
    try:
        return p.expand(rows, block, 1)[:, :, 0]
    except RuntimeError:
        raise ValueError(f"{name}: shape {tuple(p.shape)} does not fit a block of {rows} x {block}") from None


def _spec(fmt: Any, params: tuple, rows: int, block: int) -> tuple[dict, tuple[float, float], torch.Tensor,
                                                                    torch.Tensor | None, torch.Tensor | None]:
    """The kernel's constexprs, the INT code bounds and its parameter tensors ``(a [R, B], z [R, B] or None,
    S 0-dim or None)``."""
    if len(params) != 2:
        raise ValueError(f"expected params (scale, zero) or (s, S), got {len(params)} items")
    constexprs = dict(FAMILY="int", ZERO=False, TENSOR=False, POW2=False, E_BITS=0, E_MAN=0,
                      E_EMIN=0, E_MAX=0, E_NAN=-1)
    if isinstance(fmt, IntFormat):
        scale, zero = params
        z = None if zero is None else _columns(zero, rows, block, "zero")
        constexprs |= dict(ZERO=zero is not None)
        return constexprs, (float(fmt.qmin), float(fmt.qmax)), _columns(scale, rows, block, "scale"), z, None
    if isinstance(fmt, FloatFormat):
        s, S = params
        if S is not None:
            if not isinstance(S, torch.Tensor) or S.dtype != torch.float32 or S.numel() != 1:
                raise TypeError(f"tensor scale: expected an fp32 tensor of one element, got {S!r}")
            S = S.reshape(())
        e = Grid.of(fmt.element)
        constexprs |= dict(FAMILY="float", TENSOR=S is not None,
                           POW2=isinstance(fmt.scale, PowerOfTwo) and S is None, E_BITS=e.bits, E_MAN=e.man,
                           E_EMIN=e.emin, E_MAX=e.max_code, E_NAN=e.nan_code)
        return constexprs, (0.0, 0.0), _columns(s, rows, block, "s"), None, S
    raise TypeError(f"expected an IntFormat or a FloatFormat, got {type(fmt).__name__}")


def kernel(W1: torch.Tensor, Hinv1: torch.Tensor, fmt, params: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q1, Err1)``, fp32 ``[R, B]``: column ``i`` quantized after the errors of columns ``< i`` were spread over
    it, and its error divided by ``Hinv1[i, i]`` (module docstring)."""
    return launch(W1, Hinv1, fmt, params)


def launch(W1: torch.Tensor, Hinv1: torch.Tensor, fmt, params: tuple, block_rows: int | None = None,
           num_warps: int = NUM_WARPS, exact_div: bool = EXACT_DIV) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernel` with its choices open: ``block_rows`` (a power of two) rows a program and ``num_warps`` (the tiling,
    which benchmarks/bench_gptq_block.py sweeps), ``exact_div`` (subnormal-safe ``err`` for a ``div_rn`` that
    flushes them; the tests run it in the interpreter too)."""
    if W1.dim() != 2 or Hinv1.dim() != 2:
        raise ValueError(f"expected W1 [R, B] and Hinv1 [B, B], got {tuple(W1.shape)} and {tuple(Hinv1.shape)}")
    rows, block = W1.shape
    if Hinv1.shape != (block, block):
        raise ValueError(f"Hinv1 must be [{block}, {block}] for W1 {tuple(W1.shape)}, got {tuple(Hinv1.shape)}")
    if W1.dtype != torch.float32 or Hinv1.dtype != torch.float32:
        raise TypeError(f"expected fp32 W1 and Hinv1, got {W1.dtype} and {Hinv1.dtype}")
    constexprs, bounds, a, z, S = _spec(fmt, params, rows, block)
    if S is not None:  # torch takes a CPU scalar beside CUDA tensors; so does the kernel
        S = S.to(W1.device)
    tensors = [t for t in (W1, Hinv1, a, z, S) if t is not None]
    if any(t.device != W1.device for t in tensors):
        raise ValueError(f"expected every tensor on {W1.device}, got {[str(t.device) for t in tensors]}")
    Q1 = torch.empty(rows, block, dtype=torch.float32, device=W1.device)
    Err1 = torch.empty_like(Q1)
    if rows == 0 or block == 0:
        return Q1, Err1
    width = max(MIN_BLOCK_B, triton.next_power_of_2(block))
    if block_rows is not None and block_rows != triton.next_power_of_2(block_rows):
        raise ValueError(f"block_rows must be a power of two, got {block_rows}")
    if block_rows is None:
        block_rows = BLOCK_R
        if interpreted():
            block_rows = min(max(1, INTERPRETER_TILE // width), triton.next_power_of_2(rows))
    zs = z if z is not None else a
    _block[(triton.cdiv(rows, block_rows),)](
        W1, Hinv1, Q1, Err1, a, zs, S if S is not None else a, rows, block,
        W1.stride(0), W1.stride(1), Hinv1.stride(0), Hinv1.stride(1), a.stride(0), a.stride(1),
        zs.stride(0), zs.stride(1), *bounds, BLOCK_R=block_rows, BLOCK_B=width, num_warps=num_warps,
        EXACT=exact_div, enable_fp_fusion=False, **constexprs)
    return Q1, Err1
