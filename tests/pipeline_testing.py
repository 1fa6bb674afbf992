"""What the pipeline and transform tests share (imported by test modules of this folder, which pytest puts on
sys.path): a recorder of the pipeline's per-group quantization, and fitting a transform then applying its state."""
from __future__ import annotations

import copy

import torch

from ptqsuite import pipeline
from ptqsuite.arch import arch_of
from ptqsuite.transforms import TRANSFORMS

QUANTIZE_LINEARS = pipeline._quantize_linears  # the real one: a second Recorder in a test replaces the first


class Recorder:
    """Wraps the pipeline's per-group quantization. ``seen[name]``: the linear's weight before and after, the
    Hessian it was solved with and the token count behind it."""

    def __init__(self, monkeypatch, model):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.seen = {}

        def wrapped(linears, stats, plan, clips):
            before = [linear.weight.detach().clone() for linear in linears]
            H, n = stats.H.clone(), stats.n  # the solver may consume stats.H (Stats.last_use)
            bits = QUANTIZE_LINEARS(linears, stats, plan, clips)
            for linear, W in zip(linears, before):
                self.seen[self.names[id(linear)]] = (W, linear.weight.detach().clone(), H, n)
            return bits

        monkeypatch.setattr(pipeline, "_quantize_linears", wrapped)


def fit_apply(model, recipe, calibration) -> tuple[torch.nn.Module, object]:
    """Fit ``recipe``'s first transform on a copy of ``model`` (which fitting must leave as it was) and apply the
    state to another copy: ``(rewritten copy, state)``."""
    step = recipe.transforms[0]
    module = TRANSFORMS[step.name]
    source, target = copy.deepcopy(model), copy.deepcopy(model)
    state = module.fit(source, arch_of(source), calibration, recipe, module.options(step), "cpu")
    before, after = model.state_dict(), source.state_dict()
    assert before.keys() == after.keys(), f"{step.name}.fit changed the model's parameters"
    for k in before:
        assert torch.equal(before[k], after[k]), f"{step.name}.fit changed {k}"
    with torch.no_grad():
        module.apply(target, arch_of(target), state)
    return target, state
