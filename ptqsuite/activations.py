"""What a quantized model does at run time to its linears' inputs and to its KV cache: online rotations and fake
quantization, installed on an existing model (forward pre-hooks and an attention function registered with
transformers), never by copying modules, so the pipeline and the transforms keep addressing linears and attention
modules by their names in arch.py.

Scales, per recipe spec (recipe.py):

* dynamic (the default): computed from the tensor itself, one per row: per token for a linear's input, per token
  and head for K and V (``g<n>``: groups within the row). Each cached token's value depends on that token alone,
  so quantizing K and V where attention reads them gives exactly what a cache that quantizes each token once, as
  it is stored, returns, in a full forward and in generation alike.
* static (``pt``): one scale per tensor (per linear input; per layer for K and for V), fitted on calibration
  data: ``observe`` first (the pipeline runs the calibration set through the weight-quantized model with every
  static quantizer recording its range and passing values through), then ``freeze``.
* KIVI (``kv…pc``): K per channel, a scale per channel over each block of ``KV_TOKEN_BLOCK`` consecutive tokens,
  V per token. A block is quantized when it is complete; the newest, incomplete block stays in full precision,
  K and V (KIVI's residual, here as long as one block). A query at cache index t therefore reads the quantized K and V
  of the blocks before its own and the unquantized ones of its own block, in a full forward exactly as in token by
  token generation. That per-(query, key) choice needs the scores in hand: this path computes attention eagerly
  (scores materialized) instead of calling the model's sdpa or eager function.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import torch

from .formats import FloatFormat, IntFormat
from .granularity import PerChannel, PerGroup, PerToken
from .hadamard import fwht

KV_TOKEN_BLOCK = 32  # KIVI's group size G; KIVI's residual R is 128 tokens, here R = G (documented deviation)


def fake(x: torch.Tensor, spec, params: tuple | None = None) -> torch.Tensor:
    """``x`` fake-quantized by ``spec`` (a recipe QuantSpec) per row of its ``[-1, x.shape[-1]]`` view, with
    ``params`` (a format's ``fit``: static scales) or scales from ``x`` itself. Straight-through when ``x`` carries
    a gradient (rotation learning trains through it). ``spec`` None or 16-bit: ``x`` itself."""
    if spec is None or spec.fmt is None:
        return x
    if spec.static and params is None:
        raise RuntimeError(f"static {spec.gran} scales of {spec.fmt} were never calibrated: run the calibration "
                           f"pass (pipeline.quantize does) before evaluating")
    rows = x.reshape(-1, x.shape[-1])
    if params is None and x.is_cuda and not x.requires_grad:
        kernel = fused_fake(spec.fmt, spec.gran)
        if kernel is not None:
            return kernel(rows).reshape(x.shape)
    q = spec.fmt.quantize(rows, spec.gran, params).dequantize(x.dtype).reshape(x.shape)
    return x + (q - x).detach() if x.requires_grad else q


@functools.cache  # looked up once per format: this is on every quantized linear input's and K/V's forward
def fused_fake(fmt, gran):
    """A Triton kernel computing ``fmt.fake(rows, gran)`` for ``rows[M, K]`` bit for bit in one or two launches
    instead of torch's few dozen (dynamic scales along rows: INT and scaled float formats, per row or per group of
    a row), or None: no Triton here, or a granularity only torch computes. ``fake`` uses it on CUDA, where the
    kernels also divide correctly rounded as the specification does (torch's CUDA division by a scalar goes
    through its reciprocal: int_quant.reference)."""
    if not isinstance(gran, PerChannel | PerGroup):  # PerToken is a PerChannel: one group per row
        return None
    group = gran.n if isinstance(gran, PerGroup) else None
    try:
        from ptqsuite_kernels import float_quant, int_quant
    except ImportError:
        return None
    if isinstance(fmt, IntFormat) and fmt.scale_dtype in int_quant.SCALE_DTYPES:
        return functools.partial(int_quant.kernel, bits=fmt.bits, symmetric=fmt.symmetric, group=group,
                                 scale_dtype=fmt.scale_dtype)
    if isinstance(fmt, FloatFormat):
        return functools.partial(float_quant.fake, fmt=fmt, gran=gran)
    return None


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


class Range:
    """The running minimum and maximum of what a static quantizer saw during calibration."""

    def __init__(self):
        self.lo = self.hi = None

    def add(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def params(self, fmt) -> tuple:
        """The format's per-tensor fit of the observed range (asymmetric INT: [min, max]; else max |x|)."""
        if self.lo is None:
            raise RuntimeError("a static quantizer saw no calibration data: its layer never ran")
        return fmt.fit(torch.stack([self.lo, self.hi]).view(1, 1, 2))


