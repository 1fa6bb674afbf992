"""The Triton INT fake-quantization kernel reproduces its torch reference (ptqsuite.formats) bit for bit.

Runs on CUDA when there is a device, else in Triton's CPU interpreter, which needs TRITON_INTERPRET=1 before the
kernel module is imported (the root conftest sets it on machines without CUDA). Cases are generated, never
skipped: option lists below, odd shapes, and value distributions chosen to reach every branch of the format
(zero ranges, fp16 scale clamping at both ends, clipping, round-half ties). Example counts follow the
hypothesis profile (kernel_testing.examples).
"""
from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_testing import DEVICE, NO_KERNEL, assert_bitwise_equal, examples, needs_kernel

from ptqsuite.granularity import PerChannel, PerGroup, to_groups

BITS = [2, 3, 4, 8]
SYMMETRIC = [False, True]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GROUPS = [1, 7, 12, 32, 128, None]  # None: per-channel, one group per row
COLS = [1, 2, 7, 12, 13, 31, 32, 33, 127, 128, 129, 255, 256, 300]  # multiples of the groups and off by one
VALUES = ["normal", "outliers", "zeros", "constant", "ties"]
MAGNITUDES = [1.0, 1e4, 1e-6]  # 1e-6: every scale clamps to fp16's tiny; 1e4 (x100 outliers): to its max
SCALE_DTYPES = [torch.float16, torch.float32]  # weights' scales; dynamic activations' and the KV cache's (recipe.py)

if NO_KERNEL is None:
    from ptqsuite_kernels.int_quant import kernel, reference
# The interpreter's numpy warns where an fp16 output overflows to inf, as torch's cast does silently.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
hypothesis_settings = examples(300)


