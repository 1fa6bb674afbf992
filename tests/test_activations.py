"""Activation and KV-cache quantization at run time (ptqsuite/activations.py): 16 bits is the identity, every linear
and every attention is reached, cached decoding equals one full forward (so perplexity and generation see the same
quantized cache), static scales are fitted and then fixed, kept layers stay more precise, KIVI's residual block is
exact. stories260K: trained weights, 5 layers, GQA 8:4, head_dim 8, so every path runs in a second."""
import copy

import pytest
import torch

from ptqsuite import data, models, pipeline
from ptqsuite.activations import KV_TOKEN_BLOCK, LinearInput, block_quantized_keys, fake
from ptqsuite.arch import arch_of
from ptqsuite.recipe import parse

CALIB = "@tinystories.8x128.s0"
# Every K/V scale kind: per token and head, groups within a head, static per layer, KIVI per channel.
KV_SPECS = ["kv4", "kv4g4", "kv8pt", "kvfp8pt", "kv2pc", "kv4pc"]


@pytest.fixture(scope="module")
def stories():
    return models.load(models.get("stories260k"), "cpu", torch.float32)


def ids(loaded, n=1, seqlen=80, seed=1):
    return data.calibration("tinystories", loaded.tokenizer, n, seqlen, seed)


def quantized(loaded, recipe_id):
    model, recipe = copy.deepcopy(loaded.model), parse(recipe_id)
    calib = data.calibration("tinystories", loaded.tokenizer, 8, 128, 0) if recipe.needs_calibration else None
    pipeline.quantize(model, recipe, arch_of(model), calib)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("recipe", ["rtn-w16a16kv16", "quarot+rtn-w16a16kv16"])
def test_16_bit_activations_and_kv_are_the_identity(stories, recipe):
    """a16/kv16 install the hooks (and the attention wrapper) and change nothing, bit for bit, in a forward and in
    greedy generation."""
    hooked, plain = quantized(stories, recipe), quantized(stories, recipe.replace("a16kv16", ""))
    assert sum(isinstance(m, LinearInput) for m in hooked.modules()) == len(arch_of(hooked).quantizable(hooked))
    assert hooked.config._attn_implementation.startswith("ptqsuite_")
    x = ids(stories, seqlen=24)
    assert torch.equal(logits(hooked, x), logits(plain, x))
    with torch.no_grad():
        out = [m.generate(x, max_new_tokens=12, do_sample=False) for m in (hooked, plain)]
    assert torch.equal(*out)


@pytest.mark.parametrize("kv", KV_SPECS)
def test_cached_decoding_equals_a_full_forward(stories, kv):
    """Decoding the last tokens one at a time through the cache gives the logits of one full forward: what a
    quantize-on-store cache returns does not depend on when it is read. 80 tokens: KIVI blocks of 32 complete
    during decoding (positions 63 -> 64) and within the prefill."""
    model = quantized(stories, f"rtn-w16{kv}{CALIB if 'pt' in kv else ''}")
    x = ids(stories)
    full = logits(model, x)
    with torch.no_grad():
        out = model(x[:, :60], use_cache=True)
        past, steps = out.past_key_values, [out.logits[:, -1]]
        for i in range(60, x.shape[1] - 1):
            out = model(x[:, i:i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, 59:-1], atol=2e-4, rtol=0)
    assert not torch.allclose(full, logits(stories.model, x), atol=1e-2), f"{kv} changed nothing"


def test_generation_reads_the_quantized_cache(stories):
    """Greedy generation with KV2 goes elsewhere than with the unquantized cache: the cache quantizer is active in
    generate(), not only in perplexity's full forwards."""
    x = ids(stories, seqlen=40)
    with torch.no_grad():
        fp = stories.model.generate(x, max_new_tokens=24, do_sample=False)
        kv2 = quantized(stories, "rtn-w16kv2").generate(x, max_new_tokens=24, do_sample=False)
    assert not torch.equal(fp, kv2)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_keeps_the_newest_block_unquantized(stories, bits):
    """Queries of the first block read only unquantized K and V: their logits are the fp model's (to the eager
    attention's rounding); later ones read quantized blocks."""
    model = quantized(stories, f"rtn-w16kv{bits}pc")
    x = ids(stories)
    q, fp = logits(model, x), logits(stories.model, x)
    assert torch.allclose(q[:, :KV_TOKEN_BLOCK], fp[:, :KV_TOKEN_BLOCK], atol=1e-4, rtol=0)
    assert not torch.allclose(q[:, KV_TOKEN_BLOCK:], fp[:, KV_TOKEN_BLOCK:], atol=1e-2)


