"""The Triton W8A8 GEMM equals its reference bit for bit, for fp32, fp16 and bf16 outputs.

Why bitwise is right even for fp16/bf16 outputs: the int32 accumulation is exact in any order, the epilogue
``fp32(fp32(float32(acc) · x_scale) · w_scale)`` is the same sequence of correctly rounded fp32 operations on both
sides, and the final cast rounds to nearest even on both sides (torch's cast of an fp32 tensor; the kernel's
fp16 conversion, and bf16 rounded by hand where the interpreter would truncate). A half-ulp tolerance would only
hide a kernel that rounded differently.

Operands come from quantizing the shared value distributions (per-token INT8 activations with fp32 scales,
per-channel INT8 weights with fp16 scales), plus codes pinned at -128, the largest products: with K > 1024 the
int32 sum passes 2^24 and its conversion to fp32 rounds.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_testing import (DEVICE, MAGNITUDES, NO_KERNEL, VALUES, assert_bitwise_equal, examples, needs_kernel,
                            values)

from ptqsuite.formats import IntFormat
from ptqsuite.granularity import PerToken

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = [1, 3, 7, 17, 65, 130]
COLS = [1, 31, 127, 129, 172, 300, 1100]  # K: off the 128-wide K steps; 1100 · 128² > 2^24
OUTS = [1, 37, 65, 129]
CODES = VALUES + ["min"]  # min: every code -128

if NO_KERNEL is None:
    from ptqsuite_kernels.int8_gemm import MAX_K, kernel, reference
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


def int8_operand(kind: str, shape: tuple[int, int], seed: int, magnitude: float,
                 scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 and scales fp32 [rows, 1]: the INT8 symmetric quantization of a value distribution, per row."""
    x = values("normal" if kind == "min" else kind, shape, seed, magnitude)
    q = IntFormat(8, symmetric=True, scale_dtype=scale_dtype).quantize(x, PerToken())
    codes = torch.full(shape, -128, device=x.device) if kind == "min" else q.codes.reshape(shape)
    return codes.to(torch.int8), q.scale.reshape(-1, 1)


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    m: int
    n: int
    k: int
    x_values: str
    x_magnitude: float
    w_values: str
    w_magnitude: float
    seed: int

    def operands(self) -> tuple[torch.Tensor, ...]:
        xq, xs = int8_operand(self.x_values, (self.m, self.k), self.seed, self.x_magnitude, torch.float32)
        wq, ws = int8_operand(self.w_values, (self.n, self.k), self.seed + 1, self.w_magnitude, torch.float16)
        return xq, xs, wq, ws


cases = st.builds(
    Case,
    dtype=st.sampled_from(DTYPES),
    m=st.sampled_from(ROWS),
    n=st.integers(1, 80) | st.sampled_from(OUTS),
    k=st.integers(1, 320) | st.sampled_from(COLS),
    x_values=st.sampled_from(CODES),
    x_magnitude=st.sampled_from(MAGNITUDES),
    w_values=st.sampled_from(CODES),
    w_magnitude=st.sampled_from(MAGNITUDES),
    seed=st.integers(0, 2**32 - 1),
)


@needs_kernel
@examples(100)
@given(cases)
# The largest products (-128 · -128) over K = 1100: the int32 sum 18M passes 2^24 and rounds on conversion.
@example(Case(dtype=torch.bfloat16, m=3, n=37, k=1100, x_values="min", x_magnitude=1.0, w_values="min",
              w_magnitude=1.0, seed=1))
# Large M (the 128x128 tile config) with outliers; fp16 outputs overflowing to inf.
@example(Case(dtype=torch.float16, m=257, n=129, k=300, x_values="outliers", x_magnitude=1e4, w_values="normal",
              w_magnitude=1.0, seed=2))
def test_kernel_equals_reference_bitwise(case: Case):
    xq, xs, wq, ws = case.operands()
    assert_bitwise_equal(kernel(xq, xs, wq, ws, case.dtype), reference(xq, xs, wq, ws, case.dtype))


@needs_kernel
@pytest.mark.parametrize("bad, error", [
    (dict(xq=torch.zeros(2, 8)), TypeError),
    (dict(wq=torch.zeros(3, 9, dtype=torch.int8)), ValueError),
    (dict(x_scale=torch.ones(2, 1, dtype=torch.float16)), ValueError),
    (dict(w_scale=torch.ones(3)), ValueError),
    (dict(out_dtype=torch.int32), TypeError),
])
def test_kernel_rejects_bad_arguments(bad: dict, error: type[Exception]):
    args = dict(xq=torch.zeros(2, 8, dtype=torch.int8), x_scale=torch.ones(2, 1),
                wq=torch.zeros(3, 8, dtype=torch.int8), w_scale=torch.ones(3, 1), out_dtype=torch.float16) | bad
    with pytest.raises(error):
        kernel(**{name: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for name, v in args.items()})


@needs_kernel
def test_kernel_rejects_k_that_could_overflow_int32():
    xq = torch.zeros(1, MAX_K + 1, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="overflow"):
        kernel(xq, torch.ones(1, 1, device=DEVICE), xq, torch.ones(1, 1, device=DEVICE), torch.float32)
