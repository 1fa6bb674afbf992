"""FP4 (E2M1) weight GEMM: ``y = x @ Ŵᵀ (+ bias)`` for activations ``x[M, K]`` (fp16, bf16, fp32) and an MXFP4 or
NVFP4 weight ``Ŵ[N, K]`` stored packed (`PackedFP4`), dequantized inside the K loop.

Packed layout (`pack_weight`, from ``FloatFormat.quantize(W[N, K], PerGroup(g))`` with E2M1 elements):

* ``codes`` uint8 ``[N, ceil(K/2)]``: the 4-bit element codes two per byte, code ``2j`` in the low nibble of byte
  ``j`` (ptqsuite/formats/packing.py's 4-bit stream read as little-endian bytes; an odd K pads a zero code);
* ``scales`` uint8 ``[N, G]``, ``G = ceil(K/g)``: the block scales' codes in the format's scale encoding, E8M0
  (MXFP4: ``2^(c − 127)``, 255 = NaN) or E4M3 (NVFP4, and the MXFP4 variant with E4M3 scales);
* ``global_scale``: NVFP4's fp32 tensor scale ``S`` (0-dim), or None;
* decoding: ``Ŵ[n, k] = e[n, k] · σ[n, k // g]`` in fp32 with ``σ = s · S`` (one fp32 product) or ``σ = s``:
  bit for bit ``QTensor.dequantize()`` (`PackedFP4.dequantize`).

What the kernel computes, and ``reference`` specifies: ``y = Σ_k x[m, k] · Ŵ[n, k] (+ bias[n])`` with ``Ŵ`` in fp32,
accumulated in fp32, rounded to ``x``'s dtype. ``reference`` is that sum in float64 cast to ``x``'s dtype; the
kernel is within `error_bound` of it (derived there) before the output rounding, checked by `within`.

Kernel: a program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y`` over a range of K (split-K for few rows, fp32
partials summed by torch in a fixed order). Its K steps lie inside one scale block (``BLOCK_K`` divides ``g``), so
the block scale factors out of the step: the E2M1 values ``e`` (2 significant bits: exact in fp16 and bf16) are
decoded from the codes by bit arithmetic, ``tl.dot(x, eᵀ)`` accumulates the step's exact products in fp32, and
the partial is multiplied by the step's ``σ`` (decoded from its code: E8M0 as ``2^(c − 127)``, E4M3 through its
bit fields; times ``S`` as a correctly rounded fp32 product) before joining the accumulator. So fp16/bf16 inputs
use tensor cores with no range limit on the scales (``e · σ`` itself may not fit fp16), fp32 inputs an IEEE fp32
dot.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ptqsuite.formats import FloatFormat, QTensor
from ptqsuite.formats.minifloat import E2M1, Minifloat, PowerOfTwo
from ptqsuite.formats.packing import pack, unpack
from ptqsuite.granularity import PerGroup, from_groups
from ptqsuite_kernels.int_gemm import ACC_UNIT, F64_UNIT
from ptqsuite_kernels.minifloat_jit import NAN, Grid, decode, mul_fp32, pow2_bits, to_fp32
from ptqsuite_kernels.rounding import cast_rne, upcast_dot
from ptqsuite_kernels.tiles import split_k_range, tile_offsets

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_K = 128
MIN_GROUP = 16  # tl.dot's smallest K step
# Tiles by rows of x, (max M, BLOCK_M, BLOCK_N, warps, stages): narrow N tiles and split-K for a few tokens
# (memory-bound), square tiles reusing each decoded weight tile across rows when compute-bound. tl.dot needs 16 rows.
CONFIGS = [(16, 16, 64, 4, 4), (64, 64, 64, 4, 4), (256, 64, 128, 4, 3), (math.inf, 128, 128, 8, 3)]
GROUP_M = 8  # row tiles per band of the launch order: neighbouring programs share weight tiles in L2
MAX_SPLIT_K = 16


@dataclass(frozen=True)
class PackedFP4:
    """An E2M1 weight ``W[N, K]`` in the layout of the module docstring."""

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    fmt: FloatFormat
    group: int
    shape: tuple[int, int]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    def element_codes(self) -> torch.Tensor:
        """The 4-bit codes ``[N, K]`` (uint8), unpacked."""
        k = self.shape[1]
        words = torch.nn.functional.pad(self.codes, (0, _packed_bytes(k) - self.codes.shape[1]))
        return unpack(words.view(torch.int32), 4, k).to(torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Ŵ[N, K]`` decoded from the packed form alone: bit for bit ``QTensor.dequantize(dtype)``."""
        sigma = self.fmt.sigma(self.fmt.scale.decode(self.scales), self.global_scale)
        group = torch.arange(self.shape[1], device=self.codes.device) // self.group
        return (self.fmt.element.decode(self.element_codes()) * sigma[:, group]).to(dtype)

    def storage_bits(self) -> int:
        tensors = [t for t in (self.codes, self.scales, self.global_scale) if t is not None]
        return sum(8 * t.numel() * t.element_size() for t in tensors)


