"""What the processes of one pytest-xdist run share on disk: results that every worker would otherwise compute
again for itself. The case: an unquantized model's reference metrics, when the matrix spreads a model's cases
over several xdist groups (shards) and so over several workers; a zero-shot or long-context reference is a minute
of GPU time each.

The directory belongs to one run: the controller creates it, hands it to each worker (``workerinput``) and deletes
it when the run ends, so nothing computed by one version of the code is read by another. Each entry is computed
once under a lock (the other workers wait for it rather than compute it too), written atomically as JSON, and
read back by everyone, its writer included, so all workers hold identical values.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .paths import atomic_write_text, exclusive_lock

WORKERINPUT_KEY = "ptqsuite_shared_dir"


def once(directory: Path | None, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON-able value as stored under ``name`` in ``directory`` by the first process to ask; None:
    no sharing, ``compute()`` itself. Tuples come back as lists (a JSON round trip, in every process alike)."""
    if directory is None:
        return compute()
    path = directory / f"{name}.json"
    with exclusive_lock(directory / f".{name}.lock"):
        if not path.exists():
            atomic_write_text(path, json.dumps(compute()))
        return json.loads(path.read_text())


class RunDirectory:
    """The controller's side, a pytest plugin: one directory for the run, named to each worker as it starts."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="ptqsuite-run-"))

    def pytest_configure_node(self, node) -> None:
        node.workerinput[WORKERINPUT_KEY] = str(self.path)

    def pytest_unconfigure(self, config) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
