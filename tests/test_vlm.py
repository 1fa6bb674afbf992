"""LLaVA (arch/llava.py) and the image-and-text agreement check (eval/vlm.py), on the tiny random LLaVA: the
language model is calibrated on text and quantized, the vision tower and projector are kept, and the agreement with
the unquantized model is exact under the identity and falls with the bits."""
import copy

import pytest
import torch

from ptqsuite import blockwise, data, matrix, models, pipeline
from ptqsuite.arch import arch_of
from ptqsuite.eval import vlm
from ptqsuite.eval.ppl import perplexity
from ptqsuite.paths import ASSETS
from ptqsuite.recipe import parse
from ptqsuite.runner import Runner, Settings

MODEL = "llava-tiny-random"
KEPT = ("model.vision_tower.", "model.multi_modal_projector.")
TOLERANCE = 2e-4  # of max |logit|, as tests/test_transforms.py: fp32 rounding of float64 rewrites


@pytest.fixture(scope="module")
def runner():
    return Runner(Settings(torch.device("cpu"), torch.float32), matrix.load())


@pytest.fixture(scope="module")
def loaded(runner):
    return runner.loaded(models.get(MODEL))


@pytest.fixture(scope="module")
def answers(runner):
    """The unquantized model's answers at the CPU matrix's size, as the runner caches them for every case."""
    size = runner.matrix.size("vlm", "cpu", MODEL)
    return runner.vlm_answers(models.get(MODEL), size["n"], size["new_tokens"])


@pytest.fixture(scope="module")
def calibration(loaded):
    return data.calibration("tinystories", loaded.tokenizer, 8, 128, seed=0)


@pytest.fixture(scope="module")
def quantize(loaded, calibration):
    built = {}

    def get(recipe_id: str):
        if recipe_id not in built:
            recipe, model = parse(recipe_id), copy.deepcopy(loaded.model)
            report = pipeline.quantize(model, recipe, arch_of(model),
                                       calibration if recipe.needs_calibration else None)
            built[recipe_id] = model, report
        return built[recipe_id]
    return get


def tiny_processor():
    """A LlavaProcessor for the tiny model: the shared tokenizer (a fresh copy: add_tokens mutates it) with <image> as
    id 512, and CLIP's image processor at 32x32."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "models" / "stories260K")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def changed(before: torch.nn.Module, after: torch.nn.Module) -> set[str]:
    b, a = before.state_dict(), after.state_dict()
    assert b.keys() == a.keys()
    return {k for k in b if not torch.equal(b[k], a[k])}


def test_the_unquantized_model_agrees_with_itself_exactly(runner, loaded, answers):
    size = runner.matrix.size("vlm", "cpu", MODEL)
    new = size["new_tokens"]
    assert len(answers.batches) < size["n"]  # prompts of one length share a forward
    for batch in answers.batches:  # the greedy steps wrote the teacher-forced forward's argmax: rows are causal
        assert torch.equal(batch.sequences[:, -(new - 1):], answers.tokens[list(batch.index), :-1])
    for model in (loaded.model, copy.deepcopy(loaded.model)):
        r = vlm.score(model, answers)
        assert (r.n, r.positions) == (size["n"], size["n"] * new)
        assert (r.top1, r.kld, r.correct) == (1.0, 0.0, "1" * r.positions)
    metrics, protocol = runner.reference(models.get(MODEL), ("vlm",))  # through Runner._vlm
    assert metrics["vlm.top1"]["value"] == 1.0 and metrics["vlm.kld"]["value"] == 0.0
    assert metrics["vlm.top1"]["n"] == size["n"] and f"seed={0}" in protocol["vlm"]
    r = vlm.agreement(loaded.model, loaded.model, loaded.tokenizer, n=2, seed=5, new_tokens=3)
    assert (r.top1, r.kld, r.positions) == (1.0, 0.0, 6)


def test_images_and_prompts_are_deterministic_and_match_a_processor(loaded):
    """Same seed, same inputs; the hand-built ids and CLIP normalization are what LlavaProcessor makes of the same
    image and prompt."""
    config = loaded.model.config
    first, again, other = (vlm.examples(config, loaded.tokenizer, 4, seed) for seed in (0, 0, 1))
    assert all(a.ids == b.ids and torch.equal(a.pixels, b.pixels) for a, b in zip(first, again))
    assert any(not torch.equal(a.pixels, b.pixels) for a, b in zip(first, other))
    assert len({ex.pixels.sum().item() for ex in first}) == len(first)  # four different images
    for ex in first:
        assert ex.ids.count(config.image_token_id) == vlm.image_tokens(config) == 16
        assert ex.pixels.shape == (1, 3, 32, 32)
    for a, b in zip(first, vlm.examples(config, tiny_processor(), 4, 0)):
        assert a.ids == b.ids
        assert torch.allclose(a.pixels, b.pixels, atol=1e-6, rtol=0)
    # the image reaches the answer: one prompt, two images, two next-token distributions
    batch = vlm.Batch((0, 1), torch.tensor([first[0].ids] * 2), torch.cat([ex.pixels for ex in first[:2]]))
    p = vlm._logits(loaded.model, batch, 1)[:, -1].softmax(-1)
    assert (p[0] - p[1]).abs().sum() > 1e-2


def test_a_hub_folder_loads_with_its_processor(loaded, tmp_path):
    """The registry's hub LLaVA path on a folder laid out as llava-hf's (the tiny model saved with its processor):
    loaded by the arch's auto class, its inputs built by AutoProcessor, the same answers as the hand-built ones."""
    folder = tmp_path / "llava-1.5-7b"
    loaded.model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    hub = models.load(models.get("llava-1.5-7b"), "cpu", torch.float32, models.Sources(model_dir=str(tmp_path)))
    processor = vlm.processor(hub.path, hub.tokenizer)
    assert vlm.uses_processor(processor) and not vlm.uses_processor(vlm.processor("random:x", loaded.tokenizer))
    by_processor = vlm.answers(hub.model, processor, n=4, seed=0, new_tokens=4)
    by_hand = vlm.answers(loaded.model, loaded.tokenizer, n=4, seed=0, new_tokens=4)
    assert torch.equal(by_processor.tokens, by_hand.tokens)
    assert torch.allclose(by_processor.log_probs, by_hand.log_probs, atol=1e-5, rtol=0)


