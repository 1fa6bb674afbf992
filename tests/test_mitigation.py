"""The laws of the mitigation steps other than GPTQ (tests/test_gptq.py), each on one linear layer with correlated,
outlier-heavy calibration inputs: the clipping search never loses to no clipping, group by group; low-rank
compensation's error falls with the rank and vanishes at full rank; learned clipping lowers its training loss;
steps compose; bad combinations are refused with the reason."""
import pytest
import torch

from ptqsuite.formats import MXFP4, NVFP4, IntFormat
from ptqsuite.granularity import PerChannel, PerGroup, PerTensor
from ptqsuite.mitigation import clip, gptq, lrc, lwc, rtn
from ptqsuite.mitigation.stats import Hessian
from ptqsuite.recipe import QuantSpec, RecipeError, Step, parse

ROWS, COLS = 40, 172  # 172 = 5·32 + 12: tail groups
SPECS = {
    "int3-g32": QuantSpec(IntFormat(3), PerGroup(32)),
    "int4-pc": QuantSpec(IntFormat(4), PerChannel()),
    "int4sym-g16": QuantSpec(IntFormat(4, symmetric=True), PerGroup(16)),
    "int2-g64": QuantSpec(IntFormat(2), PerGroup(64)),
    "mxfp4": QuantSpec(MXFP4, PerGroup(32)),
    "nvfp4": QuantSpec(NVFP4, PerGroup(16)),
    "int4-pt": QuantSpec(IntFormat(4), PerTensor()),
}


def layer(seed=0):
    """A heavy-tailed weight (clipping pays) and correlated inputs with outlier features."""
    g = torch.Generator().manual_seed(seed)
    # Student t with 3 degrees of freedom, Z / sqrt(χ²₃ / 3), drawn from g: torch.distributions ignores generators
    chi2 = torch.randn(3, ROWS, COLS, generator=g).pow(2).sum(0)
    W = torch.randn(ROWS, COLS, generator=g) / (chi2 / 3).sqrt() / COLS**0.5
    X = torch.randn(512, COLS, generator=g) @ (torch.eye(COLS) + 0.3 * torch.randn(COLS, COLS, generator=g))
    X[:, torch.randperm(COLS, generator=g)[:4]] *= 10
    h = Hessian(COLS)
    h.add_batch(X)
    return W, X, h.stats()


def output_error(X, W, W_hat):
    return (X @ (W - W_hat).T).pow(2).sum().item()


# --- clip ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SPECS)
def test_clip_search_never_loses_to_no_clipping_group_by_group(name):
    torch.manual_seed(0)
    spec = SPECS[name]
    W, X, stats = layer()
    ratio = clip.search(W, stats, spec)
    groups = spec.gran.to_groups(W)
    searched = clip.group_error(W, spec.fmt.project(groups, spec.fmt.fit(groups, ratio)), stats.H, spec.gran)
    plain = clip.group_error(W, spec.fmt.project(groups, spec.fmt.fit(groups)), stats.H, spec.gran)
    assert ratio.shape == groups[..., :1].shape
    assert set(ratio.unique().tolist()) <= {torch.tensor(r).item() for r in clip.ratios()}
    assert clip.ratios() == [1 - i / 20 for i in range(10)]  # AWQ's grid: 1 down to 0.55
    assert (searched <= plain).all()
    assert searched.sum() < 0.97 * plain.sum(), "heavy tails: the search should find clipping that pays"


def test_clip_group_error_is_the_output_error_of_the_group_alone():
    """``e_g H_gg e_gᵀ`` (what the search minimizes) is ``2/n ‖X_g e_gᵀ‖²``: AWQ's per-group criterion."""
    spec = SPECS["int3-g32"]
    W, X, stats = layer(seed=1)
    W_hat = rtn.solve(W, None, spec).dequantize()
    err = clip.group_error(W, spec.gran.to_groups(W_hat), stats.H, spec.gran)
    for g, cols in enumerate(torch.arange(COLS).split(32)):
        direct = 2 / X.shape[0] * (X[:, cols] @ (W - W_hat)[:, cols].T).pow(2).sum(0)
        torch.testing.assert_close(err[:, g], direct, rtol=1e-4, atol=1e-6)


def test_clip_then_gptq_beats_gptq_alone_on_heavy_tails():
    spec = SPECS["int3-g32"]
    W, X, stats = layer(seed=2)
    plain = gptq.solve(W, stats, spec).dequantize()
    clipped = gptq.solve(W, stats, spec, clip=clip.search(W, stats, spec)).dequantize()
    assert output_error(X, W, clipped) < output_error(X, W, plain)


def test_clip_on_a_weight_on_its_grid_changes_nothing():
    spec = SPECS["int4sym-g16"]
    W, X, stats = layer(seed=3)
    Wq = spec.fmt.fake(W, spec.gran)
    ratio = clip.search(Wq, stats, spec)
    assert (ratio == 1).all()
    assert torch.equal(rtn.solve(Wq, stats, spec, clip=ratio).dequantize(), Wq)


# --- lrc -----------------------------------------------------------------------------------------------------------

def whitened_error(W, W_hat, A, B, stats, damp=0.01):
    H = stats.H.double() + damp * torch.diag(stats.H).mean().double() * torch.eye(COLS, dtype=torch.float64)
    E = (W - W_hat).double() - (A @ B).double()
    return torch.trace(E @ H @ E.T).item()


