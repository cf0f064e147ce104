"""The compiled CPU kernels (csrc/fused_lenet.cpp, plain C++ with OpenMP), loaded without PyTorch.

They are compiled on first use with the local C++ compiler (a few seconds) and cached under the user's
cache directory; processes starting together on an empty cache build once (a file lock) and never load a
partly written library (it is renamed into place whole). fastcpu runs the network's kernels from it and
read.py its search for cuts; both keep a plain path for when it cannot be built or LENET_NO_EXT=1 is set.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

_SOURCE = Path(__file__).parent / "csrc" / "fused_lenet.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
_lib: ctypes.CDLL | None = None
_failed = False
_P, _I64, _INT, _F32, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_double
# what the library exports: name -> (argument types, result type); pointers are _P, thread counts _INT
_SIGNATURES = {
    "lenet_sizes": ([_INT], _INT),
    "lenet_forward": ([_P, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _INT], None),
    "lenet_backward": ([_P, _P, _I64, _P, _P, _P, _P, _P, _INT], None),
    "lenet_infer": ([_P, _I64, _P, _P, _P, _P, _P, _INT], None),
    "modern_conv1": ([_P, _I64, _P, _P, _P, _INT], None),
    "modern_conv2": ([_P, _I64, _P, _P, _P, _P, _P, _P, _INT], None),
    "modern_pool2": ([_P, _I64, _P, _P, _P, _INT], None),
    "modern_back_pool2": ([_P, _I64, _P, _P, _P, _P, _P, _INT], None),
    "modern_back_conv2": ([_P, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _INT], None),
    "modern_back_conv1": ([_P, _P, _I64, _P, _P, _P, _INT], None),
    "modern_infer": ([_P, _I64, _P, _P, _P, _P, _P, _P, _P, _INT], None),
    "lenet_fma_rate": ([_I64, _INT], _F64),
    "affine_warp": ([_P, _I64, _INT, _INT, _P, _P, _INT], None),
    "lenet5_sdlm_train": ([_P, _P, _I64, _I64, _P, _P, _P, _P, _P, _F32, _F32, _F32, _P, _P], None),
    "cheapest_paths": ([_P, _I64, _I64, _I64, _F64, _P, _P], None),
}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lenet" / "ext"


def _cpu_signature() -> str:
    """The CPU's model and feature flags: a -march=native build is only valid on the same kind of CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() + platform.machine()
    return "\n".join([line for line in lines if line.startswith(("model name", "flags"))][:2])


def library_path() -> Path:
    """Where the library built from this source, with these flags, for this kind of CPU is cached."""
    key = "\n".join([_SOURCE.read_text(), " ".join(_FLAGS), _cpu_signature()])
    return _cache_dir() / f"fused_lenet_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[bool]:
    """One builder at a time in folder, across processes (the OS releases a dead process's lock); yields
    whether the lock is held (no flock on Windows: concurrent builds then still each rename a whole file)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(folder / "build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(target: Path, exclusive: bool) -> None:
    """Compile into a fresh temp folder beside target, then rename the whole file into place. exclusive:
    no other process is building here, so temp folders left by killed builds can go."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found")
    for leftover in target.parent.glob("build-*") if exclusive else ():
        shutil.rmtree(leftover, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run(
            [compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(
                done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "build failed"
            )
        os.replace(built, target)  # atomic: a concurrent reader sees no file or the whole new one


def _open_library(target: Path) -> ctypes.CDLL:
    """The library at target, built first (by one process at a time) when it is missing or will not load.

    A library that exists was renamed into place whole, so it loads without the lock; one that will not
    load (a file damaged on disk) is rebuilt.
    """
    if target.exists():
        with contextlib.suppress(OSError):
            return ctypes.CDLL(str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target.parent) as exclusive:
        if target.exists():  # built by another process while this one waited for the lock
            with contextlib.suppress(OSError):
                return ctypes.CDLL(str(target))
        _build(target, exclusive)
    return ctypes.CDLL(str(target))


def load() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None when it cannot be built or LENET_NO_EXT=1."""
    global _lib, _failed
    if os.environ.get("LENET_NO_EXT") == "1" or _failed:
        return None
    if _lib is None:
        try:
            lib = _open_library(library_path())
        except (OSError, RuntimeError) as exc:  # no compiler, a failed build: the plain paths still work
            _failed = True
            warnings.warn(f"lenet: compiled CPU kernels unavailable, using plain code ({exc})", stacklevel=2)
            return None
        for name, (arguments, result) in _SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = arguments, result
        _lib = lib
    return _lib
