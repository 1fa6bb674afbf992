"""The declarative matrix (matrix.toml): cases per tier and the evaluation budget per device type."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from . import models
from .data import DATASETS
from .recipe import Recipe, parse

DEFAULT = Path(__file__).with_name("matrix.toml")


@dataclass(frozen=True)
class Case:
    recipe: Recipe
    model: models.ModelSpec
    tier: str

    @property
    def id(self) -> str:
        return f"{self.recipe}-{self.model.name}"


@dataclass(frozen=True)
class Matrix:
    tiers: tuple[str, ...]
    cases: tuple[Case, ...]
    budgets: dict[str, dict[str, dict[str, int]]]

    def in_tier(self, case: Case, tier: str) -> bool:
        return self.tiers.index(case.tier) <= self.tiers.index(tier)

    def budget(self, device_type: str, model: str) -> dict[str, int]:
        per_device = self.budgets.get(device_type) or self.budgets["cpu"]
        return per_device.get(model, per_device["*"])

    def weight_bits(self, tier: str | None = None) -> list[int]:
        return sorted({c.recipe.weight.bits for c in self.cases if tier is None or self.in_tier(c, tier)})


def load(path: Path = DEFAULT) -> Matrix:
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    tiers = tuple(raw["tiers"])
    cases, seen = [], set()
    for group in raw["cases"]:
        if group["tier"] not in tiers:
            raise ValueError(f"{path}: unknown tier {group['tier']!r}; tiers: {', '.join(tiers)}")
        for model in group["models"]:
            for recipe in group["recipes"]:
                case = Case(parse(recipe), models.get(model), group["tier"])
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
    return Matrix(tiers, tuple(cases), raw["budget"])
