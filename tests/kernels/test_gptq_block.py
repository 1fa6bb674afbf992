"""The Triton GPTQ block kernel (ptqsuite_kernels.gptq_block) equals ``gptq.block_reference`` bit for bit: the
quantized columns ``Q1`` and the scaled errors ``Err1`` of one block of GPTQ's inner loop, for every format family
(INT2/3/4/8 symmetric and asymmetric, MXFP4, NVFP4, FP8 E4M3 and E5M2), computed against the reference on the CPU
(the specification; torch on CUDA is not trusted to be IEEE-exact, see int_quant.reference).

Inputs are built the way GPTQ builds them: a weight drawn from the shared value distributions (outliers, zeros,
constant rows, magnitudes 1e4 and 1e-6) or put on round-half ties of its grid (with a diagonal Hessian, so that no
error feedback moves them off), a block's columns as a strided view of a wider weight, in natural or
act-order (a random permutation of columns, static groups), the format's ``fit`` on the groups and gathered per
column, and ``Hinv1`` a diagonal block (a strided view) of the upper Cholesky factor of a damped random SPD
Hessian with outlier features (``gptq._inverse_cholesky``). Odd sizes on purpose: rows not a multiple of the
kernel's 16-row tiles (1, 3, 17, 130), blocks of 128, 37 (a layer's tail), 1, and anything up to 64. Special
values (NaN and ±inf in a group, ±0, subnormals, groups whose steps are subnormal) have their own test, and
GPTQ's solve runs end to end with the kernel in place of the torch loop.

Plausible bugs these comparisons catch. ``test_the_comparison_catches_planted_bugs`` plants four in a torch copy of
the reference and shows the bitwise comparison fails on the data used here (the first and the last can only happen
on a GPU: the interpreter neither fuses nor flushes): the update fused into an FMA (one rounding instead of torch's
two: a launch without ``enable_fp_fusion=False``), ``err`` through the reciprocal of ``d`` (what ``/`` risks on a
GPU), a column read out of the tile as a float sum padded with ``+0.0`` (``−0.0`` becomes ``+0.0``; numpy's sum
does this to any padding, see the kernel), a division that flushes subnormals (``div_rn`` before triton 3.6).
Mutations of the kernel checked to fail here (in the interpreter): columns ``< i`` touched by the update, the
previous column's parameters, round-half-up instead of half-even (the "ties" cases), the reciprocal of ``d``, a
sticky bit in the element rounding, E4M3's NaN code replaced by 0, NaN codes passed on to the INT clamp, a wrong
E8M0 exponent, the ``+0.0``-padded read-out.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_testing import DEVICE, MAGNITUDES, NO_KERNEL, VALUES, assert_bitwise_equal, examples, needs_kernel, values

from ptqsuite.formats import FP8, FP8_E5M2, MXFP4, NVFP4, IntFormat
from ptqsuite.granularity import PerChannel, PerGroup, to_groups
from ptqsuite.mitigation import gptq
from ptqsuite.recipe import QuantSpec

FORMATS = {
    "int2-sym": IntFormat(2, symmetric=True), "int2-asym": IntFormat(2), "int3-sym": IntFormat(3, symmetric=True),
    "int3-asym": IntFormat(3), "int4-sym": IntFormat(4, symmetric=True), "int4-asym": IntFormat(4),
    "int8-sym": IntFormat(8, symmetric=True), "int8-asym": IntFormat(8),
    "mxfp4": MXFP4, "nvfp4": NVFP4, "fp8": FP8, "fp8-e5m2": FP8_E5M2,
}
GROUPS = [None, 16, 32, 128]  # None: per channel
ROWS = [1, 3, 17, 130]  # around the GPU's 16-row tiles
BLOCKS = [128, 37, 1]  # a full block, a layer's tail, one column
ORDERS = ["natural", "act-order"]
KINDS = VALUES + ["ties"]

if NO_KERNEL is None:
    from ptqsuite_kernels.gptq_block import kernel, launch, reference
# The interpreter's numpy warns on arithmetic with NaN and inf, as torch does silently.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")


def hessian_block(block: int, seed: int, margin: int = 3, diagonal: bool = False) -> torch.Tensor:
    """``Hinv1[block, block]``: a diagonal block, ``margin`` columns in, of the upper Cholesky factor of the damped
    inverse of ``H = 2 XᵀX / n`` for correlated inputs ``X`` with a few x10 outlier features (as test_gptq.layer),
    as a strided view of the whole factor, which is what GPTQ passes. ``diagonal``: uncorrelated inputs, a
    diagonal ``H``: no error is fed forward (``err · 0``), every column is quantized as it was drawn."""
    gen = torch.Generator().manual_seed(seed)
    cols = block + 2 * margin
    X = torch.randn(2 * cols, cols, generator=gen) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen))
    X[:, torch.randperm(cols, generator=gen)[:max(1, cols // 40)]] *= 10
    H = 2 * X.T @ X / X.shape[0]
    Hinv = gptq._inverse_cholesky(torch.diag(torch.diag(H)) if diagonal else H, 0.01)
    assert not diagonal or torch.equal(Hinv, torch.diag(torch.diag(Hinv)))
    return Hinv.to(DEVICE)[margin:margin + block, margin:margin + block]


def column_params(W: torch.Tensor, fmt, gran, perm: torch.Tensor) -> tuple:
    """The format's ``fit`` of ``W``'s groups gathered for the columns ``perm`` (``[rows, len(perm), 1]``), as
    gptq._Grid.columns gives them; scalars (NVFP4's tensor scale) as they are."""
    full = fmt.fit(to_groups(W, gran))
    group = gran.n if isinstance(gran, PerGroup) else W.shape[1]
    index = (perm // group).to(W.device)
    return tuple(p[:, index] if gptq._per_group(p) else p for p in full)


def ties(W1: torch.Tensor, fmt, params: tuple, seed: int) -> torch.Tensor:
    """``W1`` replaced by round-half ties of each element's grid (its column's parameters): INT ``(k + ½ − zero) ·
    scale`` (exact: half-integers times an fp16 scale), float ``σ ·`` an element-grid midpoint (exact for
    power-of-two ``σ``, else within an ulp), a third nudged one ulp either way. Only a correctly rounded division
    and round-half-even put each on the reference's side. Elements of NaN groups stay as they were."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(W1.shape)
    a = params[0].cpu()[:, :, 0]
    if isinstance(fmt, IntFormat):
        k = torch.randint(fmt.qmin, fmt.qmax, shape, generator=gen) + 0.5
        v = (k - params[1].cpu()[:, :, 0] if params[1] is not None else k) * a
    else:
        sigma = fmt.sigma(a, None if params[1] is None else params[1].cpu())
        grid = fmt.element.decode(torch.arange(2 ** (fmt.bits - 1)))
        grid = grid[grid.isfinite()].sort().values
        mids = (grid[1:] + grid[:-1]) / 2
        v = mids[torch.randint(len(mids), shape, generator=gen)] * sigma
        v = torch.where(torch.rand(shape, generator=gen) < 0.5, -v, v)
    away = torch.where(torch.rand(shape, generator=gen) < 0.5, -torch.inf, torch.inf)
    v = torch.where(torch.rand(shape, generator=gen) < 1 / 3, torch.nextafter(v, away), v)
    return torch.where(a.isfinite(), v, W1.cpu()).to(W1.device)


def strided(W1: torch.Tensor) -> torch.Tensor:
    """``W1`` as the column slice of a wider weight (GPTQ's ``W[:, i1:i2]``): row stride larger than its width."""
    wide = torch.full((W1.shape[0], W1.shape[1] + 5), torch.nan, device=W1.device)
    wide[:, 2:2 + W1.shape[1]] = W1
    return wide[:, 2:2 + W1.shape[1]]


def expected(W1: torch.Tensor, Hinv1: torch.Tensor, fmt, params: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference`` on the CPU, the results on DEVICE."""
    cpu = tuple(p.cpu() if isinstance(p, torch.Tensor) else p for p in params)
    return tuple(t.to(DEVICE) for t in reference(W1.cpu(), Hinv1.cpu(), fmt, cpu))


def assert_same(actual: tuple, wanted: tuple) -> None:
    """``Q1`` and ``Err1`` bit for bit, NaN compared as NaN (its sign and payload are the hardware's)."""
    for a, b in zip(actual, wanted):
        assert torch.equal(a.isnan(), b.isnan()), f"NaN at {(a.isnan() != b.isnan()).nonzero()[0].tolist()}"
        assert_bitwise_equal(torch.where(a.isnan(), 0.0, a), torch.where(b.isnan(), 0.0, b))


@dataclass(frozen=True)
class Case:
    fmt: str
    group: int | None
    rows: int
    block: int
    values: str
    magnitude: float
    order: str
    seed: int

    @property
    def format(self):
        return FORMATS[self.fmt]

    @property
    def gran(self) -> PerChannel | PerGroup:
        return PerChannel() if self.group is None else PerGroup(self.group)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """``(W1, Hinv1, params)`` as GPTQ passes them for a block at the start of a layer of ``block`` columns:
        act-order permutes the columns and gathers static groups fitted on the original weight. Ties: the
        outliers' parameters, a weight on their ties and a diagonal Hessian (so every column keeps its ties)."""
        kind = "outliers" if self.values == "ties" else self.values
        W = values(kind, (self.rows, self.block), self.seed, self.magnitude)
        perm = torch.arange(self.block)
        if self.order == "act-order":
            perm = torch.randperm(self.block, generator=torch.Generator().manual_seed(self.seed))
        params = column_params(W, self.format, self.gran, perm)
        W1 = W[:, perm.to(W.device)]
        if self.values == "ties":
            W1 = ties(W1, self.format, params, self.seed)
        return strided(W1), hessian_block(self.block, self.seed, diagonal=self.values == "ties"), params


cases = st.builds(
    Case,
    fmt=st.sampled_from(list(FORMATS)),
    group=st.sampled_from(GROUPS),
    rows=st.sampled_from(ROWS),
    block=st.sampled_from(BLOCKS) | st.integers(1, 64),
    values=st.sampled_from(KINDS),
    magnitude=st.sampled_from(MAGNITUDES),
    order=st.sampled_from(ORDERS),
    seed=st.integers(0, 2**32 - 1),
)


@needs_kernel
@examples(20)
@given(cases)
# What GPTQ runs most: INT4 g128 asymmetric and MXFP4 on a full block, outliers, rows past the tiles.
@example(Case(fmt="int4-asym", group=128, rows=130, block=128, values="outliers", magnitude=1.0, order="natural",
              seed=1))
@example(Case(fmt="mxfp4", group=32, rows=17, block=128, values="outliers", magnitude=1e-6, order="natural", seed=2))
# NVFP4 (tensor scale, E4M3 block scales) in act-order on a tail block; E5M2 per channel at 1e4.
@example(Case(fmt="nvfp4", group=16, rows=3, block=37, values="normal", magnitude=1e4, order="act-order", seed=3))
@example(Case(fmt="fp8-e5m2", group=None, rows=17, block=37, values="outliers", magnitude=1e4, order="natural",
              seed=4))
@example(Case(fmt="int2-sym", group=32, rows=130, block=37, values="constant", magnitude=1e-6, order="act-order",
              seed=5))
# Round-half ties (a third one ulp off) on every column: INT3 asymmetric, and NVFP4 (σ not a power of two).
@example(Case(fmt="int3-asym", group=32, rows=17, block=128, values="ties", magnitude=1.0, order="natural", seed=6))
@example(Case(fmt="nvfp4", group=16, rows=17, block=37, values="ties", magnitude=1.0, order="natural", seed=7))
def test_kernel_equals_reference_bitwise(case: Case):
    W1, Hinv1, params = case.inputs()
    assert_same(kernel(W1, Hinv1, case.format, params), expected(W1, Hinv1, case.format, params))


# Each format at its usual granularity (NVFP4 16, MXFP4 and 2/3-bit INT 32, 4-bit INT 128, 8 bits per channel).
USUAL_GROUP = {"nvfp4": 16, "mxfp4": 32, "int2-sym": 32, "int2-asym": 32, "int3-sym": 32, "int3-asym": 32,
               "int4-sym": 128, "int4-asym": 128}


@needs_kernel
@pytest.mark.parametrize("kind", ["outliers", "ties"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_equals_reference_bitwise(name: str, kind: str):
    """Every format, whatever the generated cases drew: errors fed forward through a correlated Hessian
    (outliers), and round-half ties on every column (a diagonal Hessian)."""
    case = Case(fmt=name, group=USUAL_GROUP.get(name), rows=17, block=48, values=kind, magnitude=1.0,
                order="natural", seed=8)
    W1, Hinv1, params = case.inputs()
    assert_same(kernel(W1, Hinv1, case.format, params), expected(W1, Hinv1, case.format, params))


def planted(block: int = 37) -> torch.Tensor:
    """8 rows of special values (rows of their own, so each group sees one kind): NaN in a group, ±inf, zeros with
    -0.0 among them, fp32 subnormals, normal values near 2^-124 (scaled float groups with subnormal steps, hence
    subnormal ``w − q``), a NaN row, a constant row, a normal row."""
    x = torch.randn(8, block, generator=torch.Generator().manual_seed(0))
    x[0, 5] = torch.nan
    x[1, 20], x[1, 30] = torch.inf, -torch.inf
    x[2] = 0.0
    x[2, 1::3] = -0.0
    x[3] = torch.finfo(torch.float32).tiny * torch.linspace(-0.9, 0.9, block)
    x[4] = 2.0**-124 * torch.linspace(-3.0, 4.0, block)
    x[5] = torch.nan
    x[6] = 0.7
    return x.to(DEVICE)


def planted_inputs(name: str, gran=PerGroup(16)) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    W1 = planted()
    return strided(W1), hessian_block(W1.shape[1], seed=0), column_params(W1, FORMATS[name], gran,
                                                                          torch.arange(W1.shape[1]))


@needs_kernel
@pytest.mark.parametrize("name", list(FORMATS))
def test_special_values_follow_the_reference(name: str):
    """A NaN or ±inf group gives NaN columns, and the row's later columns turn NaN through the update (then NaN
    weights meet finite scales: INT codes 0, E2M1's +0, E4M3's and E5M2's NaN code); ±0, subnormals and tiny
    groups bit for bit."""
    fmt = FORMATS[name]
    W1, Hinv1, params = planted_inputs(name)
    want = expected(W1, Hinv1, fmt, params)
    assert want[0].isnan().any() and not want[0][6:].isnan().any()
    assert_same(kernel(W1, Hinv1, fmt, params), want)


@needs_kernel
@pytest.mark.parametrize("exact_div", [False, True], ids=["div_rn", "exact_div"])
@pytest.mark.parametrize("name", ["int4-asym", "mxfp4", "nvfp4"])
def test_subnormal_errors_are_kept(name: str, exact_div: bool):
    """Subnormal ``w − q`` and ``err`` come out as the reference's, through ``div_rn`` (triton ≥ 3.6, the
    interpreter) and through the integer division the kernel uses where ``div_rn`` flushes them (older triton)."""
    fmt = FORMATS[name]
    W1, Hinv1, params = planted_inputs(name)
    want = expected(W1, Hinv1, fmt, params)
    err = want[1]
    assert ((err != 0) & (err.abs() < torch.finfo(torch.float32).tiny)).any()  # the case is not vacuous
    assert_same(launch(W1, Hinv1, fmt, params, exact_div=exact_div), want)


def buggy_reference(W1, Hinv1, fmt, params, bug: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_reference`` with one plausible kernel bug planted (module docstring)."""
    W1, Q1, Err1 = W1.clone(), torch.zeros_like(W1), torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        w, d = W1[:, i], Hinv1[i, i]
        if bug == "plus-zero":  # the column read out of the tile as a sum padded with +0.0
            w = w + 0.0
        column = tuple(p[:, i:i + 1] if gptq._per_group(p) else p for p in params)
        q = fmt.project(w.reshape(-1, 1, 1), column).reshape(-1)
        err = (w - q) * (1 / d) if bug == "reciprocal" else (w - q) / d
        if bug == "flush":  # div.rn.ftz: subnormal operands and quotients become zeros
            tiny = torch.finfo(torch.float32).tiny
            err = torch.where(((w - q).abs() < tiny) | (err.abs() < tiny), 0.0 * err.sign(), err)
        if bug == "fma":  # one rounding of w − err · h (exact product in fp64)
            W1[:, i:] = (W1[:, i:].double() - err.double()[:, None] * Hinv1[i, i:].double()[None, :]).float()
        else:
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        Q1[:, i], Err1[:, i] = q, err
    return Q1, Err1


@pytest.mark.parametrize("bug", ["fma", "reciprocal", "plus-zero", "flush"])
def test_the_comparison_catches_planted_bugs(bug: str):
    """Each bug changes the reference's bits on the data the tests above use (torch only: no kernel needed)."""
    if bug in ("fma", "reciprocal"):
        case = Case(fmt="int4-asym", group=32, rows=17, block=128, values="outliers", magnitude=1.0,
                    order="natural", seed=1)
        W1, Hinv1, params = case.inputs()
        fmt = case.format
    else:  # -0.0 columns and subnormal steps: the planted rows
        fmt = FORMATS["mxfp4"]
        W1, Hinv1, params = planted_inputs("mxfp4")
    cpu = tuple(p.cpu() if isinstance(p, torch.Tensor) else p for p in params)
    wrong = buggy_reference(W1.cpu(), Hinv1.cpu(), fmt, cpu, bug)
    with pytest.raises(pytest.fail.Exception):
        assert_same(wrong, gptq.block_reference(W1.cpu(), Hinv1.cpu(), fmt, cpu))


@needs_kernel
@pytest.mark.parametrize("spec, act_order", [
    (QuantSpec(IntFormat(3), PerGroup(32)), False),  # dynamic groups, fitted as the loop reaches them
    (QuantSpec(NVFP4, PerGroup(16)), True),  # static groups, permuted columns, a tensor scale
], ids=["int3-g32", "nvfp4-act-order"])
def test_gptq_solve_passes_what_the_kernel_takes(spec, act_order: bool, monkeypatch):
    """GPTQ's solve with the kernel in place of the torch loop (as on CUDA): every block it hands over (a 128 and a
    44-column tail, as strided views, with gathered parameters) comes back as the CPU reference computes it."""
    calls = []

    def recording(W1, Hinv1, fmt, params):
        out = kernel(W1, Hinv1, fmt, params)
        calls.append(((W1.clone(), Hinv1.clone(), fmt, params), out))
        return out

    monkeypatch.setattr(gptq, "_block_kernel", lambda W1: recording)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(24, 172, generator=gen)
    X = torch.randn(400, 172, generator=gen) @ (torch.eye(172) + 0.3 * torch.randn(172, 172, generator=gen))
    layer = gptq.GPTQ(W.shape[1], DEVICE)
    layer.add_batch(X.to(DEVICE))
    layer.quantize(W.to(DEVICE), spec, gptq.Options(act_order=act_order))
    assert [c[0][0].shape[1] for c in calls] == [128, 44]
    for args, out in calls:
        assert_same(out, expected(*args))


@pytest.mark.skipif(DEVICE != "cuda", reason="gptq.block_loop uses the kernel on CUDA tensors only")
def test_block_loop_dispatches_to_the_kernel_on_cuda():
    assert gptq._block_kernel(torch.zeros(1, 1, device="cuda")) is kernel
    assert gptq._block_kernel(torch.zeros(1, 1)) is None


@needs_kernel
@pytest.mark.parametrize("bad, error", [
    (dict(fmt="int4"), TypeError),
    (dict(W1=torch.zeros(4, 3, dtype=torch.float16)), TypeError),
    (dict(W1=torch.zeros(4, 5)), ValueError),  # Hinv1 is 3 x 3
    (dict(W1=torch.zeros(4, 3, 1)), ValueError),
    (dict(params=(torch.ones(4, 2, 1), None)), ValueError),  # scales of another block width
    (dict(params=(torch.ones(4, 3, 1, dtype=torch.float16), None)), TypeError),
    (dict(params=(torch.ones(4, 3, 1),)), ValueError),
])
def test_kernel_rejects_bad_arguments(bad: dict, error: type[Exception]):
    args = dict(W1=torch.zeros(4, 3), Hinv1=torch.eye(3), fmt=IntFormat(4, symmetric=True),
                params=(torch.ones(4, 3, 1), None)) | bad
    params = tuple(p.to(DEVICE) if isinstance(p, torch.Tensor) else p for p in args["params"])
    with pytest.raises(error):
        kernel(args["W1"].to(DEVICE), args["Hinv1"].to(DEVICE), args["fmt"], params)
