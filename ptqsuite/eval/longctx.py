"""Synthetic long-context retrieval, generated at run time from a seed: two tasks, scored by exact match.

Their use here is KV-cache quantization: the answer must be copied from one place in a long prompt, read back
through the model's own attention and KV cache (``generate`` with ``use_cache=True``), where quantized K and V
blur it.

``lines``: LongEval's lines task (DachengLi1/LongChat ``longeval``, as qllm-eval runs it). A prompt is LongEval's
header, N lines ``line <key>: REGISTER_CONTENT is <value>``, and its question, verbatim; keys are adjective-noun
pairs (LongEval's ``LRT-NL``, the option qllm-eval uses), values integers in 1..50000. Hard: the model must find
one key among N similar ones. SmolLM2-135M manages 0.5 at 256 tokens and ~0 from 1024 on (README), so it is for
larger models.

``passkey``: the passkey retrieval test of Mohtashami & Jaggi (2023, landmark attention; also LongLoRA's): a pass
key in 1..50000 stated once inside repeated filler text, asked for at the end. Easy for a model that attends
where it should (SmolLM2-135M: 1.0 up to 2048 tokens), so a drop measures what quantizing the cache destroyed.

Example i of a target length comes from ``random.Random`` seeded by (task format, seed, length, i), so the same
seed gives the same prompts; the answer's depth in the context is uniform.

Deviations, to make the numbers cheap, exact and model-agnostic:

* The size is not given but chosen per example: the most lines (filler blocks) whose tokenized prompt fits the
  target length, found by bisection with the model's tokenizer. The answer tokens stay within the context too.
* lines: keys, and values, are distinct within a prompt (LongEval draws them independently), so the answer is
  unambiguous; the answer is prefixed with the queried line's own opening, ``line <key>: REGISTER_CONTENT is <``,
  so a base model only has to continue it (LongEval does this for its base model, mpt-storywriter). With a chat
  template (by default when the tokenizer has one, as LongEval uses the conversation template) the record and
  question are the user turn and the prefix opens the assistant turn; with and without are different protocols.
* passkey: the filler is cut at whole blocks (the original cuts it at a character count), plain text by default
  as in the original (it ends "The pass key is", which the model continues).
* Scoring: greedy decoding of MAX_NEW_TOKENS tokens; an example is correct when the first integer in the
  continuation equals the value (LongEval: the last integer of a free 100-token answer).
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

VALUES = (1, 50000)  # LongEval and the passkey test: random.randint(1, 50000)
MAX_NEW_TOKENS = 8  # the longest answer is 5 digits and ">": 6 tokens where each digit is one
BATCH_TOKENS = 8192  # the default batch holds about this many prompt tokens

HEADER = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and contains "
    "a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, memorize its "
    "corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve the corresponding "
    "<REGISTER_CONTENT> of a certain line index. Now the record start:\n\n"
)
LINE = "line {key}: REGISTER_CONTENT is <{value}>\n"
QUESTION = "\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {key}? I need the number."
ANSWER = "line {key}: REGISTER_CONTENT is <"

# The passkey test's text (landmark attention's run_test.py); the prompt is these parts joined with "\n".
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER = "The pass key is"

# LongEval draws keys from the wonderwords lists; these are short common words instead, 12168 keys in all.
ADJECTIVES = (
    "able acid aged airy amber angry ashen awful bald bare basic beige big bitter black bland blind blue bold brave "
    "brief brisk broad brown busy calm cheap chief civil clean clear close cold cool coral crisp cruel curly cute "
    "damp dark dear deep dense dirty dry dull dusty eager early easy empty equal evil faint fair fake false fancy "
    "fast fat fierce final fine firm flat fond foggy free fresh full funny fuzzy giant glad gold good grand gray "
    "great green grim handy happy hard harsh heavy high hollow holy honest huge humble icy idle jolly juicy keen "
    "kind large late lazy lean light little live lone long loose loud lucky mad major merry mild minor misty"
).split()
NOUNS = (
    "acorn actor anchor angle apple arrow attic badge baker basket beach bean bell bird blade bloom board boat bone "
    "book bottle box bread brick bridge brook brush bucket cabin cable cake camel candle canoe card carpet castle "
    "cave chain chair chalk cherry chest cloud clover coat coin comet copper cork cotton crane crown cup curtain "
    "daisy desk diamond dog door dragon drum eagle engine falcon feather fence field flag flute forest fox garden "
    "gate ghost glove goat grape guitar hammer harbor hat hill horse island jacket jar jewel kettle key kite ladder "
    "lake lamp leaf lemon lion lizard llama magnet maple market meadow mirror"
).split()


@dataclass(frozen=True)
class Example:
    prompt: str  # all the model reads: the record, the question and the answer prefix
    ids: tuple[int, ...]  # the prompt in the model's tokens
    value: int  # the right answer
    count: int  # lines (lines) or filler blocks (passkey)
    query: int  # the queried line (lines) or the filler blocks before the pass key (passkey)


@dataclass(frozen=True)
class RetrievalResult:
    length: int  # target prompt length in tokens: no prompt is longer
    n: int  # examples
    accuracy: float  # exact match of the retrieved value
    correct: str  # "0"/"1" per example, in example order: a paired test against a baseline compares these
    mean_tokens: float  # actual mean prompt length
    protocol: str  # everything that defines the numbers; compare only results with the same protocol

    def to_dict(self) -> dict:
        return asdict(self)


def _distinct(draw, count: int) -> list:
    seen: dict = {}  # insertion-ordered set
    while len(seen) < count:
        seen.setdefault(draw(), None)
    return list(seen)


def record(seed: int, count: int) -> tuple[list[str], list[int]]:
    """``count`` distinct keys and distinct values; a longer record extends a shorter one of the same seed."""
    if count > len(ADJECTIVES) * len(NOUNS):
        raise ValueError(f"{count} lines exceed the {len(ADJECTIVES) * len(NOUNS)} distinct keys")
    keys, values = random.Random(f"{seed}:keys"), random.Random(f"{seed}:values")
    return (_distinct(lambda: f"{keys.choice(ADJECTIVES)}-{keys.choice(NOUNS)}", count),
            _distinct(lambda: values.randint(*VALUES), count))


def use_chat(tokenizer, chat: bool | None, default: bool | None = None) -> bool:
    """``chat``; by default ``default``, or (None) whether the tokenizer has a chat template."""
    chat = default if chat is None else chat
    if chat is None:
        return bool(getattr(tokenizer, "chat_template", None))
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True, but the tokenizer has no chat template")
    return chat


def _as_chat(tokenizer, user: str, answer: str, chat: bool, sep: str) -> str:
    """The user turn then the answer prefix: in the chat template, or joined by ``sep`` as plain text."""
    if not chat:
        return user + sep + answer
    messages = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer


def prompt(tokenizer, keys: Sequence[str], values: Sequence[int], query: int, chat: bool) -> str:
    """LongEval's prompt for these lines, asking for line ``query``, then the answer prefix."""
    lines = "".join(LINE.format(key=k, value=v) for k, v in zip(keys, values))
    user = HEADER + lines + QUESTION.format(key=keys[query])
    return _as_chat(tokenizer, user, ANSWER.format(key=keys[query]), chat, "\n\n")


