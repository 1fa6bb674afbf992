"""The report (ptqsuite/report.py) and its plots (ptqsuite/plots.py), on results records built here: method labels,
report.md and report.html contents, PNG validity and byte-for-byte determinism, the report without matplotlib,
and the trend's out-of-band flag."""
import re
import sys

import pytest

from ptqsuite import plots, report, results
from ptqsuite.recipe import parse

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PARAMS = 100_000  # quantized parameters of the made-up model


def make_record(recipe_id: str, ppl: float | None, *, status: str = "matched", baseline: float | None = None,
                model: str = "tiny", device: str = "cpu-fp32", bpw: float | None = None, accs: dict | None = None,
                commit: str = "a" * 40) -> dict:
    """A results record as results.record + the plugin's baseline annotation make one (schema of results.py)."""
    recipe = parse(recipe_id).to_dict()
    bits = plots.weight_bits(recipe)
    bpw = bpw if bpw is not None else (bits + 0.125 if bits else 16.0)
    metrics = {"bits_per_weight": {"value": bpw}}
    if ppl is not None:
        metrics["wikitext2.ppl"] = {"value": ppl, "windows": 8, "tokens": 4096, "nll_std": 0.1}
    for task, acc in (accs or {}).items():
        right = round(acc * 20)
        metrics[f"{task}.acc"] = {"value": acc, "n": 20, "correct": "1" * right + "0" * (20 - right)}
    stored = {name: m["value"] for name, m in metrics.items()}  # the baseline's values: these, or ``baseline``
    if baseline is not None:
        stored["wikitext2.ppl"] = baseline
    return {
        "schema": 1, "case": f"{recipe_id}-{model}", "recipe": recipe,
        "model": {"name": model, "family": "test", "kind": "shipped"},
        "metrics": metrics,
        "reference": {"wikitext2.ppl": {"value": 15.0, "windows": 8},
                      **{f"{t}.acc": {"value": 0.7, "n": 20} for t in accs or {}}},
        "bits_per_weight": bpw, "size": {"model_bytes": int(PARAMS * bpw / 8) + 20_000, "quantized_params": PARAMS},
        "device": {"class": device, "name": "test CPU"}, "protocol": {"device_class": device},
        "environment": {"torch": "2.13.0", "python": "3.11.7"},
        "time": {"quantize_s": 1.25, "evaluate_s": 2.5},
        "run": {"commit": commit, "dirty": False, "timestamp": "2026-01-01T00:00:00+00:00", "worker": "main"},
        "outcome": "failed" if status == "differs" else "passed",
        "baseline": {"status": status,
                     "metrics": {} if status == "missing" else stored,
                     "lines": ["wikitext2.ppl: baseline 30, measured 35: WORSE than baseline"]
                     if status == "differs" else [],
                     "worse": ["wikitext2.ppl"] if status == "differs" else []},
    }


@pytest.fixture
def records() -> list[dict]:
    return [
        make_record("rtn-w4g128", 20.0),
        make_record("rtn-w3g128", 35.0, status="differs", baseline=30.0),
        make_record("gptq-w4g128", 18.0),
        make_record("rtn-wmxfp4", 22.0, status="missing", bpw=4.25),
        make_record("rtn-w16kv4", 19.0),
        make_record("rtn-w4", None, model="tasks", accs={"arc_easy": 0.5, "piqa": 0.6}),
    ]


def table_line(markdown: str, case: str) -> str:
    lines = [line for line in markdown.splitlines() if line.startswith(f"| `{case}`")]
    assert len(lines) == 1, f"{case}: {len(lines)} table rows"
    return lines[0]


def test_method_label_drops_the_bits_and_keeps_the_method():
    label = lambda rid: plots.method_label(parse(rid).to_dict())  # noqa: E731
    assert label("rtn-w4g128") == label("rtn-w3g128") == label("rtn-w2g128")
    assert label("gptq-w4g128") != label("rtn-w4g128")
    assert len({label("rtn-w4g128"), label("rtn-w4g128sym"), label("rtn-w4"), label("rtn-w4g64")}) == 4
    # activations and KV at the weights' bits are one method across bits; at other bits they are another
    assert label("quarot+rtn-w4a4kv4") == label("quarot+rtn-w8a8kv8") != label("quarot+rtn-w4a8kv8")
    assert label("quarot+rtn-w4a4kv4") != label("rtn-w4a4kv4") != label("rtn-w4a4")
    assert label("rtn-wmxfp4") != label("rtn-wnvfp4")


def test_primary_metric_falls_back_to_mean_accuracy(records):
    assert results.primary_metric(records[:3]) == "wikitext2.ppl"
    tasks = [r for r in records if r["model"]["name"] == "tasks"]
    assert results.primary_metric(tasks) == results.MEAN_ACC
    assert plots.value(tasks[0], results.MEAN_ACC) == pytest.approx(0.55)


def test_markdown_lists_every_case_and_marks_the_regression(records, tmp_path):
    report.render(records, tmp_path, title="test run")
    md = (tmp_path / "report.md").read_text()
    for r in records:
        table_line(md, r["case"])
    assert f"**{report.REGRESSION}" in table_line(md, "rtn-w3g128-tiny")
    assert "+16.67%" in table_line(md, "rtn-w3g128-tiny")
    for case in ("rtn-w4g128-tiny", "gptq-w4g128-tiny", "rtn-wmxfp4-tiny"):
        assert report.REGRESSION not in table_line(md, case)
    assert "missing" in table_line(md, "rtn-wmxfp4-tiny")
    assert "4 matched, 1 differs, 1 missing, 0 recorded" in md
    assert "## Failed baselines (1)" in md and "WORSE than baseline" in md


