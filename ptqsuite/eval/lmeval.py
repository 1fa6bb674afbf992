"""Zero-shot accuracy through lm-eval itself, on the vendored task data, with no network.

``lm_eval.simple_evaluate`` scores lm-eval's own task configs (ptqsuite.eval.tasks: lm-eval's prompts, targets,
normalizations and metrics; only the data source is local) with ``HFLM`` wrapped around the given model object.
The model is used as it is: HFLM neither reloads, moves nor casts a model object; it runs on the model's device
in the model's dtype. Its constructor calls ``model.tie_weights()``, which could re-tie a head a transform has
untied, so that call is suppressed; the model's train/eval mode is restored afterwards, the tokenizer HFLM may
give a pad token to is a copy, and the global RNG states lm-eval seeds are restored too.

Protocol: 0-shot, log-likelihood scoring as lm-eval does it (context and continuation encoded together, the
continuation being the tail; right-padded batches sorted by length; contexts longer than the model's
``max_length`` are cut from the left, as lm-eval does). One deliberate setting: log-softmax in float32
(HFLM's ``softmax_dtype``), a no-op for fp32 models, which for bf16/fp16 models keeps each token's
log-probability from being rounded to the logits' 8 or 11 mantissa bits and close choices from flipping at random.

Subsets: ``{task: n}`` scores n examples of the split: the first n in a fixed pseudo-random order of the whole
split, sorting example i by sha256(f"{seed}:{task}:{i}"). The order is specified by this formula alone (no
Python RNG whose algorithm could change), so it is the same on every machine and version, and a smaller subset
is contained in a larger one of the same seed. ``None`` scores the whole split. An example lm-eval cannot score on
the model (a continuation longer than ``max_length``, where HFLM asserts: PIQA 314 and one other of 1838 for
stories260K's 512 tokens) is left out and named in the protocol.

Each task runs in its own ``simple_evaluate`` call (lm-eval batches all tasks' requests together otherwise),
so its wall time and examples per second are its own; the time includes loading its data (cached by
``datasets`` under $HF_HOME/datasets after the first run) and building its requests.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ptqsuite.eval import tasks as task_data

TASKS: tuple[str, ...] = task_data.TASKS
# Requests per forward, measured with benchmarks/bench_zeroshot.py (SmolLM2-135M). On the CPU larger batches are
# slower: HFLM takes the log-softmax of every position of the padded batch (GBs at vocab 49152) and pads each batch
# to its longest request.
CPU_BATCH_SIZE = 4
CUDA_BATCH_SIZE = 64
ACCURACY_METRICS = ("acc", "acc_norm")  # per-example 0/1 metrics kept as correctness strings
SEED = 1234  # lm-eval's own default for numpy, torch and few-shot seeds, passed explicitly


@dataclass(frozen=True)
class TaskResult:
    task: str
    n: int  # examples scored: the n asked for, less any left out (see protocol)
    metrics: dict[str, float]  # lm-eval's values: acc (+ acc_norm where the task has it); lambada adds perplexity
    correct: dict[str, str]  # per accuracy metric, '0'/'1' per example, in the order of `indices`
    indices: tuple[int, ...]  # which examples of the split were scored, ascending
    protocol: str  # recorded with results, so a number is never compared across protocols
    seconds: float  # wall time of this task's evaluation

    @property
    def examples_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def subset(task: str, n: int | None, seed: int = 0) -> tuple[int, ...]:
    """The indices (ascending) a subset of ``n`` examples of ``task``'s split scores; ``None``: all of them."""
    size = task_data.size(task)
    if n is None:
        return tuple(range(size))
    if not 0 < n <= size:
        raise ValueError(f"{task}: subset of {n} examples; valid: 1..{size} (the split's size) or None for all")
    key = lambda i: hashlib.sha256(f"{seed}:{task}:{i}".encode()).digest()  # noqa: E731
    return tuple(sorted(sorted(range(size), key=key)[:n]))


def default_batch_size(model) -> int:
    return CUDA_BATCH_SIZE if next(model.parameters()).device.type == "cuda" else CPU_BATCH_SIZE


def zeroshot(model, tokenizer, tasks: Mapping[str, int | None], *, seed: int = 0,
             batch_size: int | str | None = None, max_length: int | None = None) -> dict[str, TaskResult]:
    """lm-eval's zero-shot scores of ``model`` on each task, on a seeded subset of ``tasks[name]`` examples
    (None: the whole split). ``batch_size`` (None: :func:`default_batch_size`; "auto": HFLM probes memory) and
    ``max_length`` (None: the model's context) go to HFLM; results do not depend on them beyond float noise,
    except that a shorter ``max_length`` cuts long contexts."""
    for name in tasks:
        task_data.check(name)
    plan = {name: subset(name, n, seed) for name, n in tasks.items()}
    results = {}
    with session(model, tokenizer, batch_size=batch_size, max_length=max_length) as lm:
        for name, indices in plan.items():
            start = time.perf_counter()
            out, indices, left_out = _evaluate_scorable(lm, name, indices)
            seconds = time.perf_counter() - start
            protocol = _protocol(name, len(indices) + len(left_out), seed, max_length)
            if left_out:
                protocol += f"; left out {len(left_out)} (a continuation over {lm.max_length} tokens): {list(left_out)}"
            results[name] = _task_result(name, out, indices, seconds, protocol)
    return results


def _evaluate_scorable(lm, name: str, indices: tuple[int, ...]) -> tuple[dict, tuple[int, ...], tuple[int, ...]]:
    """:func:`evaluate`, leaving out the examples lm-eval cannot score on this model: those with a continuation
    longer than its max_length (e.g. 2 of PIQA's 1838 for stories260K's 512-token context). Their indices
    depend only on the tokenizer and max_length, so the same ones are left out every run."""
    try:
        return evaluate(lm, name, indices), indices, ()
    except ContinuationTooLong as e:
        left_out = tuple(indices[k] for k in e.doc_ids)  # lm-eval's doc_id is the position in `samples`
        kept = tuple(sorted(set(indices) - set(left_out)))
        if not kept:  # lm-eval would read an empty `samples` as "all of them"
            raise ValueError(f"{name}: every example asked for has {e}") from None
        return evaluate(lm, name, kept), kept, left_out


@contextlib.contextmanager
def session(model, tokenizer, *, batch_size: int | str | None = None,
            max_length: int | None = None) -> Iterator[object]:
    """An lm-eval ``HFLM`` around ``model`` for :func:`evaluate`, with lm-eval quiet, the model as given and the
    global RNG states restored when the block ends."""
    with _quiet(), _rng_preserved(), _as_given(model):
        # configure_pad_token sets a pad token on the tokenizer it is given: give it a copy.
        yield _quiet_hflm()(pretrained=model, tokenizer=copy.deepcopy(tokenizer),
                            batch_size=batch_size or default_batch_size(model),
                            max_length=max_length, softmax_dtype=torch.float32)


class ContinuationTooLong(Exception):
    """lm-eval cannot score a continuation longer than the model's max_length (HFLM asserts): which docs have one."""

    def __init__(self, doc_ids: list[int], max_length: int):
        super().__init__(f"docs {doc_ids}: a continuation longer than max_length {max_length}")
        self.doc_ids, self.max_length = doc_ids, max_length


@functools.cache
def _quiet_hflm() -> type:
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """HFLM without its per-request progress bars (the evaluator never asks it to hide them), and with a
        named exception instead of HFLM's bare assertion for a continuation that cannot fit its max_length."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            too_long = sorted({r.doc_id for r in requests if self._continuation_tokens(*r.args) > self.max_length})
            if too_long:
                raise ContinuationTooLong(too_long, self.max_length)
            return super().loglikelihood(requests, disable_tqdm=True)

        def _continuation_tokens(self, context: str, continuation: str) -> int:
            if not context:  # HFLM then scores the continuation after a prefix token
                return len(self.tok_encode(continuation, add_special_tokens=False))
            return len(self._encode_pair(context, continuation)[1])

    return QuietHFLM


def evaluate(lm, name: str, indices: tuple[int, ...]) -> dict:
    """One task through ``simple_evaluate`` on ``lm`` (from :func:`session`): lm-eval's own result dict, with the
    logged samples (per-request arguments and log-likelihoods) under ``samples[PREFIX + name]``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_data.check(name)
    cfg = task_data.config(name)
    whole = len(indices) == task_data.size(name)
    return lm_eval.simple_evaluate(
        model=lm, tasks=[cfg], task_manager=TaskManager(include_defaults=False), num_fewshot=0,
        # lm-eval's `samples` must be ascending: it maps the k-th doc it yields back to samples[k].
        samples=None if whole else {cfg["task"]: sorted(indices)},
        bootstrap_iters=0, log_samples=True, random_seed=0, numpy_random_seed=SEED,
        torch_random_seed=SEED, fewshot_random_seed=SEED,
    )


def _task_result(name: str, out: dict, indices: tuple[int, ...], seconds: float, protocol: str) -> TaskResult:
    key = task_data.PREFIX + name
    samples = sorted(out["samples"][key], key=lambda s: s["doc_id"])
    scored = tuple(s["doc_id"] for s in samples)
    if scored != indices:
        raise RuntimeError(f"{name}: lm-eval scored {len(scored)} examples, not the {len(indices)} asked for")
    metrics = {
        k.split(",")[0]: float(v) for k, v in out["results"][key].items()
        if k.endswith(",none") and "_stderr" not in k
    }
    correct = {m: "".join("1" if s[m] else "0" for s in samples) for m in ACCURACY_METRICS if m in metrics}
    return TaskResult(name, len(samples), metrics, correct, indices, protocol, seconds)


def _protocol(name: str, asked: int, seed: int, max_length: int | None) -> str:
    import lm_eval

    size = task_data.size(name)
    which = f"all {size}" if asked == size else f"seeded subset {asked} of {size} (seed {seed})"
    text = f"lm-eval {_version(lm_eval)} {name} {task_data.DATA[name].split}; 0-shot; {which}"
    return text + (f"; max_length={max_length}" if max_length else "")


def _version(module) -> str:
    from importlib.metadata import version

    return getattr(module, "__version__", None) or version("lm_eval")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs at INFO and warns about things that are expected here (a model object, 0-shot overrides,
    left truncation on short-context models); datasets draws progress bars. Only errors get through."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """simple_evaluate seeds Python's, numpy's and torch's global generators; the caller's states come back."""
    py, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


@contextlib.contextmanager
def _as_given(model: torch.nn.Module) -> Iterator[None]:
    """HFLM calls model.eval() and model.tie_weights(): the first is wanted while scoring and undone after; the
    second is shadowed by a no-op (an instance attribute) so a head that a transform untied stays untied."""
    training = model.training
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights
        model.train(training)
