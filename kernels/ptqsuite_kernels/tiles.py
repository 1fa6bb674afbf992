"""Triton helpers for how the GEMM kernels map programs to output tiles and K ranges."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_offsets(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets of program ``pid``'s ``[BLOCK_M, BLOCK_N]`` output tile. Launch order: bands of
    GROUP_M row tiles, column tile by column tile, so neighbouring programs share weight and x tiles in L2."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * tiles_n)
    first_m = band * GROUP_M
    band_m = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % band_m
    pid_n = (pid % (GROUP_M * tiles_n)) // band_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def split_k_range(pid_k, k_tiles_per_split, K, BLOCK_K: tl.constexpr):
    """The ``[start, end)`` of K that split ``pid_k`` accumulates."""
    start = pid_k * k_tiles_per_split * BLOCK_K
    return start, min(K, start + k_tiles_per_split * BLOCK_K)
