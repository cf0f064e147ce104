"""Predictions on users' images: the one forward path that the CLI, the server and export checks share.

The contract: images arrive already preprocessed to MNIST convention, as uint8 (N, 28, 28) (numpy or
torch; (N, 1, 28, 28) is accepted too), i.e. what `lenet.preprocess.preprocess` returns, stacked. The
checkpoint's normalisation (meta["normalization"]) turns them into model inputs here, so callers never
normalise themselves.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lenet.evaluate import predict_logits

SMALL_BATCH = 8  # forwards of up to this many images on the CPU use PyTorch's own convolutions (see below)
NUMPY_BATCH = 64  # fused forwards of up to this many images finish in numpy, not PyTorch (see _fused)

_onednn_lock = threading.Lock()
_onednn_off_for = 0  # small-batch forwards now running with oneDNN switched off
_onednn_setting = True  # the switch as it was before the first of them


@contextlib.contextmanager
def _without_onednn() -> Iterator[None]:
    """oneDNN's convolutions switched off while the block runs.

    For a handful of images oneDNN's set-up per call costs more than the work: up to SMALL_BATCH images run
    faster on PyTorch's own CPU convolutions, while from a few dozen on oneDNN wins (docs/speed.md). The
    switch is process-wide, so blocks in several threads share one off-period and the setting found before
    the first is put back after the last; a large batch in another thread meanwhile runs slower, its results
    the same to float rounding.
    """
    global _onednn_off_for, _onednn_setting
    with _onednn_lock:
        if _onednn_off_for == 0:
            _onednn_setting = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
        _onednn_off_for += 1
    try:
        yield
    finally:
        with _onednn_lock:
            _onednn_off_for -= 1
            if _onednn_off_for == 0:
                torch.backends.mkldnn.enabled = _onednn_setting


def _convolutions_for(batch: torch.Tensor) -> contextlib.AbstractContextManager:
    small = len(batch) <= SMALL_BATCH and batch.device.type == "cpu"
    return _without_onednn() if small else contextlib.nullcontext()


def _as_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    batch = torch.as_tensor(images)
    if batch.dim() == 4 and batch.shape[1] == 1:
        batch = batch[:, 0]
    if batch.dim() == 2:
        raise ValueError("expected a batch (N, 28, 28); wrap a single image as images[None]")
    if batch.dtype != torch.uint8 or batch.shape[1:] != (28, 28):
        raise ValueError(f"expected uint8 images (N, 28, 28), got {batch.dtype} {tuple(batch.shape)}")
    return batch


def _as_array(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """_as_batch's images as uint8 numpy (N, 28, 28) on the CPU; numpy's own checked without PyTorch."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (28, 28):
        return images
    return _as_batch(images).cpu().numpy()


def predict(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    mean: float,
    std: float,
    batch_size: int = 2000,
    kernel: bool = True,
) -> torch.Tensor:
    """Class probabilities (N, 10), float32 on the model's device, for uint8 images (N, 28, 28).

    mean, std: the checkpoint's meta["normalization"]. The model is run in eval mode (and left as it was).
    kernel: through the fused CPU kernels where they compute the model (`_fused`); False, PyTorch's own
    layers (the function an export is checked against).
    """
    device = next(model.parameters()).device
    n = len(images) if getattr(images, "ndim", 1) else 0  # (0-d: _as_batch says what was expected)
    fused = _fused(model) if kernel and device.type == "cpu" and n > 1 else None
    if fused is not None and n <= NUMPY_BATCH:
        probabilities = fused.probabilities(_as_array(images), mean, std)
        if probabilities is not None:
            return torch.from_numpy(probabilities)
    batch = _as_batch(images).to(device)
    with contextlib.nullcontext() if fused else _convolutions_for(batch):
        logits = predict_logits(fused or model, batch, mean, std, batch_size)
    return torch.softmax(logits.float(), dim=1)


def _fused(model: nn.Module) -> nn.Module | None:
    """classic and folded modern as the fused CPU kernels compute them (fastcpu.inference): faster than
    PyTorch's layers from 2 images on, e.g. the dozen candidates that `read` classifies at once; for one
    image no faster, as the kernel computes a whole block of samples. Up to NUMPY_BATCH images, the fully
    connected layers and the softmax run in numpy (FusedInference.probabilities), where PyTorch's
    dispatch per op would cost more than the arithmetic (docs/speed.md)."""
    from lenet import fastcpu

    return fastcpu.inference(model)


def classifier(model: nn.Module, mean: float, std: float):
    """predict() as a function from uint8 images (N, 28, 28) to numpy probabilities (N, 10)."""
    return lambda images: predict(model, images, mean, std).cpu().numpy()


def _is_conv(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)  # (out, in, k, k) or, for sparse tables, (kernels, k, k)
    return isinstance(weight, torch.Tensor) and weight.dim() >= 3


