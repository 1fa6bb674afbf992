"""Figures of results records (ptqsuite/results.py), each rendered to PNG bytes for report.py.

The helpers at the top (method labels, the primary metric, deltas, tolerances) need no matplotlib and are shared
with report.py. matplotlib is optional: it is imported when a figure is drawn, and its absence raises ImportError
saying how to install it. Figures use Figure + the Agg canvas, never pyplot, so drawing touches no
global backend or figure registry (safe inside a pytest session), and a fixed style, DPI and PNG metadata make the
same records give the same bytes.
"""
from __future__ import annotations

import io
import math
from collections import Counter, defaultdict
from contextlib import contextmanager

from . import baselines
from .results import MEAN_ACC, finite as _finite, metric_value, primary_metric
from .recipe import FLOAT_PRESETS

REFERENCE_LABEL = "fp16/fp32 reference"
INSTALL = 'pip install "ptqsuite[report]" (or: pip install matplotlib)'
DPI = 100
_STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8,
          "svg.hashsalt": "ptqsuite", "savefig.dpi": DPI, "figure.dpi": DPI}


# ---- what to plot (no matplotlib) ----------------------------------------------------------------------------

def method_label(recipe: dict) -> str:
    """The recipe without its bit-widths: rtn-w4g128 and rtn-w3g128 are both "rtn g128", gptq-w4g128 "gptq g128".

    Steps and their options, weight granularity and symmetry, and which of activations and KV cache are quantized
    stay; a role's bits are dropped when they equal the recipe's first quantized bits (w4a4kv4: "+A +KV"), else
    kept (w4a8kv8: "+A8 +KV8"). A float format is its own method (mxfp4, nvfp4, fp8), since its bits come with it.
    """
    steps = [*recipe.get("transforms", []), *recipe.get("steps", [])]
    head = "+".join(_step_token(s) for s in steps) or str(recipe.get("method", "?"))
    quantized = [(role, _kind(recipe[role])) for role in ("weight", "act", "kv") if isinstance(recipe.get(role), dict)]
    common = quantized[0] if quantized else (None, None)
    parts = [head, _spec_label(recipe.get("weight"), "weight", common)]
    for role, letter in (("act", "+A"), ("kv", "+KV")):
        if role in recipe:
            label = _spec_label(recipe[role], role, common)
            parts.append(letter + ("" if not label or label[0] in "0123456789." else " ") + label)
    return " ".join(p for p in parts if p)


def _kind(spec: dict) -> tuple:
    """What makes two roles' formats "the same bits": INT bits, or a float format's preset name."""
    return ("int", spec["bits"]) if spec.get("format") == "int" else ("float", float_name(spec).split()[0])


def _step_token(step: dict) -> str:
    arg = "" if step.get("arg") is None else str(step["arg"])
    return step["name"] + arg + "".join(f".{f}" for f in step.get("flags", []))


def _spec_label(spec, role: str, common: tuple) -> str:
    if not isinstance(spec, dict):  # None (weight) or "16-bit" (act/kv): not quantized
        return "w16" if role == "weight" else "16"
    default = "per-channel" if role == "weight" else "per-token"
    if spec.get("format") == "float":
        name = float_name(spec, default)
        return name.partition(" ")[2] if common != (role, _kind(spec)) and _kind(spec) == common[1] else name
    bits = "" if _kind(spec) == common[1] else str(spec["bits"])
    gran = _gran(spec.get("granularity", default), default)
    if role == "weight" and not gran:
        gran = "per-ch"  # said explicitly: per-channel vs grouped is the distinction these plots exist for
    keep = "".join(f".{name}{b}" for name, b in sorted(spec.get("keep", {}).items()))
    parts = (bits + keep if role != "weight" else "", gran, "sym" if spec.get("symmetric") else "")
    return " ".join(p for p in parts if p)


def _gran(gran: str, default: str) -> str:
    if gran == default:
        return ""
    return {"per-tensor": "pt", "per-channel": "pc", "per-token": "per-tok"}.get(gran, gran.replace("group-", "g"))


