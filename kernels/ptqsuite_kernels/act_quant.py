"""Fused per-token dynamic INT activation quantization: ``kernel(x[M, K], fmt) -> (codes int8[M, K], scale
fp32[M, 1])``, bit for bit ``fmt.quantize(x, PerToken())`` (``reference``) for ``fmt = IntFormat(bits,
symmetric=True, scale_dtype=torch.float32)`` (INT8, INT4) and ``x`` in fp32, fp16 or bf16:

* ``s = amax / qmax`` with ``amax = max_k |x[m, k]|``, ``qmax = 2^(b−1) − 1``, correctly rounded (``div_rn``);
  ``s = 1`` where that is 0 (a zero row, or an amax so small that the quotient underflows), then clamped to
  fp32's normal range ``[2^-126, fp32 max]`` as IntFormat stores scales;
* ``codes = clamp(round_half_even(x / s), −2^(b−1), 2^(b−1) − 1)``, the division correctly rounded;
* a row holding NaN or ±inf gets a NaN scale and codes 0 (so it decodes to NaN), as every format does.

Each program quantizes ``BLOCK_M`` rows in two passes over K in chunks of ``BLOCK_K`` (any K: masked tails): the
absmax, then the codes (the second read of a row mostly hits L2). Per-token FP8 (and any scaled float format) is
``float_quant.kernel(x, FP8, PerToken())``.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ptqsuite.formats import IntFormat
from ptqsuite.granularity import PerToken
from ptqsuite_kernels.rounding import nonfinite, round_half_even

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TILE = 4096  # elements of x a program holds at once: BLOCK_M rows × BLOCK_K columns
MAX_BLOCK_K = 2048
# IntFormat's storage range for fp32 scales (constexpr: a kernel may read module globals only as constants)
FP32_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)
FP32_MAX = tl.constexpr(torch.finfo(torch.float32).max)


@triton.jit(do_not_specialize=["M"])  # K stays specialized: its divisibility lets loads along K use wide vectors
def _per_token(x_ptr, codes_ptr, scale_ptr, M, K, stride_xm, qmax,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    lane = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    special = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):  # 0 pads: absmax >= 0
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + lane[None, :],
                    mask=(rows[:, None] < M) & (k0 + lane[None, :] < K), other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        special = tl.maximum(special, tl.max(nonfinite(x).to(tl.int32), axis=1))
    scale = tl.math.div_rn(amax, qmax)
    scale = tl.where(scale > 0, scale, 1.0)  # IntFormat.fit's order: zero first, then the storage range
    scale = tl.minimum(tl.maximum(scale, FP32_TINY), FP32_MAX)
    # NaN or ±inf in a row: a NaN scale (the formats' rule), whatever the maximum made of it.
    scale = tl.where(special > 0, float("nan"), scale)
    for k0 in range(0, K, BLOCK_K):
        real = (rows[:, None] < M) & (k0 + lane[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + lane[None, :], mask=real, other=0.0).to(tl.float32)
        q = round_half_even(tl.math.div_rn(x, scale[:, None]))
        q = tl.minimum(tl.maximum(q, -qmax - 1.0), qmax)
        q = tl.where(special[:, None] > 0, 0.0, q)  # a NaN scale's codes are 0
        tl.store(codes_ptr + rows[:, None] * K + k0 + lane[None, :], q.to(tl.int8), mask=real)
    tl.store(scale_ptr + rows, scale, mask=rows < M)


def _check(fmt: Any) -> None:
    if not isinstance(fmt, IntFormat):
        raise TypeError(f"expected an IntFormat, got {type(fmt).__name__} {fmt!r} (scaled float formats: "
                        f"float_quant.kernel(x, fmt, PerToken()))")
    if not (fmt.symmetric and fmt.scale_dtype == torch.float32):
        raise ValueError(f"per-token INT activations are symmetric with fp32 scales: IntFormat(bits, "
                         f"symmetric=True, scale_dtype=torch.float32), got {fmt!r}")


def kernel(x: torch.Tensor, fmt: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x[M, K]`` with its own scale: ``(codes int8[M, K], scale fp32[M, 1])``."""
    _check(fmt)
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"expected one of {DTYPES}, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("expected at least one column (a row's absmax needs an element)")
    x = x if x.stride(1) == 1 else x.contiguous()
    (m, k) = x.shape
    codes = torch.empty(m, k, device=x.device, dtype=torch.int8)
    scale = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    if m == 0:
        return codes, scale
    block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)
    block_m = min(max(1, TILE // block_k), triton.next_power_of_2(m))
    _per_token[(triton.cdiv(m, block_m),)](x, codes, scale, m, k, x.stride(0), float(fmt.qmax),
                                           BLOCK_M=block_m, BLOCK_K=block_k)
    return codes, scale


def reference(x: torch.Tensor, fmt: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``fmt.quantize(x, PerToken())`` on the CPU (see int_quant.reference for why), as ``(codes, scale)``."""
    _check(fmt)
    q = fmt.quantize(x.cpu(), PerToken())
    return q.codes.reshape(x.shape).to(torch.int8).to(x.device), q.scale.reshape(-1, 1).to(x.device)
