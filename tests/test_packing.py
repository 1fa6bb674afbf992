"""The packed INT storage layout (ptqsuite/formats/packing.py): pack/unpack are inverses, words hold the documented
bit stream, a packed QTensor decodes bit for bit like the fake-quant one, and its size is what IntFormat counts."""
import math

import pytest
import torch

from ptqsuite.formats import IntFormat
from ptqsuite.formats.packing import (VALID_BITS, PackedInt, num_words, pack, pack_qtensor, unpack,
                                      unpack_qtensor)
from ptqsuite.granularity import PerChannel, PerGroup, PerTensor

LENGTHS = [1, 31, 32, 33, 172, 300]
FORMATS = [IntFormat(b, s) for b in (2, 3, 4, 8) for s in (False, True)]
GRANS = [PerGroup(7), PerGroup(32), PerGroup(128), PerChannel()]
SHAPES = [(3, 172), (5, 300), (2, 64), (1, 1)]


def random_codes(bits: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(seed))
    codes.view(-1)[::5] = 2**bits - 1  # all ones reach every word's sign bit
    return codes.to(torch.int16)


def stream_words(codes: list[int], bits: int) -> list[int]:
    """The layout built independently: the row as one little-endian integer, cut into signed 32-bit words."""
    stream = sum(c << (i * bits) for i, c in enumerate(codes))
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(num_words(len(codes), bits))]
    return [w - 2**32 if w >= 2**31 else w for w in words]


def sample(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[torch.rand(shape, generator=g) < 0.02] *= 100  # outliers
    return x


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns of a float tensor: equal patterns mean bitwise equal (-0.0 differs from +0.0)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("bits", VALID_BITS)
@pytest.mark.parametrize("n", LENGTHS)
def test_unpack_inverts_pack(bits, n):
    codes = random_codes(bits, (3, n), seed=bits * 1000 + n)
    words = pack(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, math.ceil(n / 32) * bits)
    assert torch.equal(unpack(words, bits, n), codes)
    assert torch.equal(pack(unpack(words, bits, n), bits), words)


@pytest.mark.parametrize("bits", VALID_BITS)
@pytest.mark.parametrize("n", [33, 172])
def test_words_hold_the_little_endian_stream(bits, n):
    codes = random_codes(bits, (n,), seed=bits + n)
    assert pack(codes, bits).tolist() == stream_words(codes.tolist(), bits)


@pytest.mark.parametrize("codes, bits, words", [
    (list(range(8)), 4, [0x76543210]),
    ([1, 2, 3, 4], 8, [0x04030201]),
    ([3, 2, 1, 0] * 4, 2, [0x1B1B1B1B]),
    ([0] * 7 + [8], 4, [-(2**31)]),  # bit 31: a negative int32
    ([1] * 32, 1, [-1]),
    # 3 bits, GPTQ's layout: code 10 straddles words 0 and 1 (bits 30-31, then bit 0), code 21 words 1 and 2.
    ([0] * 10 + [7] + [0] * 21, 3, [-(2**31) + 2**30, 1, 0]),
    ([0] * 21 + [7] + [0] * 10, 3, [0, -(2**31), 3]),
])
def test_known_layouts(codes, bits, words):
    padding = [0] * (num_words(len(codes), bits) - len(words))  # zero codes up to 32
    assert pack(torch.tensor(codes), bits).tolist() == words + padding


def test_rows_are_padded_with_zero_codes():
    words = pack(torch.full((2, 33), 15), 4)
    assert words.shape == (2, 8)
    assert unpack(words, 4, 64)[:, 33:].eq(0).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("gran", GRANS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_packed_qtensor_dequantizes_bitwise(fmt, gran, shape):
    q = fmt.quantize(sample(shape, seed=fmt.bits), gran)
    p = pack_qtensor(q)
    assert p.qweight.shape == (shape[0], num_words(shape[1], fmt.bits)) and p.scales.dtype == torch.float16
    assert (p.zeros is None) == fmt.symmetric
    assert torch.equal(bits_of(p.dequantize()), bits_of(q.dequantize()))
    back = unpack_qtensor(p)
    for name in ("codes", "scale", "zero"):
        a, b = getattr(back, name), getattr(q, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name
    assert (back.fmt, back.gran, back.shape) == (q.fmt, q.gran, q.shape)


def unpadded():
    """32 | K, and for asymmetric formats 32 | G: codes and zero points fill their words exactly."""
    for fmt in FORMATS:
        cases = [((8, 4096), PerGroup(128)), ((4, 2048), PerGroup(64))] + [((3, 256), PerChannel())] * fmt.symmetric
        for shape, gran in cases:
            yield pytest.param(fmt, shape, gran, id=f"{fmt}-{shape}-{gran}")


@pytest.mark.parametrize("fmt, shape, gran", list(unpadded()))
def test_storage_is_bits_per_element_when_nothing_pads(fmt, shape, gran):
    p = pack_qtensor(fmt.quantize(sample(shape), gran))
    assert p.storage_bits() / math.prod(shape) == fmt.bits_per_element(shape, gran)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("gran", GRANS, ids=str)
def test_storage_with_padding(fmt, gran):
    """Otherwise each row stores ``32·b·ceil(K/32)`` code bits (zero codes up to a multiple of 32), ``16·G`` scale
    bits and ``32·b·ceil(G/32)`` zero-point bits: IntFormat's count plus the padding of both to 32 codes."""
    (rows, cols), b = (3, 172), fmt.bits
    groups = gran.num_groups(rows, cols) // rows
    padded = 32 * b * math.ceil(cols / 32) + 16 * groups + (0 if fmt.symmetric else 32 * b * math.ceil(groups / 32))
    exact = b * cols + (16 + (0 if fmt.symmetric else b)) * groups
    p = pack_qtensor(fmt.quantize(sample((rows, cols)), gran))
    assert p.storage_bits() == rows * padded
    assert fmt.bits_per_element((rows, cols), gran) * rows * cols == pytest.approx(rows * exact)


@pytest.mark.parametrize("call, error, match", [
    (lambda: pack(torch.tensor([0, 16]), 4), ValueError, r"\[0, 15\].*\[0, 16\]"),
    (lambda: pack(torch.tensor([-1, 3]), 2), ValueError, r"\[0, 3\].*\[-1, 3\]"),
    (lambda: pack(torch.tensor([0.0]), 4), TypeError, "integer dtype.*float32"),
    (lambda: pack(torch.tensor(3), 4), ValueError, "at least one dimension"),
    (lambda: pack(torch.tensor([1]), 0), ValueError, r"bits must be one of \[1, .*8\], got 0"),
    (lambda: pack(torch.tensor([1]), 9), ValueError, "got 9"),
    (lambda: unpack(torch.zeros(4, dtype=torch.int64), 4, 32), TypeError, "int32.*int64"),
    (lambda: unpack(torch.zeros(4, dtype=torch.int32), 4, 33), ValueError, "take 8 words"),
    (lambda: unpack(torch.zeros(4, dtype=torch.int32), 4, -1), ValueError, "non-negative"),
    (lambda: pack_qtensor(IntFormat(4).quantize(torch.ones(2, 8), PerTensor())), ValueError, "PerGroup"),
])
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_packed_int_describes_itself():
    p = pack_qtensor(IntFormat(4).quantize(sample((2, 172)), PerGroup(32)))
    assert isinstance(p, PackedInt)
    assert (p.bits, p.group, p.group_size, p.num_groups, p.shape, p.symmetric) == (4, 32, 32, 6, (2, 172), False)
    assert p.zeros.shape == (2, 4) and p.zero_points().shape == (2, 6)
