"""The Triton scaled-float quantization kernel (ptqsuite_kernels.float_quant) equals ``fmt.quantize(x, gran)``
bit for bit: element codes, block scales and NVFP4's tensor scale, for the presets (FP8 per token, MXFP4, MXFP8,
NVFP4) and variants (scale rounding, scale format, block size).

Cases are generated, never skipped: odd row counts (1, small, past 64), columns not a multiple of the block (tail
groups) up to 4100 (per-token rows of several chunks), fp32/fp16/bf16 inputs, and value distributions that reach
every branch: magnitudes 1e4 and 1e-6 (fp16 subnormals; E4M3 block scales that underflow, or clamp at 448 without
a tensor scale), zero groups, constant rows, and "ties": element-grid midpoints times each group's own σ, a third
nudged one ulp, so that only a correctly rounded ``x / σ`` and round-half-even land them right. Special values
(NaN, ±inf, ±0, subnormals, scales that underflow, ideal scales below 2^-126) have their own test.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_testing import (DEVICE, MAGNITUDES, NO_KERNEL, VALUES, assert_bitwise_equal, examples, needs_kernel,
                            values)

from ptqsuite.formats import FP8, FP8_E5M2, MXFP4, MXFP8, NVFP4, FloatFormat, IntFormat
from ptqsuite.formats.minifloat import E4M3, E8M0, FP16
from ptqsuite.granularity import PerChannel, PerGroup, PerTensor, PerToken, from_groups, to_groups

FORMATS = {
    "fp8": FP8, "fp8-e5m2": FP8_E5M2, "mxfp4": MXFP4, "mxfp8": MXFP8, "nvfp4": NVFP4,
    "mxfp4-ceil": replace(MXFP4, rounding="ceil"), "mxfp4-nearest": replace(MXFP4, rounding="nearest"),
    "mxfp4-e4m3": replace(MXFP4, scale=E4M3), "mxfp8-ceil": replace(MXFP8, rounding="ceil"),
    "mxfp4-fp16-ceil": replace(MXFP4, scale=FP16, rounding="ceil"),
    "nvfp4-e4m3-floor": replace(NVFP4, rounding="floor"), "nvfp4-fp16": replace(NVFP4, scale=FP16),
    "nvfp4-e8m0": replace(NVFP4, scale=E8M0),  # fp32(6 · 2^127) = inf: its tensor scale is always 1 (see kernel)
}
GROUPS = [None, 8, 16, 32, 128]  # None: per token, one scale per row
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = [1, 3, 7, 65, 130]
COLS = [1, 7, 33, 172, 300, 4100]  # off the blocks by a tail; 4100: per-token rows of three 2048-wide chunks
KINDS = VALUES + ["ties"]

if NO_KERNEL is None:
    from ptqsuite_kernels.float_quant import fake, kernel, reference
# The interpreter's numpy warns about the maximum of a tile row that is NaN.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def ties(x: torch.Tensor, fmt: FloatFormat, gran) -> torch.Tensor:
    """Every element but each group's largest replaced by a random midpoint of the element grid below
    ``amax / σ``, times the group's σ (rounded to fp32: within an ulp of the tie when σ is not a power of two),
    a third nudged one ulp either way. Group maxima, hence all scales, stay as they were."""
    q = fmt.quantize(x, gran)
    sigma = fmt.sigma(q.scale, q.global_scale)
    g = to_groups(x, gran)
    amax = g.abs().amax(-1, keepdim=True)
    grid = fmt.element.decode(torch.arange(2 ** (fmt.bits - 1)))
    grid = grid[grid.isfinite()].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    gen = torch.Generator().manual_seed(x.numel())
    below = (mids < amax / sigma).sum(-1, keepdim=True)  # midpoints whose multiple of σ stays under amax
    pick = (torch.rand(g.shape, generator=gen) * below).long().clamp(max=len(mids) - 1)
    v = mids[pick] * sigma * torch.where(torch.rand(g.shape, generator=gen) < 0.5, -1.0, 1.0)
    away = torch.where(torch.rand(g.shape, generator=gen) < 0.5, -torch.inf, torch.inf)
    v = torch.where(torch.rand(g.shape, generator=gen) < 1 / 3, torch.nextafter(v, away), v)
    v = torch.where(below > 0, v.clamp(-amax, amax), 0.0)
    return from_groups(torch.where(g.abs() == amax, g, v), x.shape)


@dataclass(frozen=True)
class Case:
    fmt: str
    group: int | None
    dtype: torch.dtype
    rows: int
    cols: int
    values: str
    magnitude: float
    seed: int

    @property
    def format(self) -> FloatFormat:
        return FORMATS[self.fmt]

    @property
    def gran(self) -> PerToken | PerGroup:
        return PerToken() if self.group is None else PerGroup(self.group)

    def tensor(self) -> torch.Tensor:
        shape = (self.rows, self.cols)
        if self.values != "ties":
            return values(self.values, shape, self.seed, self.magnitude, self.dtype)
        x = values("outliers", shape, self.seed, self.magnitude).cpu()
        return ties(x, self.format, self.gran).to(self.dtype).to(DEVICE)


def cases() -> st.SearchStrategy[Case]:
    return st.builds(
        Case,
        fmt=st.sampled_from(list(FORMATS)),
        group=st.sampled_from(GROUPS),
        dtype=st.sampled_from(DTYPES),
        rows=st.sampled_from(ROWS),
        cols=st.integers(1, 300) | st.sampled_from(COLS),
        values=st.sampled_from(KINDS),
        magnitude=st.sampled_from(MAGNITUDES),
        seed=st.integers(0, 2**32 - 1),
    )


def assert_same_quantization(actual: tuple, expected: tuple) -> None:
    """Codes and block scales bit for bit (NaN scales compared as a mask), and the same tensor scale."""
    (codes, scale, gscale), (codes_ref, scale_ref, gscale_ref) = actual, expected
    assert_bitwise_equal(codes, codes_ref)
    assert torch.equal(scale.isnan(), scale_ref.isnan())
    assert_bitwise_equal(scale.nan_to_num(), scale_ref.nan_to_num())
    assert (gscale is None) == (gscale_ref is None)
    if gscale is not None:
        assert_bitwise_equal(gscale, gscale_ref)


@needs_kernel
@examples(60)
@given(cases())
# NVFP4 per token at 1e-6 in fp16 (subnormal inputs): blocks of one scale, S far below 1.
@example(Case(fmt="nvfp4", group=None, dtype=torch.float16, rows=3, cols=172, values="outliers", magnitude=1e-6,
              seed=1))
# Ties against a scale that is not a power of two: only the correctly rounded quotient decides them.
@example(Case(fmt="fp8", group=None, dtype=torch.float32, rows=7, cols=300, values="ties", magnitude=1.0, seed=2))
@example(Case(fmt="nvfp4", group=16, dtype=torch.float32, rows=65, cols=33, values="ties", magnitude=1e4, seed=3))
# MXFP4 at 1e4 with x100 outliers (E8M0 scales far above 1), a per-token row of three chunks.
@example(Case(fmt="mxfp4", group=None, dtype=torch.bfloat16, rows=3, cols=4100, values="outliers", magnitude=1e4,
              seed=4))
def test_kernel_equals_reference_bitwise(case: Case):
    x = case.tensor()
    assert_same_quantization(kernel(x, case.format, case.gran), reference(x, case.format, case.gran))


def planted(dtype: torch.dtype) -> torch.Tensor:
    """8 x 80 values with special ones planted (rows of their own, so groups of any size see each alone)."""
    x = torch.randn(8, 80, generator=torch.Generator().manual_seed(0)) * 10
    info = torch.finfo(dtype)
    x[0, 3] = torch.nan
    x[1, 40], x[1, 41] = -torch.inf, torch.inf
    x[2] = 0.0
    x[2, 1::3] = -0.0
    x[3, :40] = info.tiny * torch.linspace(-0.9, 0.9, 40)  # subnormals of the dtype (and a -0 and +0 among them)
    x[4, 16:48] *= 1e-7  # NVFP4 / E4M3 block scales that underflow to 0: codes ±0
    x[5] = torch.nan
    # Normal fp32 values whose ideal scale lies below 2^-126, where E8M0's ceil and nearest pick 2^-126 or 2^-127.
    x[6, :64] = 2.0**-124 * torch.linspace(0.5, 4.0, 64)
    x[7, :16] = 2.0**-126 * torch.linspace(1.0, 16.0, 16)
    return x.to(dtype).to(DEVICE)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [None, 16, 32])
@pytest.mark.parametrize("name", list(FORMATS))
def test_special_values_follow_the_reference(name: str, group: int | None, dtype: torch.dtype):
    """NaN or ±inf give their group a NaN scale and NaN codes; zeros keep their sign; subnormals and tiny scales
    are values like any other; codes everywhere else bit for bit."""
    fmt, gran = FORMATS[name], PerToken() if group is None else PerGroup(group)
    x = planted(dtype)
    out, ref = kernel(x, fmt, gran), reference(x, fmt, gran)
    assert ref[1].isnan().any()
    assert_same_quantization(out, ref)


@needs_kernel
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_all_groups_nonfinite(name: str):
    """No finite group: NVFP4's tensor maximum is taken over nothing, T = 0, so S = 1."""
    x = torch.full((3, 40), torch.nan).to(DEVICE)
    x[1] = torch.inf
    assert_same_quantization(kernel(x, FORMATS[name], PerGroup(16)), reference(x, FORMATS[name], PerGroup(16)))


