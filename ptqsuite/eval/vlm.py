"""Image-and-text agreement of a quantized LLaVA-style model with its unquantized self, on synthetic images.

Quantization here touches the language model only; what an image check must show is that the quantized language
model still reads the (unchanged) image features as the unquantized one does. So the unquantized model's own
answers are the reference, and nothing needs labels or a dataset:

* Images, generated at run time from a seed: example i draws from ``random.Random`` seeded by (format, seed, i) a
  plain background and one to three shapes (square, disc, stripes) in other colors of a fixed palette, drawn with
  torch at the vision tower's input size (``vision_config.image_size``, 8-bit RGB), then normalized with CLIP's
  mean and std (the model's processor does this where there is one). Each comes with a question drawn from a
  short list, in LLaVA-1.5's prompt: ``USER: <image>\\n<question> ASSISTANT:``.
* Inputs: with a processor (a hub LLaVA: ``AutoProcessor``), the processor builds the token ids and pixel values;
  with a tokenizer only (the tiny random model), a copy of it that knows ``<image>`` as one special token
  tokenizes the prompt, and the placeholder becomes the image token once per image feature: the tower's patches,
  less the CLS token under the "default" feature selection (what LlavaProcessor makes of the same image and text).
* Reference: the unquantized model answers greedily, ``new_tokens`` tokens, the image token excluded (it would
  break the next forward's placeholder count), no stop at EOS, so every example has the same number of scored
  positions. Examples of one prompt length are batched (no padding). Each step is one full forward of the whole,
  fixed-length sequence (answer slots not yet written hold the prompt's last token, which no earlier position
  attends to), so the last step is the teacher-forced forward of the answer; the reference tokens are its argmax
  (the tokens the steps wrote, bit for bit, wherever a row of the forward does not depend on later positions'
  values: on a CPU).
* Score: the quantized model runs that same teacher-forced forward, in the same batches. ``top1``: the fraction
  of the n x new_tokens answer positions where its argmax (image token excluded) is the reference token; ``kld``:
  the mean over those positions of KL(P_unquantized || P_quantized) in nats. The unquantized model against itself
  gives exactly 1 and 0.
"""
from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

FORMAT = "vlm-shapes/v1"  # named in every protocol: bump it when anything that changes images, prompts or scoring does
IMAGE = "<image>"
PROMPT = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's conversation format
QUESTIONS = (
    "What is in the image?",
    "What shapes do you see?",
    "What color is the background?",
    "How many shapes are there?",
    "Describe the image briefly.",
)
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (240, 220, 40),
    "white": (250, 250, 250), "black": (15, 15, 15), "orange": (245, 140, 30), "purple": (140, 50, 170),
}
BATCH_TOKENS = 8192  # a batch holds about this many tokens (prompts of one length: no padding)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as CLIPImageProcessor normalizes
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]  # the prompt, image placeholders expanded
    pixels: torch.Tensor  # [1, 3, H, W] normalized as the vision tower expects
    text: str  # the question and what was drawn, for messages


@dataclass(frozen=True)
class Batch:
    index: tuple[int, ...]  # the examples it holds, all with one prompt length
    sequences: torch.Tensor  # [b, prompt + new_tokens - 1]: prompt and answer, the teacher-forced input
    pixels: torch.Tensor  # [b, 3, H, W]


@dataclass(frozen=True)
class Answers:
    """The unquantized model's greedy answers: what a quantized model is scored against (cached per model)."""

    examples: tuple[Example, ...]
    batches: tuple[Batch, ...]  # scored as they were answered: same shapes, same arithmetic
    tokens: torch.Tensor  # [n, new_tokens] the answers, in example order
    log_probs: torch.Tensor  # [n, new_tokens, vocab] float32 on the CPU: the reference distributions
    protocol: str


@dataclass(frozen=True)
class VlmResult:
    n: int  # images
    positions: int  # scored answer positions: n x new_tokens
    top1: float  # fraction of positions where the quantized argmax is the unquantized model's token
    kld: float  # mean KL(P_unquantized || P_quantized) over the positions, nats
    correct: str  # "0"/"1" per position, example by example: a paired test against a baseline compares these
    protocol: str

    def to_dict(self) -> dict:
        return asdict(self)


