"""Progress of long loops (blocks quantized, windows scored, examples answered) on an interactive terminal, and
nothing at all in CI logs, pipes or xdist workers.

Code that loops takes a ``progress(done, total, what="")`` callback (pipeline.quantize, eval.ppl.perplexity);
``reporter(label)`` makes one that writes a single, rewritten status line to the installed sink, at most every
``INTERVAL`` seconds, and ``clear()`` removes the line when the loop is over. The sink is stderr when it is a
terminal; the pytest plugin installs one that writes past output capture (``install``). ``PTQSUITE_PROGRESS=0``
turns it off, ``=1`` on; otherwise it is off whenever ``CI`` is set (GitHub Actions, GitLab, most CI systems).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

INTERVAL = 0.25  # seconds between redraws: frequent enough to look alive, rare enough to cost nothing
Sink = Callable[[str], None]
AUTO = "auto"  # the default sink: stderr when wanted there
_sink: Sink | None | str = AUTO


def wanted(stream) -> bool:
    """Progress is shown on an interactive terminal, unless the environment says otherwise."""
    forced = os.environ.get("PTQSUITE_PROGRESS")
    if forced is not None:
        return forced not in ("", "0", "false", "no")
    return not os.environ.get("CI") and hasattr(stream, "isatty") and stream.isatty()


def _stderr(line: str) -> None:
    sys.stderr.write(line)
    sys.stderr.flush()


def install(sink: Sink | None | str) -> None:
    """Where status lines go: a callable taking the line (which starts with a carriage return), ``None`` for
    nowhere, or ``AUTO``."""
    global _sink
    _sink = sink


def sink() -> Sink | None:
    if _sink == AUTO:
        return _stderr if wanted(sys.stderr) else None
    return _sink


def reporter(label: str) -> Callable[..., None] | None:
    """A ``progress(done, total, what="")`` callback showing ``label``, or None when progress is off (callers
    then skip the call entirely)."""
    write = sink()
    if write is None:
        return None
    start, last = time.monotonic(), [0.0]

    def progress(done: int, total: int, what: str = "") -> None:
        now = time.monotonic()
        if done < total and now - last[0] < INTERVAL:
            return
        last[0] = now
        write(f"\r\x1b[2K{label}: {done}/{total}{' ' + what if what else ''} ({now - start:.0f} s)")

    return progress


def clear() -> None:
    """Erase the status line (after a loop, before normal output resumes)."""
    write = sink()
    if write is not None:
        write("\r\x1b[2K")