@needs_kernel
def test_fp8_per_token_long_rows():
    """The fused FP8 activation quantization at K = 16384 (8 chunks per pass), bf16 with outliers."""
    x = values("outliers", (3, 16384), seed=5, dtype=torch.bfloat16)
    assert_same_quantization(kernel(x, FP8, PerToken()), reference(x, FP8, PerToken()))


@needs_kernel
@examples(8)
@given(cases())
def test_fake_equals_format_fake(case: Case):
    """``fake`` (kernel codes, torch decoding) is ``fmt.fake`` bit for bit, NaN where it is NaN."""
    x = case.tensor()
    y, ref = fake(x, case.format, case.gran), case.format.fake(x.cpu(), case.gran).to(DEVICE)
    assert torch.equal(y.isnan(), ref.isnan())
    assert_bitwise_equal(y.nan_to_num(), ref.nan_to_num())


@needs_kernel
@pytest.mark.parametrize("bad, error", [
    (dict(gran=PerTensor()), ValueError),
    (dict(fmt=IntFormat(4)), TypeError),
    (dict(x=torch.zeros(2, 3, 4)), ValueError),
    (dict(x=torch.zeros(2, 0)), ValueError),
    (dict(x=torch.zeros(2, 3, dtype=torch.int8)), TypeError),
])
def test_kernel_rejects_bad_arguments(bad: dict, error: type[Exception]):
    args = dict(x=torch.zeros(2, 3), fmt=MXFP4, gran=PerGroup(32)) | bad
    with pytest.raises(error):
        kernel(**{name: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for name, v in args.items()})


def test_per_channel_is_per_token():
    """The kernel treats both as one group per row, as granularity.py defines them."""
    x = torch.randn(3, 5)
    assert torch.equal(to_groups(x, PerChannel()), to_groups(x, PerToken()))