def float_name(spec: dict, default_gran: str = "per-channel") -> str:
    """A float format dict as its preset name (recipe.FLOAT_PRESETS) plus what differs from the preset:
    "mxfp4", "nvfp4", "fp8 pt", "mxfp4 e4m3 nearest"."""
    best = None
    for name, (fmt, gran) in FLOAT_PRESETS.items():
        if (str(fmt.element), fmt.tensor_scale) != (spec.get("element"), spec.get("tensor_scale")):
            continue
        extra = [str(fmt.scale) != spec.get("scale"), fmt.rounding != spec.get("rounding")]
        options = [spec.get("scale"), spec.get("rounding")]
        gran_default = default_gran if str(gran) == "per-channel" else str(gran)
        cand = (sum(extra), name, [o for o, e in zip(options, extra) if e], gran_default)
        best = min(best, cand) if best else cand
    if best is None:
        return f"float {spec.get('element')}"
    _, name, options, gran_default = best
    return " ".join(p for p in (name, _gran(spec.get("granularity", gran_default), gran_default), *options) if p)


def weight_bits(recipe: dict) -> int | None:
    """An INT weight format's bit-width; None for float formats and unquantized weights."""
    w = recipe.get("weight")
    return w["bits"] if isinstance(w, dict) and w.get("format") == "int" else None


def value(record: dict, name: str, section: str = "metrics") -> float | None:
    """A record's metric (section "metrics") or the unquantized model's (section "reference")."""
    return metric_value({k: m.get("value") for k, m in record.get(section, {}).items()}, name)


def baseline_value(record: dict, name: str) -> float | None:
    return metric_value((record.get("baseline") or {}).get("metrics") or {}, name)


def delta_percent(record: dict, name: str) -> float | None:
    """Relative change of a metric against the record's baseline, in percent."""
    now, was = value(record, name), baseline_value(record, name)
    return (now / was - 1) * 100 if _finite(now) and _finite(was) and was else None


def tolerance(metric: str, device_class: str) -> tuple[float, float] | None:
    """The baseline rule's (relative, absolute) tolerance; None for a device class whose dtype it does not know."""
    try:
        return baselines.tolerance(metric, device_class)
    except KeyError:
        return None


def band(metric: str, device_class: str, center: float) -> float | None:
    """Half-width of the baseline rule's pass band around ``center``: max(rel · |center|, abs)."""
    tol = tolerance(metric, device_class)
    return max(tol[0] * abs(center), tol[1]) if tol else None


def is_perplexity(metric: str | None) -> bool:
    return bool(metric) and metric.endswith((".ppl", ".perplexity"))


def axis_label(metric: str) -> str:
    dataset, _, kind = metric.rpartition(".")
    if metric == MEAN_ACC or kind in ("acc", "acc_norm"):
        return f"{'mean accuracy over tasks' if metric == MEAN_ACC else metric} (fraction correct)"
    if kind in ("ppl", "perplexity"):
        return f"{dataset} perplexity (lower is better)"
    return f"{dataset} KL divergence from unquantized (nats)" if kind == "kld" else metric


def short(text: str, limit: int = 44) -> str:
    """Middle-truncated: the head (steps) and tail (formats, calibration) of a long id both stay readable."""
    if len(text) <= limit:
        return text
    head = (limit - 1) * 3 // 5
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def _calibration(recipe: dict) -> str:
    c = recipe.get("calibration") or {}
    return f"{c.get('dataset')}.{c.get('n')}x{c.get('seqlen')}" if c else ""


def series_labels(records: list[dict]) -> list[str]:
    """method_label per record, plus "@calibration" where one figure holds a method calibrated two ways."""
    labels = [method_label(r["recipe"]) for r in records]
    calibs = defaultdict(set)
    for label, r in zip(labels, records):
        calibs[label].add(_calibration(r["recipe"]))
    return [f"{label} @{_calibration(r['recipe'])}" if len(calibs[label]) > 1 else label
            for label, r in zip(labels, records)]


def _model_device(records: list[dict]) -> tuple[str, str]:
    r = records[0]
    return r.get("model", {}).get("name", r["case"]), r["device"]["class"]


# ---- drawing ----------------------------------------------------------------------------------------------------

WIDTH, PLOT_HEIGHT = 12.0, 5.0  # inches; a legend of many methods goes below the axes and adds to the height
_MARKERS = "os^vPX<>ph"  # D (diamond) is kept for float formats