def test_kivi_keys_are_per_channel_per_block():
    """Each channel of each complete block is on its own 2^b-level grid; the incomplete tail is left as it is."""
    spec = parse("rtn-w16kv2pc").kv
    key = torch.randn(2, 3, 2 * KV_TOKEN_BLOCK + 5, 8, generator=torch.Generator().manual_seed(0))
    q = block_quantized_keys(key, spec)
    assert torch.equal(q[:, :, 2 * KV_TOKEN_BLOCK:], key[:, :, 2 * KV_TOKEN_BLOCK:])
    blocks = q[:, :, :2 * KV_TOKEN_BLOCK].reshape(2, 3, 2, KV_TOKEN_BLOCK, 8).transpose(-1, -2).reshape(-1, KV_TOKEN_BLOCK)
    assert max(len(row.unique()) for row in blocks) <= 4
    assert len(q[0, 0, :KV_TOKEN_BLOCK, 0].unique()) > 1 and not torch.equal(q, key)


def _inputs(model, x) -> dict:
    """Each quantized linear's input after its quantizer, for ``x``."""
    seen = {}
    for name, linear in arch_of(model).quantizable(model):
        linear.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, m.ptq_input(args[0])))
    with torch.no_grad():
        model(x)
    return seen


def test_activation_quantization_reaches_every_linear(stories):
    """With a4 every quantizable linear's input is on a per-token 4-bit grid: at most 16 distinct values a row."""
    model = quantized(stories, "rtn-w16a4")
    seen = _inputs(model, ids(stories, seqlen=64))
    assert len(seen) == len(arch_of(model).quantizable(model))
    assert max(len(row.unique()) for x in seen.values() for row in x.reshape(-1, x.shape[-1])) <= 16


def test_static_scales_are_calibrated_then_fixed(stories):
    """a4pt: one scale per linear, fitted on calibration data, then the same for every input: a whole forward's
    inputs of a linear take at most 16 values, and out-of-range inputs clip to the calibrated range."""
    model = quantized(stories, f"rtn-w16a4pt{CALIB}")
    quantizers = [linear.ptq_input for _, linear in arch_of(model).quantizable(model)]
    assert all(q.params is not None and q.observer is None for q in quantizers)
    seen = _inputs(model, ids(stories, n=2, seqlen=100, seed=7))
    assert max(len(x.unique()) for x in seen.values()) <= 16
    lin = quantizers[0]
    big = torch.full((1, 64), 1e4)
    assert fake(big, lin.spec, lin.params).max() < 1e3


def test_static_scales_refuse_to_run_uncalibrated(stories):
    spec = parse(f"rtn-w16a8pt{CALIB}").act
    with pytest.raises(RuntimeError, match="never calibrated"):
        fake(torch.randn(3, 8), spec)


@pytest.mark.parametrize("kept, most", [("down_proj16", None), ("down_proj8", 256)])
def test_kept_layers_stay_more_precise(stories, kept, most):
    """a4.down_proj<b>: down_proj's inputs at b bits (16: untouched), every other linear's at 4."""
    model = quantized(stories, f"rtn-w16a4.{kept}")
    x = ids(stories, seqlen=64)
    seen = _inputs(model, x)
    for name, value in seen.items():
        distinct = max(len(row.unique()) for row in value.reshape(-1, value.shape[-1]))
        if name.endswith("down_proj"):
            assert distinct > 16 and (most is None or distinct <= most), (name, distinct)
        else:
            assert distinct <= 16, (name, distinct)
    if most is None:
        raw = {}
        for name, linear in arch_of(model).quantizable(model):
            linear.register_forward_pre_hook(lambda m, args, name=name: raw.__setitem__(name, args[0]), prepend=True)
        with torch.no_grad():
            model(x)
        assert all(torch.equal(raw[n], seen[n]) for n in seen if n.endswith("down_proj"))


def test_a_kept_layer_must_exist(stories):
    with pytest.raises(ValueError, match=r"no quantized linear of that name; its linears: down_proj, gate_proj"):
        quantized(stories, "rtn-w16a4.down8")