def _packed_bytes(k: int) -> int:
    """Bytes of packing.pack's 4-bit stream for k codes: whole 32-code blocks of four int32 words."""
    return 16 * triton.cdiv(k, 32)


def pack_weight(q: QTensor) -> PackedFP4:
    """Pack a QTensor of an E2M1 FloatFormat weight quantized with ``PerGroup(g)``, g a power of two ≥ 16."""
    fmt = q.fmt
    if not isinstance(fmt, FloatFormat) or fmt.element != E2M1:
        raise TypeError(f"only E2M1 FloatFormat QTensors pack as FP4, got format {fmt}")
    if not isinstance(fmt.scale, PowerOfTwo | Minifloat) or fmt.scale.bits != 8:
        raise ValueError(f"FP4 weights store 8-bit scale codes (E8M0 or E4M3), got scale {fmt.scale}")
    g = q.gran.n if isinstance(q.gran, PerGroup) else 0
    if g < MIN_GROUP or g & (g - 1):
        raise ValueError(f"FP4 weights need PerGroup(g), g a power of two >= {MIN_GROUP}, got {q.gran}")
    if sys.byteorder != "little":
        raise RuntimeError("the packed layout views int32 words as little-endian bytes")
    rows, cols = q.shape
    scale = q.scale.reshape(rows, -1)
    scales = fmt.scale.encode(scale)
    back = fmt.scale.decode(scales)
    if not torch.equal(back.isnan(), scale.isnan()) or not torch.equal(back.nan_to_num(), scale.nan_to_num()):
        raise ValueError(f"scales are not representable in the scale format {fmt.scale}")
    codes = pack(from_groups(q.codes, q.shape), 4).view(torch.uint8)[:, :triton.cdiv(cols, 2)].contiguous()
    gs = None if q.global_scale is None else q.global_scale.reshape(()).float()
    return PackedFP4(codes, scales, gs, fmt, g, (rows, cols))


