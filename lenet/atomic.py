"""Atomic file writes: a reader, or a run resumed after a crash, sees the old file or the whole new one.

Checkpoints, metrics, run configs, plots, exports, data cache files and reports are all written by `write`:
a temp file `.NAME.XXXXXXXX.tmp` in the target's folder (so the rename stays within one file system),
flushed and fsynced, given the permissions a plain open() would give (mkstemp makes 0600 files), optionally
checked, then renamed over the target. Any failure deletes the
temp file and leaves the old target as it was; an OSError on the way (full disk, read-only folder, missing
folder) becomes one WriteError naming the target and the cause. A process killed mid-write cannot delete
its temp file: `remove_leftovers` does that on the next run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, TypeVar

from lenet.errors import LenetError

T = TypeVar("T")


class WriteError(LenetError):
    """A file could not be written; `path` is the target, `reason` the system's words (e.g. No space...)."""

    def __init__(self, path: Path, error: OSError):
        self.path, self.reason = path, error.strerror or str(error)
        super().__init__(f"{path}: cannot write ({self.reason})")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def write(
    path: str | Path, fill: Callable[[BinaryIO], object], check: Callable[[Path], T] | None = None
) -> T | None:
    """Write path atomically: fill(file) writes the content, check(temp path) may reject it by raising.

    Returns check's result (None without a check). OSError while writing becomes WriteError; whatever check
    raises passes through unchanged. Either way the temp file is gone and the old file untouched.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    except OSError as e:
        raise WriteError(path, e) from None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                umask = os.umask(0)
                os.umask(umask)
                os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes 0600; give what open() would
                fill(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise WriteError(path, e) from None
        result = check(Path(tmp)) if check is not None else None
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise WriteError(path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return result


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path atomically (see `write`)."""
    write(path, lambda f: f.write(data))


def make_folder(path: str | Path) -> None:
    """Create path and its parents if missing; OSError becomes a one-line LenetError naming the folder."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LenetError(f"{path}: cannot create the folder ({e.strerror or e})") from None


def remove_leftovers(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temp files that writes of folder/NAME left when their process was killed; returns them."""
    prefixes = tuple(_temp_prefix(Path(name)) for name in names)
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet, or one we cannot list: nothing to clean that we could clean
        return []
    removed = []
    for entry in entries:
        if entry.name.startswith(prefixes) and entry.name.endswith(".tmp") and entry.is_file():
            with contextlib.suppress(OSError):  # gone already, or a read-only folder: leave it
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed
