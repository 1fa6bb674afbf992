"""Zero-shot evaluation through lm-eval (ptqsuite.eval.lmeval) on the vendored task data (ptqsuite.eval.tasks).

The shipped task configs are lm-eval's own (drift guard), the data is the vendored data, and lm-eval's scores
agree with a direct log-likelihood computation written here from the task definitions.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import lzma
import os
import random
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import lm_eval
import numpy as np
import pytest
import torch
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.tasks.hellaswag.utils import preprocess

from ptqsuite import models
from ptqsuite.eval import lmeval
from ptqsuite.eval import tasks as task_data
from ptqsuite.paths import ASSETS

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
LM_EVAL_CONFIG = {  # our task -> the installed lm-eval config it copies
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
# Where the data comes from and what the task is called: the only keys allowed to differ from lm-eval's.
DATA_SOURCE_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
                    "validation_split", "test_split", "fewshot_split"}
SPLIT_DEVIATIONS = {"openbookqa": "validation"}  # lm-eval scores test, which is not vendored
N_CHECK = 6  # examples per task in the direct log-likelihood check


@pytest.fixture(scope="module", autouse=True)
def worker_threads():
    """Under pytest-xdist, as the plugin's ptq_runner does: this worker's share of the cores, no oversubscription
    (torch's default of all cores per worker makes every op wait on descheduled threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stories():
    return models.load(models.get("stories260k"), "cpu", torch.float32)


def _raw_rows(name: str) -> list[dict]:
    """The vendored rows, before any format conversion."""
    text = lzma.decompress((ASSETS / "data" / task_data.DATA[name].vendored).read_bytes()).decode("utf-8")
    return [json.loads(line) for line in text.splitlines()]


# --- 1. the shipped configs are lm-eval's --------------------------------------------------------------------------

def _normalized(cfg: dict) -> dict:
    """Config minus the data source; functions as (source file, name), however they were imported."""
    def norm(v):
        if callable(v):
            return ("function", str(Path(inspect.getsourcefile(v)).resolve()), v.__name__)
        return v
    return {k: norm(v) for k, v in cfg.items() if k not in DATA_SOURCE_KEYS}


@pytest.mark.parametrize("name", lmeval.TASKS)
def test_shipped_config_is_lm_evals_own(name):
    """Prompts, targets, choices, delimiters, metrics, process_docs: equal to the installed lm-eval's, so a
    changed lm-eval prompt fails here rather than silently scoring a different task."""
    ours = task_data.load_config(task_data.yaml_path(name))
    theirs = load_yaml(LM_EVAL_TASKS / LM_EVAL_CONFIG[name], resolve_func=True)
    assert _normalized(ours) == _normalized(theirs)
    assert (ours["task"], theirs["task"], ours["dataset_path"]) == (task_data.PREFIX + name, name, "json")
    scored = theirs.get("test_split") or theirs["validation_split"]
    split = task_data.DATA[name].split
    assert split == SPLIT_DEVIATIONS.get(name, scored)
    assert split == (ours.get("test_split") or ours["validation_split"])


def test_task_names_do_not_clash_with_lm_evals():
    """With lm-eval's defaults indexed as well, a ptq_ task still names only ours (a text scan of lm-eval's
    YAMLs: TaskManager() indexing them takes seconds)."""
    assert not [p for p in LM_EVAL_TASKS.rglob("*.yaml") if "ptq_" in p.read_text(errors="replace")]


# --- 2. the data: vendored intact, converted without loss, loadable by lm-eval -------------------------------------

def test_vendored_task_data_matches_sources_json():
    sources = json.loads((ASSETS / "data" / "SOURCES.json").read_text())
    for name, data in task_data.DATA.items():
        blob = lzma.decompress((ASSETS / "data" / data.vendored).read_bytes())
        assert hashlib.sha256(blob).hexdigest() == sources[data.vendored]["sha256_decompressed"], name


@pytest.mark.parametrize("name", lmeval.TASKS)
def test_every_task_loads_every_example(name):
    """lm-eval builds the task from the cached jsonl alone and sees every vendored example."""
    task = TaskManager(include_defaults=False).load([task_data.config(name)])["tasks"][task_data.PREFIX + name]
    assert len(task.eval_docs) == len(_raw_rows(name)) == task_data.size(name)
    assert task_data.data_file(name).is_absolute()


def test_format_conversions_keep_every_example_and_answer():
    for name in ("arc_easy", "arc_challenge"):
        rows = [json.loads(line) for line in task_data.data_file(name).read_text().splitlines()]
        for raw, row in zip(_raw_rows(name), rows, strict=True):
            assert (row["id"], row["question"], row["choices"]["text"]) == (raw["id"], raw["question"], raw["choices"])
            assert row["choices"]["label"].index(row["answerKey"]) == raw["gold"]
    rows = [json.loads(line) for line in task_data.data_file("boolq").read_text().splitlines()]
    assert [r["label"] for r in rows] == [int(r["answer"]) for r in _raw_rows("boolq")]
    for name in ("piqa", "hellaswag", "winogrande", "lambada_openai", "openbookqa"):  # used as vendored
        raw = lzma.decompress((ASSETS / "data" / task_data.DATA[name].vendored).read_bytes())
        assert task_data.data_file(name).read_bytes() == raw, name


# --- 3. lm-eval's numbers equal a direct computation ---------------------------------------------------------------

def _requests(name: str, doc: dict) -> tuple[list[tuple[str, str]], list[str], int]:
    """(context, continuation) pairs, the choice strings acc_norm divides by, and the gold index: written from
    each task's definition, independently of lm-eval's templating."""
    if name == "piqa":
        ctx, choices, gold = f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"]
    elif name in ("arc_easy", "arc_challenge"):
        ctx, choices, gold = f"Question: {doc['question']}\nAnswer:", doc["choices"], doc["gold"]
    elif name == "hellaswag":
        ctx = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        choices, gold = [preprocess(e) for e in doc["endings"]], int(doc["label"])
    elif name == "boolq":
        ctx, choices, gold = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["answer"])
    elif name == "winogrande":  # partial scoring: the options go in the context, the rest of the sentence is scored
        cut = doc["sentence"].index("_")
        contexts = [doc["sentence"][:cut] + o for o in (doc["option1"], doc["option2"])]
        rest = " " + doc["sentence"][cut + 1:].strip()
        return [(c, rest) for c in contexts], contexts, int(doc["answer"]) - 1
    elif name == "lambada_openai":
        words = doc["text"].split(" ")
        return [(" ".join(words[:-1]), " " + words[-1])], [], 0
    else:
        raise AssertionError(name)
    return [(ctx, " " + c) for c in choices], choices, gold


