"""Low-rank compensation: add a rank-``r`` term ``A B`` to the dequantized weight that cancels as much of the
quantization error ``E = W − Ŵ`` as ``r`` allows, measured on the layer's output over the calibration inputs.

The output error of a correction ``L`` is ``‖X (E − L)ᵀ‖² ∝ tr((E − L) H (E − L)ᵀ) = ‖(E − L) C‖²_F`` with
``H = C Cᵀ`` (Cholesky, dampened as GPTQ dampens: ``H + damp · mean(diag H) · I``). By Eckart–Young the best
rank-``r`` ``L C`` is the truncated SVD of ``E C = U Σ Vᵀ``, so ``A = U_r Σ_r`` and ``B = V_rᵀ C⁻¹``. That is the
activation-scaled SVD of LQER (Zhang et al., 2024) with the full whitening of the activations' second moment instead
of LQER's diagonal scaling (the exact optimum, as QERA derives); ZeroQuant-V2's LoRC is the special case ``H = I``.
Because the truncations are nested, the error cannot grow with ``r``, and ``r = min(out, in)`` removes it.

Storage: ``A`` and ``B`` at 16 bits, ``16 · r · (out + in)`` bits per layer, counted in the effective bits per
weight. Accuracy cases fold ``A B`` into the fake-quantized weight; a deployed kernel adds ``(x Bᵀ) Aᵀ``.

Recipe: ``gptq+lrc-w4g128`` (rank 32, LQER's setting for 7B models), ``rtn+lrc8-w3``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .stats import Stats

ROLE = "compensate"
needs_calibration = True
DEFAULT_ARG = 32
FACTOR_BITS = 16


@dataclass(frozen=True)
class Options:
    rank: int = DEFAULT_ARG
    damp: float = 0.01


def options(step) -> Options:
    from . import from_step

    return from_step(step, Options, arg="rank")


def compensate(W: torch.Tensor, W_hat: torch.Tensor, stats: Stats, options: Options = Options()):
    """``(A [out, r], B [r, in])`` minimizing ``‖(W − Ŵ − A B) C‖_F``; ``r`` capped at ``min(out, in)``."""
    E = (W.float() - W_hat.float()).double()
    H = stats.H.double()
    H = H + options.damp * torch.diag(H).mean().clamp(min=torch.finfo(torch.float32).tiny) * torch.eye(
        H.shape[0], dtype=H.dtype, device=H.device)
    C = torch.linalg.cholesky(H)
    U, S, Vh = torch.linalg.svd(E @ C, full_matrices=False)
    r = min(options.rank, S.numel())
    A = U[:, :r] * S[:r]
    B = torch.linalg.solve_triangular(C, Vh[:r], upper=False, left=False)
    return A.float(), B.float()


def extra_bits(shape: tuple[int, int], options: Options) -> int:
    out, inp = shape
    return FACTOR_BITS * min(options.rank, out, inp) * (out + inp)