def _lines(tokenizer, chat: bool, depth: float, seed: int, count: int) -> tuple[str, int, int]:
    keys, values = record(seed, count)
    query = min(int(depth * count), count - 1)
    return prompt(tokenizer, keys, values, query, chat), values[query], query


def _passkey(tokenizer, chat: bool, depth: float, seed: int, count: int) -> tuple[str, int, int]:
    value = random.Random(seed).randint(*VALUES)
    before = min(int(depth * (count + 1)), count)
    filler = lambda k: " ".join([FILLER] * k)  # noqa: E731
    user = "\n".join([PASSKEY_TASK, filler(before), NEEDLE.format(value=value), filler(count - before),
                      PASSKEY_QUESTION])
    return _as_chat(tokenizer, user, PASSKEY_ANSWER, chat, " "), value, before


@dataclass(frozen=True)
class Task:
    format: str  # named in every protocol: bump its version when anything that changes prompts or scoring changes
    render: Callable[..., tuple[str, int, int]]  # (tokenizer, chat, depth, seed, count) -> prompt, value, query
    chat: bool | None  # the default: None, when the tokenizer has a template (LongEval); False, plain text
    unit: str  # what a prompt's size counts


TASKS = {
    "lines": Task("longeval-lines-nl/v1", _lines, None, "lines"),
    "passkey": Task("passkey-landmark/v1", _passkey, False, "filler blocks"),
}


