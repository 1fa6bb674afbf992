"""SpinQuant-style learned rotation (Liu et al., 2024): QuaRot's structure with R1 optimized, not random.

R1 (the residual rotation) starts at QuaRot's randomized Hadamard and is trained on the Stiefel manifold by
Cayley SGD against the quantized model's next-token loss on the calibration sequences, the other rotations (R2
per head, the online R3 and R4) fixed Hadamards as in SpinQuant's "had" variant. The quantized model in the loss is
the recipe's: activations and the KV cache fake-quantized by its specs, and, when the solver is RTN, the weights
too, each through a straight-through estimator. With GPTQ the weights stay unquantized in the loss, as SpinQuant
does (GPTQ rewrites them afterwards). Without any quantization in the loss it is rotation-invariant, so nothing is
learned; such recipes are rejected.

One step: a calibration sequence (cycled in order), the loss's gradient G with respect to R1, the skew matrix
``A = G R1ᵀ − R1 Gᵀ`` and the Cayley retraction ``R1 ← (I + α/2·A)⁻¹ (I − α/2·A) R1``, orthogonal by
construction (to rounding: it is computed in float64). ``α`` decays linearly from ``lr`` to 0 over the run, as in
SpinQuant. Deviation: ``lr`` is 0.1, not SpinQuant's 1.5 (whose optimizer scales its step differently): on
stories260K at W4A4, 30 steps at 1.5, 0.5, 0.1 and 0.02 moved the held-out loss from 1.950 to 1.936, 1.929, 1.895
and 1.922. ``spinquant<steps>`` bounds the run, default 100 (SpinQuant's iterations); the seed of R1's start is
the recipe's calibration seed. The state keeps the loss of each step and the wall time.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch.func import functional_call

from ..mitigation import from_step
from ..activations import dynamic, quantize_io
from . import rotate

ROLE = "transform"
needs_calibration = True
DEFAULT_ARG = 100
EVAL = 4  # calibration sequences the loss is reported on before and after training


@dataclass(frozen=True)
class Options:
    steps: int = 100
    lr: float = 0.1


def options(step) -> Options:
    return from_step(step, Options, arg="steps", bounds=(1, 100000))


def unsupported(recipe) -> str | None:
    if recipe.act is None and recipe.kv is None and (recipe.method != "rtn" or recipe.weight.fmt is None):
        return ("nothing in the loss is quantized (no activation or KV-cache format, and the weights are left to "
                "GPTQ or unquantized), so the loss does not depend on the rotation; add e.g. a8 or kv4, or use RTN")
    return None


@dataclass(frozen=True)
class State:
    residual: torch.Tensor  # learned R1 [hidden, hidden], float64
    head: torch.Tensor | None  # R2 [head_dim, head_dim], a normalized Hadamard; None: no attention
    losses: tuple  # the training loss at each step
    seconds: float
    held_out: tuple  # (before, after): the mean loss over the first EVAL sequences at R1's start and at its end


@torch.no_grad()
def fit(model, arch, calibration, recipe, options: Options, device=None) -> State:
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start = rotate.fit(model, arch, None, recipe, rotate.Options(seed=recipe.calibration.seed))
    work = _rotated_but_r1(model, arch, recipe, start.head, device)
    readers, writers = _residual_params(work, arch)
    quantized = ({f"{name}.weight" for name, _ in arch.quantizable(work)}
                 if recipe.method == "rtn" and recipe.weight.fmt is not None else set())
    for name in quantized - readers.keys() - writers.keys():  # R1 does not reach them (Mamba's x_proj, dt_proj):
        W = work.get_parameter(name)  # quantized once, as the recipe will
        W.data = recipe.weight.fmt.fake(W.data, recipe.weight.gran)
    loss = lambda R, ids: functional_call(  # noqa: E731
        work, _effective(readers, writers, R, quantized, recipe.weight), (ids,), {"labels": ids, "use_cache": False}
    ).loss
    held_out = calibration[:EVAL].to(device)
    R = start.residual.to(device)
    before = float(sum(loss(R.float(), ids[None]) for ids in held_out)) / len(held_out)
    losses, t0 = [], time.perf_counter()
    for step in range(options.steps):
        ids = calibration[step % calibration.shape[0]][None].to(device)
        with torch.enable_grad():
            Rg = R.float().requires_grad_(True)
            value = loss(Rg, ids)
            (G,) = torch.autograd.grad(value, Rg)
        losses.append(float(value))
        R = cayley(R, G.double(), options.lr * (1 - step / options.steps))
    seconds = time.perf_counter() - t0
    after = float(sum(loss(R.float(), ids[None]) for ids in held_out)) / len(held_out)
    return State(R.cpu(), start.head, tuple(losses), seconds, (before, after))


def cayley(R: torch.Tensor, G: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step on the orthogonal group: ``(I + lr/2·A)⁻¹ (I − lr/2·A) R``, ``A = G Rᵀ − R Gᵀ``."""
    A = G @ R.T - R @ G.T
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve(eye + lr / 2 * A, (eye - lr / 2 * A) @ R)


def _rotated_but_r1(model, arch, recipe, head: torch.Tensor, device):
    """A copy of the model with QuaRot applied except R1 (norms folded, R2, R3, R4), on ``device``, quantizing its
    activations and KV cache as the recipe will."""
    work = copy.deepcopy(model).to(device)
    rotate.fold_norms(work, arch)
    rotate.rotate_values(work, arch, head)
    rotate.rotate_online(work, arch)
    quantize_io(work, arch, dynamic(recipe.act), dynamic(recipe.kv))
    return work


def _residual_params(model, arch) -> tuple[dict, dict]:
    """Parameters R1 touches, by full name: those that read the residual stream (``W ← W R``: the embedding, the
    norm-fed linears, the head) and those that write to it (``W ← Rᵀ W``, ``b ← b R``)."""
    readers = {f"{arch.embed}.weight": model.get_submodule(arch.embed).weight,
               f"{arch.head}.weight": model.get_submodule(arch.head).weight}
    writers = {}
    for b, block in enumerate(arch.block_list(model)):
        prefix = f"{arch.blocks}.{b}"
        for g in arch.norm_groups(block):
            readers.update((f"{prefix}.{n}.weight", block.get_submodule(n).weight) for n in g.rewritten)
        for n in arch.names(block, arch.residual_writers):
            linear = block.get_submodule(n)
            writers[f"{prefix}.{n}.weight"] = linear.weight
            if linear.bias is not None:
                writers[f"{prefix}.{n}.bias"] = linear.bias
    return readers, writers


def _effective(readers: dict, writers: dict, R: torch.Tensor, quantized: set, spec) -> dict:
    out = {}
    for name, W in readers.items():
        out[name] = (W.float() @ R).to(W.dtype)
    for name, W in writers.items():
        out[name] = (R.T @ W.float() if W.dim() == 2 else W.float() @ R).to(W.dtype)
    for name in quantized & out.keys():
        W = out[name]
        out[name] = W + (spec.fmt.fake(W.detach(), spec.gran) - W).detach()
    return out


def apply(model, arch, state: State) -> None:
    rotate.apply(model, arch, rotate.State(state.residual, state.head))
