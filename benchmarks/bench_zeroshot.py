"""Zero-shot evaluation through lm-eval (ptqsuite.eval.lmeval): seconds and examples per second per task, with the
accuracies, for one model on the CPU or a GPU.

Each task is first run on 2 examples (not reported), so the table times a warm ``datasets`` cache and the model's
first-call overheads are paid; a task's seconds then cover building its requests and scoring them.

``--random-init`` builds the model from its shipped config and tokenizer with random weights: for timing on a
machine without the weights (SmolLM2's come from the package registry); its accuracies mean nothing.

Usage: ``python benchmarks/bench_zeroshot.py [--model smollm2-135m] [--device cpu|cuda] [--n 200|all]
[--tasks piqa,...] [--batch-sizes 8[,32,..]] [--threads N] [--random-init]``
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def random_init(name: str, device: str, dtype: torch.dtype):
    """The model's architecture and tokenizer from ptqsuite/assets/models, with seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ptqsuite import models
    from ptqsuite.paths import ASSETS
    from ptqsuite.weights import copy_assets

    source = models.get(name).source
    folder = ASSETS / "models" / getattr(source, "assets", source)
    tmp = Path(tempfile.mkdtemp())
    copy_assets(folder, tmp)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp), dtype=dtype).to(device).eval()
    return models.Loaded(models.get(name), model, AutoTokenizer.from_pretrained(tmp), f"random-init:{name}")


def main(argv: list[str]) -> int:
    from ptqsuite import models
    from ptqsuite.eval import lmeval

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--n", default="200", help="examples per task (a seeded subset), or 'all'")
    p.add_argument("--tasks", default=",".join(lmeval.TASKS))
    p.add_argument("--batch-sizes", default=None, help="comma-separated, one table block each (default: lmeval's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--random-init", action="store_true", help="random weights (timing only)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.bfloat16 if cuda else torch.float32
    n = None if args.n == "all" else int(args.n)
    names = args.tasks.split(",")

    t = time.perf_counter()
    if args.random_init:
        loaded = random_init(args.model, args.device, dtype)
    else:
        loaded = models.load(models.get(args.model), args.device, dtype)
    load_s = time.perf_counter() - t
    lmeval.zeroshot(loaded.model, loaded.tokenizer, {name: 2 for name in names})  # warm-up, not reported
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    weights = "RANDOM weights: accuracies mean nothing" if args.random_init else f"model load {load_s:.1f} s"
    print(f"## lm-eval zero-shot, {args.model} ({dtype}), {where}; {weights}")
    print()
    print("| task | batch | n | seconds | examples/s | acc | acc_norm | perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    default = lmeval.default_batch_size(loaded.model)
    for batch_size in (int(b) for b in args.batch_sizes.split(",")) if args.batch_sizes else [default]:
        for name in names:  # one call per task, so each row prints as soon as it is measured
            size = None if n is None or n >= lmeval.task_data.size(name) else n  # openbookqa has 500
            r = lmeval.zeroshot(loaded.model, loaded.tokenizer, {name: size}, batch_size=batch_size)[name]
            m = r.metrics
            cells = [f"{m[k]:.4f}" if k in m else "" for k in ("acc", "acc_norm")]
            cells.append(f"{m['perplexity']:.2f}" if "perplexity" in m else "")
            print(f"| {name} | {batch_size} | {r.n} | {r.seconds:.1f} | {r.examples_per_second:.2f} | "
                  + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
