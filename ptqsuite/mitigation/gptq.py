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
* the format is injected (``spec.fmt.fit`` / ``project``): any INT or scaled float format, any granularity;
  a clipping step's ratios (``clip``) are passed to every fit of a group;
* true-sequential (the pipeline's concern, an option here): the linears of a block are quantized group by group
  (q/k/v, o, gate/up, down), each group's Hessian collected with the groups before it already quantized. On by
  default, as in AutoGPTQ and llm-compressor; ``gptq.par`` turns it off (every linear sees the fp block's inputs).

Recipe flags: ``gptq.act`` (act-order), ``gptq.par`` (not true-sequential).

A layer object has the paper code's three verbs: ``add_batch`` (accumulate ``H``), ``quantize``, ``free``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import QTensor
from ..granularity import PerChannel, PerGroup, PerTensor, to_groups
from .stats import Hessian, Stats

ROLE = "solve"
needs_calibration = True


@dataclass(frozen=True)
class Options:
    damp: float = 0.01
    block: int = 128
    act_order: bool = False
    true_sequential: bool = True


def options(step) -> Options:
    from . import from_step

    return from_step(step, Options, {"act": {"act_order": True}, "par": {"true_sequential": False}})


def unsupported(spec) -> str | None:
    if isinstance(spec.gran, PerTensor):
        return ("GPTQ fixes scales before its column loop, and a per-tensor scale would be fitted on the original "
                "weight only; use per-channel or per-group granularity")
    return None


class GPTQ:
    """One linear layer's Hessian, accumulated over calibration batches, and the solve."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.hessian = Hessian(columns, device)

    def add_batch(self, inp: torch.Tensor) -> None:
        """Inputs ``inp[..., columns]`` of the layer: ``H = 2/n Σ x xᵀ`` as a running mean."""
        self.hessian.add_batch(inp)

    @property
    def H(self) -> torch.Tensor:
        return self.hessian.H

    def quantize(self, W: torch.Tensor, spec, options: Options = Options(), clip=None) -> QTensor:
        return solve(W, self.hessian.stats(), spec, options, clip)  # fresh Stats: no stale derived cache

    def free(self) -> None:
        self.hessian = None


def solve(W: torch.Tensor, stats: Stats, spec, options: Options = Options(), clip=None) -> QTensor:
    """Quantize ``W[rows, columns]`` given the inputs' Hessian ``stats.H[columns, columns]``."""
    fmt, gran = spec.fmt, spec.gran
    reason = unsupported(spec)
    if reason:
        raise ValueError(reason)
    dead, perm, Hinv = stats.cached(("gptq", options.damp, options.act_order), lambda: _prepare(stats, options))
    W = W.float().clone()
    W[:, dead] = 0
    grid = _Grid(W, fmt, gran, static=options.act_order, clip=clip)
    if options.act_order:
        Q = _columns(W[:, perm], Hinv, perm, grid, options.block)[:, torch.argsort(perm)]
    else:
        Q = _columns(W, Hinv, perm, grid, options.block)
    return fmt.quantize(Q, gran, grid.params())


def _prepare(stats: Stats, options: Options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dead inputs, the column order, and H⁻¹'s upper Cholesky factor in that order: what every row of every linear
    reading this input shares."""
    H = stats.take_H()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if options.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
    else:
        perm = torch.arange(H.shape[0], device=H.device)
    return dead, perm, _inverse_cholesky(H, options.damp)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp · mean(diag H) · I)⁻¹``: row j holds column j's update weights.
    Overwrites ``H``; two matrices of its size live at a time (a 14336-wide fp32 H is 0.77 GiB)."""
    H.diagonal().add_(damp * torch.diag(H).mean())
    L = torch.linalg.cholesky(H)
    torch.cholesky_inverse(L, out=H)
    return torch.linalg.cholesky(H, upper=True, out=L)


def _columns(W: torch.Tensor, Hinv: torch.Tensor, perm: torch.Tensor, grid: "_Grid", block: int) -> torch.Tensor:
    """The column loop with lazy block updates; ``W`` and ``Hinv`` in the (permuted) processing order.

    Every group whose first column falls in a block is fitted at the block's start: the reference fits it when its
    loop reaches that column, but on the outer ``W``, which changes only between blocks, so it is the same fit."""
    Q = torch.zeros_like(W)
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        columns = perm[i1:i2]
        grid.reach(i1, i2, W)
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
    # Columns are held as rows of W1ᵀ (contiguous): the same arithmetic as on W1's columns, 2-3x faster on a CPU.
    Wt, Qt, Errt = W1.T.contiguous(), torch.zeros_like(W1.T), torch.zeros_like(W1.T)
    for i in range(Wt.shape[0]):
        w, d = Wt[i], Hinv1[i, i]
        column = tuple(p[:, i:i + 1] if _per_group(p) else p for p in params)
        q = fmt.project(w.reshape(-1, 1, 1), column).reshape(-1)
        err = (w - q) / d
        Wt[i:] -= Hinv1[i, i:, None] * err[None, :]
        Qt[i], Errt[i] = q, err
    return Qt.T, Errt.T


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

    def __init__(self, W: torch.Tensor, fmt, gran, static: bool, clip=None):
        self.fmt, self.gran, self.shape, self.clip = fmt, gran, tuple(W.shape), clip
        self.group = gran.n if isinstance(gran, PerGroup) else W.shape[1]
        self.full = fmt.fit(to_groups(W, gran), clip)  # static params; dynamic ones overwrite their group's slice
        # NVFP4-style tensor scales: a group's block scale is relative to the whole tensor's, so no refit per group.
        self.static = static or isinstance(gran, PerChannel) or getattr(fmt, "tensor_scale", False)

    def reach(self, i1: int, i2: int, W: torch.Tensor) -> None:
        """Refit the groups that start at positions ``i1 .. i2 - 1`` on ``W`` now. Dynamic groups exist only in
        natural order, where position and column coincide: plain integers, so the GPU is never waited for."""
        if self.static:
            return
        for position in range(i1 + (-i1 % self.group), i2, self.group):
            g = position // self.group
            fresh = self.fmt.fit(to_groups(W[:, position:position + self.group], PerChannel()), self._clip(g))
            for full, new in zip(self.full, fresh):
                if _per_group(full):
                    full[:, g:g + 1] = new

    def _clip(self, g: int):
        if self.clip is None:
            return None
        pick = lambda r: r[:, g:g + 1]  # noqa: E731
        return tuple(map(pick, self.clip)) if isinstance(self.clip, tuple) else pick(self.clip)

    def columns(self, columns: torch.Tensor) -> tuple:
        """The parameters of each column's group, ``[rows, len(columns), 1]``."""
        index = (columns // self.group).to(self.full[0].device)
        return tuple(p[:, index] if _per_group(p) else p for p in self.full)

    def params(self) -> tuple:
        return self.full
