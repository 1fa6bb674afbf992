"""Run a case: load the model once, evaluate the unquantized reference once, quantize a copy, evaluate it.

Everything expensive is cached for the session: loaded models (small ones stay resident; one hub model at a
time), the reference metrics of each model, and each case's result, so a case's metrics and any test that orders
cases (e.g. W4 < W3 < W2) share one quantized model build.
"""
from __future__ import annotations

import copy
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, data, models, pipeline, progress, shared
from .arch import arch_of
from .eval import lmeval, longctx, vlm
from .eval.ppl import ReferenceLogProbs, perplexity
from .matrix import Case, Matrix

ZEROSHOT_SEED = 0  # which examples a task's subset holds: fixed, so every run and machine scores the same ones
LONGCTX_SEED = 0  # the generated retrieval prompts
VLM_SEED = 0  # the synthetic images and their questions
KL_CACHE_BYTES = 1 << 30  # reference log-probabilities kept per model for KL (SmolLM2's one window: 0.4 GB)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    sources: models.Sources = field(default_factory=models.Sources)
    batch_size: int | None = None

    @property
    def device_class(self) -> str:
        """Baselines are per device class: numerics legitimately differ between CPU fp32 and GPU bf16."""
        if self.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(self.device)
            return f"cuda-sm{major}{minor}-{DTYPE_NAMES[self.dtype]}"
        return f"{self.device.type}-{DTYPE_NAMES[self.dtype]}"


@dataclass
class CaseResult:
    case: Case
    payload: dict  # what the baseline stores
    quantize_s: float
    evaluate_s: float


