"""Benchmark the packed INT GEMMs on CUDA against cuBLAS fp16 and against "dequantize, then matmul".

Methods, for Llama-3-8B linear shapes ``(K, N)`` and token counts ``M``:

* ``fp16 cuBLAS``: ``x @ W.T`` with the unquantized fp16 weight (the baseline of every speedup);
* ``W4A16 g128 sym`` / ``W4A16 g128 asym`` / ``W8A16 per-channel``: ptqsuite_kernels.int_gemm on packed weights;
* ``W8A8``: ptqsuite_kernels.int8_gemm on pre-quantized int8 activations, and ``W8A8 + act quant`` including the
  per-token activation quantization kernel (ptqsuite_kernels.act_quant);
* each quantized method also as ``dequant+matmul``: the weight decoded by torch from its stored form on every call,
  then cuBLAS fp16.

Columns: median time (triton.testing.do_bench), TFLOP/s (``2·M·N·K / t``), effective weight GB/s (bytes of the
stored weight, scales and zero points included, per second: the roofline of small M), speedup over cuBLAS fp16 and
over dequant+matmul, and a correctness check of the kernel against its reference on the same inputs (int_gemm:
within the derived bound; W8A8: bitwise, for M ≤ 16 where the CPU reference is quick).

Usage: ``python benchmarks/bench_int_gemm.py [--m 1,16,128,2048] [--shapes 4096x4096,4096x14336]``. Without CUDA it
says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 6144)]  # (K, N): o_proj, gate/up, down, qkv
TOKENS = [1, 16, 128, 2048]
CHECK_W8A8_UP_TO = 16


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", default=",".join(map(str, TOKENS)), help="token counts, comma-separated")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN, comma-separated")
    args = p.parse_args(argv)
    args.m = [int(m) for m in args.m.split(",")]
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    return args


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Bench:
    """Times methods for one (M, K, N) and prints their Markdown rows."""

    def __init__(self, m: int, k: int, n: int, baseline_ms: float):
        self.m, self.k, self.n, self.baseline_ms = m, k, n, baseline_ms

    def row(self, name: str, ms: float, weight_bytes: int, dequant_ms: float | None, check: str) -> str:
        tflops = 2 * self.m * self.n * self.k / ms * 1e-9
        gbs = weight_bytes / ms * 1e-6
        vs_dequant = f"{dequant_ms / ms:.2f}x" if dequant_ms else "-"
        return (f"| {self.k} | {self.n} | {self.m} | {name} | {ms * 1e3:.1f} | {tflops:.1f} | {gbs:.0f} | "
                f"{self.baseline_ms / ms:.2f}x | {vs_dequant} | {check} |")


def median_ms(fn: Callable[[], torch.Tensor]) -> float:
    from triton.testing import do_bench
    return do_bench(fn, return_mode="median")


def run(args: argparse.Namespace) -> None:
    from ptqsuite.formats import IntFormat
    from ptqsuite.formats.packing import pack_qtensor
    from ptqsuite.granularity import PerChannel, PerGroup
    from ptqsuite_kernels import act_quant, int8_gemm, int_gemm

    int8_act = IntFormat(8, symmetric=True, scale_dtype=torch.float32)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| K | N | M | method | µs | TFLOP/s | weight GB/s | vs fp16 cuBLAS | vs dequant+matmul | check |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, n in args.shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen) * 0.02
        packed = {
            "W4A16 g128 sym": pack_qtensor(IntFormat(4, symmetric=True).quantize(w, PerGroup(128))),
            "W4A16 g128 asym": pack_qtensor(IntFormat(4).quantize(w, PerGroup(128))),
            "W8A16 per-channel": pack_qtensor(IntFormat(8, symmetric=True).quantize(w, PerChannel())),
        }
        wq8 = IntFormat(8, symmetric=True).quantize(w, PerChannel())
        wq, ws = wq8.codes.reshape(n, k).to(torch.int8), wq8.scale.reshape(n, 1)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            base = median_ms(lambda: x @ w.T)
            bench = Bench(m, k, n, base)
            print(bench.row("fp16 cuBLAS", base, nbytes(w), None, "-"))
            for name, p in packed.items():
                ms = median_ms(lambda: int_gemm.kernel(x, p))
                dequant = median_ms(lambda: x @ p.dequantize(torch.float16).T)
                ok = int_gemm.within(int_gemm.kernel(x, p), int_gemm.exact(x, p), int_gemm.error_bound(x, p)).all()
                print(bench.row(name, ms, nbytes(p.qweight, p.scales, p.zeros), dequant, "ok" if ok else "FAIL"))
            xq, xs = act_quant.kernel(x, int8_act)
            ms = median_ms(lambda: int8_gemm.kernel(xq, xs, wq, ws, torch.float16))
            fused = median_ms(lambda: int8_gemm.kernel(*act_quant.kernel(x, int8_act), wq, ws, torch.float16))
            dequant = median_ms(lambda: x @ (ws * wq.float()).half().T)
            check = "-"
            if m <= CHECK_W8A8_UP_TO:
                same = torch.equal(int8_gemm.kernel(xq, xs, wq, ws, torch.float16).view(torch.int16),
                                   int8_gemm.reference(xq, xs, wq, ws, torch.float16).view(torch.int16))
                check = "ok" if same else "FAIL"
            print(bench.row("W8A8", ms, nbytes(wq, ws), dequant, check))
            print(bench.row("W8A8 + act quant", fused, nbytes(wq, ws), dequant, "-"))
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("bench_int_gemm needs a CUDA device (timings of the interpreter mean nothing); nothing to do.")
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
