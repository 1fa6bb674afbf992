"""Pre-quantization transforms (ptqsuite/transforms/) end to end on a model of a real architecture's shape with
random-init weights (timing does not depend on the values), resident on one GPU (or the CPU).

For each recipe: wall time of ``pipeline.quantize`` and its phases (each transform's fit+apply, the weight solve),
peak GPU memory beyond the model, and for SpinQuant its steps, seconds per step and the loss before and after.
Calibration is ``n`` random token sequences of ``seqlen`` (cut to what each recipe id asks for).

Usage: ``python benchmarks/bench_transforms.py [--shape llama3-8b] [--recipes quarot+rtn-w4a4kv4,...]
[--device cuda] [--layers N]``
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_gptq import SHAPES, build  # noqa: E402

RECIPES = ["quarot+rtn-w4a4kv4", "smooth+rtn-w8a8@c4.128x512.s0", "awq+rtn-w4g128@c4.128x512.s0",
           "spinquant10+rtn-w4a4kv4@c4.10x2048.s0"]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=None)
    args = p.parse_args(argv)
    from ptqsuite import pipeline
    from ptqsuite.arch import arch_of
    from ptqsuite.recipe import parse

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    base_model = build(args.shape, args.layers, dtype, args.device if cuda else "cpu").to(args.device)
    layers = base_model.config.num_hidden_layers
    print(f"## transforms on a {args.shape}-shaped model ({layers} layers, {dtype}), {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    print()
    print("| recipe | end to end s | transform s | weights s | peak GiB beyond the model | notes |")
    print("|---|---|---|---|---|---|")
    for recipe_id in args.recipes.split(","):
        recipe = parse(recipe_id)
        c = recipe.calibration
        calib = torch.randint(0, base_model.config.vocab_size, (c.n, c.seqlen), generator=torch.Generator().manual_seed(0))
        model = copy.deepcopy(base_model)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        report = pipeline.quantize(model, recipe, arch_of(model), calib if recipe.needs_calibration else None,
                                   device=args.device)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
        transform = sum(v for k, v in report.timings.items() if k.startswith("transform"))
        notes = ""
        for step, state in report.transforms.items():
            if hasattr(state, "losses") and isinstance(state.losses, tuple):
                notes = (f"{len(state.losses)} steps of 1 x {c.seqlen} tokens, {state.seconds / len(state.losses):.2f} "
                         f"s/step; held-out loss {state.held_out[0]:.4f} -> {state.held_out[1]:.4f}")
        print(f"| {recipe_id} | {wall:.1f} | {transform:.1f} | {wall - transform:.1f} | {peak:.2f} | {notes} |",
              flush=True)
        del model, report
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
