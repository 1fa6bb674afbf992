"""Vendored evaluation text and the GPTQ-style calibration sampler.

The text ships in ptqsuite/assets/data/ (xz, provenance in PROVENANCE.md), so nothing is downloaded.
Evaluation texts follow GPTQ's datautils.py (github IST-DASLab/gptq):

* wikitext2: GPTQ `wikitext2`: the HF wikitext-2-raw-v1 test rows joined with "\\n\\n".
* ptb: GPTQ `ptb-new`: the HF ptb_text_only test sentences joined with " ".
* c4: GPTQ `c4-new`: the first 1100 validation docs joined with " ", scored on at most 256 windows.
  Our docs are a 2000-doc C4 validation sample of undocumented shard and rows, NOT GPTQ's
  en/c4-validation.00000-of-00008, so C4 numbers are not comparable with papers.
* tinystories: not in GPTQ; in-domain text for stories260K. The first half of the vendored stories
  joined with "\\n\\n"; the second half is its calibration text, so the two never overlap.

Calibration follows GPTQ's sampling loops with random.Random(seed), but from other splits where
GPTQ's are not vendored: wikitext2 calibrates on the *non-raw validation* split (GPTQ: raw train),
ptb on validation (GPTQ: train), c4 on docs 1100..1999 of the same sample (GPTQ: a train shard).
c4 crops need docs longer than seqlen, and few of the 900 are: at seqlen 2048 with SmolLM2's
tokenizer only 33, so many crops come from the same docs. Text is tokenized without special
tokens, so no crop contains a BOS token, where GPTQ's LLaMA tokenizer puts one at each doc start.
"""
from __future__ import annotations

import functools
import io
import json
import lzma
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ptqsuite.paths import ASSETS

DATASETS = ("c4", "ptb", "tinystories", "wikitext2")

C4_EVAL_DOCS = 1100  # GPTQ c4-new: valdata[:1100]; later docs are the calibration pool
C4_EVAL_WINDOWS = 256  # GPTQ c4-new keeps the first 256 * seqlen tokens
_STORY_SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class EvalText:
    name: str
    text: str
    max_windows: int | None  # score at most this many seqlen windows; None: the whole text
    protocol: str  # recorded with baselines, so a number is never compared across protocols


def _check(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


@functools.cache
def _read(filename: str) -> str:
    return lzma.decompress((ASSETS / "data" / filename).read_bytes()).decode("utf-8")


def _lines(text: str) -> list[str]:
    # The HF loaders iterate `open(path)`: universal newlines, each line keeps its "\n".
    return list(io.StringIO(text, newline=None))


def _wikitext_rows(text: str) -> list[str]:
    # As the HF wikitext loader yields them: "" for a blank line, else the line with its "\n".
    return [line if line.strip() else "" for line in _lines(text)]


def _ptb_sentences(text: str) -> list[str]:
    # The HF ptb_text_only loader strips each line (the Mikolov files pad lines with spaces).
    return [line.strip() for line in _lines(text)]


@functools.cache
def _c4_docs() -> tuple[str, ...]:
    lines = _read("c4_validation_2k.texts.jsonl.xz").split("\n")  # JSON escapes newlines inside docs
    return tuple(json.loads(line)["text"] for line in lines if line)


@functools.cache
def _stories() -> tuple[str, ...]:
    return tuple(story.strip() for story in _read("tinystories.utf8.xz").split(_STORY_SEPARATOR))


def _stories_split() -> tuple[Sequence[str], Sequence[str]]:
    stories = _stories()
    half = len(stories) // 2
    return stories[:half], stories[half:]


@functools.cache
def eval_text(name: str) -> EvalText:
    """The evaluation text of `name`, built exactly as its protocol says."""
    _check(name)
    if name == "wikitext2":
        text = "\n\n".join(_wikitext_rows(_read("wiki.test.raw.xz")))
        return EvalText(name, text, None, r"gptq:wikitext2:wikitext-2-raw-v1/test:join=\n\n")
    if name == "ptb":
        text = " ".join(_ptb_sentences(_read("ptb.test.txt.xz")))
        return EvalText(name, text, None, "gptq:ptb-new:ptb_text_only/test:join=' '")
    if name == "c4":
        text = " ".join(_c4_docs()[:C4_EVAL_DOCS])
        protocol = f"gptq:c4-new:c4-validation-2k-sample[:{C4_EVAL_DOCS}]:join=' ':windows<={C4_EVAL_WINDOWS}"
        return EvalText(name, text, C4_EVAL_WINDOWS, protocol)
    stories = _stories_split()[0]
    protocol = rf"ptqsuite:tinystories:exllamav2-tiny-stories[:{len(stories)}]:join=\n\n"
    return EvalText(name, "\n\n".join(stories), None, protocol)


def _calibration_corpus(name: str) -> str:
    if name == "wikitext2":
        return "\n\n".join(_wikitext_rows(_read("wikitext2.valid.tokens.xz")))
    if name == "ptb":
        return " ".join(_ptb_sentences(_read("ptb.valid.txt.xz")))
    return "\n\n".join(_stories_split()[1])


def _encode(tokenizer, texts: str | list[str]):
    # verbose=False: a corpus longer than the model's context is expected here, not a mistake.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _crop(ids: Sequence[int], seqlen: int, rng: random.Random) -> list[int]:
    # GPTQ's bound (len - seqlen - 1): the last possible start is never drawn; kept for fidelity.
    start = rng.randint(0, len(ids) - seqlen - 1)
    return list(ids[start : start + seqlen])


def _c4_crops(tokenizer, n: int, seqlen: int, rng: random.Random) -> list[list[int]]:
    # GPTQ's get_c4 loop: draw docs until one is longer than seqlen, then crop it. (GPTQ also accepts
    # a doc of exactly seqlen tokens, which then crashes its crop; otherwise the draws are the same.)
    # Encoding the pool once up front is cheaper than GPTQ's re-encoding of every drawn doc.
    docs = _encode(tokenizer, list(_c4_docs()[C4_EVAL_DOCS:]))
    if max(map(len, docs)) <= seqlen:
        raise ValueError(f"no c4 calibration doc is longer than seqlen={seqlen} tokens")
    crops = []
    for _ in range(n):
        ids = docs[rng.randint(0, len(docs) - 1)]
        while len(ids) <= seqlen:
            ids = docs[rng.randint(0, len(docs) - 1)]
        crops.append(_crop(ids, seqlen, rng))
    return crops


def _corpus_crops(tokenizer, name: str, n: int, seqlen: int, rng: random.Random) -> list[list[int]]:
    # GPTQ's wikitext2 loop: tokenize the whole corpus once, then n independent crops.
    ids = _encode(tokenizer, _calibration_corpus(name))
    if len(ids) <= seqlen:
        raise ValueError(f"the {name} calibration corpus has {len(ids)} tokens, not > seqlen={seqlen}")
    return [_crop(ids, seqlen, rng) for _ in range(n)]


def calibration(name: str, tokenizer, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """n calibration sequences of seqlen tokens, a LongTensor [n, seqlen]; same arguments, same tensor."""
    _check(name)
    if n < 1 or seqlen < 1:
        raise ValueError(f"need n >= 1 and seqlen >= 1, got n={n}, seqlen={seqlen}")
    rng = random.Random(seed)  # GPTQ seeds Python's global random; a private one gives the same draws
    if name == "c4":
        crops = _c4_crops(tokenizer, n, seqlen, rng)
    else:
        crops = _corpus_crops(tokenizer, name, n, seqlen, rng)
    return torch.tensor(crops, dtype=torch.long)
