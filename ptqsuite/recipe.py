"""A PTQ recipe: pre-quantization transforms × error mitigation × formats × calibration, with a readable id.

Grammar of an id (it keys baselines, so ``parse(str(r)) == r`` always holds, and ``str`` prints the canonical form):

    recipe := [step "+"]* step "-" weight ["@" calibration]
    step := name [arg] ("." flag)*          a pre-quantization transform or an error-mitigation step, in the order
                                            they run: transforms, then at most one clipping step (clip, lwc), one
                                            solver (rtn, gptq), at most one compensation step (lrc). ``arg`` is a
                                            step's number (lrc's rank), flags its options (gptq.act: act-order)
    weight := "w16"                         unquantized (the identity)
            | "w" bits [gran] ["sym"]        INT, bits 2..8: per-channel and asymmetric unless said otherwise
            | "w" float [gran] ("." option)*
                                            a scaled float format (formats/scaled.py) from a preset:
                                            fp8 (E4M3, fp32 scale, per channel), fp8e5m2, mxfp4 and mxfp8 (OCP MX:
                                            E8M0 scale rounded down, blocks of 32), nvfp4 (E4M3 block scale + fp32
                                            tensor scale, blocks of 16); options change the scale format (e8m0,
                                            e4m3, fp16, fp32) or its rounding (floor, ceil, nearest)
    gran := "g" n | "pt" | "pc"              groups of n along a row (tail groups allowed), per tensor, per channel
    calibration := dataset "." n "x" seqlen ".s" seed      e.g. @c4.128x2048.s0 (printed when not the default)

Examples: ``rtn-w4g128``, ``rtn-w8sym``, ``rtn-w16``, ``rtn-wmxfp4``, ``rtn-wnvfp4``, ``rtn-wfp8pt``,
``rtn-wmxfp4.ceil`` (shared exponent rounded up), ``rtn-wmxfp4g16.e4m3.nearest``, ``gptq-w4g128``,
``gptq.act-w3@wikitext2.128x2048.s0``, ``clip+gptq+lrc16-w4g128``, ``lwc+rtn-w3g64``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from .formats import FP8, FP8_E5M2, MXFP4, MXFP8, NVFP4, FloatFormat, Format, IntFormat
from .formats.minifloat import ROUNDINGS, SCALES
from .granularity import Granularity, PerChannel, PerGroup, PerTensor

# Scaled float presets and the granularity each implies when the id names none.
FLOAT_PRESETS: dict[str, tuple[FloatFormat, Granularity]] = {
    "fp8": (FP8, PerChannel()),
    "fp8e5m2": (FP8_E5M2, PerChannel()),
    "mxfp4": (MXFP4, PerGroup(32)),
    "mxfp8": (MXFP8, PerGroup(32)),
    "nvfp4": (NVFP4, PerGroup(16)),
}


class RecipeError(ValueError):
    """A recipe id or dict that does not parse; the message names the bad part and the valid choices."""


@dataclass(frozen=True)
class QuantSpec:
    """A format applied at a granularity. ``fmt is None`` means unquantized (16-bit, the identity)."""

    fmt: Format | None
    gran: Granularity = PerChannel()

    @property
    def bits(self) -> int:
        return self.fmt.bits if self.fmt else 16

    def __str__(self) -> str:
        if self.fmt is None:
            return "w16"
        if isinstance(self.fmt, IntFormat):
            return f"w{self.fmt.bits}{_gran_token(self.gran, PerChannel())}{'sym' if self.fmt.symmetric else ''}"
        name = _preset_of(self.fmt)
        preset, default_gran = FLOAT_PRESETS[name]
        options = [str(self.fmt.scale)] if self.fmt.scale != preset.scale else []
        options += [self.fmt.rounding] if self.fmt.rounding != preset.rounding else []
        return f"w{name}{_gran_token(self.gran, default_gran)}" + "".join(f".{o}" for o in options)

    def to_dict(self) -> dict | None:
        if self.fmt is None:
            return None
        gran = {"granularity": str(self.gran)}
        if isinstance(self.fmt, IntFormat):
            return {"format": "int", "bits": self.fmt.bits, "symmetric": self.fmt.symmetric, **gran,
                    "scale_dtype": str(self.fmt.scale_dtype).removeprefix("torch.")}
        return {"format": "float", "element": str(self.fmt.element), "scale": str(self.fmt.scale),
                "rounding": self.fmt.rounding, "tensor_scale": self.fmt.tensor_scale, **gran}


def _gran_token(gran: Granularity, default: Granularity) -> str:
    if gran == default:
        return ""
    return f"g{gran.n}" if isinstance(gran, PerGroup) else "pt" if isinstance(gran, PerTensor) else "pc"


def _preset_of(fmt: FloatFormat) -> str:
    """The preset an id names a float format by: same element and tensor scale, fewest options to print."""
    candidates = [(int(p.scale != fmt.scale) + int(p.rounding != fmt.rounding), name)
                  for name, (p, _) in FLOAT_PRESETS.items()
                  if (p.element, p.tensor_scale) == (fmt.element, fmt.tensor_scale)]
    if not candidates:
        raise RecipeError(f"no preset for float format {fmt}; presets: {', '.join(FLOAT_PRESETS)}")
    return min(candidates)[1]


@dataclass(frozen=True)
class Calibration:
    dataset: str = "c4"
    n: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __str__(self) -> str:
        return f"{self.dataset}.{self.n}x{self.seqlen}.s{self.seed}"


@dataclass(frozen=True)
class Step:
    """One step of a recipe: a registry name, its number (None: the step's default) and its flags, sorted."""

    name: str
    arg: int | None = None
    flags: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.name}{'' if self.arg is None else self.arg}" + "".join(f".{f}" for f in self.flags)

    def to_dict(self) -> dict:
        return {"name": self.name, "arg": self.arg, "flags": list(self.flags)}


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]  # error mitigation in the order it runs: [clipping] solver [compensation]
    weight: QuantSpec
    transforms: tuple[Step, ...] = ()
    calibration: Calibration = field(default_factory=Calibration)

    @property
    def method(self) -> str:
        """The solver's name (rtn, gptq): what picks the quantized values."""
        return self.step("solve").name

    def step(self, role: str) -> Step | None:
        from .mitigation import METHODS

        return next((s for s in self.steps if METHODS[s.name].ROLE == role), None)

    @property
    def names(self) -> frozenset[str]:
        """Every transform and mitigation step named, for selecting recipes (--methods)."""
        return frozenset(s.name for s in (*self.transforms, *self.steps))

    @property
    def needs_calibration(self) -> bool:
        from .mitigation import METHODS

        return bool(self.transforms) or any(METHODS[s.name].needs_calibration for s in self.steps)

    def __str__(self) -> str:
        head = "+".join(map(str, (*self.transforms, *self.steps)))
        calib = f"@{self.calibration}" if self.calibration != Calibration() else ""
        return f"{head}-{self.weight}{calib}"

    def to_dict(self) -> dict:
        return {
            "id": str(self),
            "method": self.method,
            "steps": [s.to_dict() for s in self.steps],
            "transforms": [s.to_dict() for s in self.transforms],
            "weight": self.weight.to_dict(),
            "calibration": asdict(self.calibration),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        recipe = parse(d["id"])
        if recipe.to_dict() != d:
            raise RecipeError(f"recipe dict does not match its id {d['id']!r}: {d} != {recipe.to_dict()}")
        return recipe


_WEIGHT = re.compile(r"w(?:(?P<bits>\d+)|(?P<float>[a-z]+\d[a-z0-9]*?))(?:g(?P<group>\d+)|(?P<pt>pt)|(?P<pc>pc))?"
                     r"(?P<sym>sym)?(?P<options>(?:\.[a-z0-9]+)*)")
_STEP = re.compile(r"(?P<name>[a-z][a-z_]*?)(?P<arg>\d+)?(?P<flags>(?:\.[a-z0-9]+)*)")
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
    transforms, steps = _parse_steps(head, recipe_id)
    recipe = Recipe(steps, _parse_weight(weight, recipe_id), transforms, _parse_calibration(calib, recipe_id))
    for step in recipe.steps:
        _check_format(step, recipe.weight, recipe_id)
    return recipe


def _parse_steps(head: str, recipe_id: str) -> tuple[tuple[Step, ...], tuple[Step, ...]]:
    """Transforms first, then mitigation steps in role order; each checked against its module's vocabulary."""
    from .mitigation import METHODS, ROLES
    from .transforms import TRANSFORMS

    transforms, steps = [], []
    for token in head.split("+"):
        m = _STEP.fullmatch(token)
        name = m["name"] if m else token
        if name in TRANSFORMS and not steps:
            transforms.append(_step(m, TRANSFORMS[name], recipe_id))
        elif name in METHODS:
            steps.append(_step(m, METHODS[name], recipe_id))
        elif name in TRANSFORMS:
            raise RecipeError(f"transform {name!r} in recipe {recipe_id!r} comes after a mitigation step; "
                              f"transforms run first: e.g. '{name}+{steps[0].name}-...'")
        else:
            raise RecipeError(f"unknown step {name!r} in recipe {recipe_id!r}; known methods: "
                              f"{', '.join(known_methods())}; known transforms: {', '.join(known_transforms()) or '(none yet)'}")
    roles = [METHODS[s.name].ROLE for s in steps]
    solvers = [s.name for s in steps if METHODS[s.name].ROLE == "solve"]
    if len(solvers) != 1 or roles != sorted(roles, key=ROLES.index) or len(set(roles)) != len(roles):
        order = " + ".join(f"[{'|'.join(n for n, m in sorted(METHODS.items()) if m.ROLE == r)}]" for r in ROLES)
        raise RecipeError(f"recipe {recipe_id!r} has mitigation steps {[s.name for s in steps]}; expected one solver "
                          f"and at most one step of each other kind, in the order {order} (solver required)")
    return tuple(transforms), tuple(steps)


def _step(m: re.Match, module, recipe_id: str) -> Step:
    arg = int(m["arg"]) if m["arg"] else None
    flags = tuple(sorted(set(filter(None, m["flags"].split(".")))))
    step = Step(m["name"], None if arg == getattr(module, "DEFAULT_ARG", None) else arg, flags)
    try:
        module.options(step)
    except ValueError as e:
        raise RecipeError(f"step {m.group(0)!r} in recipe {recipe_id!r}: {e}") from None
    return step


def _check_format(step: Step, spec: QuantSpec, recipe_id: str) -> None:
    from .mitigation import METHODS

    reason = getattr(METHODS[step.name], "unsupported", lambda spec: None)(spec)
    if reason:
        raise RecipeError(f"step {str(step)!r} in recipe {recipe_id!r} cannot quantize to {spec}: {reason}")


def _check(name: str, valid: list[str], what: str, recipe_id: str) -> None:
    if name not in valid:
        raise RecipeError(f"unknown {what} {name!r} in recipe {recipe_id!r}; known {what}s: {', '.join(valid) or '(none yet)'}")


def _parse_weight(text: str, recipe_id: str) -> QuantSpec:
    m = _WEIGHT.fullmatch(text)
    if not m:
        raise RecipeError(
            f"bad weight format {text!r} in recipe {recipe_id!r}; expected w<bits>[g<n>|pt|pc][sym] with bits one "
            f"of {', '.join(map(str, WEIGHT_BITS))}, or w<float>[g<n>|pt|pc][.<option>]* with float one of "
            f"{', '.join(FLOAT_PRESETS)}; e.g. w4g128, w8sym, w16, wmxfp4, wnvfp4, wfp8pt, wmxfp4.ceil"
        )
    if m["float"]:
        return _parse_float(m, text, recipe_id)
    if m["options"]:
        raise RecipeError(f"INT weight format {text!r} in recipe {recipe_id!r} takes no options "
                          f"({m['options']!r}); options belong to float formats: {', '.join(FLOAT_PRESETS)}")
    bits = int(m["bits"])
    if bits not in WEIGHT_BITS:
        raise RecipeError(f"weight bits {bits} in recipe {recipe_id!r} not supported; valid: {', '.join(map(str, WEIGHT_BITS))}")
    if bits == 16:
        if m["group"] or m["pt"] or m["pc"] or m["sym"]:
            raise RecipeError(f"w16 is unquantized and takes no granularity or symmetry, got {text!r}")
        return QuantSpec(None)
    return QuantSpec(IntFormat(bits, symmetric=bool(m["sym"])), _gran(m, PerChannel()))


def _parse_float(m: re.Match, text: str, recipe_id: str) -> QuantSpec:
    if m["float"] not in FLOAT_PRESETS:
        raise RecipeError(f"unknown float format {m['float']!r} in recipe {recipe_id!r}; "
                          f"valid: {', '.join(FLOAT_PRESETS)}")
    if m["sym"]:
        raise RecipeError(f"float format {text!r} in recipe {recipe_id!r}: 'sym' is for INT formats (floats are "
                          f"symmetric already)")
    fmt, default_gran = FLOAT_PRESETS[m["float"]]
    for option in filter(None, m["options"].split(".")):
        if option in SCALES:
            fmt = replace(fmt, scale=SCALES[option])
        elif option in ROUNDINGS:
            fmt = replace(fmt, rounding=option)
        else:
            raise RecipeError(f"unknown option {option!r} of {text!r} in recipe {recipe_id!r}; valid: scale formats "
                              f"{', '.join(SCALES)}, roundings {', '.join(ROUNDINGS)}")
    return QuantSpec(fmt, _gran(m, default_gran))


def _gran(m: re.Match, default: Granularity) -> Granularity:
    return PerGroup(int(m["group"])) if m["group"] else PerTensor() if m["pt"] else PerChannel() if m["pc"] else default


def _parse_calibration(text: str, recipe_id: str) -> Calibration:
    if not text:
        return Calibration()
    m = _CALIB.fullmatch(text)
    if not m:
        raise RecipeError(f"bad calibration {text!r} in recipe {recipe_id!r}; expected <dataset>.<n>x<seqlen>.s<seed>, e.g. c4.128x2048.s0")
    from .data import DATASETS

    _check(m["dataset"], sorted(DATASETS), "calibration dataset", recipe_id)
    return Calibration(m["dataset"], int(m["n"]), int(m["seqlen"]), int(m["seed"]))
