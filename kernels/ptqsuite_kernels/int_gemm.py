"""Weight-only INT GEMM (W2/W4/W8 A16): ``y = x @ Ŵᵀ (+ bias)`` for activations ``x[M, K]`` (fp16, bf16, fp32)
and a packed INT weight (ptqsuite/formats/packing.py: ``qweight`` int32 ``[N, ceil(K/32)·b]``, ``scales[N, G]``,
b-bit ``zeros`` packed along G or a symmetric constant ``2^(b−1)``), dequantized inside the K loop.

What it computes, and ``reference`` specifies (``exact`` in float64, before the output rounding):

* ``Ŵ[n, k] = float32(scales[n, g]) · (u[n, k] − z[n, g])`` with ``g = k // group``: the packed form's (and the
  QTensor's) dequantization, exact in fp32 up to one rounding of the product;
* rounded to ``x``'s dtype (nearest even), as fake quantization's ``q.dequantize(x.dtype)`` does and as deployed
  kernels (Marlin, ExLlama) that dequantize to the activation dtype do: the GEMM's operands are then ``x`` and
  ``Ŵ`` in ``x``'s dtype, whose products are exact in fp32;
* ``y = Σ_k x[m, k] · Ŵ[n, k] (+ bias[n])`` accumulated in fp32 in an unspecified order (tiles, split-K, the
  tensor cores' own order), then rounded to ``x``'s dtype.

So ``|fp32 result − exact| ≤ error_bound(...)``, a bound on reordered fp32 summation (derived at `error_bound`),
and the output is a correct rounding of a value within it (`within`).

Kernel: a program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y`` over a range of K (split-K for few rows: each
split writes an fp32 partial, summed by torch in a fixed order, so results are deterministic). Per K step it loads
the ``[BLOCK_N, BLOCK_K·b/32]`` packed words (contiguous along K, each word once), expands them to codes with
shifts and a mask, subtracts zero points and multiplies by scales (one scale column per step when the step lies in
one group, else gathered per element), rounds to ``x``'s dtype and accumulates ``tl.dot(x, Ŵᵀ)`` in fp32. Only
widths that divide 32 (2, 4, 8) are supported: a code never straddles words.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ptqsuite.formats.packing import PackedInt
from ptqsuite_kernels.rounding import cast_rne, upcast_dot
from ptqsuite_kernels.tiles import split_k_range, tile_offsets

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS = (2, 4, 8)
# fp32 accumulation's unit roundoff: 2^-24 for IEEE round-to-nearest (the interpreter, CUDA cores). Tensor-core MMA
# aligns and truncates its partial sums (Fasi et al., "Numerical behavior of NVIDIA tensor cores", 2021): treat
# that as chopping, whose unit roundoff is twice as large.
ACC_UNIT = 2.0**-23 if torch.cuda.is_available() else 2.0**-24
F64_UNIT = 2.0**-53
# Tiles by rows of x, (max M, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): GEMV-like for a few tokens (memory-bound:
# narrow N tiles, split-K for parallelism), square tiles that reuse each dequantized weight tile across rows when
# compute-bound. tl.dot needs 16 rows at least.
CONFIGS = [(16, 16, 64, 128, 4, 4), (64, 64, 64, 64, 4, 4), (256, 64, 128, 64, 4, 3), (math.inf, 128, 128, 64, 8, 3)]
GROUP_M = 8  # row tiles per band of the launch order: neighbouring programs share weight tiles in L2
MAX_SPLIT_K = 16


@triton.jit
def _dequantize(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, group, num_groups, words_per_row, zero_words,
                BITS: tl.constexpr, SYMMETRIC: tl.constexpr, ONE_GROUP: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``Ŵ[offs_n, k0 : k0 + BLOCK_K]`` in fp32 as a ``[BLOCK_N, BLOCK_K]`` tile, zero past K or N."""
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    rows = offs_n[:, None] < N
    word = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
    words = tl.load(qw_ptr + offs_n[:, None] * words_per_row + word[None, :],
                    mask=rows & (word[None, :] < words_per_row), other=0)
    # Code j of a word sits at bits [j·b, (j+1)·b): shift each word by every j, then flatten in K order. The
    # arithmetic shift of a negative word only fills bits the mask drops.
    shifts = tl.arange(0, PER_WORD) * BITS
    u = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & MASK, (BLOCK_N, BLOCK_K))
    k = k0 + tl.arange(0, BLOCK_K)
    cols = k[None, :] < K
    if ONE_GROUP:  # the step lies in one group: a scale (and zero) column
        g = tl.zeros((BLOCK_N, 1), dtype=tl.int32) + k0 // group
        gmask = rows
    else:
        g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32) + (k // group)[None, :]
        gmask = rows & cols
    scale = tl.load(s_ptr + offs_n[:, None] * num_groups + g, mask=gmask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        zero = 1 << (BITS - 1)
    else:
        zword = tl.load(z_ptr + offs_n[:, None] * zero_words + g // PER_WORD, mask=gmask, other=0)
        zero = (zword >> ((g % PER_WORD) * BITS)) & MASK
    w = scale * (u - zero).to(tl.float32)
    return tl.where(cols, w, 0.0)  # past K: no inf (scale · −z overflowing x's dtype) may meet a padded 0 of x


# Sizes that only bound masks across rows, or index scales, are plain arguments (fewer compiled variants); K and
# the row strides stay specialized: their divisibility lets loads along K use wide vectors.
@triton.jit(do_not_specialize=["M", "N", "group", "num_groups", "zero_words", "k_tiles_per_split"])
def _int_gemm(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, group, num_groups, words_per_row, zero_words,
              stride_xm, stride_ym, k_tiles_per_split,
              BITS: tl.constexpr, SYMMETRIC: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              GROUP_M: tl.constexpr):
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m, offs_n = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_ty = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start, k_end = split_k_range(pid_k, k_tiles_per_split, K, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + k[None, :],
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = _dequantize(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, group, num_groups, words_per_row, zero_words,
                        BITS, SYMMETRIC, ONE_GROUP, BLOCK_N, BLOCK_K)
        w = cast_rne(w, x_ty)  # the operand fake quantization has: Ŵ in x's dtype
        if UPCAST:  # exact; the interpreter's tl.dot misreads bf16
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")  # ieee: no TF32 rounding of fp32 operands
    if HAS_BIAS:
        if pid_k == 0:  # once, by the first split: one more term of the fp32 sum
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]

    y_ptrs = y_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast_rne(acc, y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _config(m: int) -> tuple[int, int, int, int, int]:
    return next(c[1:] for c in CONFIGS if m <= c[0])


@functools.cache
def _sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; an H200's 132 elsewhere (the interpreter), to exercise split-K."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _split_k(tiles: int, k_tiles: int, device: torch.device) -> int:
    """Splits of K that give about two programs per SM (at least one K step each, none empty)."""
    split = max(1, min(MAX_SPLIT_K, k_tiles, 2 * _sms(device) // tiles))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))


def _check(x: torch.Tensor, w: PackedInt, bias: torch.Tensor | None) -> None:
    if not isinstance(w, PackedInt):
        raise TypeError(f"expected a PackedInt weight (ptqsuite.formats.packing.pack_qtensor), got {type(w)}")
    if w.bits not in BITS:
        raise ValueError(f"the INT GEMM kernel supports {list(BITS)}-bit weights (codes never straddle words), "
                         f"got {w.bits}")
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x of shape [M, {w.shape[1]}], got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be one of {DTYPES}, got {x.dtype}")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"expected bias of shape ({w.shape[0]},), got {tuple(bias.shape)}")


def kernel(x: torch.Tensor, w: PackedInt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[M, K] @ Ŵᵀ (+ bias)`` in ``x``'s dtype, ``Ŵ[N, K]`` the packed INT weight ``w``."""
    _check(x, w, bias)
    (n, k), m = w.shape, x.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    if m == 0 or n == 0:
        return x.new_zeros(m, n)
    block_m, block_n, block_k, warps, stages = _config(m)
    group = w.group_size
    if group % 32 == 0:  # K steps within one group (a power of two that divides it): one scale column per step
        block_k = min(block_k, group & -group)
    one_group = w.num_groups == 1 or group % block_k == 0
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = _split_k(tiles, k_tiles, x.device)
    # Split-K: fp32 partials, summed below in a fixed order; one split stores x's dtype directly.
    y = torch.empty(split, m, n, device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
    zeros = w.qweight if w.zeros is None else w.zeros  # any pointer when symmetric: never read
    _int_gemm[(tiles, split)](
        x, w.qweight, w.scales, zeros, bias if bias is not None else x, y, m, n, k, group, w.num_groups,
        w.qweight.shape[1], zeros.shape[1], x.stride(0), n, triton.cdiv(k_tiles, split),
        BITS=w.bits, SYMMETRIC=w.symmetric, ONE_GROUP=one_group, HAS_BIAS=bias is not None,
        UPCAST=upcast_dot(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        num_warps=warps, num_stages=stages)
    return y[0] if split == 1 else y.sum(0).to(x.dtype)


def _operand(x: torch.Tensor, w: PackedInt) -> torch.Tensor:
    """``Ŵ`` as the GEMM multiplies it: dequantized in fp32, rounded to ``x``'s dtype, on ``x``'s device."""
    return w.dequantize(torch.float32).to(x.dtype).to(x.device)


def exact(x: torch.Tensor, w: PackedInt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product in float64 (exact up to float64's own rounding, accounted for in `error_bound`)."""
    y = x.double() @ _operand(x, w).double().T
    return y if bias is None else y + bias.double()


def reference(x: torch.Tensor, w: PackedInt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`exact` cast to ``x``'s dtype (torch casts float64 through fp32: within half an ulp plus 2^-24 relative)."""
    _check(x, w, bias)
    return exact(x, w, bias).to(x.dtype)


def error_bound(x: torch.Tensor, w: PackedInt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """An elementwise bound (float64) on ``|fp32 accumulation − exact|``, before the rounding to the output dtype.

    Derivation: with ``n`` terms (K products, plus the bias), a dot product evaluated in floating point in *any*
    order, with products rounded or exact, satisfies ``|fl(Σ a_i b_i) − Σ a_i b_i| ≤ γ_n · Σ |a_i b_i|`` where
    ``γ_n = n·u / (1 − n·u)`` (Higham, Accuracy and Stability of Numerical Algorithms, §3.1: each term meets at
    most n roundings, each a factor ``1 + δ``, ``|δ| ≤ u``). Tiles, split-K partials and their sum are such an
    order; u is ACC_UNIT. Two float64 terms ``γ_n(2^-53)`` more: one for `exact`'s own rounding, one because
    ``Σ|a_i b_i|`` is itself computed in float64, within that relative error (``γ_n(u) < 1``).
    """
    n = w.shape[1] + (bias is not None)
    mass = x.double().abs() @ _operand(x, w).double().abs().T
    if bias is not None:
        mass = mass + bias.double().abs()
    return (_gamma(n, ACC_UNIT) + 2 * _gamma(n, F64_UNIT)) * mass


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def half_ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at magnitudes ``v`` (float64): ``2^(e − p)`` for ``2^e ≤ v < 2^(e+1)``, with
    ``p`` the significand's bits, ``e`` at least the smallest normal exponent (subnormals: a fixed spacing) and at
    most the largest (beyond the finite range: the spacing of the last binade)."""
    info = torch.finfo(dtype)
    p = 1 - math.log2(info.eps)
    e = torch.floor(torch.log2(v.abs())).clamp(math.log2(info.tiny), math.floor(math.log2(info.max)))
    return torch.exp2(e - p)


def within(y: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Elementwise: is ``y`` (in its dtype) a round-to-nearest of some value ``a`` with ``|a − exact| ≤ bound``?

    ``|y − exact| ≤ |y − a| + |a − exact| ≤ ½ulp(a) + bound ≤ ½ulp(|exact| + bound) + bound``. Rounding overflows
    to ±inf from ``max + ½ulp(max)`` on, so ``y = ±inf`` (the sign of ``exact``) is right where ``|exact| + bound``
    reaches that threshold."""
    dtype, reach = y.dtype, exact.abs() + bound
    y = y.double()
    close = (y - exact).abs() <= bound + half_ulp(reach, dtype)
    top = torch.tensor(torch.finfo(dtype).max, dtype=torch.float64)
    overflow = reach >= top + half_ulp(top, dtype)
    return close | (overflow & y.isinf() & (y.sign() == exact.sign()))