def draw(seed: int, index: int, size: int) -> tuple[torch.Tensor, str]:
    """Image ``index`` of ``seed``: ``[3, size, size]`` uint8, and what it shows."""
    rng = random.Random(f"{FORMAT}:{seed}:{index}")
    background = rng.choice(sorted(COLORS))
    image = torch.tensor(COLORS[background], dtype=torch.uint8).view(3, 1, 1).repeat(1, size, size)
    y, x = torch.meshgrid(*(2 * [(torch.arange(size, dtype=torch.float64) + 0.5) / size]), indexing="ij")
    shapes = []
    for _ in range(rng.randint(1, 3)):
        kind, color = rng.choice(sorted(MASKS)), rng.choice(sorted(set(COLORS) - {background}))
        r = rng.uniform(0.12, 0.3)  # half the size, as a fraction of the image
        cy, cx, vertical = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r), rng.random() < 0.5
        mask = MASKS[kind](y - cy, x - cx, r, vertical)
        image[:, mask] = torch.tensor(COLORS[color], dtype=torch.uint8)[:, None]
        shapes.append(f"{color} {kind}")
    return image, f"{', '.join(shapes)} on {background}"


def _square(dy, dx, r, _):
    return (dy.abs() <= r) & (dx.abs() <= r)


def _disc(dy, dx, r, _):
    return dy**2 + dx**2 <= r**2


def _stripes(dy, dx, r, vertical):  # five bands across a square, three of them colored
    return _square(dy, dx, r, None) & (torch.floor(((dx if vertical else dy) + r) / (0.4 * r)) % 2 == 0)


MASKS = {"square": _square, "disc": _disc, "stripes": _stripes}


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> ``[1, 3, H, W]`` float, rescaled and normalized as CLIPImageProcessor does."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return ((image.float() / 255 - mean) / std)[None]


def image_tokens(config) -> int:
    """Image features per image: one per patch, plus CLS under "full" feature selection."""
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")


