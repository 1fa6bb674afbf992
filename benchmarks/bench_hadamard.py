"""Times the Triton Walsh–Hadamard kernel (ptqsuite_kernels.hadamard) against torch's dense ``x @ H.T`` on CUDA
and prints a Markdown table. A script, not a test: ``python benchmarks/bench_hadamard.py``. On a machine without
CUDA it says so and exits 0.

Both sides compute the normalized transform (H / sqrt(n), stored in x's dtype for torch). GB/s counts the
traffic every implementation needs, reading x and writing y once (2·rows·n·bytes; torch also reads H, which is
not counted); speedup is torch's time over the kernel's. Times are medians of ``triton.testing.do_bench``.
"""
from __future__ import annotations

import math
import sys

import torch

DTYPES = (torch.float16, torch.bfloat16)
ROWS = (1, 16, 4096, 16384)
SIZES = (4096, 172 * 64, 14336)  # 172·64 = 11008 (Llama-2-7B's MLP), 14336 = 28·512 (Llama-3-8B's)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_hadamard needs a CUDA device; nothing timed here.")
        return 0
    from triton.testing import do_bench

    from ptqsuite.hadamard import factors, hadamard
    from ptqsuite_kernels.hadamard import kernel

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| dtype | rows | n = k·2^m | kernel µs | kernel GB/s | x @ H.T µs | x @ H.T GB/s | speedup |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for dtype in DTYPES:
        for n in SIZES:
            h = (hadamard(n) / math.sqrt(n)).to("cuda", dtype)
            k, two_m = factors(n)
            for rows in ROWS:
                x = torch.randn(rows, n, device="cuda").to(dtype)
                ours = do_bench(lambda: kernel(x), return_mode="median") * 1e-3  # seconds
                dense = do_bench(lambda: x @ h.T, return_mode="median") * 1e-3
                traffic = 2 * x.numel() * x.element_size()
                print(f"| {str(dtype).removeprefix('torch.')} | {rows} | {n} = {k}·{two_m} | {ours * 1e6:.1f} | "
                      f"{traffic / ours / 1e9:.0f} | {dense * 1e6:.1f} | {traffic / dense / 1e9:.0f} | "
                      f"{dense / ours:.2f}× |")
            del h  # noqa: F821 (pyflakes: the lambdas above are done with it)
    return 0


if __name__ == "__main__":
    sys.exit(main())
