"""QuaRot (Ashkboos et al., 2024): rotations that spread outliers, fused into the weights where they cancel.

With every RMSNorm's gain folded into the linears that read it (``fold_norm``), RMSNorm commutes with any
rotation of the residual stream (``‖x Q‖ = ‖x‖``), so the whole stream can be carried as ``x Q``:

* R1, the residual stream, a randomized Hadamard ``Q = H diag(±1)/√n`` (seeded): the embedding writes ``E Q``,
  every linear reading the stream has ``W ← W Q``, every linear writing to it ``W ← Qᵀ W`` (bias ``b Q``), and the
  head reads ``W Q``;
* R2, per head, a Hadamard over head_dim: V is produced rotated (``v_proj`` rows) and ``o_proj`` reads it rotated
  (its columns, per attention head; with grouped-query attention each K/V head feeds its group with the same R2);
* R3, online, a Hadamard over head_dim on Q and K after RoPE (``q·k`` unchanged): K's outlier channels are spread
  before the KV cache stores it;
* R4, online, a Hadamard before ``down_proj`` (after the SwiGLU product, which no offline rotation reaches):
  ``down_proj`` holds ``W H/√n`` and its input is transformed at run time (the Triton kernel on CUDA).

Nothing is calibrated. The state is the two matrices (R1, R2); R3 and R4 are plain Hadamards of the layer's width,
as in QuaRot's code. Widths that are not powers of two use ``hadamard.py``'s orders k·2^m (172, 576, 1536,
14336, 18944 ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..hadamard import hadamard, random_hadamard
from ..mitigation import from_step
from ..activations import attention_quant, linear_input
from . import algebra

ROLE = "transform"
needs_calibration = False
DEFAULT_ARG = 0


@dataclass(frozen=True)
class Options:
    seed: int = 0  # of R1's random signs: quarot<seed>


def options(step) -> Options:
    return from_step(step, Options, arg="seed", bounds=(0, None))


@dataclass(frozen=True)
class State:
    residual: torch.Tensor  # R1 [hidden, hidden], orthogonal, float64
    head: torch.Tensor | None  # R2 [head_dim, head_dim], orthogonal, float64; None: no attention (no V to rotate)


def fit(model, arch, calibration, recipe, options: Options, device=None) -> State:
    head = normalized_hadamard(arch.heads(model)[2]) if arch.value_out is not None else None
    return State(random_hadamard(arch.config(model).hidden_size, options.seed), head)


def normalized_hadamard(n: int) -> torch.Tensor:
    """``Hᵀ/√n``: the orthogonal matrix R with ``x R = fwht(x)``, what the online transform computes."""
    return hadamard(n).double().T.contiguous() / math.sqrt(n)


def fold_norms(model, arch) -> None:
    """Every norm's gain into the linears it feeds (the final norm into the head), the head untied first."""
    algebra.untie(model, arch.embed, arch.head)
    for block in arch.block_list(model):
        for group in arch.norm_groups(block):
            algebra.fold_norm(block.get_submodule(group.source), algebra.readers(block, group))
    algebra.fold_norm(model.get_submodule(arch.final_norm), [model.get_submodule(arch.head)])


def rotate_residual(model, arch, Q: torch.Tensor) -> None:
    """Carry the residual stream as ``x Q`` (norms folded first)."""
    algebra.rotate_embedding(model.get_submodule(arch.embed), Q)
    for name in arch.stream_inputs:
        algebra.rotate_outputs(model.get_submodule(name), Q)
    for block in arch.block_list(model):
        for group in arch.norm_groups(block):
            for module in algebra.readers(block, group):
                algebra.rotate_inputs(module, Q)
        for name in arch.names(block, arch.residual_writers):
            algebra.rotate_outputs(block.get_submodule(name), Q)
    algebra.rotate_inputs(model.get_submodule(arch.head), Q)


def rotate_values(model, arch, R: torch.Tensor) -> None:
    """Produce V per head as ``v R`` and read it back in the output projection with ``W_o (I ⊗ R)`` (an
    architecture without attention has no V to rotate)."""
    if arch.value_out is None:
        return
    heads, kv_heads, _ = arch.heads(model)
    value, out = arch.value_out
    for block in arch.block_list(model):
        algebra.rotate_outputs(block.get_submodule(value), algebra.per_head(R, kv_heads))
        algebra.rotate_inputs(block.get_submodule(out), algebra.per_head(R, heads))


def rotate_online(model, arch) -> None:
    """The online Hadamards: R4 before each ``online_rotated`` linear (its weight absorbs ``Hᵀ/√n``), R3 on Q and K
    (where the block attends)."""
    for block in arch.block_list(model):
        for name in arch.names(block, arch.online_rotated):
            linear = block.get_submodule(name)
            algebra.hadamard_inputs(linear)
            linear_input(linear).rotate = True
        if arch.attention is not None:
            attention_quant(model, block.get_submodule(arch.attention)).rotate_qk = True


def apply(model, arch, state: State) -> None:
    fold_norms(model, arch)
    rotate_residual(model, arch, state.residual)
    rotate_values(model, arch, state.head)
    rotate_online(model, arch)
