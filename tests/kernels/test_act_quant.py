"""The fused per-token activation quantization kernel equals ``IntFormat(bits, symmetric=True,
scale_dtype=torch.float32).quantize(x, PerToken())`` bit for bit: codes and fp32 scales.

Rows of K up to 16384 (several chunks per pass, K not a power of two), zero rows (scale 1), magnitudes whose
scales reach fp32's small end, and round-half ties: values on half steps of a scale that is not a power of two,
a third nudged one ulp off, so that only a correctly rounded division lands them on the right side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_testing import (DEVICE, MAGNITUDES, NO_KERNEL, VALUES, assert_bitwise_equal, examples, needs_kernel,
                            values)

from ptqsuite.formats import IntFormat

BITS = [2, 3, 4, 8]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
COLS = [1, 31, 300, 2047, 2049, 4099, 16384]  # around the 2048-wide chunks, and the largest K
KINDS = VALUES + ["ties", "specials"]  # specials: NaN, +inf or -inf in some rows

if NO_KERNEL is None:
    from ptqsuite_kernels.act_quant import kernel, reference
# The interpreter's numpy warns on the maximum of a row that is one NaN.
pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")


def ties(bits: int, shape: tuple[int, int], seed: int, magnitude: float, dtype: torch.dtype) -> torch.Tensor:
    """Half steps ``j/2 · s`` with ``±qmax · s`` planted in each row, so the fitted scale is exactly ``s``: a power
    of two near ``magnitude`` (within the dtype's range) times an 11-bit mantissa in fp32 (every product exact),
    or 1 in fp16/bf16 (which hold few half steps)."""
    gen = torch.Generator().manual_seed(seed)
    qmax = 2 ** (bits - 1) - 1
    x = torch.randint(-2 * qmax, 2 * qmax + 1, shape, generator=gen) / 2
    x[:, 0] = qmax * torch.where(torch.rand(shape[0], generator=gen) < 0.5, -1.0, 1.0)
    mantissa = 1 + int(torch.randint(1024, (1,), generator=gen)) / 1024 if dtype == torch.float32 else 1.0
    exponent = min(round(math.log2(magnitude)), math.floor(math.log2(torch.finfo(dtype).max / (2 * qmax))))
    x = x * mantissa * 2.0**exponent
    nudge = (torch.rand(shape, generator=gen) < 1 / 3) & (torch.arange(shape[1]) > 0)
    away = torch.where(torch.rand(shape, generator=gen) < 0.5, -torch.inf, torch.inf)
    return torch.where(nudge, torch.nextafter(x, away), x).to(dtype).to(DEVICE)


@dataclass(frozen=True)
class Case:
    bits: int
    dtype: torch.dtype
    m: int
    k: int
    values: str
    magnitude: float
    seed: int

    @property
    def fmt(self) -> IntFormat:
        return IntFormat(self.bits, symmetric=True, scale_dtype=torch.float32)

    def tensor(self) -> torch.Tensor:
        shape = (self.m, self.k)
        if self.values == "ties":
            return ties(self.bits, shape, self.seed, self.magnitude, self.dtype)
        x = values("normal" if self.values == "specials" else self.values, shape, self.seed, self.magnitude,
                   self.dtype)
        x[1::3] = 0  # zero rows: scale 1
        if self.values == "specials":  # NaN, inf, -inf in turn, one in every other row (zero rows included)
            rows = torch.arange(0, self.m, 2)
            cols = torch.randint(self.k, rows.shape, generator=torch.Generator().manual_seed(self.seed))
            x[rows, cols] = torch.tensor([torch.nan, torch.inf, -torch.inf]).repeat(self.m)[:len(rows)].to(x)
        return x


cases = st.builds(
    Case,
    bits=st.sampled_from(BITS),
    dtype=st.sampled_from(DTYPES),
    m=st.integers(1, 9) | st.sampled_from([1, 65]),
    k=st.integers(1, 320) | st.sampled_from(COLS),
    values=st.sampled_from(KINDS),
    magnitude=st.sampled_from(MAGNITUDES),
    seed=st.integers(0, 2**32 - 1),
)


@needs_kernel
@examples(150)
@given(cases)
@example(Case(bits=8, dtype=torch.bfloat16, m=3, k=16384, values="outliers", magnitude=1e4, seed=1))
@example(Case(bits=4, dtype=torch.float32, m=5, k=4099, values="ties", magnitude=1.0, seed=2))
def test_kernel_equals_reference_bitwise(case: Case):
    x = case.tensor()
    codes, scale = kernel(x, case.fmt)
    ref_codes, ref_scale = reference(x, case.fmt)
    assert_bitwise_equal(codes, ref_codes)
    assert_bitwise_equal(scale, ref_scale)


@needs_kernel
def test_zero_rows_get_scale_one_and_tiny_rows_the_smallest_normal():
    x = torch.zeros(3, 40, device=DEVICE)
    x[1, 5] = 63 * 2.0**-149  # amax / 127 underflows to 0: scale 1, as IntFormat.fit replaces a zero scale first
    x[2, 5] = 1e-36  # amax / 127 is subnormal: clamped to fp32's smallest normal
    codes, scale = kernel(x, IntFormat(8, symmetric=True, scale_dtype=torch.float32))
    assert scale.flatten().tolist() == [1.0, 1.0, torch.finfo(torch.float32).tiny]
    assert codes[:2].eq(0).all() and codes[2, 5] == round(1e-36 / torch.finfo(torch.float32).tiny)


@needs_kernel
@pytest.mark.parametrize("bad, error", [
    (dict(fmt=IntFormat(8)), ValueError),  # asymmetric
    (dict(fmt=IntFormat(8, symmetric=True)), ValueError),  # fp16 scales
    (dict(fmt="int8"), TypeError),
    (dict(x=torch.zeros(2, 3, 4)), ValueError),
    (dict(x=torch.zeros(2, 3, dtype=torch.int8)), TypeError),
    (dict(x=torch.zeros(2, 0)), ValueError),
])
def test_kernel_rejects_bad_arguments(bad: dict, error: type[Exception]):
    args = dict(x=torch.zeros(2, 3), fmt=IntFormat(8, symmetric=True, scale_dtype=torch.float32)) | bad
    with pytest.raises(error):
        kernel(args["x"].to(DEVICE), args["fmt"])