@pytest.mark.parametrize("name", ["int3-g32", "mxfp4", "int2-g64"])
def test_low_rank_error_falls_with_rank_and_vanishes_at_full_rank(name):
    spec = SPECS[name]
    W, X, stats = layer(seed=4)
    W_hat = gptq.solve(W, stats, spec).dequantize()
    errors = []
    for rank in (1, 2, 4, 8, 16, 32, ROWS):
        A, B = lrc.compensate(W, W_hat, stats, lrc.Options(rank=rank))
        assert A.shape == (ROWS, rank) and B.shape == (rank, COLS)
        errors.append(whitened_error(W, W_hat, A, B, stats))
    none = whitened_error(W, W_hat, torch.zeros(ROWS, 1), torch.zeros(1, COLS), stats)
    assert all(b <= a * (1 + 1e-9) for a, b in zip([none, *errors], errors)), errors
    assert errors[-1] < 1e-8 * none
    # on the raw calibration inputs too (the dampening is 1% of the mean diagonal), with a clear gain at rank 8
    A, B = lrc.compensate(W, W_hat, stats, lrc.Options(rank=8))
    assert output_error(X, W, W_hat + A @ B) < 0.8 * output_error(X, W, W_hat)


def test_low_rank_of_no_error_is_zero():
    spec = SPECS["int4sym-g16"]
    W, X, stats = layer(seed=5)
    Wq = spec.fmt.fake(W, spec.gran)
    A, B = lrc.compensate(Wq, Wq, stats, lrc.Options(rank=4))
    assert torch.equal(A @ B, torch.zeros(ROWS, COLS))


def test_low_rank_bits_are_counted():
    assert lrc.extra_bits((ROWS, COLS), lrc.Options(rank=8)) == 16 * 8 * (ROWS + COLS)
    assert lrc.extra_bits((ROWS, COLS), lrc.Options(rank=1000)) == 16 * ROWS * (ROWS + COLS)  # capped


# --- lwc -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["int3-g32", "int4sym-g16", "int2-g64"])
def test_learned_clipping_lowers_the_block_loss(name):
    """A one-linear "block": LWC must lower its output MSE against the fp output, and end below plain RTN."""
    spec = SPECS[name]
    W, X, _ = layer(seed=6)
    linear = torch.nn.Linear(COLS, ROWS, bias=False)
    linear.weight.data = W.clone()
    linear.requires_grad_(False)
    inputs = list(X.split(16))
    targets = [x @ W.T for x in inputs]
    clips, history = lwc.train([("proj", linear)], inputs, targets, lambda x, i: linear(x), spec, lwc.Options(epochs=20))
    assert torch.equal(linear.weight, W), "the block is left as it was"
    assert history[-1] < history[0], history  # falls; the exact path depends on the BLAS thread count
    ratios = clips["proj"] if isinstance(clips["proj"], tuple) else (clips["proj"],)
    assert all(((r > 0) & (r < 1)).all() for r in ratios)
    learned = rtn.solve(W, None, spec, clip=clips["proj"]).dequantize()
    assert output_error(X, W, learned) < output_error(X, W, rtn.solve(W, None, spec).dequantize())


def test_learned_clipping_starts_where_omniquant_starts():
    spec = SPECS["int3-g32"]
    W, _, _ = layer(seed=7)
    lo, hi = lwc.LearnedClip(W, spec).clip()
    assert torch.allclose(hi, torch.sigmoid(torch.tensor(4.0))) and torch.allclose(lo, hi)


# --- recipes: steps compose, bad combinations are refused ----------------------------------------------------------

def test_steps_parse_into_roles_in_order():
    r = parse("clip+gptq.act+lrc16-w4g128")
    assert r.steps == (Step("clip"), Step("gptq", None, ("act",)), Step("lrc", 16))
    assert r.method == "gptq" and r.step("compensate") == Step("lrc", 16) and r.needs_calibration
    assert gptq.options(r.step("solve")) == gptq.Options(act_order=True)
    assert str(parse("gptq+lrc32-w4")) == "gptq+lrc-w4", "the default rank is not printed"
    assert not parse("rtn-w4").needs_calibration and parse("clip+rtn-w4").needs_calibration


@pytest.mark.parametrize("bad,message", [
    ("gptq+rtn-w4", r"one solver.*\[clip\|lwc\] \+ \[gptq\|rtn\] \+ \[lrc\]"),
    ("lrc+gptq-w4", r"in the order"),
    ("clip+lwc+rtn-w4", r"at most one step of each"),
    ("lwc-w4", r"solver required"),
    ("gptq.fast-w4", r"unknown flag 'fast' of gptq; valid flags: .act, .par"),
    ("rtn4-w4", r"rtn takes no number"),
    ("rtn+lrc0-w4", r"lrc's rank must be >= 1, got 0"),
    ("lwc0+rtn-w4", r"lwc's epochs must be >= 1, got 0"),
    ("clip21+rtn-w4", r"clip's steps must be 1..20, got 21"),
    ("lwc+rtn-wmxfp4", r"LWC learns the ends of INT ranges"),
    ("gptq-w4pt", r"per-tensor scale"),
    ("omniquant+rtn-w4", r"unknown step 'omniquant'.*known methods: clip, gptq, lrc, lwc, rtn; known transforms: awq, quarot"),
])
def test_bad_step_combinations_name_the_rule(bad, message):
    with pytest.raises(RecipeError, match=message):
        parse(bad)
