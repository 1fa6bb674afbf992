"""Reports of results records (ptqsuite/results.py).

``render`` writes report.md, a self-contained report.html (the same tables, the plots embedded as data URIs, no
external resources: it is mailed and archived as one file) and the plots as PNG files beside them. ``trend`` writes
trend.md and one PNG per case: a metric across runs against the baseline rule's band around the first run.
Both still write their Markdown (and HTML) without matplotlib, with a note saying how to get the plots.
"""
from __future__ import annotations

import base64
import html
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import plots
from .paths import atomic_write_text
from .plots import delta_percent, method_label, value
from .results import MEAN_ACC, finite, primary_metric

REGRESSION = "REGRESSION"
STATUSES = ("matched", "differs", "missing", "recorded")


@dataclass
class Table:
    """One model on one device class: its plots and rows, rendered to Markdown and HTML alike."""

    model: str
    device: str
    metric: str | None
    columns: list[str]
    rows: list[tuple[list[str], bool]] = field(default_factory=list)  # (cells, failed the baseline rule)
    images: list[tuple[str, str, bytes]] = field(default_factory=list)  # (caption, file name, PNG)

    @property
    def anchor(self) -> str:
        return _slug(f"{self.model}.{self.device}")


# ---- report -----------------------------------------------------------------------------------------------------

def render(records, out_dir: Path, title: str = "ptqsuite report") -> Path:
    """Write report.md, report.html and the plots' PNGs into ``out_dir``; return report.md's path. Of records
    for the same case on the same device class (several results files), the last one is shown."""
    given, out = list(records), Path(out_dir)
    records = list({(r["case"], r["device"]["class"]): r for r in given}.values())
    out.mkdir(parents=True, exist_ok=True)
    groups = _groups(records)
    tables = [_table(group) for group in groups]
    note = _plot_note()
    if note is None:
        for table, group in zip(tables, groups):
            table.images = _images(group, table.anchor)
            for _, name, png in table.images:
                (out / name).write_bytes(png)  # written whole before the report that links them
    header = _header(records)
    if len(given) > len(records):
        header.append(("repeated", f"{len(given) - len(records)} record(s) repeated a case on its device class: "
                                   f"the last of each is shown"))
    atomic_write_text(out / "report.md", _markdown(title, header, records, tables, note))
    atomic_write_text(out / "report.html", _html(title, header, records, tables, note))
    return out / "report.md"


def _groups(records: list[dict]) -> list[list[dict]]:
    """Records per (model, device class), sorted by model; rows by method, then bits, then case."""
    groups = defaultdict(list)
    for r in records:
        groups[(r.get("model", {}).get("name", "?"), r["device"]["class"])].append(r)
    return [sorted(groups[k], key=_row_order) for k in sorted(groups)]


def _row_order(r: dict) -> tuple:
    bits = plots.weight_bits(r["recipe"]) or r.get("bits_per_weight") or 16
    return method_label(r["recipe"]), bits, r["case"]


def _plot_note() -> str | None:
    """None when plots can be drawn, else the note the report shows instead of them."""
    try:
        plots._mpl()
    except ImportError as e:
        return f"Plots not drawn: {e}"
    return None


def _images(group: list[dict], stem: str) -> list[tuple[str, str, bytes]]:
    metric = primary_metric(group)
    if metric is None:  # nothing to plot against
        return []
    images = [(f"{metric} vs weight bits", f"{stem}.bits.png", plots.bits_figure(group)),
              (f"{metric} vs model size", f"{stem}.size.png", plots.size_figure(group))]
    diff = plots.baseline_figure(group)
    if diff is not None:
        images.append((f"{metric}: change from baseline", f"{stem}.baseline.png", diff))
    return images


