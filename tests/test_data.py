"""Vendored text is intact, evaluation texts follow their protocols, calibration is GPTQ's sampler."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ptqsuite import data
from ptqsuite.paths import ASSETS

DATA_DIR = ASSETS / "data"
WIKI_TEST_RAW_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"  # published
HF_ROWS_JSONL_SHA256 = "a26bd387e6f1d19e45ddbd7fe6fd5aef3f97f457863f0973e3327e68ac6daee8"


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (byte-level BPE, no merges): cheap, lossless, and needs no model files."""
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_vendored_files_match_sources_json():
    sources = json.loads((DATA_DIR / "SOURCES.json").read_text())
    assert set(sources) == {p.name for p in DATA_DIR.glob("*.xz")}
    for name, entry in sources.items():
        assert sha256(lzma.decompress((DATA_DIR / name).read_bytes())) == entry["sha256_decompressed"], name
        assert entry["origin"] and entry["license"], name


def test_wikitext_raw_test_file_is_the_published_one():
    assert sha256(lzma.decompress((DATA_DIR / "wiki.test.raw.xz").read_bytes())) == WIKI_TEST_RAW_SHA256


def test_wikitext2_eval_is_gptq_join_of_hf_rows():
    rows = data._wikitext_rows(data._read("wiki.test.raw.xz"))
    # Dumped as the reference rows file was: json.dumps({"text": row}, ensure_ascii=False) per line.
    dump = "".join(json.dumps({"text": row}, ensure_ascii=False) + "\n" for row in rows)
    assert len(rows) == 4358
    assert sha256(dump.encode("utf-8")) == HF_ROWS_JSONL_SHA256
    assert data.eval_text("wikitext2").text == "\n\n".join(rows)


def test_ptb_eval_joins_stripped_test_sentences():
    sentences = data._ptb_sentences(data._read("ptb.test.txt.xz"))
    assert len(sentences) == 3761
    assert sentences[0] == "no it was n't black monday"
    assert all(s == s.strip() and s for s in sentences)
    assert data.eval_text("ptb").text == " ".join(sentences)


def test_c4_eval_is_the_first_1100_of_2000_docs():
    docs = data._c4_docs()
    ev = data.eval_text("c4")
    assert len(docs) == 2000
    assert ev.text == " ".join(docs[:1100])
    assert ev.max_windows == 256


def test_eval_text_fields():
    ev = data.eval_text("wikitext2")
    assert (ev.name, ev.max_windows) == ("wikitext2", None)
    assert ev.protocol == r"gptq:wikitext2:wikitext-2-raw-v1/test:join=\n\n"
    assert ev.text.startswith("\n\n = Robert Boulter = \n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.text = ""
    protocols = {data.eval_text(name).protocol for name in data.DATASETS}
    assert len(protocols) == len(data.DATASETS)


def test_tinystories_eval_and_calibration_are_disjoint():
    evaluation, calibration = data._stories_split()
    assert len(evaluation) + len(calibration) == 317
    assert not set(evaluation) & set(calibration)
    assert data.eval_text("tinystories").text == "\n\n".join(evaluation)


@pytest.mark.parametrize("name", data.DATASETS)
def test_calibration_shape_determinism_and_seed(tokenizer, name):
    a = data.calibration(name, tokenizer, n=8, seqlen=64, seed=0)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, data.calibration(name, tokenizer, n=8, seqlen=64, seed=0))
    assert not torch.equal(a, data.calibration(name, tokenizer, n=8, seqlen=64, seed=1))


def test_calibration_is_gptqs_crop_loop(tokenizer):
    ids = tokenizer(data._calibration_corpus("ptb"), add_special_tokens=False)["input_ids"]
    rng = random.Random(3)
    expected = []
    for _ in range(4):
        i = rng.randint(0, len(ids) - 32 - 1)
        expected.append(ids[i : i + 32])
    assert data.calibration("ptb", tokenizer, n=4, seqlen=32, seed=3).tolist() == expected


def test_c4_calibration_never_comes_from_eval_docs(tokenizer):
    crops = data.calibration("c4", tokenizer, n=6, seqlen=200, seed=0)
    eval_text = data.eval_text("c4").text
    pool = " ".join(data._c4_docs()[data.C4_EVAL_DOCS :])
    for crop in crops:
        # A byte crop may cut a UTF-8 character at either end: drop the replacement characters.
        text = tokenizer.decode(crop.tolist()).strip("\ufffd")
        assert text in pool and text not in eval_text


@pytest.mark.parametrize("name", ["ptb", "c4"])
def test_calibration_rejects_a_seqlen_nothing_is_long_enough_for(tokenizer, name):
    with pytest.raises(ValueError, match="seqlen=10000000"):
        data.calibration(name, tokenizer, n=1, seqlen=10_000_000, seed=0)


@pytest.mark.parametrize("call", [data.eval_text, lambda name: data.calibration(name, None, 1, 8, 0)])
def test_unknown_dataset_names_the_value_and_the_choices(call):
    with pytest.raises(ValueError) as info:
        call("wikitext3")
    assert str(info.value) == "unknown dataset 'wikitext3'; valid: c4, ptb, tinystories, wikitext2"