@torch.no_grad()
def _direct(model, tokenizer, context: str, continuation: str, max_length: int) -> tuple[float, bool]:
    """sum log p(continuation | context), and whether greedy decoding gives it: one unbatched forward. Tokenized
    as HFLM does (_encode_pair): trailing context spaces move to the continuation, context + continuation is
    encoded whole and the continuation is its tail; too long inputs lose tokens on the left."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    cont = whole[len(ctx):]
    inp = (ctx + cont)[-(max_length + 1):][:-1]
    logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), dim=-1)[len(inp) - len(cont):]
    target = torch.tensor(cont)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def _check_against_direct(loaded, name: str, indices: tuple[int, ...], batch_size: int) -> None:
    with lmeval.session(loaded.model, loaded.tokenizer, batch_size=batch_size) as lm:
        out = lmeval.evaluate(lm, name, indices)
        max_length = lm.max_length
    samples = sorted(out["samples"][task_data.PREFIX + name], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(indices)
    rows = _raw_rows(name)
    mine = {"acc": [], "acc_norm": [], "ll": []}
    for i, sample in zip(indices, samples):
        requests, choices, gold = _requests(name, rows[i])
        assert [tuple(a) for a in sample["arguments"]] == requests, (name, i)
        direct = [_direct(loaded.model, loaded.tokenizer, c, t, max_length) for c, t in requests]
        theirs = [r[0] for r in sample["resps"]]
        for (ll, greedy), (ll_lm, greedy_lm) in zip(direct, theirs, strict=True):
            assert ll == pytest.approx(ll_lm, abs=1e-4), (name, i)
            assert greedy == greedy_lm, (name, i)
        lls = np.array([ll for ll, _ in direct])
        if name == "lambada_openai":
            mine["acc"].append(float(direct[0][1]))
            mine["ll"].append(lls[0])
        else:
            mine["acc"].append(float(np.argmax(lls) == gold))
            mine["acc_norm"].append(float(np.argmax(lls / np.array([len(c) for c in choices])) == gold))
        for metric in ("acc", "acc_norm"):
            if metric in sample:
                assert sample[metric] == mine[metric][-1], (name, i, metric)
    result = lmeval._task_result(name, out, indices, 1.0, "")
    assert result.metrics["acc"] == pytest.approx(np.mean(mine["acc"]))
    assert result.correct["acc"] == "".join(str(int(a)) for a in mine["acc"])
    if "acc_norm" in result.metrics:
        assert result.metrics["acc_norm"] == pytest.approx(np.mean(mine["acc_norm"]))
    if name == "lambada_openai":  # lm-eval's perplexity aggregation: exp(-mean log-likelihood of the last word)
        assert np.log(result.metrics["perplexity"]) == pytest.approx(-np.mean(mine["ll"]), abs=1e-4)


@pytest.mark.parametrize("name", ["piqa", "arc_easy", "hellaswag", "winogrande", "lambada_openai", "boolq"])
def test_lm_eval_agrees_with_direct_loglikelihood(stories, name):
    """Multiple choice (acc, acc_norm), winogrande's partial scoring, lambada's greedy match and perplexity,
    boolq's long passages (left-truncated to stories260K's 512 tokens). Batched (lm-eval) vs unbatched (here)."""
    _check_against_direct(stories, name, lmeval.subset(name, N_CHECK), batch_size=4)


def test_lm_eval_agrees_with_direct_loglikelihood_smollm2():
    """SmolLM2's byte-level BPE without BOS: the space handling of _encode_pair matters here."""
    try:
        loaded = models.load(models.get("smollm2-135m"), "cpu", torch.float32)
    except models.WeightsMissing as e:
        pytest.skip(str(e))
    _check_against_direct(loaded, "piqa", lmeval.subset("piqa", 4), batch_size=4)


