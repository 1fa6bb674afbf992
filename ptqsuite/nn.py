"""``QuantLinear``: a linear layer whose weight is a QTensor, computed one of two ways for parity checks.

* ``backend="fake"``: ``F.linear(x, q.dequantize(x.dtype), bias)``, what accuracy cases evaluate.
* ``backend="packed"``: the weight packed for a GEMM kernel of its format family (``PACKED``), e.g. INT weights as
  int32 words (ptqsuite/formats/packing.py) through ptqsuite_kernels.int_gemm, bias added in its fp32 epilogue;
  MXFP4/NVFP4 weights as E2M1 nibbles with block-scale codes through ptqsuite_kernels.fp4_gemm.

Both multiply ``x`` by the same ``Ŵ`` in ``x``'s dtype with fp32 accumulation, so they agree within the GEMM's
derived accumulation bound (ptqsuite_kernels.int_gemm.error_bound). Importing this module never imports Triton:
a packed backend loads its kernel when a layer is built (CPU machines may lack Triton).

Weights are held in quantized form, not as parameters: ``Module.to`` would round fp16 scales through another
dtype. A layer moves them to the input's device (and dequantizes to its dtype) on first use, cached.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .formats import FloatFormat, IntFormat, QTensor
from .formats.packing import pack_qtensor
from .granularity import Granularity

BACKENDS = ("fake", "packed")


@dataclass(frozen=True)
class PackedBackend:
    """How a format family runs packed: ``pack(q) -> packed weight``; ``load() -> gemm(x[M, K], packed, bias)``,
    importing the kernel module only when called."""

    pack: Callable[[QTensor], Any]
    load: Callable[[], Callable[..., torch.Tensor]]


def _int_gemm() -> Callable[..., torch.Tensor]:
    from ptqsuite_kernels.int_gemm import kernel
    return kernel


def _fp4_pack(q: QTensor) -> Any:
    from ptqsuite_kernels.fp4_gemm import pack_weight
    return pack_weight(q)


def _fp4_gemm() -> Callable[..., torch.Tensor]:
    from ptqsuite_kernels.fp4_gemm import linear
    return linear


# Keyed by format class. FloatFormat: E2M1 weights with E8M0 or E4M3 block scales (MXFP4, NVFP4 and variants).
PACKED: dict[type, PackedBackend] = {IntFormat: PackedBackend(pack_qtensor, _int_gemm),
                                     FloatFormat: PackedBackend(_fp4_pack, _fp4_gemm)}


def _to_device(packed: Any, device: torch.device) -> Any:
    """A packed weight (a dataclass of tensors and plain values) with its tensors on ``device``."""
    if isinstance(packed, torch.Tensor):
        return packed.to(device)
    if not is_dataclass(packed):
        return packed
    return replace(packed, **{f.name: _to_device(getattr(packed, f.name), device) for f in fields(packed)
                              if f.init and isinstance(getattr(packed, f.name), torch.Tensor)})


class QuantLinear(torch.nn.Module):
    """``y = x Ŵᵀ + b`` with ``Ŵ`` the QTensor ``q`` of ``linear``'s weight, by the chosen backend."""

    def __init__(self, linear: torch.nn.Linear, q: QTensor, backend: str = "fake"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if tuple(q.shape) != tuple(linear.weight.shape):
            raise ValueError(f"QTensor shape {tuple(q.shape)} != weight shape {tuple(linear.weight.shape)}")
        self.in_features, self.out_features, self.backend, self.q = linear.in_features, linear.out_features, backend, q
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)
        self._cache: dict[tuple, Any] = {}
        if backend == "packed":
            family = PACKED.get(type(q.fmt))
            if family is None:
                raise ValueError(f"no packed backend for {type(q.fmt).__name__}; registered: "
                                 f"{[t.__name__ for t in PACKED]}")
            self._packed, self._gemm = family.pack(q), family.load()

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, fmt: Any, gran: Granularity, backend: str = "fake") -> QuantLinear:
        """Quantize ``linear``'s weight with ``fmt`` per ``gran`` (round to nearest) and wrap it."""
        return cls(linear, fmt.quantize(linear.weight.detach(), gran), backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.backend == "fake":
            y = F.linear(x, self._cached(("fake", x.dtype, x.device), lambda: self.q.dequantize(x.dtype)), bias)
        else:
            y = self._gemm(x, self._cached(("packed", x.device), lambda: self._packed), bias)
        return y.reshape(*shape[:-1], self.out_features)

    def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = _to_device(make(), key[-1])
        return self._cache[key]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.q.fmt}, granularity={self.q.gran}, backend={self.backend}")
