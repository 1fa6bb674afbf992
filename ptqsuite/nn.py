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

import functools
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .formats import FloatFormat, IntFormat, QTensor
from .hadamard import fwht
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


# --- What a layer does to its inputs at run time: online rotations and dynamic fake quantization. ---------------
# Installed on an existing model (hooks and a registered attention function), never by copying modules, so the
# pipeline and the transforms keep addressing linears and attention modules by their names in arch.py.

def fake_dynamic(x: torch.Tensor, spec) -> torch.Tensor:
    """``x`` fake-quantized by ``spec`` (a recipe QuantSpec) per row of its ``[-1, x.shape[-1]]`` view (a token, or
    a token and head), scales computed from ``x`` itself. Straight-through when ``x`` carries a gradient (rotation
    learning trains through it). ``spec`` None or 16-bit: ``x`` itself."""
    if spec is None or spec.fmt is None:
        return x
    q = spec.fmt.fake(x.reshape(-1, x.shape[-1]), spec.gran).reshape(x.shape)
    return x + (q - x).detach() if x.requires_grad else q


def rotate_online(x: torch.Tensor) -> torch.Tensor:
    """``x ↦ x Hᵀ/√n`` along the last dim (H = hadamard(n)): the Triton kernel on CUDA when it is installed and
    no gradient is needed, else the torch reference (float64, differentiable)."""
    if x.is_cuda and not x.requires_grad:
        kernel = _hadamard_kernel()
        if kernel is not None:
            return kernel(x)
    return fwht(x)


@functools.cache  # looked up once: this is on every online-rotated linear's forward
def _hadamard_kernel():
    try:
        from ptqsuite_kernels.hadamard import kernel
    except ImportError:  # no Triton on this machine: the reference does the same thing
        return None
    return kernel


class LinearInput(torch.nn.Module):
    """What a linear's input goes through before its weight: ``rotate`` (an online Hadamard, x ↦ x Hᵀ/√n; the
    weight holds W H/√n, so ``y`` is unchanged) then ``spec`` (dynamic fake quantization)."""

    def __init__(self):
        super().__init__()
        self.rotate, self.spec = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_dynamic(rotate_online(x) if self.rotate else x, self.spec)

    def extra_repr(self) -> str:
        return f"rotate={self.rotate}, spec={self.spec}"


def _input_hook(module, args):
    return (module.ptq_input(args[0]), *args[1:])


def linear_input(linear: torch.nn.Module) -> LinearInput:
    """The linear's LinearInput, installed (a forward pre-hook, registered before any calibration hook, so those
    see what the weight sees) on first use."""
    if not hasattr(linear, "ptq_input"):
        linear.ptq_input = LinearInput()
        linear.register_forward_pre_hook(_input_hook)
    return linear.ptq_input


class AttentionQuant(torch.nn.Module):
    """What attention does to Q, K and V after RoPE: ``rotate_qk`` (an online Hadamard over head_dim on both Q and
    K: q·k is unchanged, K's outlier channels are spread) then K and V fake-quantized by ``spec``.

    K and V are quantized where attention reads them, the cache's past tokens included. Scales are per token and
    head (or finer groups), so each token's quantized value depends on that token alone: the same values a cache
    that quantized each token once, as it was stored, would return."""

    def __init__(self):
        super().__init__()
        self.rotate_qk, self.spec = False, None

    def forward(self, q, k, v):
        if self.rotate_qk:
            q, k = rotate_online(q), rotate_online(k)
        return q, fake_dynamic(k, self.spec), fake_dynamic(v, self.spec)

    def extra_repr(self) -> str:
        return f"rotate_qk={self.rotate_qk}, spec={self.spec}"


ATTENTION_PREFIX = "ptqsuite_"


def attention_quant(model: torch.nn.Module, attention: torch.nn.Module) -> AttentionQuant:
    """``attention``'s AttentionQuant, installed on first use: the model's attention implementation (sdpa, eager,
    ...) is switched to ``ptqsuite_<it>``, which applies each attention module's AttentionQuant, if it has one,
    and then calls the original implementation (its mask format too)."""
    config = model.config
    if not config._attn_implementation.startswith(ATTENTION_PREFIX):
        config._attn_implementation = _register_attention(config._attn_implementation)
    if not hasattr(attention, "ptq_attention"):
        attention.ptq_attention = AttentionQuant()
    return attention.ptq_attention


@functools.cache  # one registration per wrapped implementation, however many models are quantized
def _register_attention(inner: str) -> str:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    name = ATTENTION_PREFIX + inner
    original = ALL_ATTENTION_FUNCTIONS.get_interface(inner, eager_attention_forward)

    def attention(module, query, key, value, *args, **kwargs):
        if hasattr(module, "ptq_attention"):
            query, key, value = module.ptq_attention(query, key, value)
        return original(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def quantize_io(model: torch.nn.Module, arch, act, kv) -> None:
    """Fake-quantize every quantizable linear's input by ``act`` and every attention's K and V by ``kv`` (recipe
    QuantSpecs; None leaves that path as it is)."""
    if act is not None:
        for _, linear in arch.quantizable(model):
            linear_input(linear).spec = act
    if kv is not None:
        for block in arch.block_list(model):
            attention_quant(model, block.get_submodule(arch.attention)).spec = kv
