"""A PTQ recipe: pre-quantization transforms × error mitigation × formats × calibration, with a readable id.

Grammar of an id (it keys baselines, so ``parse(str(r)) == r`` always holds):

    recipe := [transform "+"]* method "-" weight ["@" calibration]
    weight := "w16"                         unquantized (the identity)
            | "w" bits [ "g" n | "pt" ] ["sym"]
                                            per-channel by default; g<n> per-group (tail groups allowed);
                                            pt per-tensor; asymmetric unless "sym"
    calibration := dataset "." n "x" seqlen ".s" seed      e.g. @c4.128x2048.s0 (printed when not the default)

Examples: ``rtn-w4g128``, ``rtn-w8sym``, ``rtn-w3``, ``rtn-w16``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .formats import IntFormat
from .granularity import Granularity, PerChannel, PerGroup, PerTensor


class RecipeError(ValueError):
    """A recipe id or dict that does not parse; the message names the bad part and the valid choices."""


@dataclass(frozen=True)
class QuantSpec:
    """A format applied at a granularity. ``fmt is None`` means unquantized (16-bit, the identity)."""

    fmt: IntFormat | None
    gran: Granularity = PerChannel()

    @property
    def bits(self) -> int:
        return self.fmt.bits if self.fmt else 16

    def __str__(self) -> str:
        if self.fmt is None:
            return "w16"
        gran = f"g{self.gran.n}" if isinstance(self.gran, PerGroup) else "pt" if isinstance(self.gran, PerTensor) else ""
        return f"w{self.fmt.bits}{gran}{'sym' if self.fmt.symmetric else ''}"


@dataclass(frozen=True)
class Calibration:
    dataset: str = "c4"
    n: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __str__(self) -> str:
        return f"{self.dataset}.{self.n}x{self.seqlen}.s{self.seed}"


@dataclass(frozen=True)
class Recipe:
    method: str
    weight: QuantSpec
    transforms: tuple[str, ...] = ()
    calibration: Calibration = field(default_factory=Calibration)

    def __str__(self) -> str:
        head = "+".join((*self.transforms, self.method))
        calib = f"@{self.calibration}" if self.calibration != Calibration() else ""
        return f"{head}-{self.weight}{calib}"

    def to_dict(self) -> dict:
        fmt = self.weight.fmt
        return {
            "id": str(self),
            "method": self.method,
            "transforms": list(self.transforms),
            "weight": None if fmt is None else {
                "format": "int", "bits": fmt.bits, "symmetric": fmt.symmetric,
                "granularity": str(self.weight.gran), "scale_dtype": str(fmt.scale_dtype).removeprefix("torch."),
            },
            "calibration": asdict(self.calibration),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        recipe = parse(d["id"])
        if recipe.to_dict() != d:
            raise RecipeError(f"recipe dict does not match its id {d['id']!r}: {d} != {recipe.to_dict()}")
        return recipe


_WEIGHT = re.compile(r"w(?P<bits>\d+)(?:g(?P<group>\d+)|(?P<pt>pt))?(?P<sym>sym)?")
_CALIB = re.compile(r"(?P<dataset>[a-z0-9]+)\.(?P<n>\d+)x(?P<seqlen>\d+)\.s(?P<seed>\d+)")
WEIGHT_BITS = (*IntFormat.VALID_BITS, 16)


def known_methods() -> list[str]:
    from .mitigation import METHODS

    return sorted(METHODS)


def known_transforms() -> list[str]:
    from .transforms import TRANSFORMS

    return sorted(TRANSFORMS)


def parse(recipe_id: str) -> Recipe:
    body, _, calib = recipe_id.partition("@")
    head, sep, weight = body.partition("-")
    if not sep:
        raise RecipeError(f"recipe {recipe_id!r} has no weight format; expected e.g. 'rtn-w4g128'")
    *transforms, method = head.split("+")
    _check(method, known_methods(), "method", recipe_id)
    for t in transforms:
        _check(t, known_transforms(), "transform", recipe_id)
    return Recipe(method, _parse_weight(weight, recipe_id), tuple(transforms), _parse_calibration(calib, recipe_id))


def _check(name: str, valid: list[str], what: str, recipe_id: str) -> None:
    if name not in valid:
        raise RecipeError(f"unknown {what} {name!r} in recipe {recipe_id!r}; known {what}s: {', '.join(valid) or '(none yet)'}")


def _parse_weight(text: str, recipe_id: str) -> QuantSpec:
    m = _WEIGHT.fullmatch(text)
    if not m:
        raise RecipeError(
            f"bad weight format {text!r} in recipe {recipe_id!r}; expected w<bits>[g<n>|pt][sym], "
            f"bits one of {', '.join(map(str, WEIGHT_BITS))}, e.g. w4g128, w8sym, w3, w16"
        )
    bits = int(m["bits"])
    if bits not in WEIGHT_BITS:
        raise RecipeError(f"weight bits {bits} in recipe {recipe_id!r} not supported; valid: {', '.join(map(str, WEIGHT_BITS))}")
    if bits == 16:
        if m["group"] or m["pt"] or m["sym"]:
            raise RecipeError(f"w16 is unquantized and takes no granularity or symmetry, got {text!r}")
        return QuantSpec(None)
    gran = PerGroup(int(m["group"])) if m["group"] else PerTensor() if m["pt"] else PerChannel()
    return QuantSpec(IntFormat(bits, symmetric=bool(m["sym"])), gran)


def _parse_calibration(text: str, recipe_id: str) -> Calibration:
    if not text:
        return Calibration()
    m = _CALIB.fullmatch(text)
    if not m:
        raise RecipeError(f"bad calibration {text!r} in recipe {recipe_id!r}; expected <dataset>.<n>x<seqlen>.s<seed>, e.g. c4.128x2048.s0")
    from .data import DATASETS

    _check(m["dataset"], sorted(DATASETS), "calibration dataset", recipe_id)
    return Calibration(m["dataset"], int(m["n"]), int(m["seqlen"]), int(m["seed"]))
