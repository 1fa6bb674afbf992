"""Triton helpers for conversions that must round the same way in the CPU interpreter and on a GPU.

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