def test_a_case_repeated_across_results_files_is_shown_once_as_its_last_record(records, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_plot_note", lambda: "plots off in this test")  # the tables are what is tested
    rerun = make_record("rtn-w3g128", 30.0)  # the regression fixed in a later run
    report.render(records + [rerun], tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert report.REGRESSION not in table_line(md, "rtn-w3g128-tiny") and "1 record(s) repeated" in md


def test_only_a_change_for_the_worse_is_marked_a_regression(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_plot_note", lambda: "plots off in this test")
    better = make_record("gptq-w3g128", 25.0, status="differs", baseline=30.0)
    better["baseline"].update(lines=["wikitext2.ppl: baseline 30, measured 25: better than baseline: if intended, ..."],
                              worse=[])
    vanished = make_record("gptq-w2g128", 80.0, status="differs")
    vanished["baseline"].update(lines=["metric c4.ppl: missing from this run"], worse=["c4.ppl"])
    report.render([better, vanished], tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "**DIFFERS (better than baseline)" in table_line(md, "gptq-w3g128-tiny")
    assert report.REGRESSION not in table_line(md, "gptq-w3g128-tiny")
    assert f"**{report.REGRESSION}" in table_line(md, "gptq-w2g128-tiny")
    assert "## Failed baselines (2)" in md


def test_html_is_self_contained_and_embeds_the_plots(records, tmp_path):
    pytest.importorskip("matplotlib")
    report.render(records, tmp_path)
    page = (tmp_path / "report.html").read_text()
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs
    assert not re.search(r"https?://", page), "report.html must load nothing from the network"
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in sources)
    row = next(line for line in page.splitlines() if "rtn-w3g128-tiny</code></td>" in line)
    assert "class=failed" in row and report.REGRESSION in row
    md = (tmp_path / "report.md").read_text()
    assert all(f"]({p.name})" in md for p in pngs), "report.md links each PNG beside it"


def test_pngs_are_valid_and_byte_identical_across_renders(records, tmp_path):
    pytest.importorskip("matplotlib")
    report.render(records, tmp_path / "a")
    report.render(records, tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    # two models, each with weight bits, size and (its cases have baseline values) change from baseline
    kinds = ("bits", "size", "baseline")
    assert names == sorted(f"{m}.cpu-fp32.{kind}.png" for m in ("tiny", "tasks") for kind in kinds)
    for name in names:
        data = (tmp_path / "a" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert data == (tmp_path / "b" / name).read_bytes(), f"{name} differs between two renders"


def test_without_matplotlib_the_report_says_how_to_get_plots(records, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] or ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry raises ImportError
    with pytest.raises(ImportError, match="pip install"):
        plots.bits_figure(records[:3])
    report.render(records, tmp_path)
    assert not list(tmp_path.glob("*.png"))
    for page in ("report.md", "report.html"):
        text = (tmp_path / page).read_text()
        assert "pip install" in text and "rtn-w3g128-tiny" in text and report.REGRESSION in text


def runs_with(values: dict[str, list[float]], device: str = "cpu-fp32") -> list[tuple[str, list[dict]]]:
    """One run per position of the value lists: the cases' wikitext2.ppl in that run."""
    n = len(next(iter(values.values())))
    return [(f"run{i}", [make_record(rid, ppl[i], device=device, commit=str(i) * 40) for rid, ppl in values.items()])
            for i in range(n)]


def test_trend_flags_drift_beyond_tolerance_and_not_a_stable_series(tmp_path):
    # cpu-fp32: the baseline rule allows ±0.1 % relative
    runs = runs_with({"rtn-w4": [20.0, 20.004, 20.01], "rtn-w3": [30.0, 30.02, 30.1], "rtn-w8": [10.0, 10.2, 10.0]})
    runs[-1][1].append(make_record("gptq-w4", 25.0))  # in one run only: no trend
    rows = {r["case"]: r for r in report.trend(runs, tmp_path)}
    assert set(rows) == {"rtn-w4-tiny", "rtn-w3-tiny", "rtn-w8-tiny"}
    assert not rows["rtn-w4-tiny"]["flagged"] and rows["rtn-w4-tiny"]["excursion"] == pytest.approx(0.5)
    assert rows["rtn-w3-tiny"]["flagged"] and rows["rtn-w3-tiny"]["change"] == pytest.approx(1 / 3)
    # back inside the band at the end: not flagged, but its excursion shows it left it
    assert not rows["rtn-w8-tiny"]["flagged"] and rows["rtn-w8-tiny"]["excursion"] == pytest.approx(20)
    md = (tmp_path / "trend.md").read_text()
    assert "OUT OF BAND" in table_line(md, "rtn-w3-tiny")
    assert "OUT OF BAND" not in table_line(md, "rtn-w4-tiny") + table_line(md, "rtn-w8-tiny")


def test_trend_figure_is_a_deterministic_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = runs_with({"rtn-w3": [30.0, 30.02, 30.1]}, device="cuda-sm90-bf16")
    draw = lambda: plots.trend_figure(runs, ("rtn-w3-tiny", "cuda-sm90-bf16"), "wikitext2.ppl")  # noqa: E731
    first = draw()
    assert first.startswith(PNG_MAGIC) and first == draw()
    report.trend(runs, tmp_path)
    assert [p.name for p in tmp_path.glob("*.png")] == ["trend.rtn-w3-tiny.cuda-sm90-bf16.png"]
