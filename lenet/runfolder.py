"""A run folder (runs/NAME/): held by one training process at a time, never overwritten by surprise.

`claim` picks and locks the folder. A folder holds a run when it has any of RUN_FILES or another process
holds its lock. The default folder (runs/MODEL) that holds a run is left alone and a fresh runs/MODEL-N is
used instead; a folder named explicitly that holds a run is refused unless the run resumes or overwrites it.
The lock is an advisory lock (flock) on `.lock`, which the system releases when its process ends however it
ends, so a killed run never leaves a folder stuck; the file holds the process id for the message.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO

from lenet import atomic
from lenet.errors import LenetError

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None

# What training writes into a run folder (atomically: a kill mid-write leaves a temp file, removed on restart)
RUN_FILES = (
    "config.json", "metrics.jsonl", "best.safetensors", "last.safetensors", "curves.png", "confusion.png",
)  # fmt: skip
LOCK_FILE = ".lock"


class RunFolder:
    """A claimed run folder; `release()` (or the process ending) frees it for the next run."""

    def __init__(self, path: Path, lock: IO | None):
        self.path, self._lock = path, lock
        self.config = path / "config.json"
        self.metrics = path / "metrics.jsonl"
        self.best = path / "best.safetensors"
        self.last = path / "last.safetensors"

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _holds_run(folder: Path) -> list[str]:
    return [name for name in RUN_FILES if (folder / name).exists()]


class _Busy(Exception):
    """Another process holds the folder's lock."""


def _lock(folder: Path) -> IO | None:
    """The folder's lock, taken without waiting (None where the folder is read-only: no run can write
    there, and its first write says so); _Busy when another process holds it."""
    atomic.make_folder(folder)
    try:
        handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 (held open for the whole run)
    except OSError:
        try:
            handle = open(folder / LOCK_FILE)  # noqa: SIM115 (a read-only folder: locking still works)
        except OSError:
            return None
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise _Busy from None
    with contextlib.suppress(OSError):  # a read-only folder: the lock still holds, only the pid is missing
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    return handle


def _holder(folder: Path) -> str:
    try:
        pid = (folder / LOCK_FILE).read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


def _close(lock: IO | None) -> None:
    if lock is not None:
        lock.close()


def claim(out: str | Path | None, default: Path, resume: bool, overwrite: bool, log) -> RunFolder:
    """Lock the run folder for this run: `out`, or when out is None `default` or a fresh `default-N`.

    resume: the folder's run is continued; overwrite: its run files are deleted. Raises LenetError naming
    the folder when it is in use by another process, or holds a run and neither was asked for.
    """
    if out is not None or resume or overwrite:
        folder = Path(out) if out is not None else default
        try:
            lock = _lock(folder)
        except _Busy:
            raise LenetError(
                f"{folder}: in use by a training run ({_holder(folder)}); wait for it or choose another --out"
            ) from None
        found = _holds_run(folder)
        if found and not (resume or overwrite):
            _close(lock)
            raise LenetError(
                f"{folder}: holds a run already ({', '.join(found)}): --resume continues it, "
                "--overwrite replaces it, or choose another --out"
            )
        if overwrite:
            for name in found:
                (folder / name).unlink(missing_ok=True)
        atomic.remove_leftovers(folder, RUN_FILES)
        return RunFolder(folder, lock)
    for n in range(1, 10_000):
        folder = default if n == 1 else default.with_name(f"{default.name}-{n}")
        try:
            lock = _lock(folder)
        except _Busy:
            continue
        if _holds_run(folder):
            _close(lock)
            continue
        if n > 1:
            log(f"{default} holds a run: this one goes to {folder} (--resume would continue {default})")
        atomic.remove_leftovers(folder, RUN_FILES)
        return RunFolder(folder, lock)
    raise LenetError(f"{default}: 10,000 runs of this name exist; choose --out")


def kept_metrics(path: Path, epochs_kept: int) -> list[str]:
    """The metrics lines of the epochs the checkpoint holds, without lines of epochs lost to a kill."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["epoch"] <= epochs_kept:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a half-written last line (of a version that appended to the file)
    return kept


def write_metrics(path: Path, lines: list[str]) -> None:
    atomic.write_bytes(path, "".join(line + "\n" for line in lines).encode())
