"""Storage layout of INT weights for GEMM kernels: b-bit codes packed into int32 words. The torch code here is the
specification of the layout that kernels/ptqsuite_kernels/int_gemm.py reads.

Bit stream (``pack``/``unpack``), for unsigned codes ``u`` in ``[0, 2^b)``, ``b`` in 1..8, along the last axis:

* code ``i`` of a row occupies stream bits ``[i·b, (i+1)·b)``, its least significant bit first;
* word ``w`` holds stream bits ``[32w, 32w + 32)``, stream bit ``32w + j`` at bit ``j`` (bit 0 = LSB), stored as
  int32 (two's complement: a word with bit 31 set is negative);
* a row is padded with zero codes to a multiple of 32 codes, so ``n`` codes take ``ceil(n / 32) · b`` words.

For ``b`` in {2, 4, 8} a word holds ``32 / b`` whole codes (16, 8, 4), code ``i`` at bits ``[(i mod 32/b)·b, ...)``
of word ``i / (32/b)``, e.g. 4-bit codes 0..7 make the word 0x76543210. Other widths straddle words: 3-bit codes
0..31 fill 3 words (GPTQ's 3-bit layout).

Packed INT weight (``PackedInt``, from a QTensor of ``IntFormat.quantize(W[N, K], PerGroup(g) | PerChannel())``):

* ``qweight`` int32 ``[N, ceil(K/32)·b]``: the codes offset to unsigned, ``u = code − qmin`` (symmetric formats:
  ``u = code + 2^(b−1)``, i.e. a constant zero point ``2^(b−1)``);
* ``scales`` ``[N, G]`` in the format's scale dtype (fp16 for IntFormat's default; exact, its scales are
  representable), ``G = ceil(K/g)`` groups of ``g`` consecutive columns, the last one a tail when ``g ∤ K``;
  per-channel is one group of ``g = K``;
* ``zeros`` (asymmetric formats) int32 ``[N, ceil(G/32)·b]``: the b-bit zero points packed along the groups with the
  same stream; ``None`` for symmetric formats;
* decoding: ``Ŵ[n, k] = float32(scales[n, k // g]) · (u[n, k] − z[n, k // g])`` in fp32, with ``z = 2^(b−1)``
  when symmetric: bit for bit ``QTensor.dequantize()`` (``u − z`` is the code exactly, one fp32 product).

Storage per row: ``32·b·ceil(K/32) + 16·G (+ 32·b·ceil(G/32))`` bits, i.e. ``IntFormat.bits_per_element`` exactly
when 32 divides K (and G, for asymmetric formats); otherwise the zero-code padding of the codes and zero points.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..granularity import PerChannel, PerGroup, to_groups
from .integer import IntFormat
from .qtensor import QTensor

WORD_BITS = 32
BLOCK = 32  # codes per padding block: 32 codes of b bits are exactly b words
VALID_BITS = tuple(range(1, 9))
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {list(VALID_BITS)}, got {bits!r}")


def _positions(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index (within a block of ``bits`` words) and bit offset of each of a block's 32 codes."""
    start = torch.arange(BLOCK, device=device) * bits
    return start // WORD_BITS, start % WORD_BITS