def _mpl():
    try:
        import matplotlib
        import matplotlib.style
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"ptqsuite's plots need matplotlib: {INSTALL}") from e
    return matplotlib, Figure


@contextmanager
def _figure(width: float, height: float):
    """A figure drawn under a fixed style (the user's matplotlibrc must not change the bytes)."""
    matplotlib, Figure = _mpl()
    with matplotlib.style.context("default"), matplotlib.rc_context(_STYLE):
        yield Figure(figsize=(width, height), layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # no version string: same bytes
    return buf.getvalue()


def _palette(labels) -> dict[str, tuple]:
    """A (color, marker) per label: tab10's ten strong colors, the marker changing every ten labels, so that no
    two of up to 100 methods look alike and none is too pale to see."""
    cmap = _mpl()[0].colormaps["tab10"]
    return {label: (cmap(i % 10), _MARKERS[i // 10 % len(_MARKERS)]) for i, label in enumerate(sorted(set(labels)))}


def _legend(fig, ax, handles=None, title=None, below: bool = False) -> None:
    """Beside the axes when short; below them in columns when long (or ``below``), the figure growing to hold it."""
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    if not handles:
        return
    if len(handles) <= 14 and not below:
        fig.legend(handles=handles, loc="outside right upper", title=title, title_fontsize=8, frameon=False)
        return
    longest = max(len(h.get_label()) for h in handles)
    ncols = max(1, min(4, int(fig.get_figwidth() * 72 // (longest * 4.6 + 40))))  # 8 pt text: ~4.6 pt a char
    rows = math.ceil(len(handles) / ncols)
    fig.set_figheight(fig.get_figheight() + 0.17 * rows + 0.35)
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, title=title, title_fontsize=8, frameon=False)


def _yscale(ax, metric: str | None, ys: list[float]) -> str:
    """Log scale for perplexities spanning more than 3x, labeled with plain numbers within two decades; returns
    the axis label's note."""
    ys = [y for y in ys if _finite(y) and y > 0]
    if not is_perplexity(metric) or not ys or max(ys) / min(ys) < 3:
        return ""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    if max(ys) / min(ys) < 100:  # few powers of ten in range: label 1-2-5 steps instead of 2×10² style
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    return ", log scale"


def _reference(records: list[dict], metric: str | None) -> float | None:
    refs = [v for r in records if metric and _finite(v := value(r, metric, "reference"))]
    return Counter(refs).most_common(1)[0][0] if refs else None


def _title(ax, model: str, device: str, what: str) -> None:
    ax.set_title(f"{model} on {device}: {what.replace(MEAN_ACC, 'mean task accuracy')}")


def bits_figure(records: list[dict]) -> bytes:
    """One model on one device class: the primary metric against weight bits, a line per method (INT weights,
    dodged sideways so that methods at the same bits stay visible); float formats as diamonds at their effective
    bits/weight; the unquantized reference dashed."""
    metric = primary_metric(records)
    model, device = _model_device(records)
    points, floats, skipped = defaultdict(list), [], 0
    for label, r in zip(series_labels(records), records):
        y, w = value(r, metric) if metric else None, r["recipe"].get("weight")
        bits, bpw = weight_bits(r["recipe"]), r.get("bits_per_weight")
        if not _finite(y) or (bits is None and not (isinstance(w, dict) and _finite(bpw))):
            skipped += 1
        elif bits is not None:
            points[label].append((bits, y))
        else:
            floats.append((label, bpw, y))
    colors = _palette([*points, *(f[0] for f in floats)])
    ref = _reference(records, metric)
    with _figure(WIDTH, PLOT_HEIGHT) as fig:
        ax = fig.add_subplot()
        for i, label in enumerate(sorted(points)):
            dodge = ((i + 0.5) / len(points) - 0.5) * min(0.3, 0.05 * len(points))
            xs, ys = zip(*sorted(points[label]))
            ax.plot([x + dodge for x in xs], ys, marker=colors[label][1], color=colors[label][0], lw=1.2, ms=5,
                    label=label)
        for label, x, y in sorted(floats):
            ax.plot([x], [y], "D", color=colors[label][0], ms=7, mec="black", mew=0.6, label=f"{label} ◆ {x:.2f} b/w")
        if ref is not None:
            ax.axhline(ref, ls="--", color="black", lw=1, label=REFERENCE_LABEL)
        ints = sorted({b for pts in points.values() for b, _ in pts})
        ax.set_xticks(ints or [4])
        log = _yscale(ax, metric, [y for pts in points.values() for _, y in pts] + [f[2] for f in floats] + [ref])
        ax.set_xlabel("weight bits: INT formats (points of one bit-width spread sideways); "
                      "◆ float formats at their effective bits/weight")
        ax.set_ylabel((axis_label(metric) if metric else "no metric") + log)
        _title(ax, model, device, f"{metric} vs weight bits, a line per method")
        if skipped:
            ax.annotate(f"not shown: {skipped} case(s) with 16-bit weights or no {metric}", (1, 1), (-4, -4),
                        "axes fraction", "offset points", ha="right", va="top", fontsize=8, color="dimgray")
        _legend(fig, ax, title="method: the recipe without its bits\n(+A, +KV: activations, KV cache at those bits)")
        return _png(fig)


def size_figure(records: list[dict]) -> bytes:
    """One model on one device class: the primary metric against effective model size (MB), a point per case,
    colored by method; the unquantized model as a star at its 16-bit size and a dashed line."""
    metric = primary_metric(records)
    model, device = _model_device(records)
    pts = []
    for label, r in zip(series_labels(records), records):
        y, size = value(r, metric) if metric else None, (r.get("size") or {}).get("model_bytes")
        if _finite(y) and _finite(size):
            is_float = weight_bits(r["recipe"]) is None and isinstance(r["recipe"].get("weight"), dict)
            pts.append((label, size / 1e6, y, is_float))
    colors = _palette(p[0] for p in pts)
    ref, ref_mb = _reference(records, metric), _reference_size(records)
    with _figure(WIDTH, PLOT_HEIGHT) as fig:
        ax = fig.add_subplot()
        seen = set()
        for label, x, y, is_float in sorted(pts):
            color, marker = colors[label]
            ax.plot([x], [y], "D" if is_float else marker, color=color, ms=7 if is_float else 6, ls="none",
                    mec="black" if is_float else "none", mew=0.6, label=None if label in seen else label)
            seen.add(label)
        if ref is not None:
            ax.axhline(ref, ls="--", color="black", lw=1, label=REFERENCE_LABEL)
            if ref_mb is not None:
                ax.plot([ref_mb], [ref], "*", color="black", ms=13, ls="none",
                        label=f"{REFERENCE_LABEL} at 16-bit size")
        log = _yscale(ax, metric, [p[2] for p in pts] + [ref])
        ax.set_xlabel("effective model size (MB = 10⁶ bytes: quantized weights with their scales and zero points, "
                      "plus unquantized parameters)")
        ax.set_ylabel((axis_label(metric) if metric else "no metric") + log)
        _title(ax, model, device, f"{metric} vs model size, a point per case (◆ float formats)")
        _legend(fig, ax, title="method")
        return _png(fig)


def _reference_size(records: list[dict]) -> float | None:
    """The unquantized model's 16-bit size in MB, from a record's size: its quantized parameters at 16 bits
    instead of bits_per_weight."""
    sizes = []
    for r in records:
        size, bpw = r.get("size") or {}, r.get("bits_per_weight")
        if _finite(size.get("model_bytes")) and _finite(size.get("quantized_params")) and _finite(bpw):
            sizes.append(round(size["model_bytes"] + size["quantized_params"] * (16 - bpw) / 8))
    return Counter(sizes).most_common(1)[0][0] / 1e6 if sizes else None


def baseline_figure(records: list[dict]) -> bytes | None:
    """One model on one device class: each case's relative change of the primary metric from its baseline (%),
    sorted, largest on top; red bars failed the baseline rule ("differs"); the green band is the rule's relative
    tolerance. None when no case has a baseline value."""
    metric = primary_metric(records)
    model, device = _model_device(records)
    rows = sorted((d, r["case"], (r.get("baseline") or {}).get("status")) for r in records
                  if metric and (d := delta_percent(r, metric)) is not None)
    if not rows:
        return None
    rel = (tolerance(metric, device) or (None,))[0]
    tol = rel * 100 if rel is not None else 0.0
    suffix = "-" + model
    with _figure(10, max(3.0, 0.2 * len(rows) + 1.6)) as fig:
        ax = fig.add_subplot()
        colors = ["tab:red" if s == "differs" else "tab:blue" if s == "matched" else "tab:gray" for _, _, s in rows]
        ax.barh(range(len(rows)), [d for d, _, _ in rows], color=colors, height=0.7)
        # a tick at each bar's end, so that a 0 % bar is visible too
        ax.scatter([d for d, _, _ in rows], range(len(rows)), c=colors, marker="|", s=90, linewidths=1.5, zorder=3)
        for i, (d, _, _) in enumerate(rows):
            if abs(d) > tol:  # label the bars that left the band: their size is the news
                ax.annotate(f"{d:+.2f}%", (d, i), xytext=(3 if d > 0 else -3, 0), textcoords="offset points",
                            ha="left" if d > 0 else "right", va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), [short(c.removesuffix(suffix), 48) for _, c, _ in rows], fontsize=7)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.grid(False, axis="y")
        if rel is not None:
            ax.axvspan(-tol, tol, color="tab:green", alpha=0.15, zorder=0)
        width = max(max(abs(d) for d, _, _ in rows), tol) * 1.3
        ax.set_xlim(-width, width)
        ax.axvline(0, color="0.5", lw=0.6, zorder=1)
        ax.set_xlabel(f"relative change of {metric} from its baseline (%)")
        _title(ax, model, device, f"{metric} vs baseline, {len(rows)} cases")
        fig.legend(handles=_bar_handles(rel), loc="outside lower center", ncols=4, frameon=False)
        return _png(fig)


def _bar_handles(rel: float | None) -> list:
    from matplotlib.patches import Patch

    handles = [Patch(color="tab:red", label="differs (failed the baseline rule)"),
               Patch(color="tab:blue", label="matched"),
               Patch(color="tab:gray", label="missing / recorded")]
    if rel is not None:
        handles.append(Patch(color="tab:green", alpha=0.15, label=f"tolerance ±{rel * 100:.2g}%"))
    return handles


def trend_figure(runs: list[tuple[str, list[dict]]], case_key: tuple[str, str], metric: str) -> bytes:
    """A case's metric across runs (oldest first) with the baseline rule's band around the first run's value;
    points outside the band in red. ``case_key`` is results.key(record): (case id, device class)."""
    case, device = case_key
    xs, ys = [], []
    for i, (_, records) in enumerate(runs):
        r = next((r for r in records if (r["case"], r["device"]["class"]) == case_key), None)
        if r is not None and _finite(v := value(r, metric)):
            xs.append(i)
            ys.append(v)
    rotate = len(runs) > 4 or max((len(label) for label, _ in runs), default=0) > 14
    with _figure(max(7.5, 0.55 * len(runs) + 3.5), 4.0) as fig:
        ax = fig.add_subplot()
        half = band(metric, device, ys[0]) if ys else None
        if half is not None:
            pct = half / abs(ys[0]) * 100 if ys[0] else 0
            ax.axhspan(ys[0] - half, ys[0] + half, color="tab:green", alpha=0.15,
                       label=f"first run ± tolerance ({pct:.2g}%)")
        out = [half is not None and abs(y - ys[0]) > half for y in ys]
        ax.plot(xs, ys, color="tab:blue", lw=1.2, marker="o", ms=5, label=metric)
        if any(out):
            ax.plot([x for x, o in zip(xs, out) if o], [y for y, o in zip(ys, out) if o], "o", color="tab:red",
                    ms=9, label="outside the band", zorder=3)
        ax.set_xticks(range(len(runs)), [short(label, 24) for label, _ in runs],
                      rotation=30 if rotate else 0, ha="right" if rotate else "center")
        ax.set_xlim(-0.5, len(runs) - 0.5)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set_xlabel("run (oldest first)")
        ax.set_ylabel(axis_label(metric))
        ax.set_title(f"{short(case, 80)}\non {device}: {metric} across runs")
        _legend(fig, ax, below=True)
        return _png(fig)
