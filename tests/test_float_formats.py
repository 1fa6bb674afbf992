"""Laws of the minifloat encodings and the scaled float formats (FP8, MXFP4/MXFP8, NVFP4 and their variants).

The minifloats are checked exhaustively against torch's own float8 dtypes where torch has one; the scaled formats
against hand-computed examples from the OCP MX spec's rules and against laws (grid, error bound, idempotence,
special values) over presets × scale formats × roundings × granularities.
"""
import itertools
from dataclasses import replace

import pytest
import torch

from ptqsuite.formats import FP8, FP8_E5M2, MXFP4, MXFP8, NVFP4, FloatFormat
from ptqsuite.formats.minifloat import E2M1, E4M3, E5M2, E8M0, FP16, FP32, ROUNDINGS
from ptqsuite.granularity import PerChannel, PerGroup, PerTensor, PerToken, from_groups, to_groups

TORCH_FP8 = {E4M3: torch.float8_e4m3fn, E5M2: torch.float8_e5m2}
PRESETS = {"fp8": (FP8, PerChannel()), "fp8e5m2": (FP8_E5M2, PerToken()), "mxfp4": (MXFP4, PerGroup(32)),
           "mxfp8": (MXFP8, PerGroup(32)), "nvfp4": (NVFP4, PerGroup(16))}
# The variants arXiv 2507.17417 studies: block size, scale format, scale rounding.
VARIANTS = [replace(base, scale=scale, rounding=rounding)
            for base in (MXFP4, MXFP8, NVFP4) for scale in (E8M0, E4M3, FP16) for rounding in ROUNDINGS]
GRANS = [PerTensor(), PerChannel(), PerGroup(7), PerGroup(16), PerGroup(32), PerGroup(128)]
SHAPE = (6, 172)  # 172 = 5·32 + 12: a tail block for every block size above


