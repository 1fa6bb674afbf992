"""QuantLinear parity: the packed INT GEMM backend computes what fake quantization computes, within the GEMM's
derived error bound (ptqsuite_kernels.int_gemm.error_bound: fp32 accumulation in any order, then half an ulp of
the output dtype), and the fake backend is exactly ``F.linear(x, q.dequantize(x.dtype), bias)``.

Both backends multiply ``x`` by the same ``Ŵ`` in ``x``'s dtype with fp32 accumulation, so each is within the bound
of the exact product, hence within twice the bound of each other. Packed cases need Triton and either CUDA or
TRITON_INTERPRET=1 (tests/kernels/kernel_testing.py says which is missing); fake cases need neither.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ptqsuite.formats import IntFormat
from ptqsuite.formats.packing import pack_qtensor
from ptqsuite.granularity import PerChannel, PerGroup
from ptqsuite.nn import PACKED, QuantLinear

from kernel_testing import DEVICE, NO_KERNEL, needs_kernel, values

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (format, granularity, in_features): K = 300 leaves a 44-wide tail group of 128, K = 172 a 12-wide tail of 32.
LAYERS = [
    pytest.param(IntFormat(4), PerGroup(128), 300, id="int4-asym-g128-tail"),
    pytest.param(IntFormat(4), PerGroup(32), 172, id="int4-asym-g32-tail"),
    pytest.param(IntFormat(8, symmetric=True), PerChannel(), 300, id="int8-sym-per-channel"),
]
OUT_FEATURES = 70

if NO_KERNEL is None:
    from ptqsuite_kernels.int_gemm import error_bound, exact, within


@pytest.fixture(autouse=True)
def full_precision_matmul():
    """The fake backend's F.linear on CUDA: fp32 accumulation throughout (cuBLAS may otherwise reduce fp16/bf16
    partial sums in reduced precision, or round fp32 operands to TF32), so that the derived bound holds."""
    matmul = torch.backends.cuda.matmul
    flags = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction", "allow_tf32")
    saved = {flag: getattr(matmul, flag) for flag in flags} if DEVICE == "cuda" else {}
    for flag in saved:
        setattr(matmul, flag, False)
    yield
    for flag, value in saved.items():
        setattr(matmul, flag, value)


def layer(dtype: torch.dtype, in_features: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, OUT_FEATURES, bias=bias).to(DEVICE, dtype)


def inputs(dtype: torch.dtype, in_features: int, seed: int = 1) -> torch.Tensor:
    """Activations ``[2, 33, K]`` with outliers (3-D: QuantLinear flattens leading dimensions)."""
    return values("outliers", (66, in_features), seed, dtype=dtype).reshape(2, 33, in_features)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt, gran, k", LAYERS)
def test_fake_backend_is_f_linear_on_the_dequantized_weight(fmt, gran, k, dtype):
    linear = layer(dtype, k)
    fake = QuantLinear.from_linear(linear, fmt, gran, backend="fake")
    x = inputs(dtype, k)
    expected = F.linear(x, fake.q.dequantize(dtype), linear.bias)
    assert torch.equal(fake(x).view(torch.int8), expected.view(torch.int8))


@needs_kernel
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt, gran, k", LAYERS)
def test_packed_backend_matches_fake_within_the_gemm_bound(fmt, gran, k, dtype, bias):
    linear = layer(dtype, k, bias)
    fake = QuantLinear.from_linear(linear, fmt, gran, backend="fake")
    packed = QuantLinear(linear, fake.q, backend="packed")
    x = inputs(dtype, k)
    x2, b = x.reshape(-1, k), None if linear.bias is None else linear.bias.detach()
    w = pack_qtensor(fake.q)
    y, bound = exact(x2, w, b), error_bound(x2, w, b)
    for backend, out in (("packed", packed(x)), ("fake", fake(x))):
        assert out.shape == (2, 33, OUT_FEATURES) and out.dtype == dtype
        ok = within(out.reshape(-1, OUT_FEATURES), y, bound)
        assert ok.all(), f"{backend}: {int((~ok).sum())} of {ok.numel()} outputs outside the derived bound"
    # Hence |packed − fake| ≤ 2 (bound + half an ulp): the two backends agree to within that.


@needs_kernel
def test_packed_backend_on_a_single_token():
    linear = layer(torch.float16, 172)
    fmt, gran = IntFormat(4), PerGroup(32)
    packed = QuantLinear.from_linear(linear, fmt, gran, backend="packed")
    x = inputs(torch.float16, 172)[0, :1]
    w = pack_qtensor(packed.q)
    assert within(packed(x), exact(x, w, linear.bias.detach()), error_bound(x, w, linear.bias.detach())).all()


def test_backends_and_families_are_checked():
    linear = torch.nn.Linear(64, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        QuantLinear.from_linear(linear, IntFormat(4), PerGroup(32), backend="cublas")
    q = IntFormat(4).quantize(linear.weight.detach(), PerGroup(32))
    with pytest.raises(ValueError, match="no packed backend for"):
        QuantLinear(linear, type(q)(q.codes, q.scale, q.zero, q.shape, object(), q.gran), backend="packed")
    with pytest.raises(ValueError, match="shape"):
        QuantLinear(torch.nn.Linear(32, 8), q)
    assert IntFormat in PACKED


def test_importing_nn_does_not_import_triton():
    """Without Triton the fake backend works and the packed one fails when built, with the import error."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch; from ptqsuite.nn import QuantLinear; from ptqsuite.formats import IntFormat\n"
            "from ptqsuite.granularity import PerGroup\n"
            "linear = torch.nn.Linear(64, 8)\n"
            "QuantLinear.from_linear(linear, IntFormat(4), PerGroup(32))(torch.randn(3, 64))\n"
            "try:\n"
            "    QuantLinear.from_linear(linear, IntFormat(4), PerGroup(32), backend='packed')\n"
            "except ImportError:\n"
            "    pass\n"
            "else:\n"
            "    raise SystemExit('the packed backend was built without triton')\n")
    subprocess.run([sys.executable, "-c", code], check=True)
