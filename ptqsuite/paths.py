"""Where ptqsuite keeps things on disk, and how it writes them safely."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"


def cache_dir() -> Path:
    """Converted weights and other derived artefacts: $PTQSUITE_CACHE, else ~/.cache/ptqsuite."""
    root = os.environ.get("PTQSUITE_CACHE") or Path.home() / ".cache" / "ptqsuite"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are ordinary project files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def publish_dir(staging: Path, target: Path) -> None:
    """Move a fully built `staging` directory to `target` with one rename: readers see all of it or nothing.

    `staging` must be on target's filesystem (build it beside). An existing `target` is moved aside first and
    deleted after: a reader may briefly find no `target`, so callers replacing one hold the lock that guards it.
    """
    staging, target = Path(staging), Path(target)
    retired = None
    if target.exists():
        retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.replace(target, retired)  # POSIX rename may replace an empty directory
    os.replace(staging, target)
    if retired is not None:
        shutil.rmtree(retired)


@contextmanager
def exclusive_lock(path: Path, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) between processes; ``log`` says so when waiting."""
    with open(path, "a") as lock:  # "a": create if missing, never truncate a file another process holds
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"waiting for {path}: another process is building what it guards")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock, also when the process dies