def _header(records: list[dict]) -> list[tuple[str, str]]:
    devices = sorted({(r["device"]["class"], r["device"].get("name", "?")) for r in records})
    commits = Counter((r.get("run") or {}).get("commit") or "unknown" for r in records)
    dirty = any((r.get("run") or {}).get("dirty") for r in records)
    stamps = sorted(t for r in records if (t := (r.get("run") or {}).get("timestamp")))
    statuses = Counter((r.get("baseline") or {}).get("status", "none") for r in records)
    outcomes = Counter(r.get("outcome", "unknown") for r in records)
    env = defaultdict(Counter)
    for r in records:
        for k, v in (r.get("environment") or {}).items():
            env[k][str(v)] += 1
    return [
        ("cases", str(len(records))),
        ("device classes", ", ".join(f"{c} ({n})" for c, n in devices) or "none"),
        ("commit", ", ".join(f"{c[:12]} ({n} cases)" if len(commits) > 1 else c[:12] for c, n in commits.items())
         + (" (uncommitted changes)" if dirty else "")),
        ("run", (stamps[0] if stamps[0] == stamps[-1] else f"{stamps[0]} to {stamps[-1]}") if stamps else "unknown"),
        ("environment", ", ".join(f"{k} {' / '.join(sorted(v))}" for k, v in sorted(env.items())) or "unknown"),
        ("baselines", ", ".join(f"{statuses.get(s, 0)} {s}" for s in STATUSES)
         + "".join(f", {n} {s}" for s, n in statuses.items() if s not in STATUSES)),
        ("tests", ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))),
    ]


def _headline_metrics(group: list[dict]) -> list[str]:
    """The table's metric columns: the primary metric, then the other perplexities, then accuracies."""
    names = {n for r in group for n in r.get("metrics", {})}
    primary = primary_metric(group)
    rest = sorted(n for n in names if n.endswith((".ppl", ".acc")) and n != primary)
    return ([primary] if primary else []) + sorted(rest, key=lambda n: (not n.endswith(".ppl"), n))


def _counts(group: list[dict], metric: str) -> set[str]:
    return {_count(r.get("metrics", {}).get(metric, {})) for r in group if metric in r.get("metrics", {})}


def _count(m: dict) -> str:
    """How many examples or windows a metric value averages over."""
    if "n" in m:
        return f"n={m['n']}"
    if "windows" in m:
        return f"{m['windows']} windows"
    return ""


def _table(group: list[dict]) -> Table:
    metric = primary_metric(group)
    model, device = group[0].get("model", {}).get("name", "?"), group[0]["device"]["class"]
    names = _headline_metrics(group)
    shared = {n: c.pop() if len(c := _counts(group, n)) == 1 else None for n in names}
    columns = ["case", "method", "W bits", "bits/weight", "size MB"]
    columns += [f"{n} ({shared[n]})" if shared.get(n) else n for n in names]
    columns += [f"Δ {metric} vs baseline", "baseline", "quantize s", "evaluate s"]
    table = Table(model, device, metric, columns)
    for r in group:
        size = (r.get("size") or {}).get("model_bytes")
        cells = [r["case"], method_label(r["recipe"]), _weight_format(r["recipe"]),
                 _num(r.get("bits_per_weight"), ".3f"), _num(size / 1e6 if size else None, "#.4g")]
        for n in names:
            v = value(r, n)
            count = _count(r.get("metrics", {}).get(n, {})) if shared.get(n) is None and n != MEAN_ACC else ""
            cells.append(_num(v, ".3f" if n.endswith(".acc") or n == MEAN_ACC else "#.5g")
                         + (f" ({count})" if v is not None and count else ""))
        status, failed = _status(r)
        time = r.get("time") or {}
        cells += [_delta(r, metric), status, _num(time.get("quantize_s"), ".1f"), _num(time.get("evaluate_s"), ".1f")]
        table.rows.append((cells, failed))
    return table


def _weight_format(recipe: dict) -> str:
    """The W bits column: INT bits ("4"), a float format ("mxfp4") or "16" (weights not quantized)."""
    w = recipe.get("weight")
    if not isinstance(w, dict):
        return "16"
    return str(w["bits"]) if w.get("format") == "int" else plots.float_name(w)


