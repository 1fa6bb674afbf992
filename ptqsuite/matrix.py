"""The declarative matrix (matrix.toml): cases per tier, what each case evaluates, and the evaluation budget per
device type and model."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import models
from .data import DATASETS
from .recipe import Recipe, parse

DEFAULT = Path(__file__).with_name("matrix.toml")
# What a case can evaluate (`evals`, default ["ppl"]): perplexity, zero-shot tasks through lm-eval, long-context
# retrieval, a VLM's image-and-text agreement with its unquantized self. All but perplexity are sized by their own
# tables ([zeroshot.<device>], [longctx.<device>], [vlm.<device>]).
EVALUATIONS = ("ppl", "zeroshot", "longctx", "vlm")


@dataclass(frozen=True)
class Case:
    recipe: Recipe
    model: models.ModelSpec
    tier: str
    evals: tuple[str, ...] = ("ppl",)
    shard: str = ""  # matrix.toml's `shard`: an xdist group of its own within the model's cases

    @property
    def id(self) -> str:
        return f"{self.recipe}-{self.model.name}"

    @property
    def unsupported(self) -> str | None:
        """Why the recipe does not apply to the model's architecture (the case skips with it), or None."""
        from . import arch, pipeline

        return pipeline.unsupported(self.recipe, arch.get(self.model.arch))

    @property
    def group(self) -> str:
        """The pytest-xdist group (--dist loadgroup): a model's cases share a worker, so it loads and evaluates its
        unquantized reference once; cases with long evaluations, and a block of cases the matrix names a `shard`
        (cases no ordering test reads), form their own group, so two workers split the model's work at the cost of
        one more reference evaluation."""
        return ".".join([self.model.name, *([self.shard] if self.shard else []),
                         *(e for e in self.evals if e != "ppl")])


@dataclass(frozen=True)
class Matrix:
    tiers: tuple[str, ...]
    cases: tuple[Case, ...]
    budgets: dict[str, dict[str, dict[str, int]]]
    sizes: dict[str, dict] = field(default_factory=dict)  # {evaluation but ppl: {device: {model | "*": settings}}}

    def in_tier(self, case: Case, tier: str) -> bool:
        return self.tiers.index(case.tier) <= self.tiers.index(tier)

    def budget(self, device_type: str, model: str) -> dict[str, int]:
        return _lookup(self.budgets, device_type, model)

    def size(self, evaluation: str, device_type: str, model: str) -> dict:
        """The settings of ``evaluation`` (zeroshot: examples per task; longctx: lengths and n; vlm: n
        images and new_tokens) for a model."""
        return _lookup(self.sizes[evaluation], device_type, model)

    def weight_bits(self, tier: str | None = None) -> list[int]:
        return sorted({c.recipe.weight.bits for c in self.cases if tier is None or self.in_tier(c, tier)})


def _lookup(table: dict, device_type: str, model: str) -> dict:
    per_device = table.get(device_type) or table["cpu"]
    return per_device.get(model, per_device["*"])


def load(path: Path = DEFAULT) -> Matrix:
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    tiers = tuple(raw["tiers"])
    cases, seen = [], set()
    for group in raw["cases"]:
        if group["tier"] not in tiers:
            raise ValueError(f"{path}: unknown tier {group['tier']!r}; tiers: {', '.join(tiers)}")
        evals = tuple(group.get("evals", ["ppl"]))
        if not evals or set(evals) - set(EVALUATIONS) or len(set(evals)) != len(evals):
            raise ValueError(f"{path}: evals {list(evals)} of models {group['models']}: one or more of "
                             f"{', '.join(EVALUATIONS)}, each once")
        for model in group["models"]:
            for recipe in group["recipes"]:
                case = Case(parse(recipe), models.get(model), group["tier"], evals, group.get("shard", ""))
                if case.id in seen:
                    raise ValueError(f"{path}: case {case.id} is listed twice")
                seen.add(case.id)
                cases.append(case)
    for device, per_model in raw["budget"].items():
        for model, budget in per_model.items():
            if model != "*":
                models.get(model)
            unknown = set(budget) - set(DATASETS) - {"kld"}
            if unknown:
                raise ValueError(f"{path}: budget.{device}.{model} names unknown datasets {sorted(unknown)}; "
                                 f"valid: {', '.join(DATASETS)}, and kld (windows of each scored for KL divergence)")
    sizes = {name: raw.get(name, {"cpu": {"*": {}}}) for name in EVALUATIONS[1:]}
    _check_sizes(path, sizes)
    return Matrix(tiers, tuple(cases), raw["budget"], sizes)


def _check_sizes(path: Path, sizes: dict) -> None:
    from .eval import lmeval, longctx

    valid = {"zeroshot": set(lmeval.TASKS), "longctx": {"lengths", "n", "task"}, "vlm": {"n", "new_tokens"}}
    for name, per_device in sizes.items():
        for device, per_model in per_device.items():
            for model, settings in per_model.items():
                if model != "*" and model not in models.registry():
                    raise ValueError(f"{path}: {name}.{device}.{model}: unknown model; known: "
                                     f"{', '.join(models.registry())}")
                unknown = set(settings) - valid[name]
                if unknown:
                    raise ValueError(f"{path}: {name}.{device}.{model} names {sorted(unknown)}; valid: "
                                     f"{', '.join(sorted(valid[name]))}")
                if settings.get("task", "lines") not in longctx.TASKS:
                    raise ValueError(f"{path}: {name}.{device}.{model}.task {settings['task']!r}; valid: "
                                     f"{', '.join(longctx.TASKS)}")
