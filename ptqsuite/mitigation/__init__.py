"""Error mitigation: how quantized values are chosen for one linear layer, as steps that compose.

A recipe names at most one step of each role, in this order (``ROLES``):

* ``clip``: choose how far each group's range is shrunk before its scale is fitted. ``clip`` searches a grid
  per linear (``search(W, stats, spec, options) -> clip``); ``lwc`` learns it per block (``train(...)``);
* ``solve``: pick the quantized values: ``solve(W, stats, spec, options, clip) -> QTensor``
  (``rtn``, ``gptq``);
* ``compensate``: correct what quantization lost: ``compensate(W, W_hat, stats, options) -> (A, B)``, a low-rank
  term added to the dequantized weight (``lrc``), with its own storage cost (``extra_bits``).

The format is injected through ``spec`` (``fit(groups, clip)``, ``project``, ``quantize``); no step looks inside
it. ``stats`` is what calibration collected for the layer (``Stats``: its inputs' Hessian), None for a recipe
that collects nothing. Each step module has ``ROLE``, ``needs_calibration``, an ``Options`` frozen dataclass and
``options(step) -> Options`` (raising ValueError that names the valid flags), optionally ``DEFAULT_ARG`` (the
number a step id may carry, e.g. lrc's rank) and ``unsupported(spec) -> reason | None``.
"""
from __future__ import annotations

from dataclasses import replace

from . import clip, gptq, lrc, lwc, rtn

ROLES = ("clip", "solve", "compensate")
METHODS = {m.__name__.rsplit(".", 1)[-1]: m for m in (clip, gptq, lrc, lwc, rtn)}


def from_step(step, options_cls, flags: dict[str, dict] | None = None, arg: str | None = None,
              bounds: tuple[int, int | None] = (1, None)):
    """``options_cls()`` changed by ``step``'s flags (each maps to field values) and its number (the field ``arg``,
    within ``bounds``, inclusive; None: unbounded); a flag or number the step does not take raises ValueError
    naming what it does take."""
    flags = flags or {}
    opts = options_cls()
    for flag in step.flags:
        if flag not in flags:
            valid = ", ".join(f".{f}" for f in flags) or "none"
            raise ValueError(f"unknown flag {flag!r} of {step.name}; valid flags: {valid}")
        opts = replace(opts, **flags[flag])
    if step.arg is not None:
        if arg is None:
            raise ValueError(f"{step.name} takes no number, got {step.arg}")
        lo, hi = bounds
        if step.arg < lo or (hi is not None and step.arg > hi):
            valid = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"{step.name}'s {arg} must be {valid}, got {step.arg}")
        opts = replace(opts, **{arg: step.arg})
    return opts
