"""Perplexity speed: the GPTQ protocol's whole splits (WikiText-2, C4, PTB) on one model, seconds per split.

    python benchmarks/bench_ppl.py [--model smollm2-135m] [--device cuda] [--dtype bfloat16]
                                   [--recipe rtn-w4a4 [--torch-fake]]

``--recipe`` quantizes the model first (recipes without calibration); ``--torch-fake`` computes its dynamic
activation and KV-cache fake quantization with torch instead of the Triton kernels (activations.fused_fake), the
comparison that motivated them. Prints a Markdown table (benchmarks/results/ppl_h200.md holds the H200 numbers).
"""
from __future__ import annotations

import argparse
import time

import torch

from ptqsuite import activations, data, models, pipeline
from ptqsuite.arch import arch_of
from ptqsuite.eval import ppl
from ptqsuite.recipe import parse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--recipe", default=None, help="quantize with this recipe first (no calibration)")
    parser.add_argument("--torch-fake", action="store_true", help="torch, not the Triton kernels, fake-quantizes "
                        "activations and the KV cache")
    args = parser.parse_args()
    loaded = models.load(models.get(args.model), args.device, getattr(torch, args.dtype))
    if args.recipe:
        pipeline.quantize(loaded.model, parse(args.recipe), arch_of(loaded.model))
    if args.torch_fake:
        activations.fused_fake = lambda fmt, gran: None  # what activations.fake looks up on every call
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    what = f"{args.recipe} ({'torch' if args.torch_fake else 'Triton'} fake quantization)" if args.recipe else "fp"
    print(f"## perplexity, {args.model} {what} ({args.dtype}), {name}, default batch size\n")
    print("| split | windows | seconds | ppl |\n|---|---|---|---|")
    for dataset in ("wikitext2", "c4", "ptb"):
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        r = ppl.perplexity(loaded.model, loaded.tokenizer, data.eval_text(dataset))
        sync()
        print(f"| {dataset} | {r.windows} | {time.perf_counter() - start:.2f} | {r.ppl:.3f} |")


if __name__ == "__main__":
    main()
