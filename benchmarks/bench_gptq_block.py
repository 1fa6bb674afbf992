"""Benchmark one block of GPTQ's inner loop on CUDA: the Triton kernel (ptqsuite_kernels.gptq_block) against the
torch loop it replaces (``gptq.block_reference`` on the same device, ~15 small kernels per column).

For R weight rows (Llama-3-8B's 4096, gate/up's 14336, and 28672) and a block of B = 128 columns, in INT4 g128
asymmetric and MXFP4 (``--formats`` adds nvfp4, fp8): ``W1`` N(0, 0.02²), ``Hinv1`` the upper Cholesky factor of a
damped random SPD Hessian's inverse (``gptq._inverse_cholesky``), the format's fit gathered per column as GPTQ
passes them.

Columns: median time per block (triton.testing.do_bench, µs), speedup, GB/s (``W1`` read, ``Q1`` and ``Err1``
written, the per-column parameters read, once), and two checks: the kernel against the reference computed on the
CPU (the specification; bitwise, NaN as NaN), and whether torch's loop on CUDA equals its CPU run bitwise (if not,
torch on CUDA is the one off: the kernel is compared against the CPU). A second table times the kernel's tilings
(rows per program, warps) to choose ``gptq_block.BLOCK_R`` / ``NUM_WARPS``; ``--no-sweep`` skips it.

Usage: ``python benchmarks/bench_gptq_block.py [--rows 4096,14336,28672] [--block 128] [--formats int4-g128,mxfp4]
[--no-sweep]``. Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys

import torch

ROWS = [4096, 14336, 28672]
BLOCK = 128
FORMATS = ["int4-g128", "mxfp4"]
# (rows a program, warps): 4 rows a warp compiles without barriers (PTX, triton 3.6 and 3.9); 2 rows a warp give a
# small R more warps. Few: each is a compile (the bench step of gpu_session.sh has 170 s per script).
TILINGS = [(16, 4), (8, 4), (4, 1), (32, 8)]
DEVICE = "cuda"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="weight rows R, comma-separated")
    p.add_argument("--block", type=int, default=BLOCK, help="block columns B")
    p.add_argument("--formats", default=",".join(FORMATS), help="int4-g128, mxfp4, nvfp4, fp8 (comma-separated)")
    p.add_argument("--no-sweep", action="store_true", help="skip the tiling table")
    args = p.parse_args(argv)
    args.rows = [int(r) for r in args.rows.split(",")]
    args.formats = args.formats.split(",")
    return args


def formats() -> dict:
    from ptqsuite.formats import FP8, MXFP4, NVFP4, IntFormat
    from ptqsuite.granularity import PerChannel, PerGroup
    return {"int4-g128": (IntFormat(4), PerGroup(128)), "mxfp4": (MXFP4, PerGroup(32)),
            "nvfp4": (NVFP4, PerGroup(16)), "fp8": (FP8, PerChannel())}


def inputs(rows: int, block: int, fmt, gran) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    from ptqsuite.granularity import PerGroup, to_groups
    from ptqsuite.mitigation import gptq
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    W1 = torch.randn(rows, block, device=DEVICE, generator=gen) * 0.02
    X = torch.randn(4 * block, block, device=DEVICE, generator=gen)
    X = X @ (torch.eye(block, device=DEVICE) + 0.3 * torch.randn(block, block, device=DEVICE, generator=gen))
    Hinv1 = gptq._inverse_cholesky(2 * X.T @ X / X.shape[0], 0.01)
    full = fmt.fit(to_groups(W1, gran))
    group = gran.n if isinstance(gran, PerGroup) else block
    index = torch.arange(block, device=DEVICE) // group
    return W1, Hinv1, tuple(p[:, index] if gptq._per_group(p) else p for p in full)


def same(actual: tuple, expected: tuple) -> str:
    """"ok" if bitwise equal (NaN as NaN), else how many elements differ."""
    differ = 0
    for a, b in zip(actual, expected):
        a, b = a.cpu().contiguous(), b.cpu().contiguous()
        nan = a.isnan() | b.isnan()
        differ += int(((a.view(torch.int32) != b.view(torch.int32)) & ~nan).sum() + (a.isnan() != b.isnan()).sum())
    return "ok" if differ == 0 else f"FAIL ({differ} differ)"


def median_us(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, return_mode="median") * 1e3


def run(args: argparse.Namespace) -> None:
    import triton

    from ptqsuite.mitigation.gptq import block_reference
    from ptqsuite_kernels import gptq_block

    table = formats()
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}, tiling {gptq_block.BLOCK_R} rows x "
          f"{gptq_block.NUM_WARPS} warps, exact_div {gptq_block.EXACT_DIV}\n")
    print("| R | B | format | kernel µs | torch loop µs | speedup | GB/s | kernel = CPU reference | "
          "torch CUDA = CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    sweep = []
    for rows in args.rows:
        for name in args.formats:
            fmt, gran = table[name]
            W1, Hinv1, params = inputs(rows, args.block, fmt, gran)
            cpu = block_reference(W1.cpu(), Hinv1.cpu(), fmt, tuple(p if p is None else p.cpu() for p in params))
            check = same(gptq_block.kernel(W1, Hinv1, fmt, params), cpu)
            torch_check = same(block_reference(W1, Hinv1, fmt, params), cpu)
            us_kernel = median_us(lambda: gptq_block.kernel(W1, Hinv1, fmt, params))
            us_torch = median_us(lambda: block_reference(W1, Hinv1, fmt, params))
            moved = 4 * rows * args.block * (3 + sum(p.dim() == 3 for p in params if p is not None))
            print(f"| {rows} | {args.block} | {name} | {us_kernel:.1f} | {us_torch:.1f} | {us_torch / us_kernel:.1f}x "
                  f"| {moved / us_kernel * 1e-3:.0f} | {check} | {torch_check} |", flush=True)
            if not args.no_sweep:  # each tiling checked too: a miscompile of one shape would show here
                cells = []
                for r, w in TILINGS:
                    tiled = same(gptq_block.launch(W1, Hinv1, fmt, params, block_rows=r, num_warps=w), cpu)
                    us = median_us(lambda: gptq_block.launch(W1, Hinv1, fmt, params, block_rows=r, num_warps=w))
                    cells.append(f"{us:.1f}" + ("" if tiled == "ok" else f" {tiled}"))
                sweep.append(f"| {rows} | {name} | " + " | ".join(cells) + " |")
            torch.cuda.empty_cache()
    if sweep:
        print("\nKernel µs by tiling (rows per program x warps):\n")
        print("| R | format | " + " | ".join(f"{r}x{w}" for r, w in TILINGS) + " |")
        print("|---|---|" + "---|" * len(TILINGS))
        print("\n".join(sweep))


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("bench_gptq_block needs a CUDA device (timings of the interpreter mean nothing); nothing to do.")
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
