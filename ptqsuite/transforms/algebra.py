"""Function-preserving rewrites of linears, norms and embeddings: each function is one algebraic identity.

Conventions: a linear computes ``y = x Wᵀ + b`` with ``W[out, in]``; activations are row vectors; a rotation
``Q`` is orthogonal (``Q Qᵀ = I``) and acts as ``x ↦ x Q``; a scale ``s`` is a positive vector, acting as
``x ↦ x / s`` (its inverse goes into the weights). Arithmetic is float64 on the weight's device, results are
stored in the parameter's dtype: the rewritten model computes the same function up to that rounding.
"""
from __future__ import annotations

import torch
from torch import nn


def _store(p: torch.Tensor, value: torch.Tensor) -> None:
    p.data = value.to(p.dtype)


def _f64(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=torch.float64)


def fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """``(n(x)·γ) Wᵀ = n(x) (W diag γ)ᵀ``: an RMSNorm's gain moves into the linears that read it; γ becomes 1."""
    gamma = norm.weight.detach().double()
    for linear in linears:
        _store(linear.weight, linear.weight.double() * _f64(gamma, linear.weight))
    norm.weight.data.fill_(1.0)


def rotate_inputs(linear: nn.Module, Q: torch.Tensor) -> None:
    """``(x Q)(W Q)ᵀ = x Wᵀ``: a linear that reads ``x Q`` computes the same with ``W ← W Q``."""
    _store(linear.weight, linear.weight.double() @ _f64(Q, linear.weight))


def hadamard_inputs(linear: nn.Module) -> None:
    """``rotate_inputs`` by ``R = Hᵀ/√n`` (H = hadamard(in_features)): ``W R`` is the fast transform of W's rows,
    ``fwht(W)``, O(n log n) a row with no n×n matrix (Llama-3-8B's down_proj: n = 14336)."""
    from ..hadamard import fwht

    _store(linear.weight, fwht(linear.weight.double()))


def rotate_outputs(linear: nn.Linear, Q: torch.Tensor) -> None:
    """``x (Qᵀ W)ᵀ + b Q = (x Wᵀ + b) Q``: with ``W ← Qᵀ W``, ``b ← b Q`` a linear writes ``y Q`` instead of ``y``."""
    Q = _f64(Q, linear.weight)
    _store(linear.weight, Q.T @ linear.weight.double())
    if linear.bias is not None:
        _store(linear.bias, linear.bias.double() @ Q)


def rotate_embedding(embedding: nn.Embedding, Q: torch.Tensor) -> None:
    """``onehot(t) (E Q) = (onehot(t) E) Q``: a lookup in ``E Q`` returns the rotated row."""
    _store(embedding.weight, embedding.weight.double() @ _f64(Q, embedding.weight))


def per_head(R: torch.Tensor, heads: int) -> torch.Tensor:
    """``I_heads ⊗ R``: ``R`` applied to each head's slice of a [heads·head_dim] vector."""
    return torch.kron(torch.eye(heads, dtype=R.dtype, device=R.device), R.contiguous())


def scale_inputs(linear: nn.Linear, s: torch.Tensor) -> None:
    """``(x / s)(W diag s)ᵀ = x Wᵀ``: a linear that reads ``x / s`` computes the same with ``W ← W diag s``."""
    _store(linear.weight, linear.weight.double() * _f64(s, linear.weight))


def scale_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """``n(x)·(γ / s) = (n(x)·γ) / s``: the norm writes its output divided by ``s``."""
    _store(norm.weight, norm.weight.double() / _f64(s, norm.weight))


def scale_outputs(linear: nn.Linear, s: torch.Tensor) -> None:
    """``x (diag(1/s) W)ᵀ + b / s = (x Wᵀ + b) / s``: the linear writes its output divided by ``s``."""
    s = _f64(s, linear.weight)
    _store(linear.weight, linear.weight.double() / s[:, None])
    if linear.bias is not None:
        _store(linear.bias, linear.bias.double() / s)


def untie(model: nn.Module, embed: str, head: str) -> None:
    """Give the head its own copy of a tied embedding matrix, so the two can be rewritten differently."""
    e, h = model.get_submodule(embed), model.get_submodule(head)
    if h.weight is e.weight or h.weight.data_ptr() == e.weight.data_ptr():
        h.weight = nn.Parameter(e.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False


def migrate(source: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide what ``source`` (a norm, or a linear) writes by ``s`` and multiply it back in the ``linears`` that
    read it (``scale_norm``/``scale_outputs`` then ``scale_inputs``): SmoothQuant's and AWQ's migration."""
    (scale_outputs if isinstance(source, nn.Linear) else scale_norm)(source, s)
    for linear in linears:
        scale_inputs(linear, s)


def readers(block: nn.Module, group) -> list[nn.Module]:
    """The modules of ``block`` reading ``group``'s input (``LinearGroup.rewritten``), in that order."""
    return [block.get_submodule(n) for n in group.rewritten]


def migratable(block: nn.Module, group) -> bool:
    """Whether a per-channel scale can move through ``group.source``: a norm always; a linear when its outputs
    are exactly the group's inputs (not under grouped-query attention, where one V channel feeds several heads);
    never through a nonlinearity (``source`` None)."""
    if group.source is None:
        return False
    source = block.get_submodule(group.source)
    if not isinstance(source, nn.Linear):
        return True
    return all(source.out_features == block.get_submodule(n).in_features for n in group.linears)
