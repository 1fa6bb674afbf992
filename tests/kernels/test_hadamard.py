"""The Triton Walsh–Hadamard kernel agrees with its float64 reference (ptqsuite.hadamard.fwht) within a bound
derived from the rounding errors of its fp32 arithmetic, and keeps the transform's laws: orthogonal, inverted by
the transpose. Runs on CUDA, else in Triton's CPU interpreter (see test_int_quant.py); example counts follow the
hypothesis profile (kernel_testing.examples).

The bound. Every output is a signed sum of all n inputs, y_i = s · sum_j ±x_j with s = 1/sqrt(n) (normalized)
or 1, which the kernel evaluates in fp32 as a tree: k - 1 sequential adds for H_k (products by ±1 are exact;
adding to the initial 0 is exact), then one add per butterfly stage, m of them, then the product by
fp32(1/sqrt(n)), itself rounded. So each input passes through at most D = m + k - 1 (+ 2 when normalized)
roundings of relative size u = 2^-24, and the classical bound for such sums (Higham, Accuracy and Stability of
Numerical Algorithms, §4.2) gives

    |ŷ_i - y_i| <= γ_D · s · sum_j |x_j|,   γ_D = D·u / (1 - D·u)          (the same for every i of a row).

The reference has the same form with float64's u = 2^-53 (m stages, a k-term matmul in any order, a division
by the rounded sqrt(n), which CUDA may do as a product by a rounded reciprocal: one rounding more, counted); its
error is added. Rounding to the output dtype moves a value v by at most half the spacing of v's binade,
eps·2^floor(log2 |v|) (eps of the dtype; below the normal range, the smallest subnormal), which grows with |v|.
The kernel's output is off the exact value by the arithmetic error plus half a spacing, the reference's by half
a spacing, so they differ by at most the sum. Overflow: a value past the dtype's rounding threshold (max plus
half the top spacing) becomes inf; taking inf as that threshold keeps the bound valid. The bound is worst-case,
not tuned to the data, and far above typical errors; still, each of these broke it when planted in the kernel: a
sign error in the butterfly, H_k for H_kᵀ, inputs rounded to 11 significant bits (as a TF32 dot would), an fp16
intermediate, bf16 outputs truncated instead of rounded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from kernel_testing import MAGNITUDES, NO_KERNEL, VALUES, examples, needs_kernel, values

from ptqsuite.hadamard import BASES, factors

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 2, 12, 20, 24, 28, 36, 40, 52, 60, 64, 108, 140, 156, 172, 576, 1536]
LEADS = [(), (1,), (3,), (2, 3), (9,)]  # leading dims of x: a single vector up to several rows
LARGE = [11008, 14336, 16384, 32768]  # a row each (~0.1 s a row in the interpreter), in test_named_sizes
U_FP32, U_FP64 = 2.0**-24, 2.0**-53  # unit roundoffs of the kernel's and the reference's arithmetic

if NO_KERNEL is None:
    from ptqsuite_kernels.hadamard import kernel, reference
# The interpreter's numpy warns where an fp16 output overflows to inf, as torch's cast does silently.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
main_settings, law_settings = examples(60), examples(30)


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    lead: tuple[int, ...]
    n: int
    values: str
    magnitude: float
    normalize: bool
    transpose: bool
    seed: int

    def tensor(self) -> torch.Tensor:
        return values(self.values, (*self.lead, self.n), self.seed, self.magnitude, self.dtype)

    def kernel(self, x: torch.Tensor, transpose: bool | None = None) -> torch.Tensor:
        return kernel(x, self.normalize, self.transpose if transpose is None else transpose)

    def reference(self, x: torch.Tensor, transpose: bool | None = None) -> torch.Tensor:
        return reference(x, self.normalize, self.transpose if transpose is None else transpose)


def orders(limit: int = 2048) -> st.SearchStrategy[int]:
    """n = k·2^m up to ``limit``, every base k."""
    return st.sampled_from(BASES).flatmap(
        lambda k: st.integers(0, (limit // k).bit_length() - 1).map(lambda m: k << m))


def cases(normalize: tuple[bool, ...] = (False, True)) -> st.SearchStrategy[Case]:
    return st.builds(
        Case,
        dtype=st.sampled_from(DTYPES),
        lead=st.sampled_from(LEADS),
        n=st.sampled_from(SIZES) | orders(),
        values=st.sampled_from(VALUES),
        magnitude=st.sampled_from(MAGNITUDES),
        normalize=st.sampled_from(normalize),
        transpose=st.booleans(),
        seed=st.integers(0, 2**32 - 1),
    )


def spacing(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gap between ``dtype``'s neighbours in the binade of |v| (subnormals: the smallest subnormal), float64;
    rounding to ``dtype`` moves v by at most half of it, and it grows with |v|."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(v.double().abs().clamp(min=info.tiny))  # |v| in [2^(e-1), 2^e)
    return info.eps * torch.pow(2.0, exponent.double() - 1)


def saturate(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64, ±inf taken as the overflow threshold: the midpoint of max and the next power of two."""
    top = torch.finfo(dtype).max
    threshold = (top + 2.0 ** math.ceil(math.log2(top))) / 2
    return v.double().clamp(-threshold, threshold)


