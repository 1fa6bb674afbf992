"""The architecture layer: what is where in each model family, as data (``base.Arch``), one entry per family.

Methods ask this package, never hard-code module names. Adding an architecture is an entry in one of these modules
(plus its models in the registry); an entry whose modules need restructuring first says so in ``prepare``.
"""
from __future__ import annotations

from torch import nn

from .base import EXPERT, Arch, LinearGroup
from .dense import GEMMA, LLAMA
from .llava import LLAVA
from .mamba import MAMBA
from .moe import MIXTRAL, QWEN2_MOE

ARCHS: dict[str, Arch] = {a.name: a for a in (LLAMA, GEMMA, MIXTRAL, QWEN2_MOE, MAMBA, LLAVA)}

__all__ = ["ARCHS", "EXPERT", "Arch", "LinearGroup", "arch_of", "get", "param_count"]


def get(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}") from None


def arch_of(model: nn.Module) -> Arch:
    model_type = model.config.model_type
    for arch in ARCHS.values():
        if model_type in arch.model_types:
            return arch
    supported = sorted(t for a in ARCHS.values() for t in a.model_types)
    raise NotImplementedError(f"no architecture adapter for model_type {model_type!r}; supported: {', '.join(supported)}")


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
