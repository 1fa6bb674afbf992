"""What every kernel test shares: the device, whether kernels can run here, example budgets, value distributions,
and bitwise comparison. Imported by the test modules of this folder (pytest puts it on sys.path).

Example budgets come from the hypothesis profile (registered in the root conftest.py): ``ptqsuite-ci`` is bounded
and derandomized, so CPU CI runs the same examples every time; ``ptqsuite-gpu`` (the default where CUDA is
present) runs ``GPU_FACTOR`` times as many, randomly: whatever it finds is kept as an explicit ``@example``.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_FACTOR = 20

if importlib.util.find_spec("triton") is None:
    NO_KERNEL = "triton is not installed (CPU machines: pip install 'ptqsuite[kernels]')"
elif DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    NO_KERNEL = "no CUDA device, and TRITON_INTERPRET=1 was not set before the tests were imported"
else:
    NO_KERNEL = None
needs_kernel = pytest.mark.skipif(NO_KERNEL is not None, reason=NO_KERNEL or "")

# Value distributions every kernel is checked on (see `values`).
VALUES = ["normal", "outliers", "zeros", "constant"]
MAGNITUDES = [1.0, 1e4, 1e-6]


def examples(ci: int) -> settings:
    """Hypothesis settings with ``ci`` examples under the CI profile, ``GPU_FACTOR`` times more under the GPU one.
    Everything else (derandomization, deadline, database) comes from the active profile."""
    gpu = settings.get_current_profile_name() == "ptqsuite-gpu"
    return settings(max_examples=ci * GPU_FACTOR if gpu else ci)


def values(kind: str, shape: tuple[int, ...], seed: int, magnitude: float = 1.0,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded tensor on DEVICE, drawn in fp32 on the CPU and saturated to ``dtype``'s finite range.

    normal: N(0, 1); outliers: N(0, 1) with 2% (and at least one) x100 outliers, as in LLM activations; zeros;
    constant: one random value per row. Times ``magnitude`` (1e4 and 1e-6 reach the ends of scale formats)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(shape, generator=gen)
    elif kind == "outliers":
        x = torch.randn(shape, generator=gen)
        x[torch.rand(shape, generator=gen) < 0.02] *= 100
        x.view(-1)[torch.randint(x.numel(), (1,), generator=gen)] *= 100
    elif kind == "zeros":
        x = torch.zeros(shape)
    elif kind == "constant":
        x = torch.randn(*shape[:-1], 1, generator=gen).expand(shape).contiguous()
    else:
        raise ValueError(f"unknown value distribution {kind!r}; known: {VALUES}")
    info = torch.finfo(dtype)
    return (magnitude * x).clamp(info.min, info.max).to(dtype).to(DEVICE)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit patterns (so -0.0 != +0.0 and NaN == NaN of the same payload), with the first difference shown."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{actual.dtype}{tuple(actual.shape)} != {expected.dtype}{tuple(expected.shape)}"
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[actual.element_size()]
    differ = actual.cpu().contiguous().view(ints) != expected.cpu().contiguous().view(ints)
    if differ.any():
        where = differ.nonzero()[0].tolist()
        pytest.fail(f"{int(differ.sum())} of {differ.numel()} elements differ, first at {where}: "
                    f"{actual[tuple(where)].item()!r} != {expected[tuple(where)].item()!r}")


def assert_within_bound(y: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    """``y`` within ``bound`` of the float64 ``exact`` result, plus half an ulp of ``y``'s dtype (the GEMM kernels'
    derived tolerance, ptqsuite_kernels.int_gemm.within), with the first violation shown."""
    from ptqsuite_kernels.int_gemm import within

    ok = within(y, exact, bound)
    if not ok.all():
        i, j = (~ok).nonzero()[0].tolist()
        pytest.fail(f"{int((~ok).sum())} of {ok.numel()} outside the bound, first at [{i}, {j}]: "
                    f"{y[i, j].item()!r} vs exact {exact[i, j].item()!r}, bound {bound[i, j].item():.3g} + half ulp")


def gemm_operands(rows: list[int], outs: list[int], cols: list[int], x_magnitudes: list[float],
                  w_magnitudes: list[float]) -> dict:
    """Strategies for the fields every packed-GEMM test case shares: sizes (any small size or a listed odd one),
    value distributions and magnitudes of x and W, a bias or not, and the seed."""
    from hypothesis import strategies as st

    return dict(
        m=st.sampled_from(rows),
        n=st.integers(1, 80) | st.sampled_from(outs),
        k=st.integers(1, 320) | st.sampled_from(cols),
        x_values=st.sampled_from(VALUES),
        x_magnitude=st.sampled_from(x_magnitudes),
        w_values=st.sampled_from(VALUES),
        w_magnitude=st.sampled_from(w_magnitudes),
        bias=st.booleans(),
        seed=st.integers(0, 2**32 - 1),
    )