@dataclass(frozen=True)
class Case:
    bits: int
    symmetric: bool
    dtype: torch.dtype
    group: int | None
    rows: int
    cols: int
    values: str
    magnitude: float
    seed: int
    scale_dtype: torch.dtype = torch.float16

    @property
    def args(self) -> tuple:
        """The kernel's and the reference's arguments after ``x``."""
        return self.bits, self.symmetric, self.group, self.scale_dtype

    @property
    def gran(self) -> PerGroup | PerChannel:
        return PerChannel() if self.group is None else PerGroup(self.group)

    def tensor(self) -> torch.Tensor:
        """``x[rows, cols]`` on DEVICE: drawn in fp32 on the CPU, saturated to ``dtype``'s finite range."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.rows, self.cols)
        if self.values == "normal":
            x = torch.randn(shape, generator=gen)
        elif self.values == "outliers":  # a few (at least one) x100 outliers, as in LLM activations
            x = torch.randn(shape, generator=gen)
            x[torch.rand(shape, generator=gen) < 0.02] *= 100
            x.view(-1)[torch.randint(x.numel(), (1,), generator=gen)] *= 100
        elif self.values == "zeros":
            x = torch.zeros(shape)
        elif self.values == "constant":
            x = torch.randn(self.rows, 1, generator=gen).expand(shape)
        else:
            x = self._ties(shape, gen)
        info = torch.finfo(self.dtype)
        return (self.magnitude * x).clamp(info.min, info.max).to(self.dtype).to(DEVICE)

    def _ties(self, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
        """Half steps ``k/2 · step`` with the range's ends planted, so that each group's fitted scale is exactly
        ``step``, an fp16 value near the magnitude: odd half steps are round-half ties. A third of the values are
        nudged one fp32 ulp off: with ``step`` not a power of two, only a correctly rounded division then puts
        them on the right side of the tie."""
        if self.symmetric:
            lo, hi = -(2 ** (self.bits - 1) - 1), 2 ** (self.bits - 1) - 1
        else:
            levels = 2**self.bits - 1
            zero = int(torch.randint(1, levels, (1,), generator=gen))
            lo, hi = -zero, levels - zero
        x = torch.randint(2 * lo, 2 * hi + 1, shape, generator=gen) / 2
        pick = torch.rand(shape, generator=gen)
        x[pick < 0.2], x[pick > 0.8] = lo, hi
        # fp32 holds any fp16 step's half steps; fp16 and bf16 inputs keep their ties only with a power of two.
        mantissa = 1 + int(torch.randint(1024, (1,), generator=gen)) / 1024 if self.dtype == torch.float32 else 1
        x *= mantissa * 2.0 ** round(math.log2(self.magnitude))  # exact: at most 9 + 11 significant bits
        nudge = (pick >= 0.2) & (pick <= 0.8) & (torch.rand(shape, generator=gen) < 1 / 3)
        away = torch.where(torch.rand(shape, generator=gen) < 0.5, -math.inf, math.inf)
        return torch.where(nudge, torch.nextafter(x, away), x)


def cases(dtypes: list[torch.dtype] = DTYPES, symmetric: list[bool] = SYMMETRIC) -> st.SearchStrategy[Case]:
    return st.builds(
        Case,
        bits=st.sampled_from(BITS),
        symmetric=st.sampled_from(symmetric),
        dtype=st.sampled_from(dtypes),
        group=st.sampled_from(GROUPS),
        rows=st.integers(1, 9),
        cols=st.integers(1, 300) | st.sampled_from(COLS),
        values=st.sampled_from(VALUES),
        magnitude=st.sampled_from(MAGNITUDES),
        seed=st.integers(0, 2**32 - 1),
        scale_dtype=st.sampled_from(SCALE_DTYPES),
    )


@needs_kernel
@hypothesis_settings
@given(cases())
# Found against a kernel that multiplied by the reciprocal of the scale instead of dividing (what `/` risks on a
# GPU): a value one ulp off a round-half tie lands on the wrong side.
@example(Case(bits=3, symmetric=False, dtype=torch.float32, group=7, rows=1, cols=24, values="ties", magnitude=1.0,
              seed=1))
def test_kernel_equals_reference_bitwise(case: Case):
    x = case.tensor()
    assert_bitwise_equal(kernel(x, *case.args), reference(x, *case.args))


@needs_kernel
@hypothesis_settings
@given(cases(dtypes=[torch.float32], symmetric=[True]))
# Asymmetric formats are not idempotent, though formats.py says they are: a zero point rounded down by (about)
# half a step can leave the range's high end on a half step that rounds to even, one code below the top; refitting
# the narrower range then gives a finer grid. Smallest case: int2-asym [[-0.5, 2.5]] decodes to [[0, 2]], which
# refits to scale 2/3. Hypothesis found this one (row 3, first group):
@example(Case(bits=4, symmetric=False, dtype=torch.float32, group=7, rows=6, cols=128, values="ties",
              magnitude=1.0, seed=1)).xfail(reason="asymmetric refit on a double tie", raises=pytest.fail.Exception)
def test_symmetric_fake_quant_is_idempotent_in_fp32(case: Case):
    # Only in fp32: rounding the decoded values to fp16 or bf16 moves them off the grid, and refitting can then
    # find another scale.
    once = kernel(case.tensor(), *case.args)
    assert_bitwise_equal(kernel(once, *case.args), once)


@needs_kernel
@hypothesis_settings
@given(cases())
def test_at_most_2_pow_bits_values_per_group(case: Case):
    out = kernel(case.tensor(), *case.args)
    groups = to_groups(out.cpu().float(), case.gran).sort(dim=-1).values
    distinct = 1 + (groups[..., 1:] != groups[..., :-1]).sum(dim=-1)
    assert distinct.max() <= 2**case.bits


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", SYMMETRIC)
@pytest.mark.parametrize("group", [7, None])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=str)
def test_special_values_follow_the_reference(dtype, symmetric, group, scale_dtype):
    """NaN and ±inf poison their group (NaN), zeros and subnormals are ordinary values; elsewhere bitwise equal."""
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 2], x[1, 20], x[2, 9] = torch.nan, torch.inf, -torch.inf
    x[3, :10] = torch.finfo(dtype).tiny / 4  # subnormal
    x[3, 10:12] = -0.0
    x = x.to(DEVICE)
    out, ref = kernel(x, 4, symmetric, group, scale_dtype), reference(x, 4, symmetric, group, scale_dtype)
    assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan().any()
    assert_bitwise_equal(out.nan_to_num(0.0), ref.nan_to_num(0.0))


@needs_kernel
@pytest.mark.parametrize("bad, error", [
    (dict(bits=9), ValueError),
    (dict(group=0), ValueError),
    (dict(scale_dtype=torch.bfloat16), ValueError),
    (dict(x=torch.zeros(2, 3, 4)), ValueError),
    (dict(x=torch.zeros(2, 3, dtype=torch.int8)), TypeError),
])
def test_kernel_rejects_bad_arguments(bad: dict, error: type[Exception]):
    args = dict(x=torch.zeros(2, 3), bits=4, symmetric=True, group=2) | bad
    with pytest.raises(error):
        kernel(**args)


def test_package_imports_without_triton():
    # Triton is optional on CPU machines; no __version__, which transformers reads off modules it probes (README).
    code = ("import sys; sys.modules['triton'] = None; import ptqsuite_kernels as k; "
            "assert not hasattr(k, '__version__')")
    subprocess.run([sys.executable, "-c", code], check=True)
