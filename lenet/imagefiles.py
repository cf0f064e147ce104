"""Image files -> predictions: expand paths, preprocess in worker processes, classify in batches.

Torch-free (numpy and Pillow): `classify` is any function from uint8 images (N, 28, 28) to probabilities
(N, classes), so the same path serves a PyTorch checkpoint and an ONNX Runtime model.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from lenet.errors import LenetError
from lenet.preprocess import preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
STDIN = "-"
POOL_MIN_IMAGES = 1000  # below this, starting worker processes costs more than it saves
CHUNK = 1024  # images per forward pass when predicting files


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Files, folders (their images, sorted, not recursive) and globs -> paths, in the order given.

    "-" (stdin) is kept. A name that matches nothing is kept too, so that it fails on its own ("no such
    file") while the others go on. A folder without images raises LenetError.
    """
    paths: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                entry.path
                for entry in os.scandir(pattern)
                if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES)
            )
            if not found:
                raise LenetError(f"{pattern}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif pattern != STDIN and not os.path.exists(pattern) and glob.has_magic(pattern):
            paths.extend(sorted(p for p in glob.glob(pattern) if os.path.isfile(p)) or [pattern])
        else:
            paths.append(pattern)
    return paths


def _preprocess_one(job: tuple[str, bytes | None, str]) -> tuple[np.ndarray | None, str | None]:
    """Worker: (path, bytes or None, invert) -> (image, None) or (None, one-line error)."""
    path, data, invert = job
    try:
        if data is not None:
            return preprocess(data, invert, name="<stdin>" if path == STDIN else path), None
        return preprocess(path, invert), None
    except LenetError as e:
        return None, str(e)


def predict_files(
    classify: Callable[[np.ndarray], np.ndarray],
    paths: Sequence[str],
    invert: str = "auto",
    workers: int | None = None,
) -> Iterator[dict]:
    """Preprocess and predict image files in order: {"path", "probabilities" (10 floats) or "error"}.

    "-" reads one image from stdin. A file that fails gives an error entry and the others go on. Decoding
    and preprocessing (the cost) run in `workers` processes (default: one per CPU when there are at least
    POOL_MIN_IMAGES images; 0 means in this process); forward passes take CHUNK images at a time.
    """
    stdin = sys.stdin.buffer.read() if STDIN in paths else None
    jobs = [(p, stdin if p == STDIN else None, invert) for p in paths]
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = cpus if len(jobs) >= POOL_MIN_IMAGES else 0
    pool = None
    if workers > 0:
        import multiprocessing

        # fork where it is safe (Linux): workers start at once and never re-run the caller's script; they
        # use numpy and Pillow only, never the copy of torch they inherit. Elsewhere spawn, whose workers
        # import the caller's main module (scripts need the `if __name__ == "__main__":` guard).
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        pool = multiprocessing.get_context(method).Pool(workers)
        done = pool.imap(_preprocess_one, jobs, chunksize=64)
    else:
        done = map(_preprocess_one, jobs)
    try:
        pending: list[tuple[str, np.ndarray | None, str | None]] = []
        for (path, _, _), (image, error) in zip(jobs, done, strict=True):
            pending.append((path, image, error))
            if len(pending) == CHUNK:
                yield from _forward(classify, pending)
                pending = []
        yield from _forward(classify, pending)
    finally:
        if pool is not None:
            pool.terminate()


def _forward(classify: Callable[[np.ndarray], np.ndarray], pending: list) -> Iterator[dict]:
    good = [image for _, image, _ in pending if image is not None]
    probabilities = np.asarray(classify(np.stack(good))).tolist() if good else []
    rows = iter(probabilities)
    for path, image, error in pending:
        if image is None:
            yield {"path": path, "error": error}
        else:
            yield {"path": path, "probabilities": next(rows)}


def top_k(probabilities: Sequence[float], k: int, classes: Sequence[str]) -> list[tuple[str, float]]:
    order = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[:k]
    return [(classes[i], probabilities[i]) for i in order]
