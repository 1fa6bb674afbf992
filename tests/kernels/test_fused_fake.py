"""``activations.fused_fake``: every dynamic activation and KV-cache spec computed along rows gets a Triton kernel
that equals the torch specification (``fmt.fake(rows, gran)`` on the CPU) bit for bit, so that ``activations.fake``
can use it on CUDA without moving a number, and the specs it cannot compute get None (torch then does).

Specs come from recipe ids, as the matrix writes them; KIVI's keys are rows of ``KV_TOKEN_BLOCK`` tokens per channel
(activations.block_quantized_keys). Shapes are deliberately odd: tails of every group size, a single row, widths of
real models' hidden and intermediate sizes.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from kernel_testing import DEVICE, NO_KERNEL, assert_bitwise_equal, needs_kernel, values

from ptqsuite import activations, recipe
from ptqsuite.granularity import PerChannel, PerTensor

ACT = ["a4", "a8", "a8sym", "a4g32", "a3g7", "afp8", "amxfp4", "anvfp4", "amxfp8"]
KV = ["kv2", "kv4g16", "kvfp8", "kv4pc"]  # kv…pc: K per channel over token blocks, the kernel's rows
SHAPES = [(1, 7), (5, 64), (33, 100), (3, 576), (2, 1536)]
DTYPES = [torch.float32, torch.bfloat16]
KINDS = ["normal", "outliers", "zeros"]


def spec_of(token: str):
    r = recipe.parse(f"rtn-w16{token}")
    spec = r.act if token.startswith("a") else r.kv
    return replace(spec, gran=PerChannel()) if token.endswith("pc") else spec  # KIVI's key rows


def cases() -> list:
    """Every spec on every shape and dtype, each with one value distribution in turn (all of them seen) and a
    seed of its own."""
    return [pytest.param(token, shape, dtype, KINDS[i % len(KINDS)], i, id=f"{token}-{shape[0]}x{shape[1]}-{str(dtype)[6:]}")
            for i, (token, shape, dtype) in enumerate(itertools.product(ACT + KV, SHAPES, DTYPES))]


@needs_kernel
@pytest.mark.parametrize("token, shape, dtype, kind, seed", cases())
def test_fused_fake_equals_the_specification_bitwise(token, shape, dtype, kind, seed):
    spec = spec_of(token)
    kernel = activations.fused_fake(spec.fmt, spec.gran)
    assert kernel is not None, f"{token}: no fused kernel"
    x = values(kind, shape, seed, dtype=dtype)
    assert_bitwise_equal(kernel(x), spec.fmt.fake(x.cpu(), spec.gran).to(DEVICE))


def test_specs_only_torch_computes_get_none():
    spec = spec_of("a8")
    assert activations.fused_fake(spec.fmt, PerTensor()) is None  # static per-tensor scales (…pt) come from fit
    if NO_KERNEL is None:
        assert activations.fused_fake(spec.fmt, spec.gran) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("token", ACT + KV[:-1])
def test_fake_on_cuda_equals_the_cpu_specification(token):
    """``activations.fake`` takes the kernel on CUDA: a bf16 [batch, tokens, hidden] input as a hook sees it."""
    spec = spec_of(token)
    x = values("outliers", (2 * 37, 576), seed=1, dtype=torch.bfloat16).reshape(2, 37, 576).to("cuda")
    assert_bitwise_equal(activations.fake(x, spec), activations.fake(x.cpu(), spec).to("cuda"))