@triton.jit
def _weight_step(w_ptr, s_ptr, gs_ptr, offs_n, k0, N, K, row_bytes, num_groups, group,
                 SCALE_E8M0: tl.constexpr, S_BITS: tl.constexpr, S_MAN: tl.constexpr, S_EMIN: tl.constexpr,
                 S_NAN: tl.constexpr, TENSOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """E2M1 values ``e[BLOCK_N, BLOCK_K]`` (fp32, 0 past K or N) and ``σ[BLOCK_N]`` (fp32) of the step at k0."""
    cols = offs_n < N
    j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # k0 is even: the step's bytes, contiguous along a row
    byte = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * row_bytes + j[None, :],
                   mask=cols[:, None] & (j < row_bytes)[None, :], other=0).to(tl.int32)
    # Code 2j is byte j's low nibble, 2j + 1 its high one (an odd K's last high nibble is a zero code).
    code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_K))
    e = decode(code, 4, 1, 0, -1)  # E2M1: 1 mantissa bit, smallest normal exponent 0
    c = tl.load(s_ptr + offs_n.to(tl.int64) * num_groups + k0 // group, mask=cols, other=0).to(tl.int32)
    if SCALE_E8M0:
        s = tl.where(c == 255, NAN, pow2_bits(c - 127))
    else:
        s = decode(c, S_BITS, S_MAN, S_EMIN, S_NAN).to(tl.int32, bitcast=True)
    if TENSOR:  # σ = s · S, the format's one fp32 product (mul_fp32 takes finite values: NaN kept aside)
        product = mul_fp32(s, tl.load(gs_ptr + offs_n * 0).to(tl.int32, bitcast=True))
        s = tl.where(s == NAN, NAN, product)
    return e, s.to(tl.float32, bitcast=True)


@triton.jit
def _fp4_gemm(x_ptr, w_ptr, s_ptr, gs_ptr, b_ptr, y_ptr, M, N, K, stride_xm, row_bytes, num_groups, group,
              k_tiles_per_split, SCALE_E8M0: tl.constexpr, S_BITS: tl.constexpr, S_MAN: tl.constexpr,
              S_EMIN: tl.constexpr, S_NAN: tl.constexpr, TENSOR: tl.constexpr, HAS_BIAS: tl.constexpr,
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
        e, sigma = _weight_step(w_ptr, s_ptr, gs_ptr, offs_n, k0, N, K, row_bytes, num_groups, group,
                                SCALE_E8M0, S_BITS, S_MAN, S_EMIN, S_NAN, TENSOR, BLOCK_N, BLOCK_K)
        if UPCAST:  # exact; the interpreter's tl.dot misreads bf16
            x = to_fp32(x)
        else:
            e = e.to(x_ty)  # exact: E2M1 values have 2 significant bits
        # ieee: no TF32 rounding of fp32 operands. The block scale multiplies the step's fp32 partial.
        acc += tl.dot(x, tl.trans(e), input_precision="ieee") * sigma[None, :]
    if HAS_BIAS:
        if pid_k == 0:  # once, by the first split: one more term of the fp32 sum
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]

    y_ptrs = y_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(y_ptrs, cast_rne(acc, y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _check(x: torch.Tensor, w: PackedFP4, bias: torch.Tensor | None) -> None:
    if not isinstance(w, PackedFP4):
        raise TypeError(f"expected a PackedFP4 weight (ptqsuite_kernels.fp4_gemm.pack_weight), got {type(w)}")
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x of shape [M, {w.shape[1]}], got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be one of {DTYPES}, got {x.dtype}")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"expected bias of shape ({w.shape[0]},), got {tuple(bias.shape)}")


def _split_k(tiles: int, k_tiles: int, device: torch.device) -> int:
    """Splits of K that give about two programs per SM (at least one K step each, none empty)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    split = max(1, min(MAX_SPLIT_K, k_tiles, 2 * sms // tiles))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))


def _scale_constexprs(w: PackedFP4) -> dict:
    if isinstance(w.fmt.scale, PowerOfTwo):
        return dict(SCALE_E8M0=True, S_BITS=8, S_MAN=0, S_EMIN=0, S_NAN=-1)
    g = Grid.of(w.fmt.scale)
    return dict(SCALE_E8M0=False, S_BITS=g.bits, S_MAN=g.man, S_EMIN=g.emin, S_NAN=g.nan_code)


def linear(x: torch.Tensor, w: PackedFP4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[M, K] @ Ŵᵀ (+ bias)`` in ``x``'s dtype, ``Ŵ[N, K]`` the packed FP4 weight ``w``."""
    _check(x, w, bias)
    (n, k), m = w.shape, x.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    if m == 0 or n == 0:
        return x.new_zeros(m, n)
    block_m, block_n, warps, stages = next(c[1:] for c in CONFIGS if m <= c[0])
    block_k = min(w.group, MAX_BLOCK_K)  # divides the group: one scale per step
    if block_k < 32:
        # Measured on an H200 with triton 3.6: 16-wide K steps on 16- or 32-row fp16/bf16 tiles give wrong sums
        # (NVFP4 at M = 1 off by 90 in 50); 64-row tiles are right. A miscompile, so avoid the shape.
        block_m = max(block_m, 64)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = _split_k(tiles, k_tiles, x.device)
    y = torch.empty(split, m, n, device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
    gs = w.global_scale if w.global_scale is not None else w.scales  # any pointer without S: never read
    _fp4_gemm[(tiles, split)](
        x, w.codes, w.scales, gs, bias if bias is not None else x, y, m, n, k, x.stride(0), w.codes.shape[1],
        w.num_groups, w.group, triton.cdiv(k_tiles, split), **_scale_constexprs(w),
        TENSOR=w.global_scale is not None, HAS_BIAS=bias is not None, UPCAST=upcast_dot(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M, num_warps=warps, num_stages=stages)
    return y[0] if split == 1 else y.sum(0).to(x.dtype)


kernel = linear  # the house name: kernel(...) beside reference(...)


def exact(x: torch.Tensor, w: PackedFP4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product with ``Ŵ`` in fp32, in float64 (exact up to float64's rounding, counted in `error_bound`)."""
    y = x.double() @ w.dequantize(torch.float32).to(x.device).double().T
    return y if bias is None else y + bias.double()


def reference(x: torch.Tensor, w: PackedFP4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`exact` cast to ``x``'s dtype."""
    _check(x, w, bias)
    return exact(x, w, bias).to(x.dtype)


def error_bound(x: torch.Tensor, w: PackedFP4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """An elementwise bound (float64) on ``|fp32 result − exact|``, before the rounding to the output dtype.

    Derivation (Higham, Accuracy and Stability of Numerical Algorithms, lemma 3.1 and §3.1): if every term of a
    sum reaches the result through at most ``n`` roundings, each a factor ``(1 + δ)^±1`` with ``|δ| ≤ u`` (no
    underflow), the error is at most ``γ_n · Σ|terms|``, ``γ_n = n·u / (1 − n·u)``, in any order of operations.
    The kernel's term ``x[m, k] · Ŵ[n, k]`` meets: the product ``x · e`` (exact for fp16/bf16 x; one rounding for
    fp32), the sum inside the step's dot (at most ``K − 1``: padding adds exact zeros), the product by ``σ``
    (one), the accumulator's additions (one per K step and the bias: at most ``ceil(K/16) + 1``), the split-K sum
    (at most ``MAX_SPLIT_K − 1``), and one more because ``exact`` multiplies by ``Ŵ = fl(e · σ)`` where the
    kernel has ``e · σ`` (equal for power-of-two σ). So ``n = K + ceil(K/16) + MAX_SPLIT_K + 2`` with u = ACC_UNIT
    (2^-24, or 2^-23 for tensor cores, which truncate), plus ``exact``'s own float64 error ``γ_{K+1}(2^-53)``.
    Elements and scales are exact in fp32, so decoding adds nothing else."""
    k = w.shape[1]
    n = k + math.ceil(k / 16) + MAX_SPLIT_K + 2
    mass = x.double().abs() @ w.dequantize(torch.float32).to(x.device).double().abs().T
    if bias is not None:
        mass = mass + bias.double().abs()
    gamma = n * ACC_UNIT / (1 - n * ACC_UNIT) + (k + 1) * F64_UNIT / (1 - (k + 1) * F64_UNIT)
    return gamma * mass