def lookup(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown long-context task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    # Plain text gets the tokenizer's special tokens (a Llama BOS); a chat template writes its own.
    return tokenizer(text, add_special_tokens=not chat, verbose=False).input_ids


def draws(name: str, seed: int, length: int, index: int) -> tuple[float, int]:
    """Example ``index`` of ``length``'s random draws: the answer's depth in [0, 1), drawn apart from the
    prompt's size, and the seed of its content."""
    rng = random.Random(f"{lookup(name).format}:{seed}:{length}:{index}")
    return rng.random(), rng.getrandbits(64)


def build(name: str, tokenizer, chat: bool, drawn: tuple[float, int], count: int) -> Example:
    """The example of these draws with ``count`` lines (filler blocks)."""
    text, value, query = lookup(name).render(tokenizer, chat, *drawn, count)
    return Example(text, tuple(encode(tokenizer, text, chat)), value, count, query)


def example(name: str, tokenizer, budget: int, chat: bool, seed: int, length: int, index: int) -> Example:
    """Example ``index`` of ``length``: N lines (filler blocks) where N fit ``budget`` tokens and N + 1 do not
    (found by doubling, then bisecting: prompt length grows with N, though not strictly, as the content drawn for
    N may tokenize differently)."""
    drawn = draws(name, seed, length, index)
    fit, hi = None, 1
    while len((trial := build(name, tokenizer, chat, drawn, hi)).ids) <= budget:
        fit, hi = trial, hi * 2
    if fit is None:
        raise ValueError(f"length {length}: a single line makes a {name} prompt of {len(trial.ids)} tokens, "
                         f"over {budget}")
    while hi - fit.count > 1:
        trial = build(name, tokenizer, chat, drawn, (fit.count + hi) // 2)
        fit, hi = (trial, hi) if len(trial.ids) <= budget else (fit, trial.count)
    return fit


def score(continuation: str, value: int) -> bool:
    """The scoring rule: the first integer in the generated text is the value."""
    m = re.search(r"\d+", continuation)
    return m is not None and int(m.group()) == value


def _budget(model, length: int) -> int:
    """The prompt's token budget for a target length: the length, less room to answer at the context's end."""
    limit = model.config.max_position_embeddings
    if length > limit:
        raise ValueError(f"length {length} exceeds the model's context of {limit} tokens (max_position_embeddings)")
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    return min(length, limit - MAX_NEW_TOKENS)


def examples(model, tokenizer, length: int, n: int, *, task: str = "lines", seed: int = 0,
             chat: bool | None = None) -> list[Example]:
    """The ``n`` prompts of ``task`` at ``length`` for this model's tokenizer and context."""
    budget, chat = _budget(model, length), use_chat(tokenizer, chat, lookup(task).chat)
    return [example(task, tokenizer, budget, chat, seed, length, i) for i in range(n)]


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Greedy continuations (token ids) of prompts of one length, as one batch: no padding, so nothing enters
    attention or the KV cache but the prompts, whatever the cache quantization (KIVI's per-channel blocks would
    see left padding)."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError(f"a batch needs prompts of one length, got {sorted({len(p) for p in prompts})}")
    ids = torch.tensor(prompts, device=next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         num_beams=1, use_cache=True, pad_token_id=_pad_id(model))
    return out[:, ids.shape[1]:].tolist()


def _pad_id(model) -> int:
    # Only fills finished rows after an EOS (generation runs on); never part of a prompt.
    config = model.generation_config
    return next((t for t in (config.pad_token_id, config.eos_token_id) if isinstance(t, int)), 0)


def retrieval(model, tokenizer, lengths: Sequence[int], n: int, *, task: str = "lines", seed: int = 0,
              chat: bool | None = None, batch_size: int | None = None) -> dict[int, RetrievalResult]:
    """Accuracy of ``task`` at each target prompt length (in tokens), ``n`` examples each; same seed, same numbers."""
    lookup(task)
    if n < 1 or not lengths:
        raise ValueError(f"need n >= 1 and at least one length, got n={n}, lengths={list(lengths)}")
    for length in lengths:
        _budget(model, length)  # a bad length fails before anything runs
    return {length: _evaluate(model, tokenizer, task, length, n, seed, chat, batch_size) for length in lengths}


def _batches(exs: list[Example], batch_size: int) -> list[list[int]]:
    """Indices of ``exs`` in batches of equal prompt length, at most ``batch_size`` each, in a fixed order."""
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(exs):
        by_length.setdefault(len(e.ids), []).append(i)
    groups = [group for _, group in sorted(by_length.items())]
    return [group[s : s + batch_size] for group in groups for s in range(0, len(group), batch_size)]


def _evaluate(model, tokenizer, name: str, length: int, n: int, seed: int, chat: bool | None,
              batch_size: int | None) -> RetrievalResult:
    chat, budget = use_chat(tokenizer, chat, lookup(name).chat), _budget(model, length)
    exs = [example(name, tokenizer, budget, chat, seed, length, i) for i in range(n)]
    batch_size = batch_size or max(1, BATCH_TOKENS // length)
    correct = [False] * n
    for batch in _batches(exs, batch_size):
        for i, out in zip(batch, generate(model, [exs[i].ids for i in batch])):
            correct[i] = score(tokenizer.decode(out, skip_special_tokens=True), exs[i].value)
    counts = sorted(e.count for e in exs)
    protocol = (f"{lookup(name).format}; {'chat' if chat else 'plain'}; seed={seed}; n={n}; "
                f"tokens<={budget}; {lookup(name).unit}="
                f"{counts[0]}..{counts[-1]}; values={VALUES[0]}..{VALUES[1]}; greedy {MAX_NEW_TOKENS} tokens; "
                "correct: first integer == value")
    return RetrievalResult(
        length=length, n=n, accuracy=sum(correct) / n, correct="".join("01"[c] for c in correct),
        mean_tokens=sum(len(e.ids) for e in exs) / n, protocol=protocol,
    )
