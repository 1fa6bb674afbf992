"""What RTN must show on the real models, from the same cached results the matrix cases use."""
import pytest

from ptqsuite import models
from ptqsuite.matrix import Case
from ptqsuite.plugin import run_or_skip
from ptqsuite.recipe import parse

# grouped with the model's matrix cases under --dist loadgroup, so they reuse the cached results
REAL = [pytest.param(m, marks=pytest.mark.xdist_group(m)) for m in ("stories260k", "smollm2-135m")]


def metrics(runner, opts, recipe_id, model):
    return run_or_skip(runner, Case(parse(recipe_id), models.get(model), "default"), opts.require_models).payload["metrics"]


@pytest.mark.parametrize("model", REAL)
def test_w8_within_one_percent_of_fp(ptq_runner, ptq_options, model):
    m = metrics(ptq_runner, ptq_options, "rtn-w8", model)
    assert m["wikitext2.recovery"]["value"] == pytest.approx(1, abs=0.01)


@pytest.mark.parametrize("model", REAL)
def test_perplexity_falls_with_bits(ptq_runner, ptq_options, model):
    ppl = {b: metrics(ptq_runner, ptq_options, f"rtn-w{b}", model)["wikitext2.ppl"]["value"] for b in (2, 3, 4)}
    assert ppl[4] < ppl[3] < ppl[2], ppl
