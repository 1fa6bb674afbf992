"""Triton helpers for rounding and special values that must behave the same in the CPU interpreter and on a GPU.

NaN and ±inf are recognized by their exponent bits (`nonfinite`): a GPU compiles ``x != x`` and NaN-aware max/min
as if NaN never occurred (seen on an H200). Round-half-to-even is built from ``floor`` (`round_half_even`):
libdevice's ``rint`` is not available in the interpreter.

The interpreter (triton 3.9) converts fp32 to bf16 by truncation, where a GPU rounds to nearest even, and its
``tl.dot`` reads bf16 operands' bit patterns as integers. Kernels that must match a torch reference bit for bit
therefore round to bf16 by hand, and feed bf16 values to ``tl.dot`` as fp32 in the interpreter (exact: a bf16
product fits fp32's significand).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """Whether kernels run in Triton's CPU interpreter (read at launch: the root conftest sets it at start-up)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` must get ``dtype`` operands as fp32: bf16 in the interpreter."""
    return dtype == torch.bfloat16 and interpreted()


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """fp32 ``v`` to ``dtype`` (fp32, fp16 or bf16) rounded to nearest, ties to even, in the interpreter as on a
    GPU. bf16: add half an ulp (minus one unless the kept part is odd) and clear the 16 low bits; the cast of the
    result is then exact wherever it runs."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        # NaN stays a quiet NaN: a GPU's canonical NaN 0x7FFFFFFF would overflow into -0.0 above (seen on an H200).
        rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, rounded)
        return rounded.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return v.to(dtype)


@triton.jit
def nonfinite(v):
    """Whether fp32 ``v`` is NaN or ±inf: all exponent bits set."""
    return (v.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000


@triton.jit
def round_half_even(v):
    """fp32 ``v`` rounded to an integer value, ties to even. Never -0.0 (-0.0 + 0.0 and -1.0 + 1.0 are +0.0): a
    zero code decodes to +0.0, as a torch reference's integer codes do."""
    down = tl.math.floor(v)
    frac = v - down  # exact in floating point
    odd = tl.math.floor(down * 0.5) != down * 0.5
    return down + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