def _status(r: dict) -> tuple[str, bool]:
    """The baseline cell and whether the case failed its baseline rule. A "differs" is a REGRESSION when a metric
    moved the bad way or vanished (the record's ``worse`` list), or when the lines say nothing; else it is a
    protocol change or an improvement, which fail too (baselines move only on purpose)."""
    baseline = r.get("baseline") or {}
    status = baseline.get("status", "–")
    outcome = r.get("outcome")
    suffix = f" (test {outcome})" if outcome not in (None, "passed") else ""
    if status != "differs":
        return status + suffix, False
    why = " ".join(baseline.get("lines") or [])
    if baseline.get("worse") or not why:
        return REGRESSION + suffix, True
    kind = "protocol changed" if "protocol changed" in why else "better than baseline"
    return f"DIFFERS ({kind}){suffix}", True


def _delta(r: dict, metric: str | None) -> str:
    d = delta_percent(r, metric) if metric else None
    if d is None:
        return "–"
    return f"{d:+.2f}%" if abs(d) >= 0.005 or d == 0 else f"{d:+.1e}%"


def _num(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)


def _failures(records: list[dict]) -> list[tuple[str, str, str, list[str]]]:
    """(status, case, device class, the rule's lines) of each case that failed its baseline rule."""
    return [(_status(r)[0], r["case"], r["device"]["class"], (r.get("baseline") or {}).get("lines") or [])
            for r in sorted(records, key=lambda r: (r["case"], r["device"]["class"])) if _status(r)[1]]


# ---- Markdown and HTML ------------------------------------------------------------------------------------------

