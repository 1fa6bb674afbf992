"""GPTQ (Frantar et al., 2023): quantize a linear layer's weight column by column, spreading each column's rounding
error over the columns not yet quantized so that the layer's output on calibration inputs changes least.

For inputs ``X`` (rows are tokens) the layer error ``‖X Wᵀ − X Ŵᵀ‖²`` is a quadratic form in ``H = 2 XᵀX / n``.
Quantizing column ``j`` to ``q`` with error ``e = (w_j − q) / [H⁻¹]_jj`` is compensated optimally by
``W[:, j:] −= e · [H⁻¹]_{j, j:}``, where ``H⁻¹`` is restricted to the columns left; the upper Cholesky factor of
``H⁻¹`` holds exactly those rows. Faithful to the reference implementation (IST-DASLab/gptq):

* dampening: ``H += damp · mean(diag H) · I`` (``damp`` = 0.01);
* dead inputs (``H_jj = 0``: a feature never active on the calibration data): ``H_jj = 1`` and ``W[:, j] = 0``;
* lazy batch updates: columns in blocks of 128, the rest of ``W`` updated once per block;
* group scales fitted when the column loop reaches a group's first column, on the weights as updated so far (the
  reference's quirk kept: columns of the current block not yet block-updated are seen as they were at block start);
* act-order: columns in order of decreasing ``H_jj``, with static groups (scales fitted on the original ``W``
  before any update, so that groups stay contiguous in storage); formats with a tensor scale (NVFP4) always use
  static groups, since their block scales are relative to the whole tensor's;
* the format is injected (``spec.fmt.fit`` / ``project``): any INT or scaled float format, any granularity.

A layer object has the paper code's three verbs: ``add_batch`` (accumulate ``H``), ``quantize``, ``free``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import QTensor
from ..granularity import PerChannel, PerGroup, PerTensor, to_groups

needs_calibration = True


@dataclass(frozen=True)
class Options:
    damp: float = 0.01
    block: int = 128
    act_order: bool = False


class GPTQ:
    """One linear layer's Hessian, accumulated over calibration batches, and the solve."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.n = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Inputs ``inp[..., columns]`` of the layer: ``H = 2/n Σ x xᵀ`` as a running mean."""
        x = inp.reshape(-1, inp.shape[-1]).float()
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        x = x * (2 / self.n) ** 0.5
        self.H += x.T @ x

    def quantize(self, W: torch.Tensor, spec, options: Options = Options()) -> QTensor:
        return solve(W, self.H, spec, options)

    def free(self) -> None:
        self.H = None


def solve(W: torch.Tensor, H: torch.Tensor, spec, options: Options = Options()) -> QTensor:
    """Quantize ``W[rows, columns]`` given the inputs' Hessian ``H[columns, columns]``."""
    fmt, gran = spec.fmt, spec.gran
    if isinstance(gran, PerTensor):
        raise ValueError("GPTQ fixes scales before the column loop; per-tensor scales would see only the original W. "
                         "Use per-channel or per-group granularity")
    W, H = W.clone().float(), H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if options.act_order else torch.arange(W.shape[1])
    Hinv = _inverse_cholesky(H[perm][:, perm], options.damp)
    grid = _Grid(W, fmt, gran, static=options.act_order)
    Q = _columns(W[:, perm], Hinv, perm, grid, options.block)
    Q = Q[:, torch.argsort(perm)]
    return fmt.quantize(Q, gran, grid.params())


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp · mean(diag H) · I)⁻¹``: row j holds column j's update weights."""
    H = H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], device=H.device)
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _columns(W: torch.Tensor, Hinv: torch.Tensor, perm: torch.Tensor, grid: "_Grid", block: int) -> torch.Tensor:
    """The column loop with lazy block updates; ``W`` and ``Hinv`` in the (permuted) processing order.

    Every group whose first column falls in a block is fitted at the block's start: the reference fits it when its
    loop reaches that column, but on the outer ``W``, which changes only between blocks, so it is the same fit."""
    Q = torch.zeros_like(W)
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        columns = perm[i1:i2]
        grid.reach(columns, W, i1)
        Q[:, i1:i2], Err1 = block_loop(W[:, i1:i2], Hinv[i1:i2, i1:i2], grid.fmt, grid.columns(columns))
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def block_loop(W1: torch.Tensor, Hinv1: torch.Tensor, fmt, params: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of GPTQ's inner loop: quantize column ``i`` onto its grid, then spread its error ``err`` over the
    block's later columns. ``params`` is the format's ``fit`` gathered per column (``[rows, block, 1]`` tensors;
    scalars such as NVFP4's tensor scale as they are). Returns ``(Q1, Err1)``. The Triton kernel
    (``ptqsuite_kernels.gptq_block``) reproduces this bit for bit, and replaces it on CUDA."""
    kernel = _block_kernel(W1)
    if kernel is not None:
        return kernel(W1, Hinv1, fmt, params)
    return block_reference(W1, Hinv1, fmt, params)


def block_reference(W1: torch.Tensor, Hinv1: torch.Tensor, fmt, params: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    W1, Q1, Err1 = W1.clone(), torch.zeros_like(W1), torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        w, d = W1[:, i], Hinv1[i, i]
        column = tuple(p[:, i:i + 1] if _per_group(p) else p for p in params)
        q = fmt.project(w.reshape(-1, 1, 1), column).reshape(-1)
        err = (w - q) / d
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        Q1[:, i], Err1[:, i] = q, err
    return Q1, Err1


def _block_kernel(W1: torch.Tensor):
    if W1.device.type != "cuda":
        return None
    try:
        from ptqsuite_kernels.gptq_block import kernel
    except ImportError:  # triton missing: the torch loop is the same algorithm, only slower
        return None
    return kernel


def _per_group(p) -> bool:
    return isinstance(p, torch.Tensor) and p.dim() == 3


class _Grid:
    """The format's parameters per group, fitted statically (all at once on the original ``W``: per-channel, or
    act-order's static groups) or when the loop reaches a group's first column (GPTQ's default)."""

    def __init__(self, W: torch.Tensor, fmt, gran, static: bool):
        self.fmt, self.gran, self.shape = fmt, gran, tuple(W.shape)
        self.group = gran.n if isinstance(gran, PerGroup) else W.shape[1]
        self.full = fmt.fit(to_groups(W, gran))  # static params; dynamic ones overwrite their group's slice
        # NVFP4-style tensor scales: a group's block scale is relative to the whole tensor's, so no refit per group.
        self.static = static or isinstance(gran, PerChannel) or getattr(fmt, "tensor_scale", False)

    def reach(self, columns: torch.Tensor, W: torch.Tensor, i1: int) -> None:
        """Refit the groups that start among ``columns`` (processing positions ``i1, i1+1, ...``) on ``W`` now."""
        if self.static:
            return
        for i in (columns % self.group == 0).nonzero().flatten().tolist():
            position, g = i1 + i, int(columns[i]) // self.group
            fresh = self.fmt.fit(to_groups(W[:, position:position + self.group], PerChannel()))
            for full, new in zip(self.full, fresh):
                if _per_group(full):
                    full[:, g:g + 1] = new

    def columns(self, columns: torch.Tensor) -> tuple:
        """The parameters of each column's group, ``[rows, len(columns), 1]``."""
        index = (columns // self.group).to(self.full[0].device)
        return tuple(p[:, index] if _per_group(p) else p for p in self.full)

    def params(self) -> tuple:
        return self.full
