"""What RTN and the mitigation steps must show on the real models, from the same cached results the matrix cases use."""
import pytest

from ptqsuite import models
from ptqsuite.matrix import Case
from ptqsuite.plugin import run_or_skip
from ptqsuite.recipe import parse

# grouped with the model's matrix cases under --dist loadgroup, so they reuse the cached results
REAL = [pytest.param(m, marks=pytest.mark.xdist_group(m)) for m in ("stories260k", "smollm2-135m")]


def metrics(runner, opts, recipe_id, model):
    """The metrics of the matrix case ``recipe_id``-``model`` (with the evaluations the matrix gives it), or of that
    recipe as a perplexity-only case when the matrix has none."""
    case = next((c for c in opts.matrix.cases if c.id == f"{parse(recipe_id)}-{model}"), None)
    case = case or Case(parse(recipe_id), models.get(model), "default")
    return run_or_skip(runner, case, opts.require_models).payload["metrics"]


@pytest.mark.parametrize("model", REAL)
def test_w8_within_one_percent_of_fp(ptq_runner, ptq_options, model):
    m = metrics(ptq_runner, ptq_options, "rtn-w8", model)
    assert m["wikitext2.recovery"]["value"] == pytest.approx(1, abs=0.01)


RTN_BITS = {"stories260k": (2, 3, 4), "smollm2-135m": (3, 4, 8)}  # SmolLM2 W2 (ppl 1e7) is full-tier


@pytest.mark.parametrize("model", REAL)
def test_perplexity_falls_with_bits(ptq_runner, ptq_options, model):
    ppl = [metrics(ptq_runner, ptq_options, f"rtn-w{b}", model)["wikitext2.ppl"]["value"] for b in RTN_BITS[model]]
    assert ppl == sorted(ppl, reverse=True) and len(set(ppl)) == len(ppl), dict(zip(RTN_BITS[model], ppl))


@pytest.mark.parametrize("model", REAL[:1])  # SmolLM2's 8-bit float cases are full-tier: minutes each on a CPU
@pytest.mark.parametrize("recipe", ["rtn-wfp8", "rtn-wmxfp8"])
def test_8_bit_floats_within_two_percent_of_fp(ptq_runner, ptq_options, model, recipe):
    """Measured recovery on stories260K: CPU fp32, 128 windows: FP8 1.004, MXFP8 1.002 (noise about 0.5 %); H200
    bf16, the whole split: FP8 0.9935, MXFP8 0.9863, with INT8 per channel at 0.9941 for scale. MXFP8's one E8M0
    scale per 32 weights (elements' relative error up to 2^-4) costs a 64-wide model 1.4 %: 1 % was CPU-noise deep."""
    m = metrics(ptq_runner, ptq_options, recipe, model)
    assert m["wikitext2.recovery"]["value"] == pytest.approx(1, abs=0.02)


@pytest.mark.parametrize("model", REAL)
def test_nvfp4_beats_mxfp4(ptq_runner, ptq_options, model):
    """E4M3 block scales over 16 elements (4.5 bits) against E8M0 over 32 (4.25 bits): the finer scale wins in KL
    divergence from the fp model and in perplexity, as NVIDIA and arXiv 2507.17417 report."""
    nv, mx = (metrics(ptq_runner, ptq_options, r, model) for r in ("rtn-wnvfp4", "rtn-wmxfp4"))
    assert nv["wikitext2.kld"]["value"] < mx["wikitext2.kld"]["value"]
    assert nv["wikitext2.ppl"]["value"] < mx["wikitext2.ppl"]["value"]


# Error mitigation against RTN at the same format, on the calibration each model's matrix cases use.
CALIBRATED = {
    "stories260k": ("gptq", "@tinystories.128x512.s0"),
    "smollm2-135m": ("gptq.act", "@c4.8x512.s0"),  # natural order loses at W4 here: see the README
}


@pytest.mark.parametrize("model", [REAL[0], pytest.param("smollm2-135m", marks=[pytest.mark.xdist_group("smollm2-135m"),
                                                                               pytest.mark.slow])])  # 2 x 2.5 min
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_at_most_rtn(ptq_runner, ptq_options, model, bits):
    """GPTQ's promise, on real models: never worse than round-to-nearest in perplexity at W3 and W4."""
    method, calib = CALIBRATED[model]
    gptq = metrics(ptq_runner, ptq_options, f"{method}-w{bits}{calib}", model)["wikitext2.ppl"]["value"]
    rtn = metrics(ptq_runner, ptq_options, f"rtn-w{bits}", model)["wikitext2.ppl"]["value"]
    assert gptq <= rtn, (gptq, rtn)


@pytest.mark.parametrize("model", REAL[:1])
@pytest.mark.parametrize("better,worse", [
    ("clip+gptq-w3", "gptq-w3"),  # the clipping search finds ranges GPTQ's full range wastes at 3 bits
    ("gptq+lrc4-w3", "gptq-w3"),  # a rank-4 correction (1.6 more bits per weight here) pays
    ("lwc2+rtn-w3", "rtn-w3"),  # learned clipping, two epochs, already beats plain RTN
])
def test_each_step_pays_at_3_bits(ptq_runner, ptq_options, model, better, worse):
    calib = CALIBRATED[model][1]
    ppl = lambda r: metrics(ptq_runner, ptq_options, r, model)["wikitext2.ppl"]["value"]  # noqa: E731
    b, w = ppl(better + calib), ppl(worse if worse.startswith("rtn") else worse + calib)
    assert b < w, (better, b, worse, w)