class Runner:
    """``shared``: the run's directory shared with the other xdist workers (shared.py), or None."""

    def __init__(self, settings: Settings, matrix: Matrix, shared: Path | None = None):
        self.settings, self.matrix, self.shared = settings, matrix, shared
        self._loaded: dict[str, models.Loaded] = {}
        self._reference: dict[tuple[str, str], tuple[dict, dict]] = {}
        self._results: dict[str, CaseResult] = {}
        self._calibration: dict[tuple, torch.Tensor] = {}
        self._kl_reference: dict[str, ReferenceLogProbs] = {}
        self._vlm_answers: dict[tuple, vlm.Answers] = {}

    def loaded(self, spec: models.ModelSpec) -> models.Loaded:
        if spec.name not in self._loaded:
            if spec.kind == "hub":  # full-size: one resident at a time
                for name in [n for n, m in self._loaded.items() if m.spec.kind == "hub"]:
                    del self._loaded[name]
            self._loaded[spec.name] = models.load(spec, self.settings.device, self.settings.dtype, self.settings.sources)
        return self._loaded[spec.name]

    def evaluate(self, model: torch.nn.Module, spec: models.ModelSpec, evals: tuple[str, ...] = ("ppl",),
                 reference=None) -> tuple[dict, dict]:
        """Metrics ``{name: {value, ...counts}}`` and the protocol each was measured with, for each evaluation in
        ``evals``. With the unquantized ``reference`` model, perplexity also gives the KL divergence from it."""
        metrics, protocol = {}, {}
        for name in evals:
            m, p = getattr(self, f"_{name}")(model, spec, reference)
            metrics.update(m)
            protocol.update(p)
        return metrics, protocol

    def _ppl(self, model, spec: models.ModelSpec, reference) -> tuple[dict, dict]:
        tokenizer = self.loaded(spec).tokenizer
        budget = dict(self.matrix.budget(self.settings.device.type, spec.name))
        kld_windows = budget.pop("kld", 0)
        metrics, protocol = {}, {}
        for dataset, max_windows in budget.items():
            r = perplexity(model, tokenizer, data.eval_text(dataset), bos_per_window=spec.bos_per_window,
                           max_windows=max_windows or None, batch_size=self.settings.batch_size,
                           reference=reference, kld_windows=kld_windows,
                           progress=progress.reporter(f"{spec.name}: {dataset} windows"))
            progress.clear()
            metrics[f"{dataset}.ppl"] = {"value": r.ppl, "windows": r.windows, "tokens": r.tokens, "nll_std": r.nll_std}
            if r.kld is not None:
                metrics[f"{dataset}.kld"] = {"value": r.kld, "windows": r.kld_windows}
            protocol[dataset] = f"{r.protocol}; windows={r.windows}"
        return metrics, protocol

    def _zeroshot(self, model, spec: models.ModelSpec, reference) -> tuple[dict, dict]:
        tasks = {task: n or None for task, n in self.matrix.size("zeroshot", self.settings.device.type,
                                                                 spec.name).items()}
        results = lmeval.zeroshot(model, self.loaded(spec).tokenizer, tasks, seed=ZEROSHOT_SEED)
        metrics, protocol = {}, {}
        for task, r in results.items():
            for metric, value in r.metrics.items():
                entry = {"value": value, "n": r.n}
                if metric in r.correct:
                    entry["correct"] = r.correct[metric]
                metrics[f"{task}.{metric}"] = entry
            protocol[task] = r.protocol
        return metrics, protocol

    def _longctx(self, model, spec: models.ModelSpec, reference) -> tuple[dict, dict]:
        size = self.matrix.size("longctx", self.settings.device.type, spec.name)
        context = _context(self.loaded(spec).model)
        lengths = [n for n in size["lengths"] if n <= context]  # a short-context model runs the lengths it has
        task = size.get("task", "lines")
        results = longctx.retrieval(model, self.loaded(spec).tokenizer, lengths, size["n"], task=task,
                                    seed=LONGCTX_SEED)
        metrics = {f"{task}.{length}.acc": {"value": r.accuracy, "n": r.n, "correct": r.correct}
                   for length, r in results.items()}
        return metrics, {f"{task}.{length}": r.protocol for length, r in results.items()}

    def _vlm(self, model, spec: models.ModelSpec, reference) -> tuple[dict, dict]:
        size = self.matrix.size("vlm", self.settings.device.type, spec.name)
        r = vlm.score(model, self.vlm_answers(spec, size["n"], size["new_tokens"]))
        counts = {"n": r.n, "positions": r.positions}
        metrics = {"vlm.top1": {"value": r.top1, **counts, "correct": r.correct},
                   "vlm.kld": {"value": r.kld, **counts}}
        return metrics, {"vlm": r.protocol}

    def vlm_answers(self, spec: models.ModelSpec, n: int, new_tokens: int) -> vlm.Answers:
        """The unquantized model's answers on the synthetic images, computed once per model: every case of the model
        is scored against them."""
        key = (spec.name, n, new_tokens)
        if key not in self._vlm_answers:
            loaded = self.loaded(spec)
            self._vlm_answers[key] = vlm.answers(loaded.model, vlm.processor(loaded.path, loaded.tokenizer), n=n,
                                                 seed=VLM_SEED, new_tokens=new_tokens)
        return self._vlm_answers[key]

    def kl_reference(self, spec: models.ModelSpec) -> ReferenceLogProbs:
        if spec.name not in self._kl_reference:
            self._kl_reference[spec.name] = ReferenceLogProbs(self.loaded(spec).model, KL_CACHE_BYTES)
        return self._kl_reference[spec.name]

    def reference(self, spec: models.ModelSpec, evals: tuple[str, ...] = ("ppl",)) -> tuple[dict, dict]:
        """The unquantized model's metrics for ``evals``, each evaluation computed once per model and run (by
        whichever xdist worker asks first, when workers share a directory)."""
        metrics, protocol = {}, {}
        for name in evals:
            if (spec.name, name) not in self._reference:
                key = f"reference.{self.settings.device_class}.{spec.name}.{name}"
                self._reference[spec.name, name] = tuple(shared.once(
                    self.shared, key, lambda: self.evaluate(self.loaded(spec).model, spec, (name,))))
            metrics.update(self._reference[spec.name, name][0])
            protocol.update(self._reference[spec.name, name][1])
        return metrics, protocol

    def run(self, case: Case) -> CaseResult:
        if case.id not in self._results:
            self._results[case.id] = self._run(case)
        return self._results[case.id]

    def calibration(self, case: Case) -> torch.Tensor | None:
        """The recipe's calibration token ids for this model, built once per (model, calibration)."""
        if not case.recipe.needs_calibration:
            return None
        c, loaded = case.recipe.calibration, self.loaded(case.model)
        key = (case.model.name, c)
        if key not in self._calibration:
            context = _context(loaded.model)
            if c.seqlen > context:
                raise ValueError(f"{case.id}: calibration sequences of {c.seqlen} tokens exceed {case.model.name}'s "
                                 f"context of {context}; use e.g. @{c.dataset}.{c.n}x{context}.s{c.seed}")
            self._calibration[key] = data.calibration(c.dataset, loaded.tokenizer, c.n, c.seqlen, c.seed)
        return self._calibration[key]

    def _run(self, case: Case) -> CaseResult:
        reference, protocol = self.reference(case.model, case.evals)
        calibration = self.calibration(case)
        qmodel = copy.deepcopy(self.loaded(case.model).model)
        t0 = time.perf_counter()
        report = pipeline.quantize(qmodel, case.recipe, arch_of(qmodel), calibration, self.settings.device,
                                   progress=progress.reporter(f"{case.id}: quantize"))
        progress.clear()
        t1 = time.perf_counter()
        metrics, _ = self.evaluate(qmodel, case.model, case.evals, reference=self.kl_reference(case.model))
        t2 = time.perf_counter()
        del qmodel
        for name in [n for n in metrics if n.endswith(".ppl") and n.removesuffix(".ppl") in data.DATASETS]:
            dataset = name.removesuffix(".ppl")
            metrics[f"{dataset}.recovery"] = {"value": reference[name]["value"] / metrics[name]["value"]}
        metrics["bits_per_weight"] = {"value": report.bits_per_weight}
        payload = {
            "case": case.id,
            "recipe": case.recipe.to_dict(),
            "model": {"name": case.model.name, "family": case.model.family, "kind": case.model.kind},
            "metrics": metrics,
            "reference": reference,
            "size": {"model_bytes": report.model_bytes, "quantized_params": report.quantized_params},
            "protocol": {
                "device_class": self.settings.device_class,
                "batch_size": self.settings.batch_size or "auto",
                "evaluation": protocol,
                "kld_windows": self.matrix.budget(self.settings.device.type, case.model.name).get("kld", 0),
                **({"calibration": case.recipe.to_dict()["calibration"]} if case.recipe.needs_calibration else {}),
            },
            "environment": environment(),
        }
        return CaseResult(case, payload, t1 - t0, t2 - t1)


def _context(model) -> float:
    """The language model's context length (a VLM's is in its text config); unbounded where nothing encodes
    positions (Mamba)."""
    return getattr(arch_of(model).config(model), "max_position_embeddings", None) or math.inf


def non_finite(metrics: dict) -> list[str]:
    return [name for name, m in metrics.items() if not math.isfinite(m["value"])]


def environment() -> dict:
    import transformers

    return {
        "ptqsuite": __version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
    }