class LinearInput(torch.nn.Module):
    """What a linear's input goes through before its weight: ``rotate`` (an online Hadamard, x ↦ x Hᵀ/√n; the
    weight holds W H/√n, so ``y`` is unchanged) then ``spec`` (fake quantization; static: ``params``)."""

    def __init__(self):
        super().__init__()
        self.rotate, self.spec, self.params, self.observer = False, None, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rotate_online(x) if self.rotate else x
        if self.observer is not None:
            self.observer.add(x)
            return x
        return fake(x, self.spec, self.params)

    def observe(self) -> None:
        self.observer = Range()

    def freeze(self) -> None:
        self.params, self.observer = self.observer.params(self.spec.fmt), None

    def extra_repr(self) -> str:
        return f"rotate={self.rotate}, spec={self.spec}, static={self.params is not None}"


def _input_hook(module, args):
    return (module.ptq_input(args[0]), *args[1:])


def _tap_hook(linear, tap, args, output):
    n = linear.in_features
    return torch.cat([linear.ptq_input(output[..., :n]), output[..., n:]], dim=-1)


def linear_input(linear: torch.nn.Module, tap: torch.nn.Module | None = None) -> LinearInput:
    """The linear's LinearInput, installed (a forward pre-hook, registered before any calibration hook, so those
    see what the weight sees) on first use. A linear the model applies through its weight, never calling it
    (``LinearGroup.tap``), gets it as a forward hook on ``tap`` instead, on the first ``in_features`` columns of
    its output: that linear's input."""
    if not hasattr(linear, "ptq_input"):
        linear.ptq_input = LinearInput()
        if tap is None:
            linear.register_forward_pre_hook(_input_hook)
        else:
            tap.register_forward_hook(functools.partial(_tap_hook, linear))
    return linear.ptq_input


class AttentionQuant(torch.nn.Module):
    """What attention does to Q, K and V after RoPE: ``rotate_qk`` (an online Hadamard over head_dim on both Q and
    K: q·k is unchanged, K's outlier channels are spread) then K and V fake-quantized by ``spec`` as the cache
    stores them (module docstring), static scales in ``params`` (``{"k": fit, "v": fit}``)."""

    def __init__(self):
        super().__init__()
        self.rotate_qk, self.spec, self.params, self.observers = False, None, None, None

    def attend(self, module, query, key, value, mask, original, **kwargs):
        if self.rotate_qk:
            query, key = rotate_online(query), rotate_online(key)
        spec = self.spec if self.spec is not None and self.spec.fmt is not None else None
        if self.observers is not None:
            self.observers["k"].add(key)
            self.observers["v"].add(value)
        elif spec is not None and type(spec.gran) is PerChannel:
            return kivi_attention(module, query, key, value, mask, spec, **kwargs)
        elif spec is not None:
            params = self.params or {}
            key, value = fake(key, spec, params.get("k")), fake(value, spec, params.get("v"))
        return original(module, query, key, value, mask, **kwargs)

    def observe(self) -> None:
        self.observers = {"k": Range(), "v": Range()}

    def freeze(self) -> None:
        self.params = {name: r.params(self.spec.fmt) for name, r in self.observers.items()}
        self.observers = None

    def extra_repr(self) -> str:
        return f"rotate_qk={self.rotate_qk}, spec={self.spec}, static={self.params is not None}"


