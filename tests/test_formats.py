"""Laws of the INT formats and granularities (the torch reference every kernel is tested against)."""
import pytest
import torch

from ptqsuite.formats import IntFormat
from ptqsuite.granularity import PerChannel, PerGroup, PerTensor, from_groups, mask, to_groups

BITS = [2, 3, 4, 8]
GRANS = [PerTensor(), PerChannel(), PerGroup(1), PerGroup(7), PerGroup(32), PerGroup(128)]
SHAPES = [(1, 1), (3, 172), (5, 64), (2, 300)]


def cases():
    for bits in BITS:
        for sym in (False, True):
            for gran in GRANS:
                yield pytest.param(IntFormat(bits, sym), gran, id=f"{IntFormat(bits, sym)}-{gran}")


def sample(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x.view(-1)[:: max(1, x.numel() // 3)] *= 50  # outliers
    return x


@pytest.mark.parametrize("fmt,gran", list(cases()))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_grid_and_idempotence(fmt, gran, shape):
    x = sample(shape)
    q = fmt.quantize(x, gran)
    assert q.codes.min() >= fmt.qmin and q.codes.max() <= fmt.qmax
    y = q.dequantize()
    assert torch.equal(fmt.fake(y, gran), y), "quantizing a quantized tensor must change nothing"
    groups = to_groups(y, gran)
    assert all(len(torch.unique(g)) <= 2**fmt.bits for g in groups.reshape(-1, groups.shape[-1]))


@pytest.mark.parametrize("fmt,gran", list(cases()))
def test_error_within_half_step(fmt, gran):
    """RTN's error is at most half a grid step per element, plus the hair that rounding the scale toward zero in
    fp16 (relative 2^-10) can clip from the range's extremes: (qmax - qmin) · 2^-10 steps."""
    x = sample((4, 172), seed=1)
    q = fmt.quantize(x, gran)
    step = from_groups(q.scale.expand_as(q.codes.float()), x.shape)
    assert ((q.dequantize() - x).abs() <= step * (0.5 + (fmt.qmax - fmt.qmin) * 2**-10)).all()


@pytest.mark.parametrize("fmt,gran", list(cases()))
def test_zeros_exact_and_constants_stay_constant(fmt, gran):
    x = torch.zeros(3, 40)
    assert torch.equal(fmt.fake(x, gran), x), "an all-zero group must decode to exact zeros"
    x[1] = 0.37
    y = fmt.fake(x, PerChannel())
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2])
    assert len(torch.unique(y[1])) == 1 and abs(y[1, 0] - 0.37) <= 0.37 / fmt.qmax


def test_more_bits_less_error():
    x = sample((16, 300), seed=2)
    errs = [(IntFormat(b).fake(x, PerGroup(32)) - x).pow(2).mean() for b in BITS]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_smaller_groups_less_error():
    x = sample((16, 256), seed=3)
    errs = [(IntFormat(4).fake(x, g) - x).pow(2).mean() for g in (PerTensor(), PerChannel(), PerGroup(64), PerGroup(8))]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_tail_group_is_its_own_group():
    """172 = 5·32 + 12: the 12-wide tail gets its own scale, unaffected by padding, and no element is lost."""
    x = sample((2, 172), seed=4)
    x[:, 160:] *= 1e-3  # a tail of tiny values: a shared scale would flatten it to 0
    y = IntFormat(4, symmetric=True).fake(x, PerGroup(32))
    assert y.shape == x.shape
    assert (y[:, 160:] != 0).any()
    assert torch.equal(y[:, 160:], IntFormat(4, symmetric=True).fake(x[:, 160:].contiguous(), PerChannel()))
    m = mask((2, 172), PerGroup(32))
    assert m.sum() == x.numel() and m.shape == (2, 6, 32)
    assert torch.equal(from_groups(to_groups(x, PerGroup(32)), x.shape), x)


@pytest.mark.parametrize("bits,sym,gran,expected", [
    (4, False, PerGroup(128), 4 + (16 + 4) * 2 / 172),  # 172 = 128 + a 44-wide tail group
    (4, True, PerGroup(128), 4 + 16 * 2 / 172),
    (8, True, PerChannel(), 8 + 16 / 172),
    (3, False, PerGroup(32), 3 + (16 + 3) * 6 / 172),  # 6 groups, the last a 12-wide tail
    (8, False, PerTensor(), 8 + (16 + 8) / (4 * 172)),
])
def test_effective_bits_count_scales_and_zeros(bits, sym, gran, expected):
    assert IntFormat(bits, sym).bits_per_element((4, 172), gran) == pytest.approx(expected, rel=1e-12)


def test_scales_are_stored_in_fp16():
    q = IntFormat(4).quantize(sample((3, 64), seed=5), PerGroup(16))
    assert torch.equal(q.scale, q.scale.half().float())


@pytest.mark.parametrize("bad", [1, 9, 16, "4"])
def test_bad_bits_name_the_valid_ones(bad):
    with pytest.raises(ValueError, match=r"must be one of \[2, 3, 4, 5, 6, 7, 8\]"):
        IntFormat(bad)


def test_bad_group_size():
    with pytest.raises(ValueError, match="positive integer"):
        PerGroup(0)


@pytest.mark.parametrize("fmt,gran", list(cases()))
def test_special_values(fmt, gran):
    """NaN or ±inf poison their group (NaN scale); zeros decode to +0; fp32 subnormals decode to zeros."""
    x = sample((4, 64), seed=6)
    x[0, 3], x[1, 40], x[2, 5] = torch.nan, torch.inf, -torch.inf
    x[3, :] = -0.0
    x[3, :16] = 1e-42
    q = fmt.quantize(x, gran)
    bad = to_groups(~torch.isfinite(x), gran).any(-1, keepdim=True)
    assert torch.equal(q.scale.isnan(), bad) and (q.codes[bad.expand_as(q.codes)] == 0).all()
    y = q.dequantize()
    assert torch.equal(y.isnan(), from_groups(bad.expand_as(q.codes), x.shape))
    if not isinstance(gran, PerTensor):
        assert torch.equal(y[3], torch.zeros(64)) and not torch.signbit(y[3]).any()
