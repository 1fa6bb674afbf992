"""LLaVA (``LlavaForConditionalGeneration``): a CLIP vision tower and a two-layer MLP projector in front of a Llama
language model, whose blocks are quantized exactly as a Llama's (``dense.LLAMA``'s groups).

The vision tower and the projector are no blocks of this entry, so no recipe quantizes them: they stay in high
precision (in LLaVA-1.5-7B about 0.3B of the 7B weights). Calibration is text: a forward with ``input_ids`` alone
never runs the vision tower, so block 0's inputs are the token embeddings and rotary tables (the prologue), as for
a Llama.

The projector's output is written into the language model's residual stream in place of the image tokens'
embeddings (``stream_inputs``): a rotation of the stream (QuaRot, SpinQuant) rotates its last linear's outputs as it
rotates the embedding, so images still reach the rotated model as what they were. That is a function-preserving
rewrite in full precision, not a quantization.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .dense import LLAMA

LANGUAGE_MODEL = "model.language_model"


def _init(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
    """Random-init overrides for the vision tower: the rest follows models.build_random's rules."""
    if name.endswith("patch_embedding.weight"):  # a conv [out, channels, k, k]: fan-in is all but the first dim
        return torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5
    if name.endswith("class_embedding"):  # CLIP's CLS token: a learned vector, not a norm gain of ones
        return torch.randn(p.shape, generator=gen)
    return None


LLAVA = replace(
    LLAMA,
    name="llava",
    model_types=("llava",),
    blocks=f"{LANGUAGE_MODEL}.layers",
    embed=f"{LANGUAGE_MODEL}.embed_tokens",
    final_norm=f"{LANGUAGE_MODEL}.norm",
    prologue=(f"{LANGUAGE_MODEL}.embed_tokens", f"{LANGUAGE_MODEL}.rotary_emb"),
    stream_inputs=("model.multi_modal_projector.linear_2",),
    text_config="text_config",
    loader="AutoModelForImageTextToText",
    init=_init,
    notes="vision tower and projector kept in high precision; calibrated on text",
)
