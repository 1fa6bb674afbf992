"""The Triton weight-only INT GEMM (W2/W4/W8 A16) stays within its derived error bound of the exact product.

Tolerance, derived (ptqsuite_kernels.int_gemm): the GEMM's operands are ``x`` and ``Ŵ`` rounded to ``x``'s dtype, whose
products are exact in fp32; any order of fp32 accumulation of K terms (plus the bias) errs by at most
``γ_K · (|x| @ |Ŵ|ᵀ + |bias|)``, ``γ_K = K·u / (1 − K·u)``, u = 2^-24 (2^-23 for tensor cores, which truncate);
the output is then a correct rounding of that value: within half an ulp of the output dtype at ``|exact| + bound``
(fp16: 2^-11 relative, bf16: 2^-8, both with their subnormal spacing as a floor), or ±inf past the overflow
threshold. No constant is tuned: ``within`` is tested below to reject a result one ulp off.

Shapes are deliberately odd: M from 1 (GEMV) through small odd counts to more than 64 rows (other tile configs),
K and N not multiples of tiles, words or groups (tail groups), groups of 7 (scales gathered per element), 96
(steps of 32 inside a group), 32, 128 and per-channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_testing import (DEVICE, MAGNITUDES, NO_KERNEL, assert_bitwise_equal, examples, needs_kernel,
                            values)
from kernel_testing import assert_within_bound as assert_close_to_exact
from kernel_testing import gemm_operands

from ptqsuite.formats import IntFormat
from ptqsuite.formats.packing import PackedInt, pack_qtensor
from ptqsuite.granularity import PerChannel, PerGroup

BITS = [2, 4, 8]
SYMMETRIC = [False, True]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GROUPS = [7, 32, 96, 128, None]  # None: per-channel
ROWS = [1, 3, 7, 17, 65, 130]  # GEMV, odd small, past the 16- and 64-row tile configs
COLS = [1, 31, 33, 172, 300]  # K: off words (32), tiles and groups
OUTS = [1, 37, 65, 129]  # N: off the 64- and 128-wide tiles
W_MAGNITUDES = [1.0, 1e-6]  # 1e-6: every scale clamps to fp16's tiny (larger would overflow Ŵ in fp16)

if NO_KERNEL is None:
    from ptqsuite_kernels.int_gemm import error_bound, exact, half_ulp, kernel, reference, within
# The interpreter's numpy warns where an fp16 output overflows to inf, as torch's cast does silently.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


@dataclass(frozen=True)
class Case:
    bits: int
    symmetric: bool
    dtype: torch.dtype
    group: int | None
    m: int
    n: int
    k: int
    x_values: str
    x_magnitude: float
    w_values: str
    w_magnitude: float
    bias: bool
    seed: int

    def x(self) -> torch.Tensor:
        return values(self.x_values, (self.m, self.k), self.seed, self.x_magnitude, self.dtype)

    def weight(self) -> PackedInt:
        w = values(self.w_values, (self.n, self.k), self.seed + 1, self.w_magnitude)
        gran = PerChannel() if self.group is None else PerGroup(self.group)
        return pack_qtensor(IntFormat(self.bits, self.symmetric).quantize(w, gran))

    def bias_(self) -> torch.Tensor | None:
        return values("normal", (self.n,), self.seed + 2, dtype=self.dtype) if self.bias else None


def cases(w_magnitudes: list[float] = W_MAGNITUDES) -> st.SearchStrategy[Case]:
    return st.builds(
        Case,
        bits=st.sampled_from(BITS),
        symmetric=st.sampled_from(SYMMETRIC),
        dtype=st.sampled_from(DTYPES),
        group=st.sampled_from(GROUPS),
        **gemm_operands(ROWS, OUTS, COLS, MAGNITUDES, w_magnitudes),
    )


def assert_within_bound(y: torch.Tensor, x: torch.Tensor, w: PackedInt, bias: torch.Tensor | None) -> None:
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0])
    assert_close_to_exact(y, exact(x, w, bias), error_bound(x, w, bias))


@needs_kernel
@examples(100)
@given(cases())
# Large M: the 128x128 tile config, with a tail group and split-K.
@example(Case(bits=4, symmetric=False, dtype=torch.float16, group=128, m=257, n=129, k=300, x_values="outliers",
              x_magnitude=1.0, w_values="normal", w_magnitude=1.0, bias=True, seed=1))
# fp16 outputs overflowing to inf (x saturated at 65504).
@example(Case(bits=8, symmetric=True, dtype=torch.float16, group=None, m=3, n=37, k=172, x_values="outliers",
              x_magnitude=1e4, w_values="outliers", w_magnitude=1.0, bias=False, seed=2))
def test_kernel_within_derived_bound_of_exact(case: Case):
    x, w, bias = case.x(), case.weight(), case.bias_()
    assert_within_bound(kernel(x, w, bias), x, w, bias)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@examples(15)
@given(cases(w_magnitudes=[1.0]))  # weights whose rounding to fp16/bf16 is seldom exact
def test_identity_activations_decode_the_weight_bitwise(dtype: torch.dtype, case: Case):
    """``I @ Ŵᵀ = Ŵᵀ`` exactly: each output is one product ``1 · Ŵ[n, k]`` plus zeros, exact in any order. So the
    kernel must return ``Ŵ`` rounded to x's dtype bit for bit: every code position, zero point, scale and tail,
    and the rounding to the dtype (a truncating bf16 conversion is off by an ulp, within the GEMM bound)."""
    w = case.weight()
    x = torch.eye(case.k, dtype=dtype, device=DEVICE)
    assert_bitwise_equal(kernel(x, w), w.dequantize(dtype).T.to(DEVICE))


@needs_kernel
def test_large_k_per_channel_gemv():
    """K = 4099: many K steps, per-channel scales over a row longer than any tile, an M=1 GEMV."""
    case = Case(bits=4, symmetric=True, dtype=torch.bfloat16, group=None, m=1, n=33, k=4099, x_values="normal",
                x_magnitude=1.0, w_values="outliers", w_magnitude=1.0, bias=True, seed=3)
    x, w, bias = case.x(), case.weight(), case.bias_()
    assert_within_bound(kernel(x, w, bias), x, w, bias)


@needs_kernel
def test_within_rejects_one_ulp_off():
    """The checker is tight: a correctly rounded product passes with a zero bound, one ulp more fails."""
    y64 = torch.tensor([1 + 2**-11 + 2**-30, -3.0, 0.0, 70000.0], dtype=torch.float64)
    y = torch.tensor([1 + 2**-10, -3.0, 0.0, float("inf")], dtype=torch.float16)
    assert within(y, y64, torch.zeros_like(y64)).all()
    off = torch.nextafter(y[:3], torch.full_like(y[:3], 1e4))
    assert not within(off, y64[:3], torch.zeros(3, dtype=torch.float64)).any()
    assert half_ulp(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.float16).tolist() == [2**-11, 2**-25]


@needs_kernel
def test_reference_is_exact_rounded():
    case = Case(bits=2, symmetric=False, dtype=torch.float16, group=32, m=7, n=37, k=172, x_values="normal",
                x_magnitude=1.0, w_values="normal", w_magnitude=1.0, bias=True, seed=4)
    x, w, bias = case.x(), case.weight(), case.bias_()
    assert torch.equal(reference(x, w, bias), exact(x, w, bias).to(x.dtype))


@needs_kernel
@pytest.mark.parametrize("bad, error", [
    (dict(w=pack_qtensor(IntFormat(3).quantize(torch.ones(4, 64), PerGroup(32)))), ValueError),
    (dict(x=torch.zeros(2, 63)), ValueError),
    (dict(x=torch.zeros(2, 64, dtype=torch.int8)), TypeError),
    (dict(bias=torch.zeros(5)), ValueError),
    (dict(w=IntFormat(4).quantize(torch.ones(4, 64), PerGroup(32))), TypeError),
])
def test_kernel_rejects_bad_arguments(bad: dict, error: type[Exception]):
    args = dict(x=torch.zeros(2, 64), w=pack_qtensor(IntFormat(4).quantize(torch.ones(4, 64), PerGroup(32))),
                bias=None) | bad
    with pytest.raises(error):
        kernel(**{name: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for name, v in args.items()})
