"""Results files: one JSON object per line (JSON lines), one line per case a run evaluated.

A record is what the case's baseline stores (metrics with their sample counts and per-example records, the
unquantized reference, size, protocol, library versions) plus what a baseline must not store because it changes
from run to run: wall times, the device's name, the commit, when, which xdist worker, and how the run compared
with its baseline. ``python -m ptqsuite report|compare|trend`` read these files; ``--ptq-results FILE`` and
``--ptq-report DIR`` write them.

Field by field (``SCHEMA`` versions this list; readers refuse other versions):

* ``case``, ``recipe`` (Recipe.to_dict: id, method, transforms, weight/act/kv formats, calibration), ``model``
* ``metrics``, ``reference``: ``{name: {"value": v, <counts: n | windows, tokens>, ["correct": "0101.."]}}``
* ``bits_per_weight`` (effective, scales and zero points included), ``size`` (model_bytes, quantized_params)
* ``device``: ``{"class": "cpu-fp32" | "cuda-sm90-bf16" | ..., "name": "NVIDIA H200" | the CPU's name,
  "cuda_visible_devices": what the process saw (under xdist: the GPU its worker was pinned to)}``
* ``time``: ``{"quantize_s", "evaluate_s"}`` as measured when the case ran (a test that reuses the run's cached
  result reports the same times)
* ``protocol``, ``environment`` (library versions), ``run``: ``{"commit", "dirty", "timestamp", "worker"}``
* ``outcome``: the pytest outcome of the test that produced the record (passed, failed, skipped)
* ``baseline``: ``{"status": "matched" | "differs" | "missing" | "recorded", "metrics": {name: value},
  "lines": [why it differs], "worse": [metrics that moved the bad way]}``: "differs" is a failure of the baseline
  rule (ptqsuite/baselines.py); "recorded" means this run wrote the baseline (--snapshot-update)
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .paths import atomic_write_text

SCHEMA = 1
MEAN_ACC = "mean.acc"  # pseudo-metric: the mean of a record's *.acc metrics, for models scored on tasks only


class ResultsError(ValueError):
    """A results file that cannot be read: the message names the file, the line and what is wrong."""


def record(payload: dict, quantize_s: float, evaluate_s: float, device: torch.device) -> dict:
    """The results record of one case's payload (what runner.Runner.run returned), before baseline comparison."""
    return {
        "schema": SCHEMA,
        **payload,
        "bits_per_weight": payload["metrics"].get("bits_per_weight", {}).get("value"),
        "device": {"class": payload["protocol"]["device_class"], "name": device_name(device),
                   "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")},  # the GPU an xdist worker was pinned to
        "time": {"quantize_s": round(quantize_s, 3), "evaluate_s": round(evaluate_s, 3)},
        "run": run_info(),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def run_info() -> dict:
    """Which code produced the numbers (the working directory's git commit, None outside a checkout), where and
    when."""
    commit, dirty = _git_state()
    return {"commit": commit, "dirty": dirty, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    """Asked once per process: a run's cases share one checkout, and `git status` walks the whole tree."""
    try:
        return _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


def write(path: Path, records: Iterable[dict]) -> None:
    """Write a whole results file atomically (a reader never sees half of it), in case-id order."""
    lines = [json.dumps(r, sort_keys=True) for r in sorted(records, key=lambda r: (r["case"], r["device"]["class"]))]
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))


def read(path: Path) -> list[dict]:
    return list(iter_records(path))


def iter_records(path: Path) -> Iterator[dict]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ResultsError(f"{path}: cannot read results file: {e.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise ResultsError(f"{path}:{number}: not JSON ({e}); a results file holds one JSON object per line") from None
        if not isinstance(r, dict) or r.get("schema") != SCHEMA:
            found = r.get("schema") if isinstance(r, dict) else type(r).__name__
            raise ResultsError(f"{path}:{number}: results schema {found!r}; this ptqsuite reads schema {SCHEMA}")
        missing = [k for k in ("case", "metrics", "device", "protocol") if k not in r]
        if missing:
            raise ResultsError(f"{path}:{number}: record lacks {', '.join(missing)}")
        yield r


def key(r: dict) -> tuple[str, str]:
    """What identifies a case across runs: the same case id on the same device class."""
    return r["case"], r["device"]["class"]


def values(metrics: dict) -> dict[str, float]:
    return {name: m["value"] for name, m in metrics.items()}


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def metric_value(values: dict, name: str) -> float | None:
    """``values[name]`` ({name: float}, as ``values`` returns), MEAN_ACC computed; None when absent."""
    if name == MEAN_ACC:
        accs = [v for k, v in values.items() if k.endswith(".acc") and finite(v)]
        return sum(accs) / len(accs) if accs else None
    v = values.get(name)
    return float(v) if isinstance(v, (int, float)) else None


def primary_metric(records: list[dict]) -> str | None:
    """The one number a table or plot shows for these records: wikitext2.ppl if any has it, else the first *.ppl
    by name, else MEAN_ACC (task-only cases), else None."""
    names = {n for r in records for n in r.get("metrics", {})}
    if "wikitext2.ppl" in names:
        return "wikitext2.ppl"
    ppl = sorted(n for n in names if n.endswith(".ppl"))
    if ppl:
        return ppl[0]
    return MEAN_ACC if any(n.endswith(".acc") for n in names) else None
