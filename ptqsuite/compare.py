"""``python -m ptqsuite compare A B``: what changed between two results files, judged by the baseline rule.

Run B is measured against run A exactly as a test run is measured against its baseline (ptqsuite/baselines.py):
the protocol must match, perplexity-like metrics within the device class's relative tolerance, accuracies by the
paired exact McNemar test on their per-example records. Each case present in both files gets one status:

* ``regressed``: some metric moved beyond tolerance in the bad direction (or vanished)
* ``incomparable``: the protocol differs (other windows, examples, calibration): the numbers cannot be judged
* ``changed``: beyond tolerance, but only in the good direction or in a metric without one
* ``same``: within tolerance everywhere
* ``added`` / ``removed``: in only one of the files

The exit status is 1 when any case regressed or is incomparable, else 0 (2 for unreadable input).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import results
from .baselines import compare as judge

FAILING = ("regressed", "incomparable")


@dataclass
class Row:
    case: str
    device_class: str
    status: str
    primary: str | None = None  # the metric shown in the table
    before: float | None = None
    after: float | None = None
    lines: list[str] = field(default_factory=list)


def compare_runs(before: list[dict], after: list[dict]) -> list[Row]:
    a = {results.key(r): r for r in before}
    b = {results.key(r): r for r in after}
    rows = []
    for k in sorted(set(a) | set(b)):
        if k not in b or k not in a:
            rows.append(Row(*k, "removed" if k not in b else "added"))
            continue
        rows.append(_row(a[k], b[k]))
    return rows


def _row(before: dict, after: dict) -> Row:
    v = judge(before, after)
    if v.ok:
        status = "same"
    elif any(line.startswith("protocol changed") or "not comparable" in line for line in v.lines):
        status = "incomparable"
    else:
        status = "regressed" if v.worse else "changed"
    name = results.primary_metric([after])
    was, now = (results.metric_value(results.values(r["metrics"]), name) if name else None for r in (before, after))
    return Row(after["case"], after["device"]["class"], status, name, was, now, v.lines)


def table(rows: list[Row], show_same: bool = False) -> str:
    """A Markdown table of the rows (unchanged cases summarised in one line unless ``show_same``), then the
    reasons for every regressed, incomparable or changed case."""
    counts = {s: sum(r.status == s for r in rows) for s in ("regressed", "incomparable", "changed", "same", "added",
                                                             "removed")}
    out = ["| case | device | status | metric | A | B | change |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.status == "same" and not show_same:
            continue
        change = f"{(r.after / r.before - 1):+.2%}" if r.before and r.after is not None else ""
        status = f"**{r.status.upper()}**" if r.status in FAILING else r.status
        out.append(f"| {r.case} | {r.device_class} | {status} | {r.primary or ''} | {_num(r.before)} | "
                   f"{_num(r.after)} | {change} |")
    out.append("")
    out.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    for r in rows:
        if r.lines and r.status != "same":
            out += ["", f"{r.case} ({r.device_class}): {r.status}"] + [f"  - {line}" for line in r.lines]
    return "\n".join(out) + "\n"


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


def exit_status(rows: list[Row]) -> int:
    return 1 if any(r.status in FAILING for r in rows) else 0
