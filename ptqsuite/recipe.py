"""A PTQ recipe: pre-quantization transforms × error mitigation × formats × calibration, with a readable id.

Grammar of an id (it keys baselines, so ``parse(str(r)) == r`` always holds, and ``str`` prints the canonical form):

    recipe := [step "+"]* step "-" weight [act] [kv] ["@" calibration]
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
    act := "a" spec                           linear inputs, fake-quantized dynamically per token (g<n>: groups of n
                                            along the token's features); a16 hooks in and changes nothing
    kv := "kv" spec                          K after RoPE and V as attention receives them, per token and head
                                            (g<n>: groups of n within a head); kv16 likewise the identity
                                            (act and kv specs are weight specs with another letter: a8, a4sym, anvfp4,
                                            kv4g32; INT is asymmetric unless "sym", as for weights)
    gran := "g" n | "pt" | "pc"              groups of n along a row (tail groups allowed), per tensor, per channel
    calibration := dataset "." n "x" seqlen ".s" seed      e.g. @c4.128x2048.s0 (printed when not the default)

Examples: ``rtn-w4g128``, ``rtn-w8sym``, ``rtn-w16``, ``rtn-wmxfp4``, ``rtn-wnvfp4``, ``rtn-wfp8pt``,
``rtn-wmxfp4.ceil`` (shared exponent rounded up), ``rtn-wmxfp4g16.e4m3.nearest``, ``gptq-w4g128``,
``gptq.act-w3@wikitext2.128x2048.s0``, ``clip+gptq+lrc16-w4g128``, ``lwc+rtn-w3g64``, ``quarot+gptq-w4a4kv4``,
``smooth+rtn-w8a8``, ``awq+clip+rtn-w4g128``, ``spinquant+gptq-w4a8``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

import torch

from .formats import FP8, FP8_E5M2, MXFP4, MXFP8, NVFP4, FloatFormat, Format, IntFormat
from .formats.minifloat import ROUNDINGS, SCALES
from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken

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
    keep: tuple[tuple[str, int], ...] = ()  # activations only: (linear name, bits) whose inputs stay more precise

    @property
    def bits(self) -> int:
        return self.fmt.bits if self.fmt else 16

    @property
    def static(self) -> bool:
        """Activations and KV: one scale per tensor, fitted on calibration data (not computed per row at run time)."""
        return self.fmt is not None and isinstance(self.gran, PerTensor)

    def for_layer(self, name: str) -> "QuantSpec":
        """The spec for the linear called ``name`` (its last path component): a kept one gets its own bits, INT of
        the same symmetry and granularity (a float spec: FP8 at 8 bits), or 16: not quantized."""
        bits = dict(self.keep).get(name)
        if bits is None:
            return replace(self, keep=()) if self.keep else self
        if bits == 16:
            return QuantSpec(None)
        if isinstance(self.fmt, IntFormat):
            return QuantSpec(replace(self.fmt, bits=bits), self.gran)
        return QuantSpec(FP8, self.gran if isinstance(self.gran, PerTensor) else DEFAULT_GRAN["a"])

    def __str__(self) -> str:
        return self.token("w")

    def token(self, role: str) -> str:
        """The spec as it appears in an id after its role letter(s): w (weight), a (activations), kv (KV cache)."""
        if self.fmt is None:
            return f"{role}16"
        default = DEFAULT_GRAN[role]
        keep = "".join(f".{name}{bits}" for name, bits in self.keep)
        if isinstance(self.fmt, IntFormat):
            return f"{role}{self.fmt.bits}{_gran_token(self.gran, default)}{'sym' if self.fmt.symmetric else ''}{keep}"
        name = _preset_of(self.fmt)
        preset, preset_gran = FLOAT_PRESETS[name]
        options = [str(self.fmt.scale)] if self.fmt.scale != preset.scale else []
        options += [self.fmt.rounding] if self.fmt.rounding != preset.rounding else []
        return (f"{role}{name}{_gran_token(self.gran, _role_gran(preset_gran, default))}"
                + "".join(f".{o}" for o in options) + keep)

    def to_dict(self) -> dict | None:
        if self.fmt is None:
            return None
        # keep only when present, so the dicts that keyed earlier baselines do not change
        gran = {"granularity": str(self.gran), **({"keep": dict(self.keep)} if self.keep else {})}
        if isinstance(self.fmt, IntFormat):
            return {"format": "int", "bits": self.fmt.bits, "symmetric": self.fmt.symmetric, **gran,
                    "scale_dtype": str(self.fmt.scale_dtype).removeprefix("torch.")}
        return {"format": "float", "element": str(self.fmt.element), "scale": str(self.fmt.scale),
                "rounding": self.fmt.rounding, "tensor_scale": self.fmt.tensor_scale, **gran}


# What a spec's granularity is when the id names none, per role. Activations and the KV cache are quantized
# dynamically, a scale per row: per token for linear inputs, per token and head for K and V (the rows of the
# [tokens x heads, head_dim] view), as QuaRot and SmoothQuant's per-token setting do.
DEFAULT_GRAN: dict[str, Granularity] = {"w": PerChannel(), "a": PerToken(), "kv": PerToken()}
ROLE_NAMES = {"w": "weight", "a": "activation", "kv": "KV-cache"}


def _role_gran(preset_gran: Granularity, role_default: Granularity) -> Granularity:
    """A float preset's granularity in a role: a per-row preset (fp8) is per token for activations and KV."""
    return role_default if isinstance(preset_gran, PerChannel) else preset_gran


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
    act: QuantSpec | None = None  # linear inputs, fake-quantized dynamically; None: not quantized (no hook)
    kv: QuantSpec | None = None  # K after RoPE and V as attention stores them; None: not quantized

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

        from .transforms import TRANSFORMS

        return (any(TRANSFORMS[t.name].needs_calibration for t in self.transforms)
                or any(METHODS[s.name].needs_calibration for s in self.steps)
                or any(spec is not None and spec.static for spec in (self.act, self.kv)))

    def __str__(self) -> str:
        head = "+".join(map(str, (*self.transforms, *self.steps)))
        calib = f"@{self.calibration}" if self.calibration != Calibration() else ""
        act = self.act.token("a") if self.act is not None else ""
        kv = self.kv.token("kv") if self.kv is not None else ""
        return f"{head}-{self.weight}{act}{kv}{calib}"

    def to_dict(self) -> dict:
        return {
            "id": str(self),
            "method": self.method,
            "steps": [s.to_dict() for s in self.steps],
            "transforms": [s.to_dict() for s in self.transforms],
            "weight": self.weight.to_dict(),
            "calibration": asdict(self.calibration),
            # only when present, so weight-only recipes keep the dicts their baselines were recorded with
            **({"act": self.act.to_dict() or "16-bit"} if self.act is not None else {}),
            **({"kv": self.kv.to_dict() or "16-bit"} if self.kv is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        recipe = parse(d["id"])
        if recipe.to_dict() != d:
            raise RecipeError(f"recipe dict does not match its id {d['id']!r}: {d} != {recipe.to_dict()}")
        return recipe


def _spec_pattern(role: str) -> str:
    """One role's format in an id: ``<role><bits>|<role><float>``, then granularity, sym and float options."""
    g = role
    return (rf"{role}(?:(?P<{g}bits>\d+)|(?P<{g}float>[a-z]+\d[a-z0-9]*?))"
            rf"(?:g(?P<{g}group>\d+)|(?P<{g}pt>pt)|(?P<{g}pc>pc))?(?P<{g}sym>sym)?(?P<{g}options>(?:\.[a-z0-9_]+?)*)")


_FORMATS = re.compile(f"{_spec_pattern('w')}(?:{_spec_pattern('a')})?(?:{_spec_pattern('kv')})?")
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
    w, a, kv = _parse_formats(weight, recipe_id)
    recipe = Recipe(steps, w, transforms, _parse_calibration(calib, recipe_id), a, kv)
    for step in recipe.steps:
        _check_format(step, recipe.weight, recipe_id)
    from .transforms import TRANSFORMS

    for step in recipe.transforms:
        reason = getattr(TRANSFORMS[step.name], "unsupported", lambda recipe: None)(recipe)
        if reason:
            raise RecipeError(f"transform {str(step)!r} in recipe {recipe_id!r} cannot work here: {reason}")
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


def _parse_formats(text: str, recipe_id: str) -> tuple[QuantSpec, QuantSpec | None, QuantSpec | None]:
    m = _FORMATS.fullmatch(text)
    if not m:
        raise RecipeError(
            f"bad format {text!r} in recipe {recipe_id!r}; expected w<spec>[a<spec>][kv<spec>] (weights, then "
            f"optionally linear inputs and the KV cache), each spec <bits>[g<n>|pt|pc][sym] with bits one of "
            f"{', '.join(map(str, WEIGHT_BITS))}, or <float>[g<n>|pt|pc][.<option>]* with float one of "
            f"{', '.join(FLOAT_PRESETS)}; e.g. w4g128, w8sym, w16, wmxfp4, wnvfp4, wfp8pt, w4a4kv4, w8a8, w4a8kv4g64"
        )
    specs = [_parse_spec(m, role, recipe_id) if m[f"{role}bits"] or m[f"{role}float"] else None
             for role in ("w", "a", "kv")]
    for role, spec in zip(("a", "kv"), specs[1:]):
        reason = _unsupported_gran(spec, role) if spec is not None and spec.fmt is not None else None
        if reason:
            raise RecipeError(f"{ROLE_NAMES[role]} format {spec.token(role)!r} in recipe {recipe_id!r}: {reason}")
    return specs[0], specs[1], specs[2]


# What each granularity means for the run-time roles (nn.py implements them):
# a:  per token (dynamic, the default), g<n> (dynamic groups within a token), pt (static: one calibrated scale)
# kv: per token and head (dynamic), g<n> (groups within a head), pt (static, per layer for K and for V),
#     pc (KIVI: K per channel over blocks of nn.KV_TOKEN_BLOCK tokens, the newest block unquantized; V per token)
ROLE_GRANULARITIES = {"a": (PerToken, PerGroup, PerTensor), "kv": (PerToken, PerGroup, PerTensor, PerChannel)}


def _unsupported_gran(spec: QuantSpec, role: str) -> str | None:
    if type(spec.gran) not in ROLE_GRANULARITIES[role]:
        return (f"{spec.gran} scales are not supported for {ROLE_NAMES[role]}s; valid: per token (the default), "
                f"g<n>, pt (static, calibrated){', pc (per channel, KIVI)' if role == 'kv' else ''}")
    if isinstance(spec.gran, (PerTensor, PerChannel)) and not isinstance(spec.gran, PerToken) \
            and isinstance(spec.fmt, FloatFormat) and _preset_of(spec.fmt) not in ("fp8", "fp8e5m2"):
        return f"{_preset_of(spec.fmt)} has its own block scales; {spec.gran} applies to INT and fp8 formats"
    return None


def _parse_keep(options: list[str], role: str, spec_bits: int, float_spec: bool, text: str, recipe_id: str):
    """Options naming a linear and bits (``down_proj8``): that linear's input stays at those bits."""
    keep = []
    for option in options:
        m = re.fullmatch(r"(?P<name>[a-z][a-z0-9_]*?)(?P<bits>\d+)", option)
        if role != "a" or not m:
            return None, option
        bits = int(m["bits"])
        if spec_bits >= 16:
            raise RecipeError(f"{text!r} in recipe {recipe_id!r} is unquantized: it has no layers to keep ({option!r})")
        valid = (8, 16) if float_spec else tuple(b for b in WEIGHT_BITS if b > spec_bits)
        if bits not in valid:
            raise RecipeError(f"option {option!r} of {text!r} in recipe {recipe_id!r} keeps {m['name']}'s inputs at "
                              f"{bits} bits; a kept layer needs more bits than the rest: one of "
                              f"{', '.join(map(str, valid))} (16: not quantized)")
        keep.append((m["name"], bits))
    return tuple(sorted(keep)), None


def _parse_spec(m: re.Match, role: str, recipe_id: str) -> QuantSpec:
    text = m.group(0)
    if m[f"{role}float"]:
        return _parse_float(m, role, text, recipe_id)
    bits = int(m[f"{role}bits"])
    keep, bad = _parse_keep(list(filter(None, m[f"{role}options"].split("."))), role, bits, False, text, recipe_id)
    if bad:
        raise RecipeError(f"INT {ROLE_NAMES[role]} format in {text!r} of recipe {recipe_id!r} takes no option "
                          f"{bad!r}; options belong to float formats ({', '.join(FLOAT_PRESETS)}), and activation "
                          f"formats take <linear><bits> to keep a layer's inputs more precise, e.g. a4.down_proj8")
    if bits not in WEIGHT_BITS:
        raise RecipeError(f"{ROLE_NAMES[role]} bits {bits} in recipe {recipe_id!r} not supported; "
                          f"valid: {', '.join(map(str, WEIGHT_BITS))}")
    if bits == 16:
        if any(m[f"{role}{k}"] for k in ("group", "pt", "pc", "sym")) or keep:
            raise RecipeError(f"{role}16 is unquantized and takes no granularity, symmetry or kept layers, "
                              f"got {text!r}")
        return QuantSpec(None)
    # dynamic scales are computed and applied on the fly in fp32, as activation kernels do (act_quant.py)
    scale_dtype = torch.float16 if role == "w" else torch.float32
    return QuantSpec(IntFormat(bits, symmetric=bool(m[f"{role}sym"]), scale_dtype=scale_dtype),
                     _gran(m, role, DEFAULT_GRAN[role]), keep)


def _parse_float(m: re.Match, role: str, text: str, recipe_id: str) -> QuantSpec:
    name = m[f"{role}float"]
    if name not in FLOAT_PRESETS:
        raise RecipeError(f"unknown float format {name!r} in recipe {recipe_id!r}; "
                          f"valid: {', '.join(FLOAT_PRESETS)}")
    if m[f"{role}sym"]:
        raise RecipeError(f"float format {text!r} in recipe {recipe_id!r}: 'sym' is for INT formats (floats are "
                          f"symmetric already)")
    fmt, preset_gran = FLOAT_PRESETS[name]
    layers = []
    for option in filter(None, m[f"{role}options"].split(".")):
        if option in SCALES:
            fmt = replace(fmt, scale=SCALES[option])
        elif option in ROUNDINGS:
            fmt = replace(fmt, rounding=option)
        elif _parse_keep([option], role, fmt.bits, True, text, recipe_id)[1] is None:
            layers.append(option)
        else:
            raise RecipeError(f"unknown option {option!r} of {text!r} in recipe {recipe_id!r}; valid: scale formats "
                              f"{', '.join(SCALES)}, roundings {', '.join(ROUNDINGS)}"
                              f"{', and <linear><bits> to keep a layer more precise (a4.down_proj8)' if role == 'a' else ''}")
    keep, _ = _parse_keep(layers, role, fmt.bits, True, text, recipe_id)
    return QuantSpec(fmt, _gran(m, role, _role_gran(preset_gran, DEFAULT_GRAN[role])), keep)


def _gran(m: re.Match, role: str, default: Granularity) -> Granularity:
    if m[f"{role}group"]:
        return PerGroup(int(m[f"{role}group"]))
    return PerTensor() if m[f"{role}pt"] else PerChannel() if m[f"{role}pc"] else default


def _parse_calibration(text: str, recipe_id: str) -> Calibration:
    if not text:
        return Calibration()
    m = _CALIB.fullmatch(text)
    if not m:
        raise RecipeError(f"bad calibration {text!r} in recipe {recipe_id!r}; expected <dataset>.<n>x<seqlen>.s<seed>, e.g. c4.128x2048.s0")
    from .data import DATASETS

    _check(m["dataset"], sorted(DATASETS), "calibration dataset", recipe_id)
    return Calibration(m["dataset"], int(m["n"]), int(m["seqlen"]), int(m["seed"]))