def _with_placeholder(tokenizer):
    """A copy of ``tokenizer`` that knows the placeholder as one special token, as a LLaVA processor's does: the
    prompt's text then splits around it exactly as the processor's tokenizer splits it."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([IMAGE], special_tokens=True)
    return tokenizer


def _by_hand(tokenizer, config, question: str) -> list[int]:
    placeholder, expanded = tokenizer.convert_tokens_to_ids(IMAGE), [config.image_token_id] * image_tokens(config)
    return [t for i in tokenizer(PROMPT.format(question=question)).input_ids
            for t in (expanded if i == placeholder else [i])]


def uses_processor(tokenizer_or_processor) -> bool:
    return hasattr(tokenizer_or_processor, "image_processor")


def examples(config, tokenizer_or_processor, n: int, seed: int) -> list[Example]:
    """The ``n`` prompts of ``seed`` for a model with this (LLaVA) config."""
    processor = tokenizer_or_processor if uses_processor(tokenizer_or_processor) else None
    tokenizer = None if processor else _with_placeholder(tokenizer_or_processor)
    out = []
    for i in range(n):
        image, shown = draw(seed, i, config.vision_config.image_size)
        question = random.Random(f"{FORMAT}:{seed}:{i}:question").choice(QUESTIONS)
        if processor:
            inputs = processor(images=image.permute(1, 2, 0).numpy(), text=PROMPT.format(question=question),
                               return_tensors="pt")
            ids, pixels = inputs["input_ids"][0].tolist(), inputs["pixel_values"]
        else:
            ids, pixels = _by_hand(tokenizer, config, question), normalize(image)
        out.append(Example(tuple(ids), pixels, f"{question} [{shown}]"))
    return out


def _batches(exs: list[Example], new_tokens: int) -> list[tuple[int, ...]]:
    """Example indices in batches of one prompt length (no padding), at most ``BATCH_TOKENS`` tokens each."""
    by_length: dict[int, list[int]] = {}
    for i, ex in enumerate(exs):
        by_length.setdefault(len(ex.ids), []).append(i)
    out = []
    for length, group in sorted(by_length.items()):
        size = max(1, BATCH_TOKENS // (length + new_tokens))
        out += [tuple(group[s : s + size]) for s in range(0, len(group), size)]
    return out


def _logits(model, batch: Batch, new_tokens: int) -> torch.Tensor:
    """``[b, new_tokens, vocab]`` float32: the logits predicting each answer token (the sequence's last positions)."""
    p = next(model.parameters())
    return model(input_ids=batch.sequences.to(p.device), pixel_values=batch.pixels.to(p.device, p.dtype),
                 use_cache=False, logits_to_keep=new_tokens).logits.float()


def _argmax(logits: torch.Tensor, excluded: int) -> torch.Tensor:
    return logits.index_fill(-1, torch.tensor([excluded], device=logits.device), float("-inf")).argmax(-1).cpu()


@torch.no_grad()
def answer(model, exs: list[Example], index: tuple[int, ...], new_tokens: int) -> tuple[Batch, torch.Tensor]:
    """Greedy ``new_tokens`` for examples of one prompt length, by full forwards of one fixed-length sequence
    (module docstring): the teacher-forced batch and its logits at the answer positions."""
    prompt = len(exs[index[0]].ids)
    batch = Batch(index, torch.tensor([exs[i].ids + exs[i].ids[-1:] * (new_tokens - 1) for i in index]),
                  torch.cat([exs[i].pixels for i in index]))
    for k in range(new_tokens):
        logits = _logits(model, batch, new_tokens)
        if k + 1 < new_tokens:
            batch.sequences[:, prompt + k] = _argmax(logits[:, k], model.config.image_token_id)
    return batch, logits


def protocol(config, tokenizer_or_processor, n: int, seed: int, new_tokens: int) -> str:
    size = config.vision_config.image_size
    built = "processor" if uses_processor(tokenizer_or_processor) else "ids by hand"
    return (f"{FORMAT}; seed={seed}; n={n}; images {size}x{size}, {image_tokens(config)} image tokens, CLIP "
            f"mean/std; prompt {PROMPT!r} ({built}); greedy {new_tokens} tokens of the unquantized model, image "
            "token excluded, no EOS stop; scored teacher-forced: top1 = argmax agrees, kld = KL(unquantized || "
            "quantized) nats, means over n x new_tokens positions")


def answers(reference, tokenizer_or_processor, *, n: int, seed: int, new_tokens: int) -> Answers:
    """The unquantized ``reference``'s answers on the ``n`` images of ``seed``."""
    if n < 1 or new_tokens < 1:
        raise ValueError(f"need n >= 1 and new_tokens >= 1, got n={n}, new_tokens={new_tokens}")
    exs = examples(reference.config, tokenizer_or_processor, n, seed)
    runs = [answer(reference, exs, index, new_tokens) for index in _batches(exs, new_tokens)]
    order = torch.tensor([i for batch, _ in runs for i in batch.index]).argsort()
    logits = torch.cat([logits.cpu() for _, logits in runs])[order]
    # the last forward is the teacher-forced one: its argmax are the answers (the tokens written into the sequence
    # wherever rows do not depend on later positions' values, as on a CPU, bit for bit)
    return Answers(tuple(exs), tuple(batch for batch, _ in runs), _argmax(logits, reference.config.image_token_id),
                   F.log_softmax(logits, dim=-1), protocol(reference.config, tokenizer_or_processor, n, seed,
                                                           new_tokens))


@torch.no_grad()
def score(model, ref: Answers) -> VlmResult:
    """``model`` teacher-forced on the reference answers (module docstring)."""
    agree, kld = torch.zeros(ref.tokens.shape, dtype=torch.bool), torch.zeros(ref.tokens.shape, dtype=torch.float64)
    for batch in ref.batches:
        index = list(batch.index)
        logits = _logits(model, batch, ref.tokens.shape[1])
        agree[index] = _argmax(logits, model.config.image_token_id) == ref.tokens[index]
        log_p, ref_lp = F.log_softmax(logits, dim=-1).cpu(), ref.log_probs[index]
        kld[index] = (ref_lp.exp() * (ref_lp - log_p)).sum(-1).double()
    return VlmResult(n=len(ref.examples), positions=agree.numel(), top1=agree.double().mean().item(),
                     kld=kld.mean().item(), correct="".join("01"[int(a)] for a in agree.flatten()),
                     protocol=ref.protocol)


def agreement(model, reference, tokenizer_or_processor, *, n: int, seed: int, new_tokens: int) -> VlmResult:
    """How close ``model``'s answers on ``n`` synthetic images stay to the unquantized ``reference``'s."""
    return score(model, answers(reference, tokenizer_or_processor, n=n, seed=seed, new_tokens=new_tokens))


def processor(path: str, tokenizer):
    """The model folder's processor where it has one (a hub LLaVA), else ``tokenizer``: inputs are built by hand."""
    folder = Path(path)
    if (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(folder)
    return tokenizer
