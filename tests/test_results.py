"""Results files and what reads them (ptqsuite.results, ptqsuite.compare, `python -m ptqsuite compare`), GPU
pinning of xdist workers (plugin.GpuWorkers) and terminal progress (ptqsuite.progress).

Records here are built by hand: the plugin's own writing of them is tested in test_plugin.py on real runs.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from ptqsuite import compare, progress, results
from ptqsuite.__main__ import main

pytest_plugins = ["pytester"]


def record(case="rtn-w4-llama3-tiny-random", ppl=100.0, acc="1100110011", device="cpu-fp32") -> dict:
    return {
        "schema": results.SCHEMA, "case": case, "recipe": {"id": case.rsplit("-llama3", 1)[0]},
        "model": {"name": "llama3-tiny-random"},
        "metrics": {"wikitext2.ppl": {"value": ppl, "windows": 4, "tokens": 8188},
                    "piqa.acc": {"value": acc.count("1") / len(acc), "n": len(acc), "correct": acc},
                    "bits_per_weight": {"value": 4.25}},
        "reference": {"wikitext2.ppl": {"value": 90.0, "windows": 4, "tokens": 8188}},
        "protocol": {"device_class": device, "batch_size": "auto", "evaluation": {"wikitext2": "w"}},
        "environment": {"torch": "2.13.0"}, "device": {"class": device, "name": "x"}, "bits_per_weight": 4.25,
        "time": {"quantize_s": 1.0, "evaluate_s": 2.0}, "run": {"commit": None},
    }


def write(tmp_path, name, records) -> str:
    results.write(tmp_path / name, records)
    return str(tmp_path / name)


def test_write_then_read_round_trips_in_case_order(tmp_path):
    rs = [record("rtn-w8-llama3-tiny-random"), record("rtn-w2-llama3-tiny-random")]
    assert results.read(write(tmp_path, "r.jsonl", rs)) == sorted(rs, key=lambda r: r["case"])
    assert not list(tmp_path.glob(".*tmp")), "the atomic write left a temporary file"


@pytest.mark.parametrize("text, says", [("{not json\n", "not JSON"), ('{"schema": 99}\n', "schema 99"),
                                        ('{"schema": 1, "case": "x"}\n', "lacks metrics")])
def test_unreadable_results_file_names_file_line_and_problem(tmp_path, capsys, text, says):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record()) + "\n" + text)
    assert main(["compare", str(bad), str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and says in err, err


def test_missing_results_file_is_a_clear_error(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope.jsonl"), str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


# --- compare ------------------------------------------------------------------------------------------------------
# fp32 tolerance is 0.1 % relative; accuracy changes are judged by McNemar on the 10 paired examples.

def test_compare_same_run_is_clean(tmp_path, capsys):
    path = write(tmp_path, "a.jsonl", [record()])
    assert main(["compare", path, path]) == 0
    assert "1 same" in capsys.readouterr().out


@pytest.mark.parametrize("ppl, status, code", [(100.05, "same", 0), (101.0, "regressed", 1), (99.0, "changed", 0)],
                         ids=["within-tolerance", "worse", "better"])
def test_compare_judges_perplexity_by_the_baseline_rule(tmp_path, capsys, ppl, status, code):
    a, b = write(tmp_path, "a.jsonl", [record()]), write(tmp_path, "b.jsonl", [record(ppl=ppl)])
    assert main(["compare", a, b, "--all"]) == code
    out = capsys.readouterr().out
    assert f"| {status.upper() if code else status}" in out or f"**{status.upper()}**" in out, out


def test_compare_accuracy_drop_needs_significance(tmp_path):
    """Two flips of ten are what sampling explains; a drop on a large record is not."""
    small = compare.compare_runs([record(acc="1100110011")], [record(acc="0000110011")])
    assert small[0].status == "same"
    big = compare.compare_runs([record(acc="1" * 60 + "0" * 40)], [record(acc="1" * 30 + "0" * 70)])
    assert big[0].status == "regressed" and any("McNemar" in line for line in big[0].lines), big[0]


def test_compare_protocol_change_is_incomparable_and_fails(tmp_path, capsys):
    changed = record()
    changed["protocol"]["batch_size"] = 4
    a, b = write(tmp_path, "a.jsonl", [record()]), write(tmp_path, "b.jsonl", [changed])
    assert main(["compare", a, b]) == 1
    assert "INCOMPARABLE" in capsys.readouterr().out


def test_compare_lists_added_and_removed_cases_and_keys_by_device(tmp_path):
    gpu = record(device="cuda-sm90-bf16")
    rows = compare.compare_runs([record(), record("rtn-w3-llama3-tiny-random")], [record(), gpu])
    assert {(r.case, r.device_class, r.status) for r in rows} == {
        ("rtn-w4-llama3-tiny-random", "cpu-fp32", "same"), ("rtn-w3-llama3-tiny-random", "cpu-fp32", "removed"),
        ("rtn-w4-llama3-tiny-random", "cuda-sm90-bf16", "added")}
    assert compare.exit_status(rows) == 0


def test_compare_vanished_metric_is_a_regression():
    after = copy.deepcopy(record())
    del after["metrics"]["piqa.acc"]
    assert compare.compare_runs([record()], [after])[0].status == "regressed"


def test_compare_shows_the_primary_metric_of_task_only_cases():
    """Without perplexity the table shows the mean task accuracy (results.primary_metric, as the report does)."""
    tasks_only = lambda acc: {**record(acc=acc), "metrics": {"piqa.acc": record(acc=acc)["metrics"]["piqa.acc"]}}  # noqa: E731
    row = compare.compare_runs([tasks_only("1100110011")], [tasks_only("1100110010")])[0]
    assert (row.primary, row.before, row.after) == (results.MEAN_ACC, 0.6, 0.5)


# --- GPU workers --------------------------------------------------------------------------------------------------

PINNING_TEST = '''
import os

def test_where(worker_id, pytestconfig):
    out = pytestconfig.rootpath / "pins"
    out.mkdir(exist_ok=True)
    (out / worker_id).write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
'''


def test_xdist_workers_are_pinned_one_gpu_each(pytester):
    """--ptq-gpus lists the GPUs; worker gw<i> sees only GPU ids[i mod len]. (On this CPU machine no CUDA device
    exists, so the ids only reach the environment, which is what a GPU machine's torch reads.)"""
    pytester.makepyfile(test_pins=PINNING_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "3", "--dist", "each", "--ptq-gpus", "5,7")
    assert result.ret == 0, result.stdout.str()
    pins = {p.name: p.read_text() for p in (pytester.path / "pins").iterdir()}
    assert pins == {"gw0": "5", "gw1": "7", "gw2": "5"}, pins


def test_auto_workers_is_one_per_gpu(pytester):
    pytester.makepyfile(test_pins=PINNING_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "auto", "--ptq-gpus", "0,1")
    assert result.ret == 0
    assert "2 workers" in result.stdout.str(), result.stdout.str()


def test_without_gpus_workers_are_not_pinned(pytester):
    pytester.makepyfile(test_pins=PINNING_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--dist", "each", "--device", "cpu")
    assert result.ret == 0
    assert {p.read_text() for p in (pytester.path / "pins").iterdir()} <= {"unset", os.environ.get(
        "CUDA_VISIBLE_DEVICES", "unset")}


# --- progress -----------------------------------------------------------------------------------------------------

class Tty:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("env, tty, shown", [({}, True, True), ({}, False, False), ({"CI": "true"}, True, False),
                                              ({"PTQSUITE_PROGRESS": "1"}, False, True),
                                              ({"CI": "1", "PTQSUITE_PROGRESS": "0"}, True, False)])
def test_progress_only_on_a_terminal_outside_ci(monkeypatch, env, tty, shown):
    for name in ("CI", "PTQSUITE_PROGRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert progress.wanted(Tty(tty)) is shown


def test_progress_line_is_throttled_and_always_shows_the_end(monkeypatch):
    lines = []
    monkeypatch.setattr(progress, "_sink", lines.append)
    report = progress.reporter("case: quantize")
    for i in range(1, 1001):
        report(i, 1000, f"block {i}")
    progress.clear()
    assert 1 <= len(lines) - 1 < 50, len(lines)  # redraws throttled, not one per step
    assert lines[-2].startswith("\r") and "case: quantize: 1000/1000 block 1000" in lines[-2]
    assert lines[-1] == "\r\x1b[2K"


def test_progress_off_means_no_callback(monkeypatch):
    monkeypatch.setattr(progress, "_sink", None)
    assert progress.reporter("x") is None


def test_progress_stays_out_of_a_piped_run(tmp_path):
    """A run whose output goes to a pipe or file (a CI log) shows no status lines, even with CI unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PTQSUITE_PROGRESS")}
    code = "from ptqsuite import progress; p = progress.reporter('x'); print(p is None)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "True" and "\r" not in done.stderr
