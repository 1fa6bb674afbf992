"""Perplexity speed: the GPTQ protocol's whole splits (WikiText-2, C4, PTB) on one model, seconds per split.

    python benchmarks/bench_ppl.py [--model smollm2-135m] [--device cuda] [--dtype bfloat16]

Prints a Markdown table (benchmarks/results/ppl_h200.md holds the H200 numbers).
"""
from __future__ import annotations

import argparse
import time

import torch

from ptqsuite import data, models
from ptqsuite.eval import ppl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    loaded = models.load(models.get(args.model), args.device, getattr(torch, args.dtype))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"## perplexity, {args.model} ({args.dtype}), {name}, default batch size\n")
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
