"""AWQ's activation-aware scale search (Lin et al., 2024): protect salient weight channels by scaling them up.

For each group of linears reading one input, block by block on the full-precision model's activations: with
``x̄_j`` the mean magnitude of input channel j over the calibration tokens and the grid ratio ``r = i/20``,
i = 0..19,

    s = x̄^r / sqrt(max(x̄^r) · min(x̄^r))        (x̄^r clamped below at 1e-4)

is scored by the output error of the group's scope (AWQ's ``module2inspect``: the whole attention for q/k/v, the
MLP for gate/up, the linear itself for o_proj and down_proj) when its linears hold ``Q(W diag s) / s``, ``Q`` the
recipe's own weight format (injected: INT, MXFP4, NVFP4 alike), against the scope's unquantized output; the best
``s`` is migrated (the source writes ``x / s``, the linears hold ``W diag s``). Every group is searched on the
block as it was, as the reference does, then all are applied. A linear-fed group whose source's outputs are not
exactly its inputs (V under grouped-query attention) is skipped, as in the reference.

AWQ's second half, the clipping search, is the ``clip`` mitigation step: ``awq+clip+rtn-w4g128`` is the paper's
method; ``awq+rtn`` is scaling alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blockwise import walk
from ..mitigation import from_step
from . import algebra

ROLE = "transform"
needs_calibration = True
GRID = 20


@dataclass(frozen=True)
class Options:
    grid: int = GRID


def options(step) -> Options:
    return from_step(step, Options)


@dataclass(frozen=True)
class State:
    scales: dict  # "<block index>.<source>" -> s [channels], float32
    ratios: dict  # same keys: the chosen grid ratio r
    losses: dict  # same keys: scope output MSE at r = 0 (s = 1) and at the chosen r


def fit(model, arch, calibration, recipe, options: Options, device=None) -> State:
    scales, ratios, losses = {}, {}, {}
    device = device or next(model.parameters()).device
    groups = arch.input_groups(arch.block_list(model)[0])
    firsts, scopes = {g.observed for g in groups}, {_scope(g) for g in groups}
    watch = tuple(sorted(firsts | scopes))
    sums, calls = {}, {}  # per watched linear: (sum |x| per channel, tokens); per watched module: its calls

    def on_call(b, name, args, kw):
        if name in firsts:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            total, n = sums.get(name, (0.0, 0))
            sums[name] = (total + x.abs().sum(0), n + x.shape[0])
        if name in scopes:
            calls.setdefault(name, []).append((args, kw))

    for b, block in walk(model, arch, calibration, device, watch, on_call):
        for g in (g for g in arch.input_groups(block) if algebra.migratable(block, g)):
            total, n = sums[g.observed]
            s, r, loss = search(block, g, total / n, calls[_scope(g)], recipe.weight, options.grid)
            key = f"{b}.{g.source}"
            scales[key], ratios[key], losses[key] = s.float().cpu(), r, loss
        sums.clear()
        calls.clear()
    return State(scales, ratios, losses)


def _scope(group) -> str:
    if group.scope is None and len(group.linears) != 1:
        raise ValueError(f"group {group} has several linears and no scope module to judge them by")
    return group.scope or group.linears[0]


def search(block, group, x_mean: torch.Tensor, calls: list, spec, grid: int = GRID):
    """The grid search for one group: returns (s, r, {"r=0": loss, "best": loss})."""
    scope = block.get_submodule(_scope(group))
    linears = [block.get_submodule(n) for n in group.linears]
    originals = [linear.weight.data for linear in linears]  # each candidate is a new tensor: no copy needed
    reference = [_out(scope(*a, **kw)) for a, kw in calls]
    candidates, losses = [], []
    try:
        for i in range(grid):
            s = x_mean.pow(i / grid).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for linear, W in zip(linears, originals):
                linear.weight.data = _fake(W.float() * s, spec).div(s).to(W.dtype)
            candidates.append(s)
            losses.append(sum(float((_out(scope(*a, **kw)).float() - ref.float()).pow(2).mean())
                              for (a, kw), ref in zip(calls, reference)) / len(calls))
    finally:
        for linear, W in zip(linears, originals):
            linear.weight.data = W
    best = min(range(grid), key=losses.__getitem__)  # the first of equal losses, as a strict < scan keeps
    return candidates[best], best / grid, {"r=0": losses[0], "best": losses[best]}


def _fake(W: torch.Tensor, spec) -> torch.Tensor:
    return W if spec.fmt is None else spec.fmt.fake(W, spec.gran)


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def apply(model, arch, state: State) -> None:
    for b, block in enumerate(arch.block_list(model)):
        for g in arch.input_groups(block):
            key = f"{b}.{g.source}"
            if key in state.scales:
                algebra.migrate(block.get_submodule(g.source), algebra.readers(block, g), state.scales[key])
