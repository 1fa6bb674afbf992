"""The sequential calibration pipeline (ptqsuite/pipeline.py) on real models: what each linear is calibrated on,
GPTQ's per-layer law through the whole loop, idempotence, determinism, and the errors it raises."""
import copy

import pytest
import torch
from pipeline_testing import Recorder

from ptqsuite import data, models, pipeline
from ptqsuite.arch import arch_of
from ptqsuite.mitigation import clip, rtn
from ptqsuite.recipe import parse

# stories260K: a real trained model, 5 blocks, and a 172-wide MLP (tail groups). The tiny random Llama runs the
# same code path through the accuracy matrix.
MODELS = ["stories260k"]


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    return models.load(models.get(request.param), "cpu", torch.float32)


def calibration(loaded, n=8, seqlen=128):
    return data.calibration("tinystories", loaded.tokenizer, n, seqlen, seed=0)


def quantize(loaded, recipe_id, monkeypatch=None, calib=None):
    model = copy.deepcopy(loaded.model)
    recorder = Recorder(monkeypatch, model) if monkeypatch else None
    report = pipeline.quantize(model, parse(recipe_id), arch_of(model), calib if calib is not None else calibration(loaded))
    return model, report, recorder


def input_hessians(model, ids):
    """``2 XᵀX / n`` of every quantizable linear's inputs in one forward of ``model``."""
    H, handles = {}, []
    for name, linear in arch_of(model).quantizable(model):
        def hook(module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            H[name] = (2 * x.T @ x / x.shape[0]).float()
        handles.append(linear.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return H


def test_true_sequential_calibrates_each_linear_on_the_quantized_model_before_it(loaded, monkeypatch):
    """With true-sequential GPTQ, linear L's inputs come from the model with every block before it and every
    group before L's in its block already quantized, and L's own group and later ones not yet: exactly the inputs
    L gets in the finished model. So the Hessians the pipeline collected equal those of the finished model; that
    pins capture, the blocks' keyword arguments, propagation and the stage order together."""
    calib = calibration(loaded)
    model, _, rec = quantize(loaded, "gptq-w3g32", monkeypatch, calib)
    final = input_hessians(model, calib)
    assert set(rec.seen) == set(final)
    for name, (_, _, H, _) in rec.seen.items():
        torch.testing.assert_close(H, final[name], rtol=1e-4, atol=1e-5 * final[name].abs().max().item(), msg=name)


def test_not_true_sequential_calibrates_later_groups_on_the_fp_block(loaded, monkeypatch):
    calib = calibration(loaded)
    model, _, rec = quantize(loaded, "gptq.par-w3g32", monkeypatch, calib)
    final = input_hessians(model, calib)
    o_proj = [n for n in rec.seen if n.endswith("o_proj")]
    assert all(not torch.allclose(rec.seen[n][2], final[n], rtol=1e-3) for n in o_proj)
    first = [n for n in rec.seen if n.endswith("q_proj")][0]  # block 0's first group sees the embeddings either way
    torch.testing.assert_close(rec.seen[first][2], final[first], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recipe", ["gptq-w3", "gptq-w4g32", "gptq.act-w3g32", "gptq-wmxfp4", "gptq-wnvfp4"])
def test_gptq_output_error_at_most_rtns_on_every_layer(loaded, monkeypatch, recipe):
    """The paper's claim, on every linear of a real model, on the calibration inputs it was given."""
    model, _, rec = quantize(loaded, recipe, monkeypatch)
    spec = parse(recipe).weight
    for name, (W, W_gptq, H, _) in rec.seen.items():
        W_rtn = rtn.solve(W, None, spec).dequantize()
        err = lambda W_hat: torch.trace((W - W_hat) @ H @ (W - W_hat).T).item()  # noqa: E731
        assert err(W_gptq) <= err(W_rtn) * (1 + 1e-5), name


def test_clip_and_lrc_do_their_part_on_every_layer(loaded, monkeypatch):
    """clip+rtn: each group's own output error at most plain RTN's; gptq+lrc: whole-layer error below GPTQ's."""
    _, _, clipped = quantize(loaded, "clip+rtn-w3g32", monkeypatch)
    spec = parse("rtn-w3g32").weight
    for name, (W, W_hat, H, _) in clipped.seen.items():
        ours = clip.group_error(W, spec.gran.to_groups(W_hat), H, spec.gran)
        plain = clip.group_error(W, spec.gran.to_groups(rtn.solve(W, None, spec).dequantize()), H, spec.gran)
        assert (ours <= plain * (1 + 1e-5) + 1e-12).all(), name
    _, _, plain_gptq = quantize(loaded, "gptq-w3g32", monkeypatch)
    _, report, compensated = quantize(loaded, "gptq+lrc4-w3g32", monkeypatch)
    for name, (W, W_hat, H, _) in compensated.seen.items():
        err = lambda W_hat: torch.trace((W - W_hat) @ H @ (W - W_hat).T).item()  # noqa: E731
        assert err(W_hat) < err(plain_gptq.seen[name][1]), name
    assert report.bits_per_weight > parse("gptq-w3g32").weight.fmt.bits_per_element((64, 64), spec.gran)


@pytest.mark.parametrize("recipe", ["gptq-w4g32sym", "gptq.act-w4g32sym", "clip+rtn-w4g32sym", "clip+gptq+lrc-w4g32sym",
                                    "gptq-wmxfp4"])
def test_quantizing_a_quantized_model_changes_nothing(loaded, recipe):
    """On a model already on the grid every method is RTN, which is the identity there: no error to feed back,
    no clipping that beats none, nothing to compensate. (LWC is the exception by design: σ(γ) < 1 always
    shrinks the range.)"""
    once = copy.deepcopy(loaded.model)
    pipeline.quantize(once, parse("rtn-" + recipe.split("-", 1)[1]), arch_of(once))
    twice = copy.deepcopy(once)
    pipeline.quantize(twice, parse(recipe), arch_of(twice), calibration(loaded))
    for (k, a), b in zip(once.state_dict().items(), twice.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("recipe", ["gptq.act-w3g32", "lwc2+rtn-w3g32"])
def test_same_calibration_same_numbers(loaded, recipe):
    a, ra, _ = quantize(loaded, recipe)
    b, rb, _ = quantize(loaded, recipe)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert ra.bits_per_weight == rb.bits_per_weight


def test_lwc_beats_rtn_on_the_block_outputs(loaded):
    """LWC trains on the block outputs: after it, the quantized model's last hidden state is closer to fp's."""
    calib = calibration(loaded)
    final = lambda m: m(calib, use_cache=False, output_hidden_states=True).hidden_states[-1]  # noqa: E731
    with torch.no_grad():
        fp = final(loaded.model)
        rtn_model = copy.deepcopy(loaded.model)
        pipeline.quantize(rtn_model, parse("rtn-w3g32"), arch_of(rtn_model))
        lwc_model, _, _ = quantize(loaded, "lwc2+rtn-w3g32", calib=calib)
        assert (final(lwc_model) - fp).pow(2).mean() < (final(rtn_model) - fp).pow(2).mean()


def test_report_says_where_the_time_went(loaded):
    _, report, _ = quantize(loaded, "gptq-w4g32")
    assert {"capture", "forward", "hessian", "solve"} <= set(report.timings)
    assert all(v >= 0 for v in report.timings.values())


def test_a_calibrated_recipe_without_calibration_says_so(loaded):
    model = copy.deepcopy(loaded.model)
    with pytest.raises(ValueError, match=r"gptq-w4g32 needs calibration data.*'gptq'"):
        pipeline.quantize(model, parse("gptq-w4g32"), arch_of(model))
