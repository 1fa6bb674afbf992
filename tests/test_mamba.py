"""Mamba (ptqsuite/arch/mamba.py) on its tiny random model: the layout and init, function-preserving transforms,
every recipe kind that applies running with the SSM's parameters untouched, calibration through dt_proj's tap (a
linear the model applies through its weight), and the KV-cache recipes refusing."""
import copy
import math

import pytest
import torch
import pipeline_testing

from ptqsuite import data, models, pipeline
from ptqsuite.arch import arch_of
from ptqsuite.arch.mamba import DT_MAX, DT_MIN, MAMBA
from ptqsuite.mitigation import rtn
from ptqsuite.recipe import parse
from ptqsuite.transforms import rotate, spin

MODEL = "mamba-tiny-random"
QUANTIZED = ("in_proj", "x_proj", "dt_proj", "out_proj")
KEPT = ("conv1d.weight", "conv1d.bias", ".A_log", ".D", "dt_proj.bias")  # the SSM's own parameters
STREAM = ("backbone.embeddings", "norm", "in_proj", "out_proj", "backbone.norm_f", "lm_head")  # what R1 rewrites
TOLERANCE = 2e-5  # of max |logit|: fp32 rounding of float64 rewrites, measured 1e-6 of it here; a wrong sign is O(1)
# One recipe per step kind and format role that applies to Mamba.
APPLIES = [
    "rtn-w4g128",
    "gptq-w4g128@c4.8x64.s0",
    "clip+gptq+lrc8-w3@c4.8x64.s0",
    "lwc1+rtn-w4g64sym@c4.4x64.s0",  # a weight parametrization: reaches dt_proj, whose weight is read as an attribute
    "awq+clip+rtn-w4g64@c4.4x64.s0",
    "smooth+rtn-w8a8@c4.8x64.s0",
    "quarot+rtn-w4a4",
    "spinquant2+rtn-w4a4@c4.4x64.s0",
    "rtn-w8a8",
    "rtn-w8a8pt@c4.8x64.s0",  # static scales: every observer must see data, dt_proj's through its tap
]
NO_KV_CACHE = ["rtn-w4a8kv4", "quarot+rtn-w4a4kv4", "rtn-w4kv4pc"]
FITTED_FOR = {"quarot": "quarot+rtn-w4a4", "smooth": "smooth+rtn-w8a8@c4.8x64.s0", "awq": "awq+rtn-w3@c4.4x64.s0",
              "spinquant": "spinquant2+rtn-w4a4@c4.4x64.s0"}


@pytest.fixture(scope="module")
def loaded():
    return models.load(models.get(MODEL), "cpu", torch.float32)


@pytest.fixture(scope="module")
def tokens(loaded):
    return data.calibration("c4", loaded.tokenizer, 2, 96, seed=1)


def calibration(loaded, recipe):
    c = recipe.calibration
    return data.calibration(c.dataset, loaded.tokenizer, c.n, c.seqlen, c.seed) if recipe.needs_calibration else None


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def quantized(loaded, recipe_id):
    model, recipe = copy.deepcopy(loaded.model), parse(recipe_id)
    report = pipeline.quantize(model, recipe, arch_of(model), calibration(loaded, recipe))
    return model, report


def params(model, suffixes) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.endswith(suffixes)}