# Pre-quantization transforms with activation quantization (the result checks). Both comparisons are
# against the same format without the transform; the margins are what the measurement shows (README), far beyond
# the evaluation's noise, not just a sign.
@pytest.mark.parametrize("model", REAL[1:])
def test_quarot_rescues_w4a4(ptq_runner, ptq_options, model):
    """Per-token 4-bit activations are ruined by SmolLM2's outlier channels; QuaRot's rotations spread them:
    W4A4 RTN perplexity 1866 -> 157 on the CPU budget's 2 windows (fp 18.8). Asserted with a factor of 4 to spare."""
    plain = metrics(ptq_runner, ptq_options, "rtn-w4a4", model)["wikitext2.ppl"]["value"]
    rotated = metrics(ptq_runner, ptq_options, "quarot+rtn-w4a4", model)["wikitext2.ppl"]["value"]
    assert 4 * rotated < plain, (rotated, plain)


@pytest.mark.parametrize("model", REAL[1:])
def test_smoothquant_beats_plain_w8a8(ptq_runner, ptq_options, model):
    """SmolLM2's norm outputs have outlier channels (benchmarks/activation_outliers.py); migrating them into the
    weights (α = 0.5) beats plain symmetric per-token W8A8."""
    plain = metrics(ptq_runner, ptq_options, "rtn-w8a8sym", model)["wikitext2.ppl"]["value"]
    smooth = metrics(ptq_runner, ptq_options, "smooth+rtn-w8a8sym@c4.8x512.s0", model)["wikitext2.ppl"]["value"]
    assert smooth < plain, (smooth, plain)


# KV-cache bits on SmolLM2: the long-context cases' group, so the cached results are reused.
@pytest.mark.xdist_group("smollm2-135m.longctx")
def test_kv_bits_order_retrieval_and_perplexity(ptq_runner, ptq_options):
    """KV2 <= KV4 <= KV8 in passkey retrieval and in perplexity, within noise: retrieval may not be significantly
    better with fewer bits (paired McNemar on the examples, the baselines' rule), perplexity not more than 1% better.
    And the order is not vacuous: per-token KV2 loses retrieval significantly against KV8 (measured: 0 of 20
    against 20 of 20)."""
    from ptqsuite.baselines import ACCURACY_ALPHA, mcnemar

    m = {b: metrics(ptq_runner, ptq_options, f"rtn-w16kv{b}", "smollm2-135m") for b in (2, 4, 8)}
    lengths = sorted(int(k.split(".")[1]) for k in m[8] if k.startswith("passkey."))
    assert lengths, "no passkey metrics: the matrix's longctx size for smollm2-135m changed"
    joint = {b: "".join(m[b][f"passkey.{n}.acc"]["correct"] for n in lengths) for b in m}
    for fewer, more in ((2, 4), (4, 8)):
        b, c, p = mcnemar(joint[more], joint[fewer])  # b: right with more bits, wrong with fewer
        assert not (c > b and p < ACCURACY_ALPHA), (fewer, more, joint)
        assert m[fewer]["wikitext2.ppl"]["value"] >= 0.99 * m[more]["wikitext2.ppl"]["value"], (fewer, more)
    b, c, p = mcnemar(joint[8], joint[2])
    assert b > c and p < ACCURACY_ALPHA, joint


@pytest.mark.xdist_group("smollm2-135m.zeroshot")
def test_zeroshot_follows_the_damage(ptq_runner, ptq_options):
    """Pooled over every task's headline accuracy (acc_norm where the task defines it, else acc; one record per
    example), paired against the unquantized model's own record (exact two-sided McNemar at the baselines' alpha):
    W8A8 is not significantly different from fp, W3 g128 is significantly worse, and W8A8 significantly better than
    W3 g128. A scorer that ignored the model, or a quantization path lm-eval bypassed, fails one of them."""
    from ptqsuite.baselines import ACCURACY_ALPHA, mcnemar

    def pooled(m):
        tasks = sorted(k.removesuffix(".acc") for k in m if k.endswith(".acc"))
        return "".join(m.get(f"{t}.acc_norm", m[f"{t}.acc"])["correct"] for t in tasks)

    case = lambda r: next(c for c in ptq_options.matrix.cases if c.id == f"{r}-smollm2-135m")  # noqa: E731
    result = run_or_skip(ptq_runner, case("rtn-w8a8"), ptq_options.require_models).payload
    fp, w8a8 = pooled(result["reference"]), pooled(result["metrics"])
    w3 = pooled(run_or_skip(ptq_runner, case("rtn-w3g128"), ptq_options.require_models).payload["metrics"])
    assert len(fp) == len(w8a8) == len(w3) >= 200
    assert mcnemar(fp, w8a8)[2] >= ACCURACY_ALPHA, mcnemar(fp, w8a8)  # measured (6, 5, 1.0)
    assert (flips := mcnemar(fp, w3))[0] > flips[1] and flips[2] < ACCURACY_ALPHA, flips  # (43, 15, 0.0003)
    assert (flips := mcnemar(w3, w8a8))[1] > flips[0] and flips[2] < ACCURACY_ALPHA, flips
