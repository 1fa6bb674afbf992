"""Timings of the scaled-float kernels on a CUDA device (a script, not a test): ``python benchmarks/bench_fp4.py``.

* Quantization (ptqsuite_kernels.float_quant): FP8 per token on activations ``[M, 4096]``, MXFP4 and NVFP4 on the
  Llama-3-8B linear weight shapes, against torch eager ``fmt.quantize`` on the same device. GB/s counts the bytes
  read and written once: x, codes (one byte per element), scales.
* FP4 GEMM (ptqsuite_kernels.fp4_gemm): ``y = x @ Ŵᵀ`` for ``(K, N)`` in (4096, 4096), (4096, 14336), (14336, 4096)
  and M in 1, 16, 128, 2048, against torch's fp16/bf16 matmul with a dense weight. TFLOP/s is ``2·M·N·K / t``;
  GB/s counts x, the packed weight (codes, scale codes) and y once.

Times are medians of ``triton.testing.do_bench`` (ms). Each kernel is checked against its reference on a small
slice before it is timed. Prints Markdown tables; on a machine without CUDA it says so and exits with status 0.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ptqsuite.formats import FP8, MXFP4, NVFP4
from ptqsuite.granularity import PerGroup, PerToken

TOKENS = [1, 16, 128, 2048]
HIDDEN = 4096
# Llama-3-8B linear weights [out, in]: q/o, k/v (GQA), gate/up, down.
WEIGHTS = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
GEMMS = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N)
FP4 = {"mxfp4": (MXFP4, 32), "nvfp4": (NVFP4, 16)}
DEVICE = "cuda"


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def check_quantize(x: torch.Tensor, fmt, gran) -> None:
    from ptqsuite_kernels.float_quant import kernel, reference
    small = x[:4].contiguous()
    for a, b in zip(kernel(small, fmt, gran), reference(small, fmt, gran)):
        if a is not None and not torch.equal(a, b):
            sys.exit(f"float_quant differs from its reference for {fmt} {gran}: not timing a wrong kernel")


def quantize_rows(dtype: torch.dtype) -> list[list[str]]:
    from ptqsuite_kernels.float_quant import kernel
    cases = [("fp8 per-token", FP8, PerToken(), (m, HIDDEN)) for m in TOKENS]
    cases += [(f"{name} {w}", fmt, PerGroup(g), shape) for name, (fmt, g) in FP4.items()
              for w, shape in WEIGHTS.items()]
    rows = []
    for label, fmt, gran, shape in cases:
        x = torch.randn(shape, device=DEVICE, dtype=dtype)
        check_quantize(x, fmt, gran)
        t = bench(lambda: kernel(x, fmt, gran))
        t_torch = bench(lambda: fmt.quantize(x, gran))
        groups = shape[0] * (1 if isinstance(gran, PerToken) else -(-shape[1] // gran.n))
        moved = x.numel() * (x.element_size() + 1) + 4 * groups
        rows.append([label, f"{shape[0]}x{shape[1]}", f"{t * 1e3:.1f}", f"{moved / t / 1e6:.0f}",
                     f"{t_torch * 1e3:.1f}", f"{t_torch / t:.1f}x"])
    return rows


def gemm_rows(dtype: torch.dtype) -> list[list[str]]:
    from ptqsuite_kernels.fp4_gemm import error_bound, exact, linear, pack_weight
    from ptqsuite_kernels.int_gemm import within
    rows = []
    for k, n in GEMMS:
        w = torch.randn(n, k, device=DEVICE) * 0.02
        dense = w.to(dtype)
        for name, (fmt, g) in FP4.items():
            packed = pack_weight(fmt.quantize(w, PerGroup(g)))
            for m in TOKENS:
                x = torch.randn(m, k, device=DEVICE, dtype=dtype)
                if m == TOKENS[0] and not within(linear(x, packed), exact(x, packed), error_bound(x, packed)).all():
                    sys.exit(f"fp4_gemm is outside its error bound for {name} K={k} N={n}: not timing it")
                t = bench(lambda: linear(x, packed))
                t_torch = bench(lambda: x @ dense.T)
                moved = packed.storage_bits() / 8 + (m * k + m * n) * x.element_size()
                rows.append([name, str(m), str(k), str(n), f"{t * 1e3:.1f}", f"{2 * m * n * k / t / 1e9:.1f}",
                             f"{moved / t / 1e6:.0f}", f"{t_torch * 1e3:.1f}", f"{t_torch / t:.2f}x"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="activation dtype")
    parser.add_argument("--only", choices=["quantize", "gemm"], help="run one of the two tables")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_fp4 times CUDA kernels and needs a CUDA device; none here, nothing to do.")
        return
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}, activations {args.dtype}, torch {torch.__version__}")
    if args.only in (None, "quantize"):
        table("Quantization (float_quant) vs torch eager fmt.quantize",
              ["format", "shape", "time µs", "GB/s", "torch µs", "speedup"], quantize_rows(dtype))
    if args.only in (None, "gemm"):
        table(f"FP4 GEMM (fp4_gemm.linear) vs torch {args.dtype} matmul",
              ["format", "M", "K", "N", "time µs", "TFLOP/s", "GB/s", f"torch {args.dtype} µs", "speedup"],
              gemm_rows(dtype))


if __name__ == "__main__":
    main()
