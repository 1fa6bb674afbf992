"""The long-context retrieval task: prompts are deterministic, fit their length and hold their answer once; the
scoring accepts the right value only; generation runs end to end through the model's own cache."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from ptqsuite import models, recipe
from ptqsuite.activations import quantize_io
from ptqsuite.arch import arch_of
from ptqsuite.eval import longctx

ANSWER_AT_END = re.compile(r"line (\S+): REGISTER_CONTENT is <$")


@pytest.fixture(scope="module")
def stories():
    return models.load(models.get("stories260k"), "cpu", torch.float32)


class Oracle(torch.nn.Module):
    """A stand-in model that reads the answer off its prompt and writes ``answer(value)``: with the identity, a
    perfect model."""

    def __init__(self, tokenizer, context: int, answer=lambda value: value):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where generate's inputs go
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.generation_config = SimpleNamespace(pad_token_id=None, eos_token_id=tokenizer.eos_token_id)
        self.tokenizer, self.answer, self.batches = tokenizer, answer, []

    def generate(self, ids, attention_mask, max_new_tokens, **kwargs):
        assert kwargs["do_sample"] is False and kwargs["use_cache"] is True and bool(attention_mask.all())
        self.batches.append(tuple(ids.shape))
        rows = []
        for row in ids.tolist():
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            if (line := ANSWER_AT_END.search(text)) is not None:
                value = int(re.search(rf"line {line.group(1)}: REGISTER_CONTENT is <(\d+)>", text).group(1))
                new = self.tokenizer(f"{self.answer(value)}>", add_special_tokens=False).input_ids
            else:  # passkey
                value = int(re.search(r"The pass key is (\d+)\.", text).group(1))
                new = self.tokenizer(f" {self.answer(value)}.", add_special_tokens=False).input_ids
            rows.append(row + (new + [self.tokenizer.eos_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


@pytest.fixture(scope="module")
def oracle(stories):
    return Oracle(stories.tokenizer, context=8192)


def test_prompts_are_deterministic_per_seed(oracle):
    tok = oracle.tokenizer
    first = longctx.examples(oracle, tok, 1024, 6, seed=0)
    assert first == longctx.examples(oracle, tok, 1024, 6, seed=0)
    other = longctx.examples(oracle, tok, 1024, 6, seed=1)
    assert all(a.prompt != b.prompt for a, b in zip(first, other))
    assert len({e.prompt for e in first}) == 6


@pytest.mark.parametrize("length", [512, 1024, 4096])
def test_prompts_fill_their_length(oracle, length):
    """Each prompt fits; one more line would not."""
    tok = oracle.tokenizer
    for i, e in enumerate(longctx.examples(oracle, tok, length, 5, seed=0)):
        assert len(e.ids) <= length
        assert list(e.ids) == tok(e.prompt).input_ids
        assert len(longctx.build("lines", tok, False, longctx.draws("lines", 0, length, i), e.count + 1).ids) > length


def test_the_answer_fits_in_context_at_the_longest_length(oracle):
    small = Oracle(oracle.tokenizer, context=2048)
    for i, e in enumerate(longctx.examples(small, small.tokenizer, 2048, 3)):
        assert len(e.ids) <= 2048 - longctx.MAX_NEW_TOKENS
        assert len(longctx.build("lines", small.tokenizer, False, longctx.draws("lines", 0, 2048, i), e.count + 1).ids) > 2040


def test_answer_is_in_the_prompt_exactly_once(oracle):
    for e in longctx.examples(oracle, oracle.tokenizer, 2048, 10, seed=3):
        keys = re.findall(r"^line (\S+): REGISTER_CONTENT is <(\d+)>$", e.prompt, flags=re.M)
        assert len(keys) == e.count
        assert len({k for k, _ in keys}) == len({v for _, v in keys}) == e.count  # distinct keys and values
        key, value = keys[e.query]
        assert int(value) == e.value and e.prompt.count(f"<{e.value}>") == 1
        assert e.prompt.endswith(f"line {key}? I need the number.\n\nline {key}: REGISTER_CONTENT is <")
        assert e.prompt.startswith(longctx.HEADER)


def test_queried_line_is_spread_over_the_context(oracle):
    exs = longctx.examples(oracle, oracle.tokenizer, 2048, 40, seed=0)
    depths = sorted(e.query / (e.count - 1) for e in exs)
    assert min(e.count for e in exs) > 20
    assert depths[0] < 0.1 and depths[-1] > 0.9 and 0.3 < depths[20] < 0.7


@pytest.mark.parametrize("length", [256, 1024, 4096])
def test_passkey_prompts_fill_their_length_and_hide_one_key(oracle, length):
    """The landmark-attention layout: task, filler, the key's line, filler, question; the key stated twice in one
    line, nowhere else; one more filler block would not fit."""
    tok = oracle.tokenizer
    for i, e in enumerate(longctx.examples(oracle, tok, length, 5, task="passkey", seed=1)):
        assert len(e.ids) <= length and list(e.ids) == tok(e.prompt).input_ids
        more = longctx.build("passkey", tok, False, longctx.draws("passkey", 1, length, i), e.count + 1)
        assert len(more.ids) > length
        task, before, needle, after, question = e.prompt.split("\n")
        assert task == longctx.PASSKEY_TASK and question == "What is the pass key? The pass key is"
        assert needle == f"The pass key is {e.value}. Remember it. {e.value} is the pass key."
        assert before.count(longctx.FILLER) == e.query and after.count(longctx.FILLER) == e.count - e.query
        assert re.findall(r"\d+", e.prompt) == [str(e.value)] * 2


def test_passkey_depth_is_spread_and_plain_by_default(tmp_path):
    from transformers import AutoTokenizer

    from ptqsuite.paths import ASSETS
    from ptqsuite.weights import copy_assets

    copy_assets(ASSETS / "models" / "smollm2-135m-instruct", tmp_path)  # the shipped tokenizer, no weights needed
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.chat_template  # the lines task would use it; passkey stays plain text, as the original
    model = Oracle(tok, context=8192)
    exs = longctx.examples(model, tok, 1024, 40, task="passkey")
    depths = sorted(e.query / e.count for e in exs)
    assert depths[0] < 0.1 and depths[-1] > 0.9 and 0.3 < depths[20] < 0.7
    assert not any("<|im_start|>" in e.prompt for e in exs)
    assert longctx.retrieval(model, tok, [512, 1024], 6, task="passkey")[1024].accuracy == 1.0
    r = longctx.retrieval(Oracle(tok, 8192, answer=lambda v: v + 1), tok, [512], 6, task="passkey")[512]
    assert r.correct == "000000" and r.protocol.startswith("passkey-landmark/v1; plain")


def test_unknown_task_names_the_valid_ones(oracle):
    with pytest.raises(ValueError, match="unknown long-context task 'needle'; valid: lines, passkey"):
        longctx.retrieval(oracle, oracle.tokenizer, [512], 2, task="needle")


def test_a_longer_record_extends_a_shorter_one():
    keys, values = longctx.record(7, 50)
    assert longctx.record(7, 20) == (keys[:20], values[:20])
    assert all(1 <= v <= 50000 for v in values)


def test_scoring_rule():
    assert longctx.score("12345>\n\n", 12345)
    assert longctx.score(" 12345> and 7", 12345)
    assert not longctx.score("1234>", 12345)  # a prefix of the value
    assert not longctx.score("123456>", 12345)  # the value, then more digits
    assert not longctx.score("7 12345", 12345)  # the first integer counts
    assert not longctx.score(">\n\nThe", 12345)


def test_perfect_model_scores_one_and_a_wrong_one_zero(oracle):
    tok = oracle.tokenizer
    assert longctx.retrieval(oracle, tok, [512, 1024], 8)[1024].accuracy == 1.0
    wrong = Oracle(tok, 8192, answer=lambda value: value + 1)
    assert longctx.retrieval(wrong, tok, [512], 8)[512].correct == "0" * 8


def test_correct_is_in_example_order_whatever_the_batches(oracle):
    tok = oracle.tokenizer
    even = Oracle(tok, 8192, answer=lambda value: value if value % 2 == 0 else value + 1)
    exs = longctx.examples(even, tok, 512, 24, seed=5)
    expected = "".join("01"[e.value % 2 == 0] for e in exs)
    for batch_size in (1, 4, None):
        even.batches.clear()
        r = longctx.retrieval(even, tok, [512], 24, seed=5, batch_size=batch_size)[512]
        assert r.correct == expected and r.accuracy == expected.count("1") / 24
        assert sum(b[0] for b in even.batches) == 24 and max(b[0] for b in even.batches) <= (batch_size or 24)
    assert max(b[0] for b in even.batches) > 1  # equal-length prompts do share batches


def test_bad_lengths_raise(stories):
    with pytest.raises(ValueError, match="length 1024 exceeds the model's context of 512"):
        longctx.retrieval(stories.model, stories.tokenizer, [512, 1024], 2)
    with pytest.raises(ValueError, match="length 256: a single line makes a lines prompt of"):  # the header is long here
        longctx.retrieval(stories.model, stories.tokenizer, [256], 2)
    with pytest.raises(ValueError, match="n >= 1"):
        longctx.retrieval(stories.model, stories.tokenizer, [512], 0)


def test_chat_needs_a_template(stories):
    assert longctx.use_chat(stories.tokenizer, None) is False
    with pytest.raises(ValueError, match="no chat template"):
        longctx.examples(stories.model, stories.tokenizer, 512, 1, chat=True)


def test_stories260k_end_to_end(stories):
    results = longctx.retrieval(stories.model, stories.tokenizer, [448, 512], 6)  # 2 and 3 lines
    assert list(results) == [448, 512]
    for length, r in results.items():
        assert (r.length, r.n, len(r.correct)) == (length, 6, 6) and set(r.correct) <= {"0", "1"}
        assert r.accuracy == r.correct.count("1") / 6
        assert length - 60 < r.mean_tokens <= min(length, 512 - longctx.MAX_NEW_TOKENS)  # a line is ~40 tokens
        assert "plain" in r.protocol and "seed=0" in r.protocol and "n=6" in r.protocol
    again = longctx.retrieval(stories.model, stories.tokenizer, [512], 6, batch_size=1)
    assert again[512] == results[512]


@pytest.mark.parametrize("kv", [None, "kv4", "kv4pc"])
def test_batched_generation_matches_one_at_a_time(kv):
    """A batch holds prompts of one length, unpadded: each row generates as it would alone, KV-quantized too
    (kv4: per token; kv4pc: KIVI, per-channel blocks of cache positions)."""
    loaded = models.load(models.get("stories260k"), "cpu", torch.float32)
    if kv:
        quantize_io(loaded.model, arch_of(loaded.model), None, recipe.parse(f"rtn-w16{kv}").kv)
    exs = longctx.examples(loaded.model, loaded.tokenizer, 512, 4, seed=2)
    width = min(len(e.ids) for e in exs)
    prompts = [e.ids[:width] for e in exs]  # cut to one length
    batched = longctx.generate(loaded.model, prompts)
    assert batched == [longctx.generate(loaded.model, [p])[0] for p in prompts]
    with pytest.raises(ValueError, match="one length"):
        longctx.generate(loaded.model, [exs[0].ids, exs[0].ids[:-1]])


@pytest.mark.slow
def test_smollm2_finds_the_passkey_and_not_the_line():
    """SmolLM2-135M-Instruct (fp32, the GGUF weights): the passkey at 2048 tokens every time (README: 1.0 at
    512..2048), LongEval's lines at 1024 tokens (41 lines) almost never (README: 0/16): why the matrix gives
    SmolLM2 the passkey task."""
    try:
        loaded = models.load(models.get("smollm2-135m"), "cpu", torch.float32)
    except models.WeightsMissing as e:
        pytest.skip(str(e))
    passkey = longctx.retrieval(loaded.model, loaded.tokenizer, [2048], 8, task="passkey")[2048]
    assert "; plain;" in passkey.protocol and passkey.accuracy >= 7 / 8
    lines = longctx.retrieval(loaded.model, loaded.tokenizer, [1024], 8)[1024]
    assert "; chat;" in lines.protocol and lines.accuracy <= 2 / 8
