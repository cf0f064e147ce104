"""Which torch device a name means, and how many CPU threads torch uses: shared by training, evaluation,
prediction, serving and the benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to count inside the block, and put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