def test_layout_is_mamba_scaled_down(loaded):
    model, c = loaded.model, loaded.model.config
    assert arch_of(model) is MAMBA
    assert (c.state_size, c.conv_kernel, c.expand, c.time_step_rank) == (16, 4, 2, c.hidden_size // 16)
    assert c.residual_in_fp32 and (c.bos_token_id, c.eos_token_id) == (loaded.tokenizer.bos_token_id,
                                                                        loaded.tokenizer.eos_token_id)
    names = [n.rsplit(".", 1)[-1] for n, _ in MAMBA.quantizable(model)]
    assert names == list(QUANTIZED) * c.num_hidden_layers


def test_init_is_mambas():
    """The SSM's parameters as Mamba draws them, whatever the global RNG: S4D-real A, D = 1, softplus(dt bias)
    log-uniform over [dt_min, dt_max], the depthwise convolution at std fan_in^-1/2."""
    spec = models.get(MODEL)
    torch.manual_seed(1)
    model = models.build_random(spec)
    torch.manual_seed(2)
    again = models.build_random(spec).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    for block in MAMBA.block_list(model):
        mixer = block.mixer
        n = mixer.A_log.shape[1]
        assert torch.equal(mixer.A_log, torch.log(torch.arange(1, n + 1.0)).expand_as(mixer.A_log))
        assert torch.equal(mixer.D, torch.ones_like(mixer.D))
        log_dt = torch.nn.functional.softplus(mixer.dt_proj.bias.double()).log()
        lo, hi = math.log(DT_MIN), math.log(DT_MAX)
        assert log_dt.min() >= lo - 1e-6 and log_dt.max() <= hi + 1e-6
        assert abs(log_dt.mean().item() - (lo + hi) / 2) < 0.1 * (hi - lo)  # spread over the range, not clumped
        assert abs(mixer.conv1d.weight.std().item() - mixer.conv_kernel_size ** -0.5) < 0.05


def test_fp_forward_is_finite_and_not_uniform(loaded, tokens):
    out = logits(loaded.model, tokens)
    assert torch.isfinite(out).all()
    p = torch.softmax(out, dim=-1)
    entropy = -(p * p.log()).sum(-1)
    assert entropy.max() < math.log(out.shape[-1]) - 0.1  # every position prefers some tokens
    assert (p.max(-1).values < 0.5).float().mean() > 0.5  # and is not saturated (a random tied head would be)


def fit_apply(loaded, name):
    """Fit ``name`` on a copy of the model for its FITTED_FOR recipe, apply the state to another copy."""
    recipe = parse(FITTED_FOR[name])
    return pipeline_testing.fit_apply(loaded.model, recipe, calibration(loaded, recipe))


@pytest.mark.parametrize("name", sorted(FITTED_FOR))
def test_transform_preserves_the_function(loaded, tokens, name):
    """Rotations reach only the residual stream's readers and writers (and out_proj's online R4); scales only the
    norm and in_proj; the SSM is untouched. In fp32, with nothing quantized, the logits are the original's."""
    target, _ = fit_apply(loaded, name)
    before = loaded.model.state_dict()
    changed = {k for k, v in target.state_dict().items() if not torch.equal(v, before[k])}
    allowed = STREAM if name in ("quarot", "spinquant") else ("norm", "in_proj")
    assert changed and all(k.removesuffix(".weight").endswith(allowed) for k in changed), changed
    ref, out = logits(loaded.model, tokens), logits(target, tokens)
    assert (out - ref).abs().max() <= TOLERANCE * ref.abs().max()


def test_quarot_has_no_head_rotation_and_rotates_out_proj_online(loaded):
    from ptqsuite.activations import linear_input

    target, state = fit_apply(loaded, "quarot")
    assert state.head is None
    assert all(linear_input(b.mixer.out_proj).rotate for b in MAMBA.block_list(target))
    assert not any(hasattr(b.mixer.x_proj, "ptq_input") for b in MAMBA.block_list(target))


@pytest.mark.parametrize("recipe_id", APPLIES)
def test_recipe_runs_quantizing_the_linears_and_keeping_the_ssm(loaded, tokens, recipe_id):
    model, report = quantized(loaded, recipe_id)
    blocks = len(MAMBA.block_list(model))
    kept, after = params(loaded.model, KEPT), model.state_dict()
    assert len(kept) == len(KEPT) * blocks and all(torch.equal(v, after[k]) for k, v in kept.items())
    weights = params(loaded.model, tuple(f"{n}.weight" for n in QUANTIZED))
    assert len(weights) == report.linears == len(QUANTIZED) * blocks
    assert all(not torch.equal(W, after[k]) for k, W in weights.items())
    out = logits(model, tokens)
    assert torch.isfinite(out).all() and not torch.equal(out, logits(loaded.model, tokens))


def test_16_bit_is_the_identity(loaded, tokens):
    """w16 leaves the weights, a16 hooks into every linear's input (dt_proj's at its tap) and changes nothing."""
    model, report = quantized(loaded, "rtn-w16a16")
    assert torch.equal(logits(model, tokens), logits(loaded.model, tokens))
    assert report.bits_per_weight == 16


@pytest.mark.parametrize("name", QUANTIZED)
def test_activation_quantization_reaches_every_linear(loaded, tokens, name):
    """Keeping one linear's inputs at 16 bits changes the A4 model's logits: its inputs were quantized (dt_proj's,
    which the model never calls, through x_proj's output)."""
    all_a4, _ = quantized(loaded, "rtn-w16a4")
    one_kept, _ = quantized(loaded, f"rtn-w16a4.{name}16")
    assert not torch.equal(logits(all_a4, tokens), logits(one_kept, tokens))


def input_hessians(model, ids) -> dict:
    """``2 XᵀX / n`` of each linear's inputs in one forward; dt_proj's are x_proj's first dt_rank outputs (Δ)."""
    H, handles = {}, []
    rank = model.config.time_step_rank

    def add(name, x):
        x = x.reshape(-1, x.shape[-1]).double()
        H[name] = (2 * x.T @ x / x.shape[0]).float()

    for b, block in enumerate(MAMBA.block_list(model)):
        prefix = f"backbone.layers.{b}.mixer"
        for name in ("in_proj", "x_proj", "out_proj"):
            handles.append(getattr(block.mixer, name).register_forward_pre_hook(
                lambda m, args, name=f"{prefix}.{name}": add(name, args[0])))
        handles.append(block.mixer.x_proj.register_forward_hook(
            lambda m, args, out, name=f"{prefix}.dt_proj": add(name, out[..., :rank])))
    logits(model, ids)
    for h in handles:
        h.remove()
    return H


def test_gptq_calibrates_every_linear_on_what_it_reads(loaded, monkeypatch):
    """True-sequential GPTQ: each linear's Hessian is that of its inputs in the finished model (dt_proj's: the Δ
    columns of the quantized x_proj's output, over every calibration token), and GPTQ's output error on those
    inputs is at most RTN's on every linear."""
    recipe = parse("gptq-w4g128@c4.8x64.s0")
    calib = calibration(loaded, recipe)
    model = copy.deepcopy(loaded.model)
    rec = pipeline_testing.Recorder(monkeypatch, model)
    pipeline.quantize(model, recipe, MAMBA, calib)
    final = input_hessians(model, calib)
    assert set(rec.seen) == set(final)
    for name, (W, W_gptq, H, n) in rec.seen.items():
        assert n == calib.numel(), name
        torch.testing.assert_close(H, final[name], rtol=1e-4, atol=1e-5 * final[name].abs().max().item(), msg=name)
        err = lambda W_hat: torch.trace((W - W_hat) @ H @ (W - W_hat).T).item()  # noqa: E731
        assert err(W_gptq) <= err(rtn.solve(W, None, recipe.weight).dequantize()) * (1 + 1e-5), name


def test_spinquant_loss_is_the_recipes_quantized_model(loaded):
    """At R1's start, SpinQuant's loss is that of QuaRot (same seed) + RTN: every quantized linear, x_proj and
    dt_proj included (R1 does not reach them), is quantized in the loss as the recipe will quantize it."""
    recipe = parse("spinquant1+rtn-w4@c4.8x64.s0")
    calib = calibration(loaded, recipe)
    state = spin.fit(copy.deepcopy(loaded.model), MAMBA, calib, recipe, spin.options(recipe.transforms[0]), "cpu")
    model = copy.deepcopy(loaded.model)
    rotate.apply(model, MAMBA, rotate.fit(model, MAMBA, None, recipe, rotate.Options(seed=recipe.calibration.seed)))
    pipeline.quantize(model, parse("rtn-w4"), MAMBA)
    with torch.no_grad():
        loss = sum(model(ids[None], labels=ids[None], use_cache=False).loss.item()
                   for ids in calib[:spin.EVAL]) / spin.EVAL
    assert abs(state.held_out[0] - loss) <= 1e-5 * loss, (state.held_out[0], loss)


@pytest.mark.parametrize("recipe_id", NO_KV_CACHE)
def test_kv_cache_recipes_refuse(loaded, recipe_id):
    model = copy.deepcopy(loaded.model)
    with pytest.raises(ValueError, match="no KV cache"):
        pipeline.quantize(model, parse(recipe_id), MAMBA)
