"""Fused per-token dynamic activation quantization: ``kernel(x[M, K], fmt) -> (codes[M, K], scale fp32[M, 1])``,
bit for bit ``fmt.quantize(x, PerToken())`` (``reference``), for ``x`` in fp32, fp16 or bf16.

INT (``IntFormat(bits, symmetric=True, scale_dtype=torch.float32)``, e.g. INT8 and INT4; codes as int8):

* ``s = amax / qmax`` with ``amax = max_k |x[m, k]|``, ``qmax = 2^(b−1) − 1``, correctly rounded (``div_rn``);
  ``s = 1`` where that is 0 (a zero row, or an amax so small that the quotient underflows), then clamped to
  fp32's normal range ``[2^-126, fp32 max]`` as IntFormat stores scales;
* ``codes = clamp(round_half_even(x / s), −2^(b−1), 2^(b−1) − 1)``, the division correctly rounded;
* a row holding NaN or ±inf gets a NaN scale and codes 0 (so it decodes to NaN), as every format does.

Each program quantizes ``BLOCK_M`` rows in two passes over K in chunks of ``BLOCK_K`` (any K: masked tails): the
absmax, then the codes (the second read of a row mostly hits L2). Formats plug in through ``FORMATS``: a format
class maps to a `Spec` (the kernel's ``FAMILY`` branch, code dtype and scale constants); a new family adds an entry
there and a branch in `_scale` and `_encode`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import triton
import triton.language as tl

from ptqsuite.formats import IntFormat
from ptqsuite.granularity import PerToken
from ptqsuite_kernels.int_quant import _round_half_even

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TILE = 4096  # elements of x a program holds at once: BLOCK_M rows × BLOCK_K columns
MAX_BLOCK_K = 2048


@dataclass(frozen=True)
class Spec:
    """What the kernel needs of a format."""

    family: str  # the kernel's FAMILY branch
    codes: torch.dtype  # dtype of the codes tensor
    qmax: float  # the largest code magnitude: scale = amax / qmax
    scale_dtype: torch.dtype  # scales are clamped to its normal range


def _int_spec(fmt: IntFormat) -> Spec:
    if not fmt.symmetric or fmt.scale_dtype != torch.float32:
        raise ValueError(f"per-token INT activations are symmetric with fp32 scales: "
                         f"IntFormat({fmt.bits}, symmetric=True, scale_dtype=torch.float32), got {fmt!r}")
    return Spec("int", torch.int8, float(fmt.qmax), torch.float32)


FORMATS: dict[type, Callable[[Any], Spec]] = {IntFormat: _int_spec}


@triton.jit
def _scale(amax, qmax, SCALE_MIN: tl.constexpr, SCALE_MAX: tl.constexpr, FAMILY: tl.constexpr):
    if FAMILY == "int":
        scale = tl.math.div_rn(amax, qmax)
        scale = tl.where(scale > 0, scale, 1.0)  # IntFormat.fit's order: zero first, then the storage range
        return tl.minimum(tl.maximum(scale, SCALE_MIN), SCALE_MAX)


@triton.jit
def _encode(x, scale, qmax, FAMILY: tl.constexpr):
    if FAMILY == "int":
        q = _round_half_even(tl.math.div_rn(x, scale))
        q = tl.minimum(tl.maximum(q, -qmax - 1.0), qmax)
        return tl.where(scale == scale, q, 0.0).to(tl.int8)  # a NaN scale's codes are 0


@triton.jit(do_not_specialize=["M"])  # K stays specialized: its divisibility lets loads along K use wide vectors
def _per_token(x_ptr, codes_ptr, scale_ptr, M, K, stride_xm, qmax,
               SCALE_MIN: tl.constexpr, SCALE_MAX: tl.constexpr, FAMILY: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    lane = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    special = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):  # 0 pads: absmax >= 0
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + lane[None, :],
                    mask=(rows[:, None] < M) & (k0 + lane[None, :] < K), other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        special = tl.maximum(special, tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1))
    # NaN or ±inf in a row: a NaN scale (the formats' rule), whatever the maximum made of it.
    scale = tl.where(special > 0, float("nan"), _scale(amax, qmax, SCALE_MIN, SCALE_MAX, FAMILY))
    for k0 in range(0, K, BLOCK_K):
        real = (rows[:, None] < M) & (k0 + lane[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + lane[None, :], mask=real, other=0.0)
        codes = _encode(x.to(tl.float32), scale[:, None], qmax, FAMILY)
        tl.store(codes_ptr + rows[:, None] * K + k0 + lane[None, :], codes, mask=real)
    tl.store(scale_ptr + rows, scale, mask=rows < M)


def spec(fmt: Any) -> Spec:
    """The kernel's view of ``fmt``, or a clear error for a format it has no branch for."""
    make = FORMATS.get(type(fmt))
    if make is None:
        raise TypeError(f"no per-token activation kernel for {type(fmt).__name__}; supported: "
                        f"{[t.__name__ for t in FORMATS]}")
    return make(fmt)


def kernel(x: torch.Tensor, fmt: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x[M, K]`` with its own scale: ``(codes[M, K], scale fp32[M, 1])``."""
    s = spec(fmt)
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"expected one of {DTYPES}, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("expected at least one column (a row's absmax needs an element)")
    x = x if x.stride(1) == 1 else x.contiguous()
    (m, k) = x.shape
    codes = torch.empty(m, k, device=x.device, dtype=s.codes)
    scale = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    if m == 0:
        return codes, scale
    block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)
    block_m = min(max(1, TILE // block_k), triton.next_power_of_2(m))
    info = torch.finfo(s.scale_dtype)
    _per_token[(triton.cdiv(m, block_m),)](x, codes, scale, m, k, x.stride(0), s.qmax, SCALE_MIN=info.tiny,
                                           SCALE_MAX=info.max, FAMILY=s.family, BLOCK_M=block_m, BLOCK_K=block_k)
    return codes, scale


def reference(x: torch.Tensor, fmt: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``fmt.quantize(x, PerToken())`` on the CPU (see int_quant.reference for why), as ``(codes, scale)``."""
    s = spec(fmt)
    q = fmt.quantize(x.cpu(), PerToken())
    return q.codes.reshape(x.shape).to(s.codes).to(x.device), q.scale.reshape(-1, 1).to(x.device)
