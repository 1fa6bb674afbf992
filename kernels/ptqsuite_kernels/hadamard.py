"""Walsh–Hadamard transform along the last dim, in Triton, beside its torch reference.

``kernel(x, normalize, transpose)`` computes ``reference(...)``, i.e. ``ptqsuite.hadamard.fwht``: ``x @ H.T``
(``x @ H`` if ``transpose``) over ``sqrt(n)`` if ``normalize``, with H = H_k ⊗ H_{2^m} = hadamard(n). Unlike the
INT kernel it cannot be bit-exact: the reference sums in float64, the kernel in fp32, so
tests/kernels/test_hadamard.py bounds the difference by a rounding-error analysis of the order used here.

Design: a program holds ROWS whole rows as an fp32 tile [ROWS, K, 2^m], row r's element a·2^m + b at [r, a, b]
(the Kronecker index convention; K is k padded to a power of two, padding rows zero and never stored). Then
H x = H_k · X · H_{2^m}ᵀ with X the row viewed as [k, 2^m]:

* H_k by a dense product accumulated in the tile: ``z += G[c, :, None] * x[c, :]`` over c < k, G = H_kᵀ (a ±1
  tensor argument; H_k for ``transpose``), each row of x loaded once. Products by ±1 are exact, so each output
  goes through k - 1 roundings (sequential fp32 adds, FMAs on a GPU: the same result). A plain loop rather than
  ``tl.dot``: no minimum tile size, and fp32 ``tl.dot`` defaults to TF32 on a GPU.
* H_{2^m} in registers by m constant-geometry butterfly stages: view the tile as [.., 2, 2^m/2] (halves lo, hi)
  and replace it by ``join(lo + hi, lo - hi)``, i.e. out[2j + t] = lo[j] ± hi[j]. A stage applies H_2 to the top
  bit of b and rotates b's bits left, so after m stages every bit was transformed once and the order is natural
  again: H_{2^m} = H_2 ⊗ … ⊗ H_2 (Pease's form of the FWHT). No index arithmetic, one reshape/permute pattern.
* Normalization multiplies by fp32(1/sqrt(n)); the output is rounded to nearest even by ``rounding.cast_rne``
  (the interpreter's own cast truncates to bf16; a GPU's rounds).

Limit: the whole padded row lives in one program, K·2^m = next_power_of_2(n) ≤ MAX_TILE = 32768 fp32 values
(128 KiB: 16 warps hold 64 registers a thread of it), so every supported n ≤ 32768 works and larger n raise.
Larger n would need the butterfly's top stages in a second pass through global memory; no LLM width needs it
so far. Whether 32768 runs without register spills on an H200 is for benchmarks/bench_hadamard.py to show.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ptqsuite.hadamard import base, factors, fwht
from ptqsuite_kernels.rounding import cast_rne

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TILE = 32768  # fp32 values of one program's tile: a whole row padded to a power of two
MIN_TILE = 2048  # small rows are batched into programs of at least this many values


@triton.jit(do_not_specialize=["rows", "scale"])
def _fwht(x_ptr, g_ptr, out_ptr, rows, scale, k: tl.constexpr, K: tl.constexpr, TWO_M: tl.constexpr,
          LOG_M: tl.constexpr, ROWS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None, None]
    a = tl.arange(0, K)[None, :, None]
    b = tl.arange(0, TWO_M)[None, None, :]
    first = row * (k * TWO_M)  # the row's first element

    # H_k: z[r, a, b] = sum over c of H_k[a, c] · x[r, c, b], G[c, a] = H_k[a, c] loaded a row at a time.
    z = tl.zeros([ROWS, K, TWO_M], dtype=tl.float32)
    for c in range(k):
        g = tl.load(g_ptr + c * k + a, mask=a < k, other=0.0)
        z += g * tl.load(x_ptr + first + c * TWO_M + b, mask=row < rows, other=0.0).to(tl.float32)

    # H_{2^m}: m constant-geometry stages, out[2j + t] = lo[j] + (-1)^t hi[j].
    for _ in tl.static_range(LOG_M):
        lo, hi = tl.split(tl.permute(tl.reshape(z, [ROWS, K, 2, TWO_M // 2]), [0, 1, 3, 2]))
        z = tl.reshape(tl.join(lo + hi, lo - hi), [ROWS, K, TWO_M])

    z = z * scale
    offset = first + a * TWO_M + b
    tl.store(out_ptr + offset, cast_rne(z, out_ptr.dtype.element_ty), mask=(row < rows) & (a < k))


@functools.lru_cache(maxsize=64)
def _g(k: int, transpose: bool, device: torch.device) -> torch.Tensor:
    """G with G[c, a] = M[a, c] for M = H_k (H_kᵀ if transpose): the kernel's ±1 argument, fp32, contiguous."""
    h = base(k)
    return (h if transpose else h.T).contiguous().to(device=device, dtype=torch.float32)


def kernel(x: torch.Tensor, normalize: bool = True, transpose: bool = False) -> torch.Tensor:
    """The Walsh–Hadamard transform of ``x[..., n]`` along its last dim (see ``reference``), n ≤ MAX_TILE."""
    if x.dtype not in DTYPES:
        raise TypeError(f"expected x of dtype one of {DTYPES}, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("expected a tensor with at least one dim (the transformed last dim), got a scalar")
    n = x.shape[-1]
    k, two_m = factors(n)  # ValueError naming n and the valid forms
    if triton.next_power_of_2(n) > MAX_TILE:
        raise ValueError(f"the kernel handles n up to {MAX_TILE} (a row per program), got n = {n}; "
                         f"ptqsuite.hadamard.fwht has no limit")
    x = x.contiguous()
    out = torch.empty_like(x)
    rows = x.numel() // n
    if rows == 0:
        return out
    tile = triton.next_power_of_2(k) * two_m
    per_program = min(triton.next_power_of_2(rows), max(1, MIN_TILE // tile))
    _fwht[(triton.cdiv(rows, per_program),)](
        x, _g(k, transpose, x.device), out, rows, 1 / math.sqrt(n) if normalize else 1.0,
        k=k, K=triton.next_power_of_2(k), TWO_M=two_m, LOG_M=two_m.bit_length() - 1, ROWS=per_program,
        num_warps=min(16, max(4, tile * per_program // 2048)))
    return out


def reference(x: torch.Tensor, normalize: bool = True, transpose: bool = False) -> torch.Tensor:
    """The specification: ``ptqsuite.hadamard.fwht`` (float64 arithmetic, x's dtype out)."""
    return fwht(x, normalize, transpose)