def sample(shape=SHAPE, seed=0, spread=3.0):
    """Rows of very different magnitudes (e^(3·N(0,1))), with 2% x100 outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(spread * torch.randn(shape[0], 1, generator=g))
    x[torch.rand(shape, generator=g) < 0.02] *= 100
    return x


def fmt_id(f: FloatFormat) -> str:
    return str(f)


# --- minifloats -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
def test_minifloat_codes_match_torch_float8(fmt):
    codes = torch.arange(256, dtype=torch.uint8)
    expected = codes.view(TORCH_FP8[fmt]).float()
    decoded = fmt.decode(codes)
    assert torch.equal(decoded.isnan(), expected.isnan())
    assert torch.equal(decoded[~decoded.isnan()], expected[~expected.isnan()])
    numbers = ~expected.isnan()
    assert torch.equal(fmt.encode(expected[numbers]), codes[numbers]), "encode must invert decode"


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
def test_minifloat_nearest_matches_torch_cast_within_range(fmt):
    x = sample((64, 1000), seed=1, spread=4.0).clamp(-fmt.max, fmt.max)
    assert torch.equal(fmt.round(x), x.to(TORCH_FP8[fmt]).float())


def test_e2m1_grid_and_ties_to_even():
    assert E2M1.decode(torch.arange(8)).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert E2M1.decode(torch.arange(8, 16)).tolist() == [-0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 5.01])
    assert E2M1.round(x).tolist() == [0, 1, 1, 2, 2, 4, 4, 0.5, 6]


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1], ids=str)
def test_minifloat_roundings_bracket_and_saturate(fmt):
    x = sample((32, 500), seed=2, spread=4.0)
    lo, hi, near = (fmt.round(x, m) for m in ("floor", "ceil", "nearest"))
    inside = x.abs() <= fmt.max
    assert (lo.abs() <= x.abs())[inside].all() and (hi.abs() >= x.abs())[inside].all()
    assert ((near == lo) | (near == hi)).all()
    assert ((near - x).abs() <= (x - lo).abs().minimum((hi - x).abs()))[inside].all()
    assert torch.equal(near[~inside].abs(), torch.full_like(near[~inside], fmt.max))


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1], ids=str)
def test_minifloat_special_values(fmt):
    special = torch.tensor([0.0, -0.0, torch.inf, -torch.inf, torch.nan, 1e-30, -1e-30, 1e30])
    y = fmt.round(special)
    assert y[:2].tolist() == [0.0, 0.0] and not torch.signbit(y[0]) and torch.signbit(y[1]), "±0 keep their sign"
    assert y[2:4].tolist() == [fmt.max, -fmt.max], "saturating: ±inf become ±max"
    assert y[4].isnan()
    assert y[5] == 0 and torch.signbit(y[6]) and y[7] == fmt.max, "underflow to ±0, overflow saturates"


def test_e8m0_decodes_powers_of_two_and_rounds():
    codes = torch.arange(255, dtype=torch.uint8)
    assert torch.equal(E8M0.decode(codes), torch.ldexp(torch.ones(255), codes.int() - 127))
    assert E8M0.decode(torch.tensor([255], dtype=torch.uint8)).isnan().all()
    assert torch.equal(E8M0.encode(E8M0.decode(codes)), codes)
    x = torch.tensor([3.0, 4.0, 5.0, 6.0])
    assert E8M0.round(x, "floor").tolist() == [2, 4, 4, 4]
    assert E8M0.round(x, "ceil").tolist() == [4, 4, 8, 8]
    assert E8M0.round(x, "nearest").tolist() == [4, 4, 4, 8]  # nearest in value: 6 is the midpoint, ties up
    assert E8M0.round(torch.tensor([0.0, 1e-45, 1e38]), "floor").tolist() == [2.0**-127, 2.0**-127, 2.0**126]


@pytest.mark.parametrize("mode", ROUNDINGS)
def test_fp16_scale_rounding(mode):
    x = torch.tensor([1 / 3, 1e-9, 1e9])
    y = FP16.round(x, mode)
    assert torch.equal(y, y.half().float())
    assert (y[0] <= x[0]) if mode == "floor" else (y[0] >= x[0]) if mode == "ceil" else (y[0] == x[0].half())
    assert y[1] == torch.finfo(torch.float16).tiny and y[2] == torch.finfo(torch.float16).max


# --- scaled formats --------------------------------------------------------------------------------------------

def test_mxfp4_follows_the_ocp_rule():
    """One block of 32: X = 2^(floor(log2 amax) - 2); 7 / X = 7 clips to 6 (the spec's rule clips); 'ceil' uses
    X = 2^ceil(log2(7 / 6)) = 2, so 7 / 2 = 3.5 rounds (to even) to 4, decoding to 8; -1.4 / 2 = -0.7 to -0.5."""
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([7.0, 0.3, -1.4, 2.6])
    q = MXFP4.quantize(x, PerGroup(32))
    assert q.scale.item() == 1.0 and E8M0.encode(q.scale).item() == 127
    assert q.dequantize()[0, :4].tolist() == [6.0, 0.5, -1.5, 3.0]
    up = replace(MXFP4, rounding="ceil").quantize(x, PerGroup(32))
    assert up.scale.item() == 2.0 and up.dequantize()[0, :4].tolist() == [8.0, 0.0, -1.0, 3.0]


def test_nvfp4_two_level_scale():
    """S = amax / (6 · 448), so the block holding the tensor's max gets block scale 448 exactly."""
    x = sample((4, 64), seed=3)
    q = NVFP4.quantize(x, PerGroup(16))
    assert q.global_scale == x.abs().max() / (6 * 448)
    assert q.scale.max() == 448 and torch.equal(q.scale, E4M3.round(q.scale))
    block_amax = to_groups(x, PerGroup(16)).abs().amax(-1, keepdim=True)
    assert torch.equal(q.scale, E4M3.round(block_amax / q.global_scale / 6))


@pytest.mark.parametrize("fmt,gran", [p for p in PRESETS.values() if p[0].element in TORCH_FP8], ids=str)
def test_fp8_element_presets_match_torch_casts(fmt, gran):
    """Where torch has the element dtype (not E2M1), our elements are torch's saturating cast of x / σ."""
    x = sample(seed=4)
    q = fmt.quantize(x, gran)
    sigma = fmt.sigma(q.scale, q.global_scale)
    scaled = (to_groups(x, gran) / sigma).clamp(-fmt.element.max, fmt.element.max)
    assert torch.equal(fmt.element.decode(q.codes), scaled.to(TORCH_FP8[fmt.element]).float())


def laws_cases() -> list:
    return [pytest.param(fmt, gran, id=f"{fmt}-{gran}")
            for fmt, gran in itertools.product(VARIANTS + [FP8, FP8_E5M2], GRANS)]


@pytest.mark.parametrize("fmt,gran", laws_cases())
def test_grid_error_bound_and_requantization(fmt, gran):
    x = sample(seed=5)
    q = fmt.quantize(x, gran)
    sigma = fmt.sigma(q.scale, q.global_scale)
    elements = fmt.element.decode(q.codes)
    assert torch.equal(elements, fmt.element.round(elements)), "elements lie on the element grid"
    # Error: at most half a grid step of x / σ's binade, except saturated elements, which sit on ±max.
    scaled = to_groups(x, gran) / sigma
    a = scaled.abs().clamp(min=2.0**fmt.element.emin)
    half_step = torch.ldexp(torch.full_like(a, 0.5), torch.frexp(a).exponent - 1 - fmt.element.man_bits)
    inside = (scaled.abs() <= fmt.element.max) & (sigma > 0)
    assert ((elements - scaled).abs() <= half_step)[inside].all()
    assert (elements.abs() == fmt.element.max)[~inside & (sigma > 0)].all()
    if fmt.rounding == "ceil" and not fmt.tensor_scale and fmt.scale.max > 1e30:
        assert inside.all(), "scales rounded up never clip (given an unbounded scale format)"
    # Re-encoding the decoded values with the same scales reproduces the codes (what a deployment does).
    assert torch.equal(fmt.encode(to_groups(q.dequantize(), gran), q.scale, q.global_scale), q.codes)
    assert fmt.bits_per_element(SHAPE, gran) == fmt.element.bits + (
        fmt.scale.bits * gran.num_groups(*SHAPE) + 32 * fmt.tensor_scale) / (SHAPE[0] * SHAPE[1])


IDEMPOTENT = [FP8, FP8_E5M2, MXFP4, MXFP8, replace(MXFP4, rounding="ceil"), replace(MXFP8, rounding="ceil"),
              replace(MXFP4, scale=FP16), replace(MXFP4, scale=FP32, rounding="ceil")]


@pytest.mark.parametrize("fmt", IDEMPOTENT, ids=fmt_id)
@pytest.mark.parametrize("gran", GRANS, ids=str)
def test_refitting_a_quantized_tensor_changes_nothing(fmt, gran):
    """Exact for power-of-two scales rounded down or up, and IEEE scales without a tensor scale: the decoded
    maximum is E.max · s (or a grid point whose refit rounds back to s). Not for E8M0 'nearest', E4M3 scales
    (subnormal scales are coarse: a block whose maximum decodes to 4·s refits a finer scale) or NVFP4 (the
    decoded tensor maximum 2688 · S is rounded in fp32, so S can move by an ulp): for those the law is the
    re-encoding above."""
    y = fmt.fake(sample(seed=6), gran)
    assert torch.equal(fmt.fake(y, gran), y)


@pytest.mark.parametrize("fmt,gran", PRESETS.values(), ids=PRESETS)
def test_special_values(fmt, gran):
    x = sample((4, 64), seed=7)
    x[0, 3], x[1, 40], x[2] = torch.nan, -torch.inf, 0.0
    x[2, 1] = -0.0
    x[3, :16] = 1e-42  # fp32 subnormals, in a block of their own (in a row of their own for per-channel)
    clean = fmt.fake(x.nan_to_num(0.0, 0.0, 0.0), gran)
    y = fmt.fake(x, gran)
    bad = from_groups(to_groups(~torch.isfinite(x), gran).any(-1, keepdim=True).expand_as(to_groups(x, gran)),
                      x.shape)
    assert y[bad].isnan().all(), "a group holding NaN or inf decodes to NaN"
    others = ~bad & (~bad).all(dim=None if isinstance(gran, PerTensor) else 1, keepdim=True)
    if not fmt.tensor_scale:  # NVFP4's tensor scale sees only finite blocks, so clean blocks equal the clean run
        assert torch.equal(y[others], clean[others])
    assert torch.equal(y[2].abs(), torch.zeros(64)) and torch.signbit(y[2, 1]), "zeros keep their sign"
    assert torch.isfinite(y[3, :16]).all() and (y[3, :16].abs() <= 1e-38).all()


def test_block_scale_underflow_flushes_to_zero():
    """NVFP4: a block 1e-6 times the tensor's max needs a block scale below E4M3's smallest (2^-9): it is 0."""
    x = torch.ones(1, 32)
    x[0, 16:] = 1e-6
    q = NVFP4.quantize(x, PerGroup(16))
    assert q.scale[0, 1].item() == 0 and torch.equal(q.dequantize()[0, 16:], torch.zeros(16))


def test_smaller_blocks_and_finer_scales_lower_the_error():
    x = sample((64, 512), seed=8, spread=0.5)

    def mse(fmt, gran):
        return (fmt.fake(x, gran) - x).pow(2).mean()

    assert mse(MXFP4, PerGroup(16)) < mse(MXFP4, PerGroup(32)) < mse(MXFP4, PerGroup(128))
    assert mse(NVFP4, PerGroup(16)) < mse(MXFP4, PerGroup(16)), "E4M3 block scales beat E8M0 at equal blocks"
    assert mse(MXFP8, PerGroup(32)) < mse(NVFP4, PerGroup(16)) < mse(MXFP4, PerGroup(32))


@pytest.mark.parametrize("bad, message", [
    (dict(rounding="up"), r"scale rounding must be one of \['nearest', 'floor', 'ceil'\], got 'up'"),
])
def test_bad_format_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        replace(MXFP4, **bad)
