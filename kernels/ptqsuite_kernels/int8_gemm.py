"""W8A8 GEMM: int8 activations with per-token scales times int8 weights with per-channel scales.

``y[m, n] = fp32(fp32(float32(acc[m, n]) · x_scale[m]) · w_scale[n])`` rounded to ``out_dtype``, where
``acc = Σ_k xq[m, k] · wq[n, k]`` is exact in int32 (``|acc| ≤ K · 128² < 2^31`` for ``K ≤ 2^17``): the
conversion to fp32 rounds to nearest even (exact below 2^24), then each product rounds once, in this order. Every
step is deterministic, so the kernel equals ``reference`` bit for bit, for every output dtype: fp16 rounds to
nearest even on both sides, and bf16 is rounded by hand (rounding.cast_rne) where the interpreter would truncate.

Kernel: ``[BLOCK_M, BLOCK_N]`` output tiles, ``tl.dot`` on int8 tiles into an int32 accumulator over K (the integer
sum is exact in any order, so no split-K bookkeeping can change it), the fp32 epilogue above on the tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptqsuite_kernels.rounding import cast_rne
from ptqsuite_kernels.tiles import tile_offsets

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_K = 2**17  # |acc| ≤ K · 2^14 stays below 2^31
# (max M, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): int8 tensor-core tiles, K steps of 64 or 128 bytes.
CONFIGS = [(16, 16, 64, 128, 4, 4), (64, 64, 64, 128, 4, 4), (256, 64, 128, 128, 4, 3),
           (float("inf"), 128, 128, 128, 8, 3)]
GROUP_M = 8  # row tiles per band of the launch order (L2 reuse)


@triton.jit(do_not_specialize=["M", "N"])  # row counts only bound masks across rows: fewer compiled variants
def _int8_gemm(xq_ptr, xs_ptr, wq_ptr, ws_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n = tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows, cols = offs_m < M, offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(xq_ptr + offs_m[:, None].to(tl.int64) * stride_xm + k[None, :],
                    mask=rows[:, None] & (k[None, :] < K), other=0)
        w = tl.load(wq_ptr + offs_n[None, :].to(tl.int64) * stride_wn + k[:, None],
                    mask=cols[None, :] & (k[:, None] < K), other=0)
        acc = tl.dot(x, w, acc, out_dtype=tl.int32)  # int8 x int8 -> int32, exact (triton 3.6 needs the dtype said)

    x_scale = tl.load(xs_ptr + offs_m, mask=rows, other=0.0)
    w_scale = tl.load(ws_ptr + offs_n, mask=cols, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None]
    y = y * w_scale[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             cast_rne(y, y_ptr.dtype.element_ty), mask=rows[:, None] & cols[None, :])


def _check(xq, x_scale, wq, w_scale, out_dtype) -> None:
    for name, t in (("xq", xq), ("wq", wq)):
        if t.dtype != torch.int8 or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D int8 tensor, got {t.dtype}{tuple(t.shape)}")
    (m, k), (n, k_w) = xq.shape, wq.shape
    if k != k_w:
        raise ValueError(f"inner dimensions differ: xq {tuple(xq.shape)}, wq {tuple(wq.shape)}")
    if k > MAX_K:
        raise ValueError(f"K = {k} > {MAX_K} could overflow the int32 accumulator")
    for name, t, rows in (("x_scale", x_scale, m), ("w_scale", w_scale, n)):
        if t.dtype != torch.float32 or tuple(t.shape) != (rows, 1):
            raise ValueError(f"{name} must be fp32 of shape ({rows}, 1), got {t.dtype}{tuple(t.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def kernel(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
           out_dtype: torch.dtype) -> torch.Tensor:
    """``(xq[M, K] · wq[N, K]ᵀ) · x_scale[M, 1] · w_scale[N, 1]ᵀ`` in ``out_dtype`` (order: module docstring)."""
    _check(xq, x_scale, wq, w_scale, out_dtype)
    (m, k), n = xq.shape, wq.shape[0]
    xq, wq = (t if t.stride(1) == 1 else t.contiguous() for t in (xq, wq))
    y = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    if y.numel() == 0:
        return y
    _, block_m, block_n, block_k, warps, stages = next(c for c in CONFIGS if m <= c[0])
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _int8_gemm[grid](xq, x_scale.contiguous(), wq, w_scale.contiguous(), y, m, n, k, xq.stride(0), wq.stride(0),
                     n, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
                     num_warps=warps, num_stages=stages)
    return y


def reference(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """The exact integer product (int64, on the CPU), then the same fp32 epilogue, rounded by torch (nearest even:
    an fp32 tensor's cast is a single correct rounding)."""
    _check(xq, x_scale, wq, w_scale, out_dtype)
    acc = xq.cpu().long() @ wq.cpu().long().T
    y = acc.float() * x_scale.cpu()  # int64 -> fp32: round to nearest even, as int32 -> fp32 is
    y = y * w_scale.cpu().T
    return y.to(out_dtype).to(xq.device)
