"""The Triton FP4 (MXFP4 / NVFP4) dequantize-GEMM stays within its derived error bound of the exact product, its
packed weight decodes to the QTensor's values bit for bit, and it agrees with fake quantization.

Tolerance, derived (ptqsuite_kernels.fp4_gemm.error_bound), not tuned: the elements (E2M1) and scales (E8M0, E4M3,
times the fp32 tensor scale) decode exactly in fp32, so dequantization adds no error; the kernel factors each
block's scale out of its K step (``σ · Σ x·e``), so a term ``x[m, k] · Ŵ[n, k]`` meets at most
``n = K + ceil(K/16) + MAX_SPLIT_K + 2`` roundings of fp32 arithmetic in whatever order the tiles, the tensor cores
and split-K take (products, the step's sum, the scale product, the accumulator, the split-K sum, and ``Ŵ = fl(e·σ)``
in the reference), hence ``|fp32 result − exact| ≤ γ_n · (|x| @ |Ŵ|ᵀ + |bias|)``, ``γ_n = n·u / (1 − n·u)``,
u = 2^-24 (2^-23 on tensor cores, which truncate) — plus float64's own γ_{K+1}(2^-53) in ``exact``. The output is
then a correct rounding of such a value: within half an ulp of the output dtype at ``|exact| + bound`` (fp16:
2^-11 relative, bf16: 2^-8, fp32: 2^-24; subnormal spacing as a floor), or ±inf past the overflow threshold
(int_gemm.within, itself tested to reject one ulp more).

Shapes are odd on purpose: M from 1 (GEMV) to past the 64-row tiles, K off the blocks (tails) and off the bytes
(odd K pads a nibble), N off the tiles.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_testing import (DEVICE, MAGNITUDES, NO_KERNEL, assert_bitwise_equal, examples, needs_kernel,
                            values)
from kernel_testing import assert_within_bound as assert_close_to_exact
from kernel_testing import gemm_operands

from ptqsuite.formats import FP8, MXFP4, NVFP4, FloatFormat
from ptqsuite.formats.minifloat import E4M3
from ptqsuite.granularity import PerGroup

FORMATS = {"mxfp4": (MXFP4, 32), "nvfp4": (NVFP4, 16), "mxfp4-ceil": (replace(MXFP4, rounding="ceil"), 32),
           "mxfp4-e4m3": (replace(MXFP4, scale=E4M3), 32), "mxfp4-g16": (MXFP4, 16), "nvfp4-g64": (NVFP4, 64)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = [1, 3, 17, 65, 130]  # GEMV, odd small, past the 16- and 64-row tile configs
COLS = [1, 7, 33, 172, 300]  # K: odd (a padded nibble), off the 16/32/64 blocks
OUTS = [1, 37, 65, 129]  # N: off the 64- and 128-wide tiles
W_MAGNITUDES = [1.0, 1e-6, 1e4]  # scales far below and above 1 (fp16 could not hold e · σ at 1e4 · 1e4 outliers)

if NO_KERNEL is None:
    from ptqsuite_kernels.fp4_gemm import (MAX_SPLIT_K, PackedFP4, error_bound, exact, linear, pack_weight,
                                           reference)
    from ptqsuite_kernels.int_gemm import ACC_UNIT, half_ulp
# The interpreter's numpy warns where an fp16 output overflows to inf, as torch's cast does silently.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


@dataclass(frozen=True)
class Case:
    fmt: str
    dtype: torch.dtype
    m: int
    n: int
    k: int
    x_values: str
    x_magnitude: float
    w_values: str
    w_magnitude: float
    bias: bool
    seed: int

    @property
    def format(self) -> tuple[FloatFormat, int]:
        return FORMATS[self.fmt]

    def x(self) -> torch.Tensor:
        return values(self.x_values, (self.m, self.k), self.seed, self.x_magnitude, self.dtype)

    def quantized(self):
        fmt, group = self.format
        w = values(self.w_values, (self.n, self.k), self.seed + 1, self.w_magnitude).cpu()
        return fmt.quantize(w, PerGroup(group))

    def weight(self) -> PackedFP4:
        return _to_device(pack_weight(self.quantized()))

    def bias_(self) -> torch.Tensor | None:
        return values("normal", (self.n,), self.seed + 2, dtype=self.dtype) if self.bias else None


def _to_device(w: PackedFP4) -> PackedFP4:
    gs = None if w.global_scale is None else w.global_scale.to(DEVICE)
    return replace(w, codes=w.codes.to(DEVICE), scales=w.scales.to(DEVICE), global_scale=gs)


def cases(w_magnitudes: list[float] = W_MAGNITUDES, x_magnitudes: list[float] = MAGNITUDES
          ) -> st.SearchStrategy[Case]:
    return st.builds(
        Case,
        fmt=st.sampled_from(list(FORMATS)),
        dtype=st.sampled_from(DTYPES),
        **gemm_operands(ROWS, OUTS, COLS, x_magnitudes, w_magnitudes),
    )


def assert_within_bound(y: torch.Tensor, x: torch.Tensor, w: PackedFP4, bias: torch.Tensor | None) -> None:
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0])
    assert_close_to_exact(y, exact(x, w, bias), error_bound(x, w, bias))


@needs_kernel
@examples(40)
@given(cases())
# NVFP4 GEMV at K = 300: split-K, a tail block of 12, bias.
@example(Case(fmt="nvfp4", dtype=torch.bfloat16, m=1, n=129, k=300, x_values="outliers", x_magnitude=1.0,
              w_values="normal", w_magnitude=1.0, bias=True, seed=1))
# fp16 outputs overflowing to inf: x at 1e4 (x100 outliers) and weights at 1e4.
@example(Case(fmt="mxfp4", dtype=torch.float16, m=3, n=37, k=172, x_values="outliers", x_magnitude=1e4,
              w_values="outliers", w_magnitude=1e4, bias=False, seed=2))
# The 128x128 tile config, odd K.
@example(Case(fmt="mxfp4-e4m3", dtype=torch.float32, m=130, n=65, k=33, x_values="normal", x_magnitude=1.0,
              w_values="outliers", w_magnitude=1e-6, bias=True, seed=3))
def test_kernel_within_derived_bound_of_exact(case: Case):
    x, w, bias = case.x(), case.weight(), case.bias_()
    assert_within_bound(linear(x, w, bias), x, w, bias)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@examples(6)
@given(cases())
# Found by hypothesis against an expectation that rounded Ŵ to fp16 before adding +0: a weight of -3e-8 is -0 in
# fp16, but the kernel's fp32 sum (-3e-8 + 0) rounds to -0 only at the end.
@example(Case(fmt="mxfp4", dtype=torch.float32, m=1, n=28, k=1, x_values="normal", x_magnitude=1.0,
              w_values="normal", w_magnitude=1e-6, bias=False, seed=0))
def test_identity_activations_decode_the_weight_bitwise(dtype: torch.dtype, case: Case):
    """``I @ Ŵᵀ = Ŵᵀ`` exactly: each output is one product ``1 · e · σ`` (the reference's one fp32 rounding of
    ``e · σ``) plus exact zeros, so the kernel must return ``Ŵ`` rounded to x's dtype bit for bit: every nibble,
    block scale, tensor scale and tail, and the rounding to the dtype. Except the sign of zero: ``-0 + 0`` is
    ``+0``, so a -0 element sums to +0 (adding +0 in fp32, before the rounding to x's dtype, does the same)."""
    w = case.weight()
    x = torch.eye(case.k, dtype=dtype, device=DEVICE)
    assert_bitwise_equal(linear(x, w), (w.dequantize().T + 0.0).to(dtype))


@needs_kernel
@examples(10)
@given(cases())
def test_packed_weight_decodes_the_qtensor_bitwise(case: Case):
    """``PackedFP4.dequantize`` is ``QTensor.dequantize`` bit for bit, and codes ``2j, 2j + 1`` share byte ``j``
    (low nibble first)."""
    q = case.quantized()
    w = pack_weight(q)
    assert_bitwise_equal(w.dequantize(), q.dequantize())
    codes = w.element_codes()
    low, high = codes[:, 0::2], torch.nn.functional.pad(codes[:, 1::2], (0, case.k % 2))
    assert_bitwise_equal(w.codes, low | (high << 4))
    assert w.codes.shape == (case.n, (case.k + 1) // 2) and w.scales.dtype == torch.uint8


@needs_kernel
def test_nan_block_poisons_its_outputs():
    """A weight block holding NaN has a NaN scale (E8M0 code 255, E4M3 0x7F): its output column is NaN."""
    for fmt, group in (FORMATS["mxfp4"], FORMATS["nvfp4"]):
        w = torch.randn(5, 64)
        w[2, 40] = torch.nan
        packed = _to_device(pack_weight(fmt.quantize(w, PerGroup(group))))
        y = linear(torch.randn(3, 64).to(DEVICE), packed)
        assert y[:, 2].isnan().all() and not y[:, [0, 1, 3, 4]].isnan().any()


@needs_kernel
@examples(15)
@given(cases(w_magnitudes=[1.0], x_magnitudes=[1.0, 1e-6]))  # no overflow: outputs compare as numbers
def test_linear_matches_fake_quantization(case: Case):
    """Parity with fake quantization, ``F.linear(x, q.dequantize(x.dtype), bias)`` with fp32 accumulation:
    ``|y − y_fake| ≤ β + β_fake + D + ½ulp + ½ulp``, where β and β_fake are both sums' derived bounds (the fake
    one ``γ_{K+1}`` of an fp32 GEMM), ``D = |x| @ |Ŵ − Ŵ_d|ᵀ`` the effect of fake quantization's rounding ``Ŵ`` to
    x's dtype (0 wherever ``e · σ`` is exact in it, as for MXFP4 at moderate magnitudes), and the half ulps the
    two roundings to x's dtype."""
    x, q, bias = case.x(), case.quantized(), case.bias_()
    w = _to_device(pack_weight(q))
    w_d = q.dequantize(x.dtype).to(DEVICE)
    fake = F.linear(x.float(), w_d.float(), None if bias is None else bias.float()).to(x.dtype)
    assert_matches_fake(linear(x, w, bias), fake, x, w, w_d, bias)


def assert_matches_fake(y: torch.Tensor, fake: torch.Tensor, x: torch.Tensor, w: PackedFP4, w_d: torch.Tensor,
                        bias: torch.Tensor | None) -> None:
    """``|y − fake|`` within the bound of `test_linear_matches_fake_quantization`'s docstring, elementwise."""
    k = w.shape[1] + (bias is not None)
    mass_d = x.double().abs() @ w_d.double().abs().T + (0 if bias is None else bias.double().abs())
    fake_bound = k * ACC_UNIT / (1 - k * ACC_UNIT) * mass_d
    d = x.double().abs() @ (w.dequantize().double() - w_d.double()).abs().T
    spread = error_bound(x, w, bias) + fake_bound + d
    reach = exact(x, w, bias).abs() + spread
    ok = (y.double() - fake.double()).abs() <= spread + 2 * half_ulp(reach, x.dtype)
    assert ok.all(), f"{int((~ok).sum())} of {ok.numel()} outputs differ from fake quantization beyond the bound"


@needs_kernel
def test_quant_linear_packed_backend():
    """ptqsuite.nn's packed backend for FloatFormat: a QuantLinear packs its weight, moves it to the input's device
    and runs `linear` on it, matching the fake backend. fp32 activations, so the fake backend's ``F.linear`` is the
    fp32-accumulated product the bound assumes."""
    from ptqsuite import nn
    layer = torch.nn.Linear(172, 37)
    with torch.no_grad():  # seeded, leaving the global generator alone
        layer.weight.copy_(values("outliers", (37, 172), seed=7).cpu())
        layer.bias.copy_(values("normal", (37,), seed=8).cpu())
    x = values("normal", (2, 3, 172), seed=9)
    packed, fake = (nn.QuantLinear.from_linear(layer, NVFP4, PerGroup(16), backend=b).to(DEVICE)
                    for b in ("packed", "fake"))
    y, y_fake = packed(x), fake(x)
    assert y.shape == (2, 3, 37)
    w = _to_device(packed._packed)
    assert_matches_fake(y.reshape(6, 37), y_fake.reshape(6, 37), x.reshape(6, 172), w, w.dequantize(),
                        layer.bias.detach().to(DEVICE))


@needs_kernel
def test_large_k_gemv():
    """K = 2100: many K steps and splits, a tail block, an M=1 GEMV on NVFP4."""
    case = Case(fmt="nvfp4", dtype=torch.bfloat16, m=1, n=33, k=2100, x_values="normal", x_magnitude=1.0,
                w_values="outliers", w_magnitude=1.0, bias=True, seed=4)
    x, w, bias = case.x(), case.weight(), case.bias_()
    assert_within_bound(linear(x, w, bias), x, w, bias)


@needs_kernel
def test_bound_is_not_vacuous():
    """The tolerance is γ_n-relative, n about K·17/16 + MAX_SPLIT_K: at K = 300 under 5·10^-5 of the mass."""
    case = Case(fmt="nvfp4", dtype=torch.float32, m=3, n=5, k=300, x_values="normal", x_magnitude=1.0,
                w_values="normal", w_magnitude=1.0, bias=False, seed=5)
    x, w = case.x(), case.weight()
    mass = x.double().abs() @ w.dequantize().double().abs().T
    n = 300 + 19 + MAX_SPLIT_K + 2
    assert (error_bound(x, w) <= mass * n * ACC_UNIT * 1.001).all() and (n * ACC_UNIT < 5e-5)


@needs_kernel
def test_reference_is_exact_rounded():
    case = Case(fmt="mxfp4", dtype=torch.float16, m=7, n=37, k=172, x_values="normal", x_magnitude=1.0,
                w_values="normal", w_magnitude=1.0, bias=True, seed=6)
    x, w, bias = case.x(), case.weight(), case.bias_()
    assert torch.equal(reference(x, w, bias), exact(x, w, bias).to(x.dtype))


@needs_kernel
@pytest.mark.parametrize("bad, error", [
    (dict(x=torch.zeros(2, 63)), ValueError),
    (dict(x=torch.zeros(2, 64, dtype=torch.int8)), TypeError),
    (dict(bias=torch.zeros(5)), ValueError),
    (dict(w=MXFP4.quantize(torch.ones(4, 64), PerGroup(32))), TypeError),
])
def test_linear_rejects_bad_arguments(bad: dict, error: type[Exception]):
    args = dict(x=torch.zeros(2, 64), w=_to_device(pack_weight(MXFP4.quantize(torch.ones(4, 64), PerGroup(32)))),
                bias=None) | bad
    with pytest.raises(error):
        linear(**{name: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for name, v in args.items()})


@needs_kernel
@pytest.mark.parametrize("q, error", [
    (FP8.quantize(torch.ones(4, 64), PerGroup(32)), TypeError),  # E4M3 elements: not FP4
    (MXFP4.quantize(torch.ones(4, 64), PerGroup(8)), ValueError),  # blocks below tl.dot's 16
    (MXFP4.quantize(torch.ones(4, 64), PerGroup(24)), ValueError),  # not a power of two
])
def test_pack_weight_rejects_other_formats(q, error: type[Exception]):
    with pytest.raises(error):
        pack_weight(q)
