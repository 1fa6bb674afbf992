"""Baselines: committed JSON snapshots under baselines/<device class>/, and the one rule that judges a result.

A baseline stores a case's metrics, the unquantized model's metrics from the same run ("reference"), the protocol
that produced them, and the environment. ``compare`` decides pass/fail:

* Protocol: every field must match (device class, batch size, each dataset's evaluation protocol and window count,
  calibration). Numbers from another protocol are not comparable, so a mismatch fails and says to re-record.
* Metrics, two-sided: ``|measured - baseline| <= tol · |baseline|``. A result better than its baseline beyond
  tolerance also fails, so baselines move only on purpose (re-record with --snapshot-update and say why in the
  commit).
  Perplexity here is a deterministic function of (weights, text, protocol): there is no sampling noise to allow
  for, only floating-point reassociation across machines, thread counts and library kernels. ``RELATIVE_TOLERANCE``
  bounds that per compute dtype, with a wide margin over what we measured (README, "Tolerances"), and far below the
  effects a regression suite exists to catch (one bit of weight precision moves perplexity by percents).
  Recovery (reference ppl / quantized ppl) is held to the same rule: it is insensitive to upstream changes that
  move the unquantized model too, and the failure message says which of the two moved.
  KL divergence from the unquantized model is a small difference of two log-distributions, so its floating-point
  noise is relatively larger: 10× the perplexity tolerance, plus an absolute floor (``KLD_FLOOR``) for
  near-lossless formats whose KL is itself at the noise level.
  ``bits_per_weight`` is exact arithmetic: it must match to 1e-9.
* Accuracies (zero-shot tasks, long-context retrieval) are means over a sample of examples, and a code change that
  moves a few logits legitimately flips a few borderline examples either way. Each accuracy metric stores its
  per-example correctness (``correct``: a '0'/'1' string in the protocol's fixed example order), and the rule is
  the exact McNemar test, paired on those examples: of the ``d`` examples whose correctness differs from the
  baseline's, ``b`` went right -> wrong and ``c`` wrong -> right; under "no change in accuracy" each flip goes
  either way with probability 1/2, so the two-sided p-value is ``min(1, 2 · P[Binomial(d, 1/2) >= max(b, c)])``.
  A difference fails when ``p < ACCURACY_ALPHA`` (0.01 per metric): a drop (or a gain: re-record on purpose)
  larger than the sample explains. The message gives both accuracies, n, b and c, p, and the bound: how many of
  the d flips may go one way before it fails. The evaluation is deterministic on a machine, so a rerun flips
  nothing (d = 0, p = 1) and the rule cannot be flaky; on other hardware, rounding flips a handful of
  near-ties both ways, which this absorbs where a fixed tolerance on the mean would not.
* Environment (library versions, threads): differences are reported, never failed on.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from syrupy.extensions.json import JSONSnapshotExtension

from .paths import atomic_write_text

RELATIVE_TOLERANCE = {"fp32": 1e-3, "bf16": 1e-2, "fp16": 1e-2}
KLD_FLOOR = {"fp32": 1e-6, "bf16": 1e-3, "fp16": 1e-4}  # nats
EXACT = 1e-9
ACCURACY_ALPHA = 0.01


class CorruptBaseline(Exception):
    pass


@dataclass
class Verdict:
    ok: bool = True
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    worse: list[str] = field(default_factory=list)  # metrics that failed in the bad direction (regressions)

    def fail(self, line: str, worse_metric: str | None = None) -> None:
        self.ok = False
        self.lines.append(line)
        if worse_metric is not None:
            self.worse.append(worse_metric)


def tolerance(metric: str, device_class: str) -> tuple[float, float]:
    """(relative, absolute) tolerance of a metric: pass when ``|delta| <= max(rel · |baseline|, abs)``."""
    dtype = device_class.rsplit("-", 1)[-1]
    if metric == "bits_per_weight":
        return EXACT, 0.0
    if metric.endswith(".kld"):
        return 10 * RELATIVE_TOLERANCE[dtype], KLD_FLOOR[dtype]
    return RELATIVE_TOLERANCE[dtype], 0.0


def compare(baseline: dict, measured: dict) -> Verdict:
    v = Verdict()
    _compare_protocol(baseline.get("protocol", {}), measured["protocol"], v)
    if not v.ok:
        return v
    device_class = measured["protocol"]["device_class"]
    _compare_metrics("", baseline.get("metrics", {}), measured["metrics"], device_class, v)
    _compare_metrics("unquantized reference ", baseline.get("reference", {}), measured["reference"], device_class, v)
    if not v.ok:
        _explain(baseline, measured, device_class, v)
    for key in sorted(set(baseline.get("environment", {})) | set(measured["environment"])):
        was, now = baseline.get("environment", {}).get(key), measured["environment"].get(key)
        if was != now:
            v.notes.append(f"environment: {key} was {was} when the baseline was recorded, now {now}")
    return v


def _compare_protocol(was: dict, now: dict, v: Verdict) -> None:
    for key in sorted(set(was) | set(now)):
        if was.get(key) != now.get(key):
            v.fail(f"protocol changed: {key}: baseline {was.get(key)!r}, now {now.get(key)!r}")
    if not v.ok:
        v.lines.append("numbers from different protocols are not comparable: re-record with --snapshot-update")


def _compare_metrics(label: str, was: dict, now: dict, device_class: str, v: Verdict) -> None:
    for name in sorted(set(was) | set(now)):
        if name not in now or name not in was:
            gone = name in was  # a metric that vanished is a regression; a new one only changes the record
            v.fail(f"{label}metric {name}: {'missing from this run' if gone else 'not in the baseline'}",
                   label + name if gone else None)
            continue
        if "correct" in now[name] or "correct" in was[name]:
            _compare_accuracy(label + name, was[name], now[name], v)
            continue
        b, m = was[name]["value"], now[name]["value"]
        rel, absolute = tolerance(name, device_class)
        delta = m - b
        if not abs(delta) <= max(rel * abs(b), absolute):  # `not <=` also catches NaN
            floor = f" (or ±{absolute:g} absolute)" if absolute else ""
            v.fail(f"{label}{name}: baseline {b:.6g}, measured {m:.6g}, delta {delta:+.4g} "
                   f"({delta / b if b else math.inf:+.3%}), tolerance ±{rel:.3%} relative{floor}: {_direction(name, delta)}",
                   label + name if _is_worse(name, delta) else None)


def mcnemar(baseline: str, measured: str) -> tuple[int, int, float]:
    """Right -> wrong flips ``b``, wrong -> right flips ``c`` and the exact two-sided McNemar p-value."""
    b = sum(x == "1" and y == "0" for x, y in zip(baseline, measured))
    c = sum(x == "0" and y == "1" for x, y in zip(baseline, measured))
    return b, c, _two_sided(b, c)


def _two_sided(b: int, c: int) -> float:
    d = b + c
    tail = sum(math.comb(d, k) for k in range(max(b, c), d + 1)) / 2.0 ** d
    return min(1.0, 2 * tail)


def flip_bound(d: int, alpha: float = ACCURACY_ALPHA) -> int | None:
    """The most of ``d`` flips that may go one way and still pass (None: any split passes)."""
    for k in range(d, (d + 1) // 2 - 1, -1):
        if _two_sided(k, d - k) >= alpha:
            return k if k < d else None
    return None


def _compare_accuracy(name: str, was: dict, now: dict, v: Verdict) -> None:
    """The paired rule of the module docstring; a record of another length or without examples fails as a
    protocol change."""
    if len(was.get("correct", "")) != len(now.get("correct", "")) or was.get("n") != now.get("n"):
        v.fail(f"{name}: the baseline scored {was.get('n')} examples, this run {now.get('n')}: not comparable, "
               f"re-record with --snapshot-update")
        return
    b, c, p = mcnemar(was["correct"], now["correct"])
    if p >= ACCURACY_ALPHA:
        return
    n, d, bound = now["n"], b + c, flip_bound(b + c)
    worse = "WORSE than baseline" if b > c else "better than baseline: if intended, re-record and say why"
    v.fail(f"{name}: baseline {was['value']:.4f}, measured {now['value']:.4f} (n={n}); {b} examples went right -> "
           f"wrong and {c} wrong -> right; exact McNemar p={p:.2g} < {ACCURACY_ALPHA}: more than sampling explains "
           f"(of {d} flips at most {bound} may go one way): {worse}", name if b > c else None)


LOWER_IS_BETTER = (".ppl", ".kld", ".perplexity")
HIGHER_IS_BETTER = (".recovery", ".acc", ".acc_norm", ".top1")


def _is_worse(name: str, delta: float) -> bool:
    """A change in the bad direction; a metric with no direction (bits_per_weight) counts as worse when it moves,
    and so does NaN."""
    if name.endswith(LOWER_IS_BETTER):
        return not delta <= 0
    if name.endswith(HIGHER_IS_BETTER):
        return not delta >= 0
    return True


def _direction(name: str, delta: float) -> str:
    if not name.endswith(LOWER_IS_BETTER + HIGHER_IS_BETTER):
        return "changed"
    return "WORSE than baseline" if _is_worse(name, delta) else "better than baseline: if intended, re-record and say why"


def _explain(baseline: dict, measured: dict, device_class: str, v: Verdict) -> None:
    moved = [n for n in measured["reference"]
             if n in baseline.get("reference", {})
             and abs(measured["reference"][n]["value"] / baseline["reference"][n]["value"] - 1) > tolerance(n, device_class)[0]]
    if moved:
        v.lines.append(f"the unquantized model moved too ({', '.join(moved)}): suspect the environment "
                       f"(library versions, hardware) before the quantization code")


def check_finite(measured: dict) -> list[str]:
    return [f"{section}.{name} = {m['value']}" for section in ("metrics", "reference")
            for name, m in measured[section].items() if not math.isfinite(m["value"])]


class BaselineExtension(JSONSnapshotExtension):
    """syrupy storage for baselines: one human-diffable JSON file per case, under ``root``.

    ``root`` is set on a per-device-class subclass (see ``for_directory``) because syrupy asks the class, not an
    instance, where snapshots live.
    """

    root: Path = Path("baselines")

    @classmethod
    def for_directory(cls, root: Path) -> type["BaselineExtension"]:
        return type(f"Baselines_{root.name}", (cls,), {"root": Path(root)})

    @classmethod
    def dirname(cls, *, test_location) -> str:
        return str(cls.root / test_location.basename)

    def serialize(self, data, **kwargs) -> str:
        bad = check_finite(data)
        if bad:
            raise ValueError(f"refusing to record non-finite metrics: {', '.join(bad)}")
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def read_snapshot_data_from_location(self, *, snapshot_location: str, snapshot_name: str, session_id: str):
        text = super().read_snapshot_data_from_location(
            snapshot_location=snapshot_location, snapshot_name=snapshot_name, session_id=session_id)
        if text is not None:
            _parse(text, snapshot_location)
        return text

    def matches(self, *, serialized_data, snapshot_data) -> bool:
        return compare(json.loads(snapshot_data), json.loads(serialized_data)).ok

    def diff_lines(self, serialized_data, snapshot_data):
        if not snapshot_data:
            yield "no baseline recorded for this case on this device class: record one with --snapshot-update"
            return
        verdict = compare(json.loads(snapshot_data), json.loads(serialized_data))
        yield from verdict.lines + verdict.notes

    @classmethod
    def write_snapshot_collection(cls, *, snapshot_collection, name_order=None) -> None:
        data = next(iter(snapshot_collection)).data
        _parse(data, snapshot_collection.location)  # never write what we could not read back
        atomic_write_text(Path(snapshot_collection.location), data)


def _parse(text: str, location: str) -> dict:
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or "metrics" not in data or "protocol" not in data:
            raise ValueError("not a ptqsuite baseline (needs 'metrics' and 'protocol')")
        return data
    except ValueError as e:
        raise CorruptBaseline(
            f"corrupt baseline file {location}: {e}. It was not modified. Restore it from git "
            f"(git checkout -- {location}) or delete it and re-record with --snapshot-update."
        ) from None
