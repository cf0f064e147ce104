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
CHUNK = 256  # images per forward pass when predicting files (per image as fast as 1024, a shorter tail)
JOB = 64  # files per worker task: one message each way per JOB files, not per file


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


def _preprocess_job(job: tuple[list[tuple[str, bytes | None]], str]) -> tuple[np.ndarray, list[str | None]]:
    """Worker: ([(path, bytes or None)], invert) -> (images (n, 28, 28) uint8, errors): each file's image and
    None, or zeros and its one-line error."""
    files, invert = job
    images = np.zeros((len(files), 28, 28), dtype=np.uint8)
    errors: list[str | None] = [None] * len(files)
    for i, (path, data) in enumerate(files):
        try:
            if data is not None:
                images[i] = preprocess(data, invert, name="<stdin>" if path == STDIN else path)
            else:
                images[i] = preprocess(path, invert)
        except LenetError as e:
            errors[i] = str(e)
    return images, errors


def predict_files(
    classify: Callable[[np.ndarray], np.ndarray],
    paths: Sequence[str],
    invert: str = "auto",
    workers: int | None = None,
) -> Iterator[dict]:
    """Preprocess and predict image files in order: {"path", "probabilities" (10 floats) or "error"}.

    "-" reads one image from stdin. A file that fails gives an error entry and the others go on. Decoding
    and preprocessing (the cost) run in `workers` processes (default: one per CPU when there are at least
    POOL_MIN_IMAGES images; 0 means in this process), JOB files per task; forward passes take CHUNK images
    at a time, in this process while the workers go on with the next files.
    """
    stdin = sys.stdin.buffer.read() if STDIN in paths else None
    files = [(p, stdin if p == STDIN else None) for p in paths]
    jobs = [(files[i : i + JOB], invert) for i in range(0, len(files), JOB)]
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = cpus if len(files) >= POOL_MIN_IMAGES else 0
    pool = None
    if workers > 0:
        import multiprocessing

        # fork where it is safe (Linux): workers start at once and never re-run the caller's script; they
        # use numpy and Pillow only, never the copy of torch they inherit. Elsewhere spawn, whose workers
        # import the caller's main module (scripts need the `if __name__ == "__main__":` guard).
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        pool = multiprocessing.get_context(method).Pool(workers)
        done = pool.imap(_preprocess_job, jobs)
    else:
        done = map(_preprocess_job, jobs)
    try:
        finished: list[tuple[list, np.ndarray, list]] = []  # (files, images, errors) not yet forwarded
        for (job_files, _), (images, errors) in zip(jobs, done, strict=True):
            finished.append((job_files, images, errors))
            if len(finished) * JOB >= CHUNK:
                yield from _forward(classify, finished)
                finished = []
        yield from _forward(classify, finished)
    finally:
        if pool is not None:
            pool.terminate()


def _forward(classify: Callable[[np.ndarray], np.ndarray], finished: list) -> Iterator[dict]:
    """Rows for finished jobs [(files, images, errors)], with one forward pass over all their good images."""
    paths = [path for job_files, _, _ in finished for path, _ in job_files]
    errors = [error for _, _, job_errors in finished for error in job_errors]
    good = [i for i, error in enumerate(errors) if error is None]
    rows = iter([])
    if good:
        images = np.concatenate([images for _, images, _ in finished])
        rows = iter(np.asarray(classify(images if len(good) == len(images) else images[good])).tolist())
    for path, error in zip(paths, errors, strict=True):
        if error is None:
            yield {"path": path, "probabilities": next(rows)}
        else:
            yield {"path": path, "error": error}


def load_classifier(
    model_path: str, backend: str, device: str = "cpu"
) -> tuple[Callable[[np.ndarray], np.ndarray], Sequence[str]]:
    """classify (uint8 images (N, 28, 28) -> numpy probabilities (N, classes)) and the class names, for a
    checkpoint (backend "torch", on `device`) or an .onnx export ("onnxruntime": no torch imported)."""
    if backend == "onnxruntime":
        from lenet.export import OnnxModel

        onnx_model = OnnxModel(model_path)
        return onnx_model.predict, onnx_model.classes
    import torch

    from lenet.predict import classifier, load

    # One thread: small batches are faster without hand-offs, and preprocessing workers take the other CPUs.
    torch.set_num_threads(1)
    model, meta = load(model_path, device)
    norm = meta["normalization"]
    return classifier(model, norm["mean"], norm["std"]), meta["classes"]


def top_k(probabilities: Sequence[float], k: int, classes: Sequence[str]) -> list[tuple[str, float]]:
    order = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[:k]
    return [(classes[i], probabilities[i]) for i in order]