def test_rtn_quantizes_the_language_model_and_keeps_the_vision_side(loaded, quantize):
    model, report = quantize("rtn-w4")
    arch = arch_of(model)
    quantized = {f"{name}.weight" for name, _ in arch.quantizable(model)}
    assert report.linears == len(quantized) == 2 * 7
    assert all(name.startswith("model.language_model.layers.") for name in quantized)
    assert changed(loaded.model, model) == quantized  # the vision tower, projector, embedding, norms, head: bitwise


def test_agreement_falls_with_the_bits(runner, answers, quantize):
    results = {}
    for bits in (8, 4, 3):
        metrics, _ = runner.evaluate(quantize(f"rtn-w{bits}")[0], models.get(MODEL), ("vlm",))
        results[bits] = metrics["vlm.top1"]["value"], metrics["vlm.kld"]["value"]
        assert len(metrics["vlm.top1"]["correct"]) == metrics["vlm.top1"]["positions"]
        print(f"rtn-w{bits}: top1 {results[bits][0]:.4f}, kld {results[bits][1]:.4g}")
    top1, kld = {b: r[0] for b, r in results.items()}, {b: r[1] for b, r in results.items()}
    assert top1[8] >= top1[4] >= top1[3] and top1[8] > top1[3]
    assert 0 < kld[8] < kld[4] < kld[3]
    assert kld[8] < 1e-3  # W8 is near-lossless


def test_quarot_preserves_text_and_image_answers(loaded, answers, calibration, quantize):
    """QuaRot without quantization computes what the model did, on text and on images: the projector's output,
    written into the rotated residual stream, is rotated with it (``stream_inputs``); the tower is untouched."""
    model, _ = quantize("quarot+rtn-w16")
    x = calibration[:2, :96]
    with torch.no_grad():
        ref, out = loaded.model(x).logits, model(x).logits
    assert (out - ref).abs().max() <= TOLERANCE * ref.abs().max()
    r = vlm.score(model, answers)
    assert abs(r.kld) < 1e-6 and r.top1 >= 1 - 1 / r.n  # rounding may flip a near-tie
    diff = changed(loaded.model, model)
    assert not any(name.startswith(KEPT[0]) for name in diff)
    assert {n for n in diff if n.startswith(KEPT[1])} == {"model.multi_modal_projector.linear_2.weight",
                                                          "model.multi_modal_projector.linear_2.bias"}


def test_kv_quantization_reaches_the_language_model_only(loaded, answers, quantize):
    """The attention wrapper is installed on the text config: K and V are quantized where the language model
    attends; the vision tower keeps its own attention implementation."""
    model, _ = quantize("rtn-w16kv4")
    assert model.config.text_config._attn_implementation.startswith("ptqsuite_")
    assert model.config.vision_config._attn_implementation == loaded.model.config.vision_config._attn_implementation
    assert not changed(loaded.model, model)  # no weight moved: the change below is the cache's
    assert vlm.score(model, answers).kld > 1e-4


def test_calibration_is_text(loaded, answers, calibration, quantize):
    """Block 0's captured inputs are the token embeddings (no image runs), and GPTQ calibrated on them quantizes the
    language model only; its text perplexity and image agreement come out finite."""
    model, arch = loaded.model, arch_of(loaded.model)
    inputs, kwargs = blockwise.capture(model, arch, calibration[:2], torch.device("cpu"), chunk=2)
    with torch.no_grad():
        assert torch.equal(inputs[0], model.get_submodule(arch.embed)(calibration[:2]))
    assert "position_embeddings" in kwargs[0]
    gptq, report = quantize("gptq-w4g128")
    assert report.linears == 14 and not report.fallbacks
    assert not any(name.startswith(KEPT) for name in changed(model, gptq))
    ppl = perplexity(gptq, loaded.tokenizer, data.eval_text("wikitext2"), seqlen=256, max_windows=2)
    r = vlm.score(gptq, answers)
    assert torch.isfinite(torch.tensor([ppl.ppl, r.kld])).all() and r.top1 > 0.5


def test_the_matrix_sizes_and_validates_vlm(tmp_path):
    head = 'tiers = ["default"]\n[budget.cpu]\n"*" = { wikitext2 = 2 }\n'
    case = f'[[cases]]\ntier = "default"\nmodels = ["{MODEL}"]\nrecipes = ["rtn-w4"]\nevals = ["ppl", "vlm"]\n'
    path = tmp_path / "matrix.toml"
    path.write_text(head + case + '[vlm.cpu]\n"*" = { n = 2, new_tokens = 3 }\n')
    m = matrix.load(path)
    assert m.cases[0].group == f"{MODEL}.vlm" and m.size("vlm", "cuda", MODEL) == {"n": 2, "new_tokens": 3}
    path.write_text(head + case + '[vlm.cpu]\n"*" = { n = 2, steps = 3 }\n')
    with pytest.raises(ValueError, match=r"vlm.cpu.\* names \['steps'\]; valid: n, new_tokens"):
        matrix.load(path)
    shipped = matrix.load()
    assert all(shipped.size("vlm", device, MODEL) for device in ("cpu", "cuda"))
