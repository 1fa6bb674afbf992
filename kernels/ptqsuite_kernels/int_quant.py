"""INT fake quantization (quantize, then dequantize) per group of a row, in Triton, beside its torch reference.

``kernel(x, bits, symmetric, group, scale_dtype)`` equals ``reference(...)``, i.e. ``IntFormat(bits, symmetric,
scale_dtype).fake(x, gran)`` with ``gran = PerGroup(group)``, or ``PerChannel()`` for ``group=None``, bit for bit (NaN results compared as NaN: their payload is not specified). Every
step is elementwise or an order-free min/max, so exactness is possible, but only with these choices, each checked
by tests/kernels/test_int_quant.py:

* Division is ``tl.math.div_rn`` (IEEE round-to-nearest): ``/`` on an NVIDIA GPU is an approximate division,
  which moves values within an ulp of a round-half tie by a step (1.5% of the test's near-tie data on an H200).
* Round-half-to-even and the NaN/inf test come from rounding.py (built from ``floor`` and exponent bits, so the
  interpreter and a GPU agree).
* A bf16 output is rounded to nearest-even by hand (rounding.cast_rne): the interpreter truncates fp32 to bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptqsuite.formats import IntFormat
from ptqsuite.granularity import PerChannel, PerGroup

from .rounding import cast_rne, nonfinite, round_half_even

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TILE = 1024  # elements a program handles: whole groups, several of them when groups are small
# The scales' storage dtypes (IntFormat.scale_dtype: fp16 for weights, fp32 for dynamic activations and KV) and
# the fp32 mantissa bits each lacks: rounding toward zero into one, within its normal range, clears them.
SCALE_DTYPES = {torch.float16: 13, torch.float32: 0}


# Sizes and code bounds are plain arguments, so that a GPU compiles one variant per tile shape, dtype and symmetry.
@triton.jit(do_not_specialize=["cols", "group", "num_groups", "total_groups", "qmin", "qmax"])
def _fake_int(x_ptr, out_ptr, cols, group, num_groups, total_groups, qmin, qmax,
              SYMMETRIC: tl.constexpr, SCALE_MIN: tl.constexpr, SCALE_MAX: tl.constexpr, SCALE_CLEAR: tl.constexpr,
              GROUPS: tl.constexpr, BLOCK: tl.constexpr):
    # One program: GROUPS consecutive groups of the row-major tensor as a [GROUPS, BLOCK] tile, a group a row.
    index = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)[:, None]
    lane = tl.arange(0, BLOCK)[None, :]
    col = (index % num_groups) * group + lane
    offset = (index // num_groups) * cols + col
    # Off: lanes past the group, the tail group's missing part, groups past the tensor's last.
    real = (lane < group) & (col < cols) & (index < total_groups)
    # Padding with 0 leaves every statistic exact: absmax >= 0, and the asymmetric range always holds 0.
    x = tl.load(x_ptr + offset, mask=real, other=0.0).to(tl.float32)
    qmin = qmin.to(tl.float32)
    qmax = qmax.to(tl.float32)

    if SYMMETRIC:
        scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), qmax)
    else:
        lo = tl.minimum(tl.min(x, axis=1), 0.0)
        scale = tl.math.div_rn(tl.maximum(tl.max(x, axis=1), 0.0) - lo, qmax)
    scale = tl.where(scale > 0, scale, 1.0)  # the spec's scale for a zero range (whose zeros decode with any)
    # What gets stored: a scale rounded toward zero to its storage dtype. Within that dtype's normal range (the
    # clamp) that is fp32 with the mantissa bits the dtype lacks cleared (fp16: 13, fp32: none); plain bit
    # arithmetic, the same in the interpreter and on a GPU.
    scale = tl.minimum(tl.maximum(scale, SCALE_MIN), SCALE_MAX)
    scale = ((scale.to(tl.int32, bitcast=True) >> SCALE_CLEAR) << SCALE_CLEAR).to(tl.float32, bitcast=True)
    # NaN or ±inf anywhere in a group: a NaN scale, so the whole group decodes to NaN (the spec's rule).
    special = real & nonfinite(x)
    scale = tl.where(tl.max(special.to(tl.int32), axis=1) > 0, float("nan"), scale)

    q = round_half_even(tl.math.div_rn(x, scale[:, None]))
    if SYMMETRIC:
        zero = tl.zeros_like(scale)
    else:
        zero = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(-lo, scale)), 0.0), qmax)
        q += zero[:, None]
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    xq = scale[:, None] * (q - zero[:, None])

    tl.store(out_ptr + offset, cast_rne(xq, out_ptr.dtype.element_ty), mask=real)


def kernel(x: torch.Tensor, bits: int, symmetric: bool, group: int | None,
           scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Fake-quantize ``x[rows, cols]`` to INT(bits) per ``group`` elements of a row (None: the whole row), with
    scales stored in ``scale_dtype``."""
    fmt = IntFormat(bits, symmetric, scale_dtype)
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype {scale_dtype}: valid: {', '.join(map(str, SCALE_DTYPES))}")
    if group is not None:
        PerGroup(group)  # validates the group size as the reference does
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"expected one of {DTYPES}, got {x.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    rows, cols = x.shape
    if x.numel() == 0:
        return out
    group = cols if group is None else group
    num_groups = triton.cdiv(cols, group)
    block = triton.next_power_of_2(min(group, cols))
    total_groups = rows * num_groups
    groups = max(1, TILE // block)
    _fake_int[(triton.cdiv(total_groups, groups),)](
        x, out, cols, group, num_groups, total_groups, fmt.qmin, fmt.qmax, SYMMETRIC=symmetric,
        SCALE_MIN=torch.finfo(scale_dtype).tiny, SCALE_MAX=torch.finfo(scale_dtype).max,
        SCALE_CLEAR=SCALE_DTYPES[scale_dtype], GROUPS=groups, BLOCK=block)
    return out


def reference(x: torch.Tensor, bits: int, symmetric: bool, group: int | None,
              scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The specification, computed on the CPU whatever ``x``'s device: torch on CUDA divides by a Python number
    through its reciprocal (on an H200, ``x / d`` for d in 3..255 was off the correctly rounded quotient in 5% to
    72% of elements), and ``IntFormat.fake`` there moved 12 of 1.5M values by a step."""
    gran = PerChannel() if group is None else PerGroup(group)
    return IntFormat(bits, symmetric, scale_dtype).fake(x.cpu(), gran).to(x.device)
