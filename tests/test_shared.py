"""The run directory xdist workers share (ptqsuite/shared.py): each entry computed once, by one process, and read
back identically by all; the runner's unquantized references go through it."""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ptqsuite import matrix, models, shared
from ptqsuite.runner import Runner, Settings


def test_without_a_directory_every_call_computes():
    calls = []
    assert shared.once(None, "x", lambda: calls.append(1) or (1, "a")) == (1, "a")
    assert shared.once(None, "x", lambda: calls.append(1) or (1, "a")) == (1, "a")
    assert len(calls) == 2


def test_the_first_call_computes_and_every_caller_reads_the_stored_value(tmp_path):
    calls = []
    first = shared.once(tmp_path, "ref", lambda: calls.append(1) or ({"ppl": 1.25}, ("a", 2)))
    second = shared.once(tmp_path, "ref", lambda: calls.append(1) or "never")
    assert calls == [1]
    assert first == second == [{"ppl": 1.25}, ["a", 2]]  # the writer gets the JSON round trip too
    assert json.loads((tmp_path / "ref.json").read_text()) == first


def test_a_failed_computation_leaves_nothing_and_the_next_caller_computes(tmp_path):
    with pytest.raises(ZeroDivisionError):
        shared.once(tmp_path, "ref", lambda: 1 / 0)
    assert not (tmp_path / "ref.json").exists()
    assert shared.once(tmp_path, "ref", lambda: 3) == 3


def _compute_in(directory: str, log: str) -> float:
    def compute():
        with open(log, "a") as f:
            f.write("computed\n")
        import time
        time.sleep(0.5)  # long enough that the other processes arrive while it runs
        return 2.5
    return shared.once(Path(directory), "slow", compute)


def test_concurrent_processes_compute_once(tmp_path):
    log = tmp_path / "log.txt"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        got = pool.starmap(_compute_in, [(str(tmp_path), str(log))] * 3)
    assert got == [2.5, 2.5, 2.5]
    assert log.read_text().splitlines() == ["computed"]


def test_runners_sharing_a_directory_evaluate_the_reference_once(tmp_path, monkeypatch):
    """Two workers' runners: the second reads the first's reference metrics and never evaluates the model."""
    settings, m = Settings(torch.device("cpu"), torch.float32), matrix.load()
    spec = models.get("llama3-tiny-random")
    first = Runner(settings, m, shared=tmp_path)
    expected = first.reference(spec)
    second = Runner(settings, m, shared=tmp_path)
    monkeypatch.setattr(second, "evaluate", lambda *a, **k: pytest.fail("evaluated the reference again"))
    assert second.reference(spec) == expected
    assert [p.name for p in tmp_path.glob("*.json")] == ["reference.cpu-fp32.llama3-tiny-random.ppl.json"]


def test_an_xdist_run_shares_one_directory_and_removes_it(tmp_path):
    """Under -n 2 both workers get the same directory from the controller, and it is gone after the run."""
    (tmp_path / "test_dirs.py").write_text(textwrap.dedent("""
        import pytest
        from ptqsuite import shared

        @pytest.mark.parametrize("i", range(4))
        def test_dir(i, pytestconfig):
            d = pytestconfig.workerinput[shared.WORKERINPUT_KEY]
            with open(pytestconfig.rootpath / "seen.txt", "a") as f:
                f.write(d + "\\n")
    """))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "--device",
                          "cpu", str(tmp_path / "test_dirs.py"), "--rootdir", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    seen = set((tmp_path / "seen.txt").read_text().split())
    assert len(seen) == 1
    assert not Path(seen.pop()).exists()