def gamma(d: int, u: float) -> float:
    return d * u / (1 - d * u)


def arithmetic_error(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """γ_D · s · sum_j |x_j| per row (module docstring), fp32 kernel plus float64 reference, shape [..., 1]."""
    n = x.shape[-1]
    k, two_m = factors(n)
    d = two_m.bit_length() - 1 + k - 1 + (2 if normalize else 0)
    s = 1 / math.sqrt(n) if normalize else 1
    return (gamma(d, U_FP32) + gamma(d + 1, U_FP64)) * s * x.double().abs().sum(dim=-1, keepdim=True)


def kernel_error(x: torch.Tensor, exact: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Bound on |kernel(x) - exact| elementwise: arithmetic error, then rounding to x's dtype."""
    error = arithmetic_error(x, normalize)
    return error + spacing(exact.abs() + error, x.dtype) / 2


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    gap = (saturate(actual, actual.dtype) - saturate(expected, expected.dtype)).abs()
    bad = ~(gap <= bound)
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        pytest.fail(f"{int(bad.sum())} of {bad.numel()} elements off by more than the bound, first at {where}: "
                    f"{actual[where].item()!r} vs {expected[where].item()!r}, bound {bound[where].item():.3g}")


def check_against_reference(case: Case) -> None:
    x = case.tensor()
    exact = case.reference(x.double())
    bound = kernel_error(x, exact, case.normalize) + spacing(exact, case.dtype) / 2
    assert_within(case.kernel(x), case.reference(x), bound)


@needs_kernel
@main_settings
@given(cases())
@example(Case(torch.float16, (3,), 576, "constant", 1e4, True, False, seed=2))  # overflows fp16 to inf
def test_kernel_equals_reference_within_rounding_bound(case: Case):
    check_against_reference(case)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES + LARGE)
def test_named_sizes(n: int, dtype: torch.dtype):
    """Every listed size in every dtype, whatever hypothesis draws above; the large ones only here."""
    check_against_reference(Case(dtype, (3,) if n <= 2048 else (), n, "outliers", 1.0, normalize=True,
                                 transpose=n % 3 == 0, seed=n))


@needs_kernel
@law_settings
@given(cases(normalize=(True,)))
def test_transpose_inverts_normalized_kernel(case: Case):
    """x̂ = kernel(kernel(x), transpose flipped) = Qᵀ·ŷ with Q orthogonal and ŷ = Q x + δ, so
    |x̂ - x| <= bound(ŷ) + |Qᵀ δ| <= bound(ŷ) + sum_j bound(x)_j / sqrt(n): Q's entries are ±1/sqrt(n)."""
    x = case.tensor()
    y = case.kernel(x)
    assume(y.isfinite().all())  # an fp16 overflow loses x
    back = case.kernel(y, transpose=not case.transpose)
    first = kernel_error(x, case.reference(x.double()), normalize=True).sum(dim=-1, keepdim=True)
    bound = kernel_error(y, case.reference(y.double(), transpose=not case.transpose), normalize=True)
    assert_within(back, x, bound + first / math.sqrt(case.n))


@needs_kernel
@law_settings
@given(cases(normalize=(True,)))
def test_normalized_kernel_preserves_the_norm(case: Case):
    """| ||ŷ|| - ||x|| | = | ||ŷ|| - ||Q x|| | <= ||ŷ - Q x|| <= ||bound||, all 2-norms of a row."""
    x = case.tensor()
    y = case.kernel(x)
    assume(y.isfinite().all())
    bound = kernel_error(x, case.reference(x.double()), normalize=True).norm(dim=-1)
    assert ((y.double().norm(dim=-1) - x.double().norm(dim=-1)).abs() <= bound).all()


@needs_kernel
@pytest.mark.parametrize("bad, error, message", [
    (torch.zeros(2, 44), ValueError, r"order 44\b.*k·2\^m"),
    (torch.zeros(2, 7), ValueError, r"order 7\b.*k·2\^m"),
    (torch.zeros(1, 65536), ValueError, r"up to 32768.*65536"),
    (torch.zeros(2, 12, dtype=torch.float64), TypeError, r"float32.*float16.*bfloat16.*got torch.float64"),
    (torch.zeros(2, 12, dtype=torch.int8), TypeError, r"int8"),
    (torch.tensor(1.0), ValueError, r"scalar"),
])
def test_kernel_rejects_bad_arguments(bad: torch.Tensor, error: type[Exception], message: str):
    with pytest.raises(error, match=message):
        kernel(bad)


@needs_kernel
@pytest.mark.parametrize("shape", [(0, 12), (2, 0, 32768)])
def test_kernel_returns_empty_for_no_rows(shape: tuple[int, ...]):
    assert kernel(torch.zeros(shape)).shape == shape