def num_words(n: int, bits: int) -> int:
    """Words of a packed row of ``n`` codes."""
    return -(-n // BLOCK) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``codes[..., n]`` (values in ``[0, 2^bits)``) into int32 ``words[..., ceil(n/32)·bits]``."""
    _check_bits(bits)
    if codes.dtype not in INT_DTYPES:
        raise TypeError(f"codes must have an integer dtype, one of {list(INT_DTYPES)}, got {codes.dtype}")
    if codes.dim() < 1:
        raise ValueError("codes must have at least one dimension (the packed one)")
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"{bits}-bit codes must lie in [0, {2**bits - 1}], got values in "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    *lead, n = codes.shape
    blocks = -(-n // BLOCK)
    u = torch.nn.functional.pad(codes.long(), (0, blocks * BLOCK - n)).reshape(*lead, blocks, BLOCK)
    word, offset = _positions(bits, codes.device)
    shifted = u << offset  # < 2^40: a code and its carry into the next word
    # One spare word per block catches the last code's (empty) carry.
    words = torch.zeros(*lead, blocks, bits + 1, dtype=torch.long, device=codes.device)
    index = word.expand_as(u)
    words.scatter_add_(-1, index, shifted & 0xFFFFFFFF)  # bits never overlap: adding is OR
    words.scatter_add_(-1, index + 1, shifted >> WORD_BITS)
    words = words[..., :bits].reshape(*lead, blocks * bits)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack`: the first ``n`` codes of each row of ``words[..., ceil(n/32)·bits]``, as int16."""
    _check_bits(bits)
    if words.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {words.dtype}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n (codes per row) must be a non-negative integer, got {n!r}")
    if words.dim() < 1 or words.shape[-1] != num_words(n, bits):
        raise ValueError(f"{n} codes of {bits} bits take {num_words(n, bits)} words per row, got shape "
                         f"{tuple(words.shape)}")
    *lead, length = words.shape
    blocks = length // bits
    w = (words.long() & 0xFFFFFFFF).reshape(*lead, blocks, bits)
    w = torch.cat([w, torch.zeros_like(w[..., :1])], -1)  # the spare word: nothing carries past a block
    word, offset = _positions(bits, words.device)
    index = word.expand(*lead, blocks, BLOCK)
    carry = w.gather(-1, index + 1) & 0xFF  # the next word's low bits, where a straddling code ends
    pair = w.gather(-1, index) | (carry << WORD_BITS)
    codes = (pair >> offset) & (2**bits - 1)
    return codes.reshape(*lead, blocks * BLOCK)[..., :n].to(torch.int16)


@dataclass(frozen=True)
class PackedInt:
    """An INT weight ``W[N, K]`` in the layout of the module docstring. ``group`` is ``None`` for per-channel."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group: int | None
    shape: tuple[int, int]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def group_size(self) -> int:
        """Columns per group; per-channel is one group of K."""
        return self.shape[1] if self.group is None else self.group

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def fmt(self) -> IntFormat:
        return IntFormat(self.bits, self.symmetric, self.scales.dtype)

    @property
    def gran(self) -> PerGroup | PerChannel:
        return PerChannel() if self.group is None else PerGroup(self.group)

    def storage_bits(self) -> int:
        """Bits actually stored: codes, scales and zero points with their padding."""
        tensors = [t for t in (self.qweight, self.scales, self.zeros) if t is not None]
        return sum(8 * t.numel() * t.element_size() for t in tensors)

    def codes(self) -> torch.Tensor:
        """The unsigned codes ``u[N, K]`` (int16)."""
        return unpack(self.qweight, self.bits, self.shape[1])

    def zero_points(self) -> torch.Tensor:
        """``z[N, G]`` (int16): unpacked zero points, or the constant ``2^(b−1)`` of a symmetric format."""
        if self.zeros is None:
            return torch.full(self.scales.shape, 2 ** (self.bits - 1), dtype=torch.int16, device=self.scales.device)
        return unpack(self.zeros, self.bits, self.num_groups)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Ŵ[N, K]``, decoded from the packed form alone (bit for bit ``QTensor.dequantize``)."""
        group = torch.arange(self.shape[1], device=self.qweight.device) // self.group_size
        step = self.codes().int() - self.zero_points().int()[:, group]
        return (self.scales.float()[:, group] * step.float()).to(dtype)


def pack_qtensor(q: QTensor) -> PackedInt:
    """Pack a QTensor of an IntFormat weight quantized per group or per channel."""
    if not isinstance(q.fmt, IntFormat):
        raise TypeError(f"only IntFormat QTensors pack as INT words, got format {q.fmt!r}")
    if not isinstance(q.gran, PerGroup | PerChannel):
        raise ValueError(f"packed INT weights need PerGroup(n) or PerChannel() granularity, got {q.gran}")
    fmt, (rows, cols) = q.fmt, q.shape
    scales = q.scale.reshape(rows, -1).to(fmt.scale_dtype)
    if not torch.equal(scales.float(), q.scale.reshape(rows, -1).float()):
        raise ValueError(f"scales are not representable in the format's scale dtype {fmt.scale_dtype}")
    codes = q.codes.reshape(rows, -1)[:, :cols] - fmt.qmin  # drops the tail group's padding
    zeros = None if q.zero is None else pack(q.zero.reshape(rows, -1).round().to(torch.int16), fmt.bits)
    group = q.gran.n if isinstance(q.gran, PerGroup) else None
    return PackedInt(pack(codes, fmt.bits), scales, zeros, fmt.bits, group, (rows, cols))


def unpack_qtensor(p: PackedInt) -> QTensor:
    """The QTensor that `pack_qtensor` packed (equal field by field, tail padding included)."""
    fmt, gran = p.fmt, p.gran
    codes = to_groups(p.codes() + fmt.qmin, gran)  # tail padding repeats the last code, as quantizing does
    scale = p.scales.float().unsqueeze(-1)
    zero = None if p.symmetric else p.zero_points().float().unsqueeze(-1)
    return QTensor(codes, scale, zero, p.shape, fmt, gran)