# --- 4. the interface -----------------------------------------------------------------------------------------------

def test_subset_is_fixed_nested_and_seeded():
    assert lmeval.subset("piqa", 5) == (792, 946, 959, 1091, 1373)  # the formula's output: never changes
    small, large = lmeval.subset("hellaswag", 50), lmeval.subset("hellaswag", 200)
    assert set(small) <= set(large) and list(large) == sorted(large) and len(set(large)) == 200
    assert lmeval.subset("hellaswag", 50, seed=1) != small
    assert lmeval.subset("piqa", None) == tuple(range(1838))


def test_zeroshot_is_deterministic_and_reports_metrics(stories):
    asked = {"piqa": 12, "lambada_openai": 8}
    first = lmeval.zeroshot(stories.model, stories.tokenizer, asked)
    second = lmeval.zeroshot(stories.model, stories.tokenizer, asked)
    for name, n in asked.items():
        a, b = first[name], second[name]
        assert (a.task, a.n, a.indices) == (name, n, lmeval.subset(name, n))
        assert (a.metrics, a.correct) == (b.metrics, b.correct)
        assert a.examples_per_second > 0 and a.protocol == b.protocol
    assert set(first["piqa"].metrics) == {"acc", "acc_norm"} and set(first["piqa"].correct) == {"acc", "acc_norm"}
    assert set(first["lambada_openai"].metrics) == {"acc", "perplexity"}
    assert first["piqa"].metrics["acc"] == first["piqa"].correct["acc"].count("1") / 12
    assert first["piqa"].protocol == f"lm-eval {version('lm_eval')} piqa validation; 0-shot; seeded subset 12 of 1838 (seed 0)"


