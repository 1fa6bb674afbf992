"""Pre-quantization transforms (ptqsuite/transforms/): function preservation on every supported architecture,
orthogonality and what each search promises (the activation / KV-cache path they serve: test_activations.py)."""
import pytest
import torch
import pipeline_testing

from ptqsuite import data, models
from ptqsuite.arch import arch_of
from ptqsuite.recipe import parse
from ptqsuite.transforms import rotate

# Every layout in the registry: Llama (trained stories260K with its 172-wide MLP, the random Llama-3 layout,
# Llama-2's multi-head attention), Mistral (sliding window), Qwen2 (q/k/v biases, tied embeddings), Gemma ((1 + w)
# norms made plain on load, scaled embedding, head_dim · heads > hidden), the MoE layouts (Mixtral; Qwen2-MoE's shared
# expert and its gate, where a rewrite must reach the kept router too). SmolLM2 (tied, 576 = 36·16 wide, 9 heads
# of 64) joins where its weights are present.
ARCHS = ["stories260k", "llama3-tiny-random", "llama2-tiny-random", "mistral-tiny-random", "qwen2-tiny-random",
         "gemma-tiny-random", "mixtral-tiny-random", "qwen2-moe-tiny-random",
         pytest.param("smollm2-135m", marks=pytest.mark.xdist_group("smollm2-135m"))]
# The recipe each transform is fitted for: the format its search judges by, or what its loss quantizes. Applied,
# the states must preserve the function whatever they were fitted for.
FITTED_FOR = {"quarot": "quarot+rtn-w4a4kv4", "smooth": "smooth+rtn-w8a8", "awq": "awq+rtn-w3",
              "spinquant": "spinquant10+rtn-w4a4@tinystories.8x128.s0"}
TOLERANCE = 2e-4  # of max |logit|: fp32 rounding of float64 rewrites; a wrong sign or transpose is O(1)


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request):
    try:
        return models.load(models.get(request.param), "cpu", torch.float32)
    except models.WeightsMissing as e:
        if request.config.getoption("--require-models"):
            raise
        pytest.skip(str(e))


def ids(loaded, n=2, seqlen=96, seed=1):
    return data.calibration("c4", loaded.tokenizer, n, seqlen, seed)


def fit_apply(loaded, name):
    """Fit ``name`` on a copy of the model for its FITTED_FOR recipe (calibration capped at 8 x 128 tokens), apply
    the state to another copy."""
    recipe = parse(FITTED_FOR[name])
    c = recipe.calibration
    calib = data.calibration(c.dataset, loaded.tokenizer, min(c.n, 8), min(c.seqlen, 128), c.seed)
    return pipeline_testing.fit_apply(loaded.model, recipe, calib)


@pytest.mark.parametrize("name", sorted(FITTED_FOR))
def test_transform_preserves_the_function(loaded, name, record_property):
    """In fp32, with nothing quantized, the rewritten model's logits equal the original's to rounding."""
    if loaded.spec.name == "smollm2-135m" and name in ("awq", "spinquant"):
        pytest.skip("minutes on a CPU; their rewrites are algebra.py's, checked on SmolLM2 through quarot and smooth")
    target, _ = fit_apply(loaded, name)
    x = ids(loaded)
    with torch.no_grad():
        ref, out = loaded.model(x).logits, target(x).logits
    diff = (out - ref).abs().max().item()
    record_property("max_abs_logit_diff", diff)
    print(f"{name} on {loaded.spec.name}: max |Δlogit| = {diff:.3g} (max |logit| {ref.abs().max():.3g})")
    assert diff <= TOLERANCE * ref.abs().max().item(), diff


@pytest.mark.parametrize("name", ["quarot", "spinquant"])
def test_rotations_are_orthogonal(loaded, name):
    if loaded.spec.name != "stories260k":
        pytest.skip("one model suffices: the rotation's construction does not depend on the weights' values")
    _, state = fit_apply(loaded, name)
    for R in (state.residual, state.head):
        eye = torch.eye(R.shape[0], dtype=torch.float64)
        assert torch.allclose(R.double() @ R.double().T, eye, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", [8, 64, 172, 576, 896])
def test_online_hadamard_matches_its_weight_side(n):
    """What the online transform computes (fwht) is x R for the R rotate.py folds into the weight."""
    from ptqsuite.activations import rotate_online

    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(rotate_online(x), x @ rotate.normalized_hadamard(n), atol=1e-12, rtol=0)


@pytest.fixture(scope="module")
def stories():
    return models.load(models.get("stories260k"), "cpu", torch.float32)


def test_awq_never_loses_to_no_scaling(stories):
    """r = 0 (s = 1) is on AWQ's grid, so the chosen scales' scope error is at most the unscaled one, and at W3
    some group gains strictly."""
    _, state = fit_apply(stories, "awq")
    assert state.losses and all(v["best"] <= v["r=0"] for v in state.losses.values())
    assert any(v["best"] < v["r=0"] and state.ratios[k] > 0 for k, v in state.losses.items())


def test_smooth_flattens_the_activation_outliers(stories):
    """After smoothing with α = 0.5, each norm-fed group's input channel ranges are the square root of what they
    were (up to the weight factor): the largest-to-median ratio of max|X_j| falls."""
    from ptqsuite.transforms import smooth

    target, state = fit_apply(stories, "smooth")
    arch = arch_of(target)
    calib = data.calibration("c4", stories.tokenizer, 8, 128, 0)
    with torch.no_grad():
        after = smooth.input_absmax(target, arch, calib, "cpu")
    spread = lambda m: float(m.max() / m.median())  # noqa: E731
    for key, before in state.act_absmax.items():
        assert spread(after[key]) < spread(before), (key, spread(before), spread(after[key]))


def test_spinquant_lowers_the_quantized_loss(stories):
    """Cayley SGD on R1 lowers the quantized model's loss on the calibration sequences it reports on."""
    _, state = fit_apply(stories, "spinquant")
    before, after = state.held_out
    assert len(state.losses) == 10 and after < before, state.held_out
