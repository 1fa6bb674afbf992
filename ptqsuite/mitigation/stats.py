"""What calibration collects for a linear layer: its inputs' Hessian ``H = 2 XᵀX / n`` (rows of ``X`` are tokens),
the quadratic form of the layer's output error: ``‖X Eᵀ‖² = n/2 · Σ_rows e H eᵀ`` for a weight error ``E``."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

GRAM_COLUMNS = 2048  # columns of H added per product: the temporary is [in, 2048], not a second [in, in]


@dataclass
class Stats:
    H: torch.Tensor  # fp32 [in, in]
    n: int  # tokens seen
    derived: dict = field(default_factory=dict)  # what steps compute from H once per layer group (GPTQ's H⁻¹ factor)
    last_use: bool = False  # the caller needs H no more after the first step that takes it (take_H)

    @classmethod
    def identity(cls, columns: int, device: torch.device | str = "cpu") -> "Stats":
        """The Hessian of inputs with uncorrelated unit-variance channels, ``I``: the stand-in where calibration
        saw too few tokens (see pipeline's MoE note). A solver's error weighting becomes plain weight error."""
        return cls(torch.eye(columns, device=device, dtype=torch.float32), 0)

    def take_H(self) -> torch.Tensor:
        """H to overwrite: itself when nothing reads it afterwards (saves a copy: 0.77 GiB for a 14336-wide fp32
        H), else a copy."""
        if self.last_use:
            H, self.H = self.H, None
            return H
        return self.H.clone()

    def cached(self, key, compute):
        """``compute()``, once per ``key``: linears that share an input (q/k/v), or one solved in row slices,
        share the matrices derived from their Hessian."""
        if key not in self.derived:
            self.derived[key] = compute()
        return self.derived[key]


class Hessian:
    """The running mean of ``2 x xᵀ`` over a layer's inputs, batch by batch."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.n = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1])
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        for j in range(0, x.shape[1], GRAM_COLUMNS):
            self.H[:, j:j + GRAM_COLUMNS].add_(gram(x, x[:, j:j + GRAM_COLUMNS]), alpha=2 / self.n)

    def stats(self) -> Stats:
        return Stats(self.H, self.n)


def gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``xᵀ y`` in fp32. On CUDA, bf16/fp16 inputs go to the tensor cores with fp32 output: their products are exact in
    fp32 and the sum accumulates in fp32, as the upcast fp32 product would (only the summation order differs),
    without an fp32 copy of ``x`` or fp32 GEMM speed."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _HALF_GRAM[0]:
        try:
            return torch.mm(x.T, y, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without out_dtype for this op
            _HALF_GRAM[0] = False
    return x.T.float() @ y.float()


def half_gram_available() -> bool:
    """Whether bf16/fp16 Hessians use the tensor cores (False once torch refused ``out_dtype``)."""
    return _HALF_GRAM[0]


_HALF_GRAM = [True]
