"""Which torch device a name means: shared by training, evaluation, prediction and serving."""

from __future__ import annotations

import torch

from lenet.errors import LenetError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """ "auto" picks CUDA, then MPS, then the CPU; a named device that is not there is a LenetError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LenetError("--device cuda: CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise LenetError("--device mps: MPS is not available on this machine")
    if name not in DEVICES[1:]:
        raise LenetError(f"--device: unknown device {name!r}, expected auto, cpu, cuda or mps")
    return torch.device(name)