def test_zeroshot_leaves_model_tokenizer_and_rng_as_given(stories):
    """HFLM would re-tie an untied head (when the config says tied), set a pad token and reseed the globals."""
    model, tokenizer = stories.model, stories.tokenizer
    head = model.lm_head.weight
    model.lm_head.weight = torch.nn.Parameter(head.detach().clone(), requires_grad=False)  # untied, config says tied
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        params = {k: p for k, p in model.named_parameters(remove_duplicate=False)}
        pad, rng, py = tokenizer.pad_token, torch.get_rng_state(), random.getstate()
        model.train()
        lmeval.zeroshot(model, tokenizer, {"piqa": 2})
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        assert model.training and "tie_weights" not in vars(model)
        after = dict(model.named_parameters(remove_duplicate=False))
        assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)
        assert all(torch.equal(before[k], v) and before[k].dtype == v.dtype for k, v in model.state_dict().items())
        assert tokenizer.pad_token == pad
        assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py
    finally:
        model.lm_head.weight = head
        model.eval()


def test_examples_lm_eval_cannot_score_are_left_out_and_named(stories):
    """HFLM asserts that a continuation fits max_length: such examples (PIQA 314 for stories260K's 512 tokens; at
    max_length 40 half of these 6) are left out, named in the protocol, and the rest is scored as usual."""
    asked = lmeval.subset("piqa", 6)
    too_long = tuple(i for i in asked if any(
        len(stories.tokenizer.encode(" " + doc[k], add_special_tokens=False)) > 40
        for doc in [_raw_rows("piqa")[i]] for k in ("sol1", "sol2")))
    assert 0 < len(too_long) < len(asked)
    r = lmeval.zeroshot(stories.model, stories.tokenizer, {"piqa": 6}, max_length=40)["piqa"]
    assert r.indices == tuple(i for i in asked if i not in too_long) and r.n == len(r.indices)
    assert r.protocol.endswith(f"; max_length=40; left out {len(too_long)} (a continuation over 40 tokens): "
                               f"{list(too_long)}")
    with lmeval.session(stories.model, stories.tokenizer) as lm:
        assert lmeval._evaluate_scorable(lm, "piqa", (314, 315))[1:] == ((315,), (314,))


def test_bad_task_names_and_sizes_are_clear_errors(stories):
    with pytest.raises(ValueError, match=r"unknown zero-shot task 'piqaa'; valid: piqa, arc_easy, arc_challenge, "
                                         r"hellaswag, winogrande, lambada_openai, boolq, openbookqa"):
        lmeval.zeroshot(stories.model, stories.tokenizer, {"piqa": 2, "piqaa": 2})
    with pytest.raises(ValueError, match=r"openbookqa: subset of 501 examples; valid: 1\.\.500"):
        lmeval.subset("openbookqa", 501)


def test_two_processes_at_once_with_cold_caches(tmp_path):
    """As two pytest-xdist workers would: both materialize the jsonl and build the datasets Arrow cache (and
    hellaswag's process_docs map) at the same time, in empty caches. Both succeed with the same numbers."""
    script = textwrap.dedent("""
        import json, sys, torch
        from ptqsuite import models
        from ptqsuite.eval import lmeval
        loaded = models.load(models.get("stories260k"), "cpu", torch.float32)
        torch.set_num_threads(1)
        r = lmeval.zeroshot(loaded.model, loaded.tokenizer, {"hellaswag": 4, "arc_easy": 4})
        print(json.dumps({k: [v.metrics, v.correct, v.indices] for k, v in r.items()}))
    """)
    env = os.environ | {"PTQSUITE_CACHE": str(tmp_path / "ptq"), "HF_HOME": str(tmp_path / "hf"),
                        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert json.loads(outs[0][0].splitlines()[-1]) == json.loads(outs[1][0].splitlines()[-1])
    assert len(list((tmp_path / "ptq" / "lmeval-data").glob("*.jsonl"))) == 2
