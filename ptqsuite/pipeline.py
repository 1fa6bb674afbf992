"""Apply a recipe to a model: the one place that walks blocks and swaps in quantized weights.

Weights are fake-quantized: each linear's weight is replaced by its dequantized codes in the model's dtype, which
is what the accuracy cases evaluate. (A bf16 model rounds ``s · (q - z)`` to bf16; the fp16-scale grid itself is
exact.) Calibration-driven methods add the block-by-block capture loop here: the mitigation interface already
takes the statistics they need.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .arch import Arch
from .mitigation import METHODS
from .recipe import Recipe


@dataclass(frozen=True)
class QuantReport:
    linears: int
    quantized_params: int
    bits_per_weight: float  # over quantized linears, scales and zero points included
    model_bytes: int  # quantized linears at their effective bits, every other parameter at 16 bits

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def quantize(model: torch.nn.Module, recipe: Recipe, arch: Arch, progress=None) -> QuantReport:
    method = METHODS[recipe.method]
    if method.needs_calibration:
        raise NotImplementedError(f"method {recipe.method!r} needs calibration, which this pipeline does not run yet")
    spec = recipe.weight
    total_params = sum(p.numel() for p in model.parameters())
    linears = arch.quantizable(model)
    bits = 0.0
    for i, (name, linear) in enumerate(linears):
        W = linear.weight.data
        if spec.fmt is not None:
            linear.weight.data = method.solve(W.float(), None, spec).dequantize(W.dtype)
        bits += W.numel() * (spec.fmt.bits_per_element(tuple(W.shape), spec.gran) if spec.fmt else 16)
        if progress:
            progress(i + 1, len(linears), name)
    qparams = sum(linear.weight.numel() for _, linear in linears)
    return QuantReport(
        linears=len(linears), quantized_params=qparams, bits_per_weight=bits / qparams,
        model_bytes=round((bits + 16 * (total_params - qparams)) / 8),
    )