def block_quantized_keys(key: torch.Tensor, spec) -> torch.Tensor:
    """``key[B, H, L, D]`` with each complete block of ``KV_TOKEN_BLOCK`` tokens fake-quantized per channel (one
    scale per head, channel and block); the incomplete tail is returned unquantized."""
    B, H, L, D = key.shape
    n = KV_TOKEN_BLOCK
    done = L // n * n
    blocks = key[:, :, :done].reshape(B, H, done // n, n, D).transpose(-1, -2)  # rows: a channel over a block
    q = fake(blocks, replace(spec, gran=PerChannel())).transpose(-1, -2).reshape(B, H, done, D)
    return torch.cat([q, key[:, :, done:]], dim=2)


def kivi_attention(module, query, key, value, mask, spec, scaling=None, dropout=0.0, **kwargs):
    """Attention reading a KIVI cache (module docstring): the query at cache index t reads key and value s
    quantized iff s's block is before t's. Queries are the last ``Lq`` of the ``Lk`` cache entries (prefill or
    decode). Same signature and result layout (``[B, Lq, H, D]``, weights) as transformers' attention functions."""
    B, Hq, Lq, D = query.shape
    Lk, groups = key.shape[2], Hq // key.shape[1]
    k_q, v_q = block_quantized_keys(key, spec), fake(value, replace(spec, gran=PerToken()))
    k_fp, k_q, v_fp, v_q = (x.repeat_interleave(groups, dim=1) for x in (key, k_q, value, v_q))
    t = torch.arange(Lk - Lq, Lk, device=query.device).view(-1, 1)
    s = torch.arange(Lk, device=query.device).view(1, -1)
    older = (s // KV_TOKEN_BLOCK) < (t // KV_TOKEN_BLOCK)
    scale = scaling if scaling is not None else D ** -0.5
    scores = torch.where(older, query @ k_q.transpose(-1, -2), query @ k_fp.transpose(-1, -2)) * scale
    if mask is None:
        scores = scores.masked_fill(s > t, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., :Lk], float("-inf"))
    else:
        scores = scores + mask[..., :Lk]
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = torch.where(older, weights, 0) @ v_q + torch.where(older, 0, weights) @ v_fp
    return out.transpose(1, 2).contiguous(), weights


ATTENTION_PREFIX = "ptqsuite_"


def attention_quant(model: torch.nn.Module, attention: torch.nn.Module) -> AttentionQuant:
    """``attention``'s AttentionQuant, installed on first use: the model's attention implementation (sdpa, eager,
    ...) is switched to ``ptqsuite_<it>``, which hands each attention module with an AttentionQuant to it, with
    the original implementation (and its mask format) to call."""
    config = getattr(attention, "config", model.config)  # what it dispatches on: a VLM's text config, not the
    # top level's, whose setter would also rewrap the vision tower's attention
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

    def attention(module, query, key, value, attention_mask, **kwargs):
        if hasattr(module, "ptq_attention"):
            return module.ptq_attention.attend(module, query, key, value, attention_mask, original, **kwargs)
        return original(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def quantize_io(model: torch.nn.Module, arch, act, kv) -> list:
    """Fake-quantize every quantizable linear's input by ``act`` (its kept layers by their own bits) and every
    attention's K and V by ``kv`` (recipe QuantSpecs; None leaves that path as it is). Returns the static
    quantizers, observing: the caller runs calibration data through the model, then calls ``freeze`` on each."""
    static = []
    if act is not None:
        linears = arch.quantizable(model)
        _check_kept(act, {name.rsplit(".", 1)[-1] for name, _ in linears})
        taps = _taps(model, arch)
        for name, linear in linears:
            static += _install(linear_input(linear, taps.get(name)), act.for_layer(name.rsplit(".", 1)[-1]))
    if kv is not None:
        if arch.attention is None:
            raise ValueError(f"a KV-cache format on architecture {arch.name!r}, which has no attention and no KV cache")
        for block in arch.block_list(model):
            static += _install(attention_quant(model, block.get_submodule(arch.attention)), kv)
    return static


def _taps(model: torch.nn.Module, arch) -> dict:
    """Full name -> tap module, for every linear applied through its weight (Mamba's dt_proj)."""
    return {f"{arch.blocks}.{b}.{name}": block.get_submodule(g.tap) for b, block in enumerate(arch.block_list(model))
            for g in arch.groups_of(block) if g.tap is not None for name in g.linears}


def _install(quantizer, spec) -> list:
    quantizer.spec, quantizer.params = spec, None
    if spec.static:
        quantizer.observe()
        return [quantizer]
    return []


def dynamic(spec):
    """``spec`` with a static scale replaced by its dynamic counterpart (per token): what a learned transform
    trains against before static scales exist (they are fitted after it, on the transformed model)."""
    return replace(spec, gran=PerToken()) if spec is not None and spec.static else spec


def _check_kept(act, names: set[str]) -> None:
    unknown = sorted(name for name, _ in act.keep if name not in names)
    if unknown:
        raise ValueError(f"activation spec keeps {unknown} at higher precision, but this model has no quantized "
                         f"linear of that name; its linears: {', '.join(sorted(names))}")
