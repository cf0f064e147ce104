"""A faster CPU training path for `classic`: its two conv/sigmoid/pool stages as one fused C++ kernel.

The kernel (csrc/fused_lenet.cpp, plain C++ with OpenMP) is compiled on first use with the local C++
compiler (a few seconds) and cached under the user's cache directory. `fast_forward(model)` wraps a classic
model in a module that computes the same function with the same parameters (gradients equal autograd's
within float rounding); it returns None, and the caller keeps the plain model, when the model is not
classic, not a float32 CPU model, the kernel cannot be built, or LENET_NO_EXT=1 is set.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

_SOURCE = Path(__file__).parent / "csrc" / "fused_lenet.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
_lib: ctypes.CDLL | None = None
_failed = False
_P = ctypes.c_void_p


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


def _build(target: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run(
            [compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(
                done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "build failed"
            )
        os.replace(built, target)  # atomic: a concurrent run sees the old file or the whole new one


def load_extension() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None when it cannot be built or LENET_NO_EXT=1."""
    global _lib, _failed
    if os.environ.get("LENET_NO_EXT") == "1" or _failed:
        return None
    if _lib is None:
        key = "\n".join([_SOURCE.read_text(), " ".join(_FLAGS), _cpu_signature()])
        target = _cache_dir() / f"fused_lenet_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
        try:
            if not target.exists():
                _build(target)
            lib = ctypes.CDLL(str(target))
        except (OSError, RuntimeError) as exc:  # no compiler, a failed build: the plain model still works
            _failed = True
            warnings.warn(f"lenet: fused CPU kernel unavailable, using the plain model ({exc})", stacklevel=2)
            return None
        lib.lenet_sizes.argtypes, lib.lenet_sizes.restype = [ctypes.c_int], ctypes.c_int
        lib.lenet_forward.argtypes = [_P, ctypes.c_int64, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int]
        lib.lenet_backward.argtypes = [_P, _P, ctypes.c_int64, _P, _P, _P, _P, _P, ctypes.c_int]
        lib.lenet_forward.restype = lib.lenet_backward.restype = None
        _lib = lib
    return _lib


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class _ClassicFeatures(torch.autograd.Function):
    """(N, 1, 28, 28) -> (N, 400): conv1, sigmoid, pool1, conv2, sigmoid, pool2, flatten; no input grad."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, workspace):
        lib, n = _lib, len(x)
        w1, b1, w2, b2 = (t.detach().contiguous() for t in (w1, b1, w2, b2))
        blocks = (n + 7) // 8
        out = x.new_empty(n, 400)
        s1, p1, s2 = _activations(workspace, blocks)
        lib.lenet_forward(_ptr(x), n, *map(_ptr, (w1, b1, w2, b2, out, s1, p1, s2)), torch.get_num_threads())
        ctx.save_for_backward(x, w2, s1, p1, s2)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w2, s1, p1, s2 = ctx.saved_tensors
        grad = grad.contiguous()
        flat = grad.new_empty(_lib.lenet_sizes(3))  # w1 (150), b1 (6), w2 (2400), b2 (16)
        _lib.lenet_backward(
            _ptr(grad), _ptr(x), len(x), *map(_ptr, (w2, s1, p1, s2, flat)), torch.get_num_threads()
        )
        gw1, gb1, gw2, gb2 = flat.split([150, 6, 2400, 16])
        return None, gw1.view(6, 1, 5, 5), gb1, gw2.view(16, 6, 5, 5), gb2, None


def _activations(workspace: list[torch.Tensor] | None, blocks: int) -> list[torch.Tensor]:
    """The saved-activation buffers (s1, p1, s2), reused from `workspace` when it has the right size.

    Fresh multi-megabyte buffers every step cost about as much as the kernel's forward pass (page faults).
    A graph still holding the previous buffers gets autograd's clear in-place-modification error on
    backward (the empty in-place write below bumps their version), never silently wrong gradients.
    """
    if workspace is None:
        return [torch.empty(blocks, _lib.lenet_sizes(i)) for i in range(3)]
    if not workspace or len(workspace[0]) != blocks:
        workspace[:] = [torch.empty(blocks, _lib.lenet_sizes(i)) for i in range(3)]
    else:
        for t in workspace:
            t[:0].zero_()
    return workspace


class FastClassic(nn.Module):
    """`classic` with the fused kernel; shares the wrapped model's parameters (`self.net`).

    Inputs it cannot handle (not float32 (N, 1, 28, 28) on CPU, or needing their own gradient) go through
    the plain model, so the result is always the model's function.
    """

    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net
        self._workspace: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        if (
            x.dtype != torch.float32
            or x.device.type != "cpu"
            or x.shape[1:] != (1, 28, 28)
            or x.requires_grad
        ):
            return net(x)
        workspace = self._workspace if torch.is_grad_enabled() else None  # no-grad calls keep it intact
        feats = _ClassicFeatures.apply(  # (N, 400)
            x.contiguous(), net.conv1.weight, net.conv1.bias, net.conv2.weight, net.conv2.bias, workspace
        )
        h = torch.sigmoid(net.fc1(feats))  # (N, 120)
        h = torch.sigmoid(net.fc2(h))  # (N, 84)
        return net.fc3(h)  # (N, 10)


def _is_classic(model: nn.Module) -> bool:
    from lenet.models import classic

    if not isinstance(model, nn.Sequential):
        return False
    with torch.random.fork_rng(devices=[]):  # building the reference must not shift the caller's RNG
        reference = classic()
    ours, ref = list(model.named_children()), list(reference.named_children())
    return len(ours) == len(ref) and all(
        name == rname and type(layer) is type(rlayer) and layer.extra_repr() == rlayer.extra_repr()
        for (name, layer), (rname, rlayer) in zip(ours, ref, strict=True)
    )


def fast_forward(model: nn.Module) -> FastClassic | None:
    """A FastClassic sharing `model`'s parameters, or None when the fused path does not apply."""
    if not _is_classic(model):
        return None
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        return None
    if load_extension() is None:
        return None
    return FastClassic(model)
