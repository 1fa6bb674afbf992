"""GPTQ's laws on one linear layer (ptqsuite/mitigation/gptq.py): it never does worse than round-to-nearest on the
calibration inputs it was given, leaves a weight already on its grid unchanged, handles dead inputs, and is
deterministic. Every format family and granularity goes through the same injected-format path."""
import pytest
import torch

from ptqsuite.formats import FP8, MXFP4, NVFP4, IntFormat
from ptqsuite.granularity import PerChannel, PerGroup
from ptqsuite.mitigation import gptq
from ptqsuite.recipe import QuantSpec

ROWS, COLS = 48, 172  # 172 = 5·32 + 12: tail groups
SPECS = [
    QuantSpec(IntFormat(4), PerChannel()),
    QuantSpec(IntFormat(3), PerGroup(32)),
    QuantSpec(IntFormat(4, symmetric=True), PerGroup(16)),
    QuantSpec(IntFormat(2), PerGroup(64)),
    QuantSpec(MXFP4, PerGroup(32)),
    QuantSpec(NVFP4, PerGroup(16)),
    QuantSpec(FP8, PerChannel()),
]
IDS = ["int4-pc", "int3-g32", "int4sym-g16", "int2-g64", "mxfp4", "nvfp4", "fp8-pc"]


def layer(seed=0, dead=()):
    """A weight and correlated calibration inputs with a few outlier features, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(ROWS, COLS, generator=g) / COLS**0.5
    X = torch.randn(1024, COLS, generator=g) @ (torch.eye(COLS) + 0.3 * torch.randn(COLS, COLS, generator=g))
    X[:, torch.randperm(COLS, generator=g)[:4]] *= 10
    X[:, list(dead)] = 0
    return W, X


def output_error(X, W, Wq):
    return (X @ (W - Wq).T).pow(2).sum().item()


def run(W, X, spec, **options):
    layer_ = gptq.GPTQ(COLS)
    for batch in X.split(300):  # uneven batches: the running mean must not care
        layer_.add_batch(batch)
    q = layer_.quantize(W, spec, gptq.Options(**options))
    layer_.free()
    return q


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
def test_output_error_at_most_rtn(spec, act_order):
    W, X = layer()
    rtn = spec.fmt.fake(W, spec.gran)
    q = run(W, X, spec, act_order=act_order)
    assert q.fmt == spec.fmt and q.gran == spec.gran
    assert output_error(X, W, q.dequantize()) <= output_error(X, W, rtn)


def test_the_saving_is_large_where_bits_are_few():
    """At 3 bits per group of 32, error feedback should cut the output error by a good margin, not a hair."""
    W, X = layer(seed=1)
    spec = SPECS[1]
    ratio = output_error(X, W, run(W, X, spec).dequantize()) / output_error(X, W, spec.fmt.fake(W, spec.gran))
    assert ratio < 0.8, ratio


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2], SPECS[4]], ids=["int4-pc", "int4sym-g16", "mxfp4"])
def test_a_weight_on_its_grid_stays_put(spec):
    """Every column rounds to itself, so no error is fed forward: quantizing a quantized weight changes nothing."""
    W, X = layer(seed=2)
    Wq = spec.fmt.fake(W, spec.gran)
    assert torch.equal(run(Wq, X, spec).dequantize(), Wq)


def test_dead_inputs_zero_their_weights():
    W, X = layer(seed=3, dead=(5, 100))
    q = run(W, X, SPECS[1]).dequantize()
    assert torch.isfinite(q).all() and (q[:, [5, 100]] == 0).all()


def test_hessian_is_the_running_mean_of_2xxT():
    W, X = layer(seed=4)
    layer_ = gptq.GPTQ(COLS)
    for batch in X.split(300):
        layer_.add_batch(batch)
    torch.testing.assert_close(layer_.H, 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-4)


def test_same_inputs_same_numbers():
    W, X = layer(seed=5)
    a, b = (run(W, X, SPECS[5], act_order=True) for _ in range(2))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
