"""End-to-end GPTQ through the sequential pipeline (ptqsuite/pipeline.py) on a model of a real architecture's shape
with random-init weights (timing does not depend on the values), on one GPU or the CPU.

The model stays on the CPU in bf16 (fp32 on a CPU run) and only the block being quantized moves to the compute
device, as it would for a model too large for the GPU; calibration is ``n`` random token sequences of ``seqlen``.
Reports wall time end to end (capture to the last block back on the CPU), the pipeline's time per phase
(capture, calibration forwards, Hessian accumulation, solve), and peak GPU memory: total, and beyond the
calibration activations (two streams of ``n · seqlen · hidden`` in the model dtype, block inputs and outputs) in
units of one decoder layer's bf16 weights.

Usage: ``python benchmarks/bench_gptq.py [--shape llama3-8b|smollm2-135m] [--recipe gptq-w4g128] [--n 128]
[--seqlen 2048] [--device cuda] [--layers N]`` (``--layers`` shortens the model; time scales per layer).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

SHAPES = {
    # Llama-3-8B: GQA 4:1, SwiGLU 3.5x, 128k vocabulary
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    # SmolLM2-135M (ptqsuite/assets/models/smollm2-135m-instruct/config.json)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--recipe", default="gptq-w4g128")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--resident", action="store_true", help="keep the whole model on the compute device")
    return p.parse_args(argv)


def build(shape: str, layers: int | None, dtype: torch.dtype, init_device: str) -> torch.nn.Module:
    """Random-init model on the CPU; weights drawn on ``init_device`` (a GPU draws 8B normals in a second)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    kwargs = dict(SHAPES[shape], hidden_act="silu", rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    if layers:
        kwargs["num_hidden_layers"] = layers
    config = LlamaConfig(**kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device="cpu")
    gen = torch.Generator(device=init_device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                std = 1.0 if "embed" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen, device=init_device, dtype=dtype) * std)
    for name, module in list(model.named_modules()):  # non-persistent buffers (rotary inv_freq): left empty by to_empty
        if "inv_freq" in dict(module.named_buffers(recurse=False)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, type(module)(config=model.config))
    return model.eval().requires_grad_(False)


def main(argv: list[str]) -> int:
    args = parse(argv)
    from ptqsuite import pipeline
    from ptqsuite.arch import arch_of
    from ptqsuite.recipe import parse as parse_recipe

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    t = time.perf_counter()
    model = build(args.shape, args.layers, dtype, args.device if cuda else "cpu")
    if args.resident:
        model.to(args.device)
    build_s = time.perf_counter() - t
    recipe = parse_recipe(args.recipe)
    calib = torch.randint(0, model.config.vocab_size, (args.n, args.seqlen), generator=torch.Generator().manual_seed(0))
    arch = arch_of(model)
    layer_bytes = sum(p.numel() * 2 for p in arch.block_list(model)[0].parameters())
    activations = 2 * args.n * args.seqlen * model.config.hidden_size * (2 if cuda else 4)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    report = pipeline.quantize(model, recipe, arch, calib, device=args.device)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    layers = model.config.num_hidden_layers
    print(f"## {args.recipe} on a {args.shape}-shaped model ({layers} layers), {args.n} x {args.seqlen} calibration "
          f"tokens, {args.device}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    print()
    print("| phase | seconds | share |")
    print("|---|---|---|")
    for phase, s in sorted(report.timings.items(), key=lambda kv: -kv[1]):
        print(f"| {phase} | {s:.1f} | {s / wall:.0%} |")
    print(f"| **end to end** | **{wall:.1f}** | {wall / layers:.2f} s per layer |")
    print()
    print(f"model build (random init, not counted): {build_s:.1f} s; effective bits per weight: "
          f"{report.bits_per_weight:.3f}")
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        beyond = peak - activations
        print(f"peak GPU memory: {peak / 2**30:.2f} GiB; calibration activations {activations / 2**30:.2f} GiB; "
              f"beyond them {beyond / 2**30:.2f} GiB = {beyond / layer_bytes:.2f} decoder layers "
              f"({layer_bytes / 2**30:.2f} GiB each in bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