@torch.no_grad()
def feature_maps(
    model: nn.Module, image: np.ndarray | torch.Tensor, mean: float, std: float
) -> dict[str, torch.Tensor]:
    """What each convolution layer makes of one uint8 image (28, 28), by layer name, on the CPU:
    {"conv1": (6, 28, 28), "conv2": (16, 10, 10)} for classic and modern ("c1", "c3" for the 1998 nets).

    A conv layer's maps are taken after the layers that keep their shape (batch norm, the non-linearity),
    i.e. the activations that the next (pooling) layer reads. Layers with 1x1 outputs are left out.
    """
    from lenet.data import normalize
    from lenet.models import trace

    device = next(model.parameters()).device
    x = normalize(_as_batch(torch.as_tensor(image).reshape(1, 28, 28)).to(device), mean, std)
    was_training = model.training
    model.eval()
    try:
        with _convolutions_for(x):
            calls = trace(model, x)  # every layer call in forward order, whatever the model's forward is
    finally:
        model.train(was_training)
    maps: dict[str, torch.Tensor] = {}
    current, shape = None, None
    for name, layer, out in calls:
        if _is_conv(layer) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
            current, shape = name, out.shape
        elif out.shape != shape:
            current = None
        if current is not None:
            maps[current] = out[0].float().cpu()
    return maps


def first_filters(model: nn.Module) -> tuple[str, torch.Tensor]:
    """The first convolution layer's name and kernels (maps, k, k), on the CPU (in registration order)."""
    for name, layer in model.named_modules():
        if _is_conv(layer):
            weight = layer.weight.detach().float().cpu()
            return name, weight.reshape(-1, *weight.shape[-2:])
    raise ValueError("the model has no convolution layer")


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """An inference copy: each batch norm folded into the conv or linear layer before it, dropout left out,
    max-pooling over separate windows done as WindowMax. Only for nn.Sequential stacks (ours); any other
    module (a forward of the user's own) is returned as it is.

    In eval mode it computes the same function (to float rounding) with fewer layers per call, which is
    what one image's latency is made of (modern: 19 layers become 11), and faster per image on large
    batches too (docs/speed.md). Layer names are kept, so feature_maps reads the same activations.
    Other layers are shared with `model`.
    """
    if type(model) is not nn.Sequential:
        return model
    layers: list[tuple[str, nn.Module]] = []
    for name, layer in model.named_children():
        previous = layers[-1][1] if layers else None
        if isinstance(layer, nn.Dropout):
            continue
        if isinstance(layer, nn.MaxPool2d) and WindowMax.can_replace(layer):
            layers.append((name, WindowMax(layer.kernel_size)))
        elif (
            isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d))
            and layer.track_running_stats
            and isinstance(previous, (nn.Conv2d, nn.Linear))
        ):
            layers[-1] = (layers[-1][0], _fold(previous, layer))
        else:
            layers.append((name, layer))
    return nn.Sequential(OrderedDict(layers)).eval()


class WindowMax(nn.Module):
    """nn.MaxPool2d(k) (stride k, no padding): the maximum of each k x k window, for large batches as
    elementwise maxima of the k^2 strided views of the input, the same numbers.

    On the CPU max_pool2d also finds where each maximum lies, which makes modern's two pooling layers most
    of its forward time on a large batch; the maxima cost a small part of that (docs/speed.md). Small
    batches keep max_pool2d: one call there beats the 2 (k - 1) calls of the maxima.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    @staticmethod
    def can_replace(pool: nn.MaxPool2d) -> bool:
        k = pool.kernel_size
        return (
            isinstance(k, int)
            and pool.stride in (k, (k, k))
            and pool.padding in (0, (0, 0))
            and pool.dilation in (1, (1, 1))
            and not pool.ceil_mode
            and not pool.return_indices
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H // k, W // k)
        k = self.k
        if len(x) <= SMALL_BATCH:
            return nn.functional.max_pool2d(x, k)
        h, w = x.shape[-2] // k * k, x.shape[-1] // k * k  # windows that fit, as max_pool2d
        rows = x[..., 0:h:k, :w]
        for i in range(1, k):
            rows = torch.maximum(rows, x[..., i:h:k, :w])
        out = rows[..., 0::k]
        for j in range(1, k):
            out = torch.maximum(out, rows[..., j::k])
        return out

    def extra_repr(self) -> str:
        return f"kernel_size={self.k}"


@torch.no_grad()
def _fold(layer: nn.Conv2d | nn.Linear, norm: nn.BatchNorm1d | nn.BatchNorm2d) -> nn.Module:
    scale = torch.rsqrt(norm.running_var + norm.eps)  # (out,)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    folded = copy.deepcopy(layer)
    folded.weight.mul_(scale.view(-1, *[1] * (layer.weight.dim() - 1)))
    bias = shift if layer.bias is None else layer.bias * scale + shift
    folded.bias = nn.Parameter(bias.detach().clone())
    return folded


def load(checkpoint_path: str | Path, device: str = "cpu", fold: bool = True) -> tuple[nn.Module, dict]:
    """The checkpoint's model on `device`, in eval mode, and its meta.

    fold: batch norms folded into the layers before them (fold_batch_norm), for speed; `lenet explain`
    passes False so that it shows the conv1 filters exactly as trained.
    """
    from lenet import checkpoint
    from lenet.device import resolve_device

    model, meta = checkpoint.load_model(checkpoint_path, resolve_device(device))
    return (fold_batch_norm(model) if fold else model), meta