def _markdown(title: str, header, records, tables: list[Table], note: str | None) -> str:
    out = [f"# {title}", ""] + [f"- **{k}**: {v}" for k, v in header] + [""]
    if note:
        out += [f"> {note}", ""]
    failures = _failures(records)
    if failures:
        out += [f"## Failed baselines ({len(failures)})", ""]
        for status, case, device, lines in failures:
            out.append(f"- **{status}** `{case}` on {device}" + "".join(f"\n  - {line}" for line in lines))
        out.append("")
    for t in tables:
        out += [f"## {t.model} on {t.device}", ""]
        out += [f"![{caption}]({name})" for caption, name, _ in t.images] + ([""] if t.images else [])
        left = {0, 1, 2, len(t.columns) - 3}  # case, method, W bits, baseline status; numbers right-aligned
        out += ["| " + " | ".join(t.columns) + " |",
                "|" + "|".join("---" if i in left else "---:" for i in range(len(t.columns))) + "|"]
        for cells, failed in t.rows:
            row = [f"`{cells[0]}`", *cells[1:]]
            if failed:
                row[-3] = f"**{row[-3]}**"
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        out.append("")
    return "\n".join(out)


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 2em; font-size: 12.5px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fde0e0; } tr.failed td.status { color: #b00000; font-weight: bold; }
.scroll { overflow-x: auto; } img { max-width: 100%; display: block; margin: 0.5em 0; }
.note { background: #fff6d5; padding: 0.5em 1em; border-left: 4px solid #e0b000; }
code { font-size: 12px; } figcaption { color: #555; font-size: 12px; }
"""


def _html(title: str, header, records, tables: list[Table], note: str | None) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>", "<ul>"]
    out += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in header] + ["</ul>"]
    if note:
        out.append(f'<p class="note">{e(note)}</p>')
    failures = _failures(records)
    if failures:
        out += [f"<h2>Failed baselines ({len(failures)})</h2>", "<ul>"]
        out += [f"<li><b>{e(status)}</b> <code>{e(case)}</code> on {e(device)}"
                + ("<ul>" + "".join(f"<li>{e(line)}</li>" for line in lines) + "</ul>" if lines else "") + "</li>"
                for status, case, device, lines in failures] + ["</ul>"]
    out += ["<p>" + " · ".join(f'<a href="#{t.anchor}">{e(t.model)} on {e(t.device)}</a>' for t in tables) + "</p>"]
    for t in tables:
        out.append(f'<h2 id="{t.anchor}">{e(t.model)} on {e(t.device)}</h2>')
        for caption, _, png in t.images:
            data = base64.b64encode(png).decode("ascii")
            out.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(caption)}</figcaption></figure>")
        out += ['<div class="scroll"><table>', "<tr>" + "".join(f"<th>{e(c)}</th>" for c in t.columns) + "</tr>"]
        for cells, failed in t.rows:
            tds = [f"<td><code>{e(cells[0])}</code></td>", *(f"<td>{e(c)}</td>" for c in cells[1:3])]
            for i, c in enumerate(cells[3:], 3):
                kind = "status" if i == len(cells) - 3 else "num"
                tds.append(f'<td class="{kind}">{e(c)}</td>')
            out.append(f'<tr{" class=failed" if failed else ""}>' + "".join(tds) + "</tr>")
        out.append("</table></div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---- trend ------------------------------------------------------------------------------------------------------

def trend_rows(runs: list[tuple[str, list[dict]]], metric: str | None = None) -> list[dict]:
    """Per case present in at least two runs: its metric (``metric`` or the case's primary metric) per run, and
    how far it moved from the first run's value, relative to the baseline rule's tolerance band around it."""
    keys = sorted({(r["case"], r["device"]["class"]) for _, recs in runs for r in recs})
    index = [{(r["case"], r["device"]["class"]): r for r in recs} for _, recs in runs]
    rows = []
    for key in keys:
        present = [by_key[key] for by_key in index if key in by_key]
        name = metric or primary_metric(present)
        vals = [v for r in present if name and finite(v := value(r, name))]
        if len(present) < 2 or len(vals) < 2:
            continue
        first, last = vals[0], vals[-1]
        half = plots.band(name, key[1], first)
        rows.append({
            "case": key[0], "device": key[1], "metric": name, "values": vals, "first": first, "last": last,
            "change": (last / first - 1) * 100 if first else None,
            "excursion": max(abs(v - first) for v in vals) / half if half else None,
            "flagged": half is not None and abs(last - first) > half,
            "file": f"trend.{_slug(key[0])}.{_slug(key[1])}.png",
        })
    return rows


def trend(runs: list[tuple[str, list[dict]]], out_dir: Path, metric: str | None = None) -> list[dict]:
    """Write trend.md and a PNG per case (cases in at least two runs) into ``out_dir``; return trend_rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = trend_rows(runs, metric)
    note = _plot_note()
    if note is None:
        for row in rows:
            (out / row["file"]).write_bytes(plots.trend_figure(runs, (row["case"], row["device"]), row["metric"]))
    atomic_write_text(out / "trend.md", _trend_markdown(runs, rows, metric, note))
    return rows


def _trend_markdown(runs, rows: list[dict], metric: str | None, note: str | None) -> str:
    flagged = sum(r["flagged"] for r in rows)
    out = [f"# Trend of {metric or 'each case’s primary metric'} across {len(runs)} runs", ""]
    for label, recs in runs:
        commits = Counter((r.get("run") or {}).get("commit") or "unknown" for r in recs)
        stamps = sorted(t for r in recs if (t := (r.get("run") or {}).get("timestamp")))
        out.append(f"- {label}: commit {', '.join(c[:12] for c in commits)}, {len(recs)} cases"
                   + (f", {stamps[-1]}" if stamps else ""))
    out += ["", f"{flagged} of {len(rows)} cases end outside the tolerance band around their first run's value "
                "(max excursion: the largest move from the first value, in units of the band's half-width).", ""]
    if note:
        out += [f"> {note}", ""]
    out += ["| case | device | metric | first | last | change % | max excursion × tol | flag | plot |",
            "|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: (not r["flagged"], r["case"], r["device"])):
        out.append(" | ".join([
            f"| `{r['case']}`", r["device"], r["metric"], f"{r['first']:#.6g}", f"{r['last']:#.6g}",
            _num(r["change"], "+.3f"), _num(r["excursion"], ".2f"), "**OUT OF BAND**" if r["flagged"] else "",
            f"[png]({r['file']})" if note is None else "–"]) + " |")
    return "\n".join(out) + "\n"
