"""Laws every quantized model obeys, checked on real and tiny models."""
import copy

import pytest
import torch

from ptqsuite import models, pipeline
from ptqsuite.arch import arch_of
from ptqsuite.recipe import parse

MODELS = ["llama3-tiny-random", "stories260k"]


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    return models.load(models.get(request.param), "cpu", torch.float32)


def logits(model, tokens):
    return model(tokens, use_cache=False).logits


def tokens(loaded, n=64):
    return torch.arange(n).remainder(loaded.model.config.vocab_size).unsqueeze(0)


def quantized(loaded, recipe_id):
    model = copy.deepcopy(loaded.model)
    report = pipeline.quantize(model, parse(recipe_id), arch_of(model))
    return model, report


def test_16_bit_is_the_identity(loaded):
    model, report = quantized(loaded, "rtn-w16")
    x = tokens(loaded)
    assert torch.equal(logits(model, x), logits(loaded.model, x))
    assert report.bits_per_weight == 16


def test_only_block_linears_change(loaded):
    model, report = quantized(loaded, "rtn-w3g32")
    arch = arch_of(model)
    quantizable = {f"{name}.weight" for name, _ in arch.quantizable(model)}
    before = loaded.model.state_dict()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= quantizable
    assert report.linears == 7 * len(arch.block_list(model))


def test_quantizing_twice_changes_nothing(loaded):
    once, _ = quantized(loaded, "rtn-w4g32")
    twice = copy.deepcopy(once)
    pipeline.quantize(twice, parse("rtn-w4g32"), arch_of(twice))
    for (k, a), b in zip(once.state_dict().items(), twice.state_dict().values()):
        assert torch.equal(a, b), k


def test_same_inputs_same_numbers(loaded):
    a, _ = quantized(loaded, "rtn-w4")
    b, _ = quantized(loaded, "rtn-w4")
    x = tokens(loaded)
    assert torch.equal(logits(a, x), logits(b, x))


def test_fewer_bits_move_the_logits_more(loaded):
    x = tokens(loaded)
    ref = logits(loaded.model, x)
    err = [(logits(quantized(loaded, f"rtn-w{b}")[0], x) - ref).pow(2).mean() for b in (8, 4, 3, 2)]
    assert all(a < b for a, b in zip(err, err[1:])), err


def test_random_models_do_not_depend_on_global_rng():
    spec = models.get("llama3-tiny-random")
    torch.manual_seed(123)
    a = models.build_random(spec).state_dict()
    torch.manual_seed(456)
    b = models.build_random(spec).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_llama3_has_the_llama3_layout():
    c = models.load(models.get("llama3-tiny-random"), "cpu", torch.float32).model.config
    assert c.num_attention_heads // c.num_key_value_heads == 4  # GQA
    theta = c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") and c.rope_parameters else c.rope_theta
    assert theta == 500000.0 and not c.tie_word_embeddings
