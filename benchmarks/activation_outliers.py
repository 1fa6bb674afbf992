"""The activation outliers SmoothQuant migrates: per norm-fed group of a model's blocks, the largest input channel
magnitudes over calibration tokens against the median channel, before and after smoothing.

Usage: ``python benchmarks/activation_outliers.py [--model smollm2-135m] [--recipe smooth+rtn-w8a8sym@c4.8x512.s0]``
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="smooth+rtn-w8a8sym@c4.8x512.s0")
    p.add_argument("--top", type=int, default=3)
    args = p.parse_args(argv)
    from ptqsuite import data, models
    from ptqsuite.arch import arch_of
    from ptqsuite.recipe import parse
    from ptqsuite.transforms import smooth

    loaded = models.load(models.get(args.model), "cpu", torch.float32)
    recipe = parse(args.recipe)
    c = recipe.calibration
    calib = data.calibration(c.dataset, loaded.tokenizer, c.n, c.seqlen, c.seed)
    arch = arch_of(loaded.model)
    step = recipe.transforms[0]
    with torch.no_grad():
        state = smooth.fit(loaded.model, arch, calib, recipe, smooth.options(step), "cpu")
        smoothed = copy.deepcopy(loaded.model)
        smooth.apply(smoothed, arch, state)
        after = smooth.input_absmax(smoothed, arch, calib, "cpu")
    print(f"## input channel outliers of {args.model}'s norm-fed linears, {c} ({recipe})")
    print()
    print(f"| block.norm | top {args.top} channels: max abs | median channel | max / median | after smoothing |")
    print("|---|---|---|---|---|")
    for key, m in state.act_absmax.items():
        top = m.topk(args.top)
        ratio, ratio_after = float(m.max() / m.median()), float(after[key].max() / after[key].median())
        channels = ", ".join(f"{int(i)}: {float(v):.1f}" for v, i in zip(top.values, top.indices))
        print(f"| {key} | {channels} | {float(m.median()):.2f} | {ratio:.0f} | {ratio_after:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
