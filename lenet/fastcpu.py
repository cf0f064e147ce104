"""Faster CPU training: the conv stages of `classic` and `modern`, and the whole SDLM training step of
`lenet5-1998` (`fused_sdlm`), as fused C++ kernels; also augment.affine's resampling (`affine_warp`).

The kernels (csrc/fused_lenet.cpp, plain C++ with OpenMP) are compiled on first use (lenet/native.py).
`fast_forward(model)` wraps a classic or modern model in a module that computes the same function
with the same parameters (gradients equal autograd's within float rounding; modern's batch norms update
their running statistics as nn.BatchNorm2d does, and in eval mode normalise with them); it returns None,
and the caller keeps the plain model, when the model is neither, not a float32 CPU model, the kernel cannot
be built, or LENET_NO_EXT=1 is set."""

from __future__ import annotations

import ctypes
import functools
import weakref

import numpy as np
import torch
from torch import nn

from lenet import native

_lib: ctypes.CDLL | None = None
_P = ctypes.c_void_p
# model -> (the ids of its layers, its FusedInference or None)
_inference: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_extension() -> ctypes.CDLL | None:
    """The compiled kernels (native.load): None when they cannot be built or LENET_NO_EXT=1."""
    global _lib
    lib = native.load()
    if lib is not None:
        _lib = lib
    return lib


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class _ClassicFeatures(torch.autograd.Function):
    """(N, 1, 28, 28) -> (N, 400): conv1, sigmoid, pool1, conv2, sigmoid, pool2, flatten; no input grad."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, workspace):
        lib, n = _lib, len(x)
        w1, b1, w2, b2 = (t.detach().contiguous() for t in (w1, b1, w2, b2))
        out = x.new_empty(n, 400)
        s1, p1, s2 = _activations(workspace, n)
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


def _activations(workspace: list[torch.Tensor] | None, n: int) -> list[torch.Tensor]:
    """The saved-activation buffers (s1, p1, s2) for n samples, reused from `workspace` when it has the
    right size: (blocks, floats per block) each, a block holding as many samples as the kernel has lanes.

    Fresh multi-megabyte buffers every step cost about as much as the kernel's forward pass (page faults).
    A graph still holding the previous buffers gets autograd's clear in-place-modification error on
    backward (the empty in-place write below bumps their version), never silently wrong gradients.
    """
    blocks = -(-n // _lib.lenet_sizes(4))
    if workspace is None:
        return [torch.empty(blocks, _lib.lenet_sizes(i)) for i in range(3)]
    if not workspace or len(workspace[0]) != blocks:
        workspace[:] = [torch.empty(blocks, _lib.lenet_sizes(i)) for i in range(3)]
    else:
        for t in workspace[:3]:
            t[:0].zero_()
    return workspace[:3]


def _gradient_buffers(workspace: list[torch.Tensor] | None, *activations: torch.Tensor) -> list[torch.Tensor]:
    """Buffers shaped like the activations for backward's intermediate gradients, kept after them in
    `workspace` (they never outlive one backward call), so that a step reuses the previous step's pages."""
    if workspace is None:
        return [torch.empty_like(a) for a in activations]
    if [g.shape for g in workspace[3:]] != [a.shape for a in activations]:
        workspace[3:] = [torch.empty_like(a) for a in activations]
    return workspace[3:]


class _ModernFeatures(torch.autograd.Function):
    """(N, 1, 28, 28) -> (N, 400) in training mode: conv1, bn1, ReLU, pool1, conv2, bn2, ReLU, pool2, flatten.

    Batch norm uses the batch's statistics, and the running statistics of bn1 and bn2 are updated as
    nn.BatchNorm2d updates them. Statistics and the coefficients of batch norm's backward are computed here
    in float64 from per-channel sums the kernel returns.
    """

    @staticmethod
    def forward(ctx, x, w1, g1, b1, w2, g2, b2, bn1, bn2, workspace):
        lib, n, threads = _lib, len(x), torch.get_num_threads()
        w1, w2 = w1.detach().contiguous(), w2.detach().contiguous()
        z1, p1, z2 = _activations(workspace, n)
        stats1 = torch.empty(12, dtype=torch.float64)
        lib.modern_conv1(_ptr(x), n, _ptr(w1), _ptr(z1), _ptr(stats1), threads)
        scale1, shift1, norm1 = _batch_norm(stats1, n * 28 * 28, g1, b1, bn1)
        stats2 = torch.empty(32, dtype=torch.float64)
        lib.modern_conv2(
            _ptr(z1), n, _ptr(scale1), _ptr(shift1), _ptr(w2), _ptr(p1), _ptr(z2), _ptr(stats2), threads
        )
        scale2, shift2, norm2 = _batch_norm(stats2, n * 10 * 10, g2, b2, bn2)
        out = x.new_empty(n, 400)
        lib.modern_pool2(_ptr(z2), n, _ptr(scale2), _ptr(shift2), _ptr(out), threads)
        ctx.save_for_backward(x, w2, z1, p1, z2, scale1, shift1, scale2, shift2)
        ctx.norms, ctx.workspace = (norm1, norm2), workspace
        return out

    @staticmethod
    def backward(ctx, grad):
        lib, threads = _lib, torch.get_num_threads()
        x, w2, z1, p1, z2, scale1, shift1, scale2, shift2 = ctx.saved_tensors
        norm1, norm2 = ctx.norms
        n = len(x)
        grad = grad.contiguous()
        dy1, dy2 = _gradient_buffers(ctx.workspace, z1, z2)
        sums2, sums1 = torch.empty(32, dtype=torch.float64), torch.empty(12, dtype=torch.float64)
        lib.modern_back_pool2(
            _ptr(grad), n, _ptr(z2), _ptr(scale2), _ptr(shift2), _ptr(dy2), _ptr(sums2), threads
        )
        coef2, gg2, gb2 = _batch_norm_backward(sums2, n * 10 * 10, norm2)
        gw2 = torch.empty(2400)
        lib.modern_back_conv2(
            _ptr(dy2),
            n,
            _ptr(z2),
            _ptr(coef2),
            _ptr(p1),
            _ptr(w2),
            _ptr(z1),
            _ptr(scale1),
            _ptr(shift1),
            _ptr(dy1),
            _ptr(gw2),
            _ptr(sums1),
            threads,
        )
        coef1, gg1, gb1 = _batch_norm_backward(sums1, n * 28 * 28, norm1)
        gw1 = torch.empty(150)
        lib.modern_back_conv1(_ptr(dy1), _ptr(x), n, _ptr(z1), _ptr(coef1), _ptr(gw1), threads)
        return None, gw1.view(6, 1, 5, 5), gg1, gb1, gw2.view(16, 6, 5, 5), gg2, gb2, None, None, None


def _batch_norm(
    stats: torch.Tensor, count: int, gamma: torch.Tensor, beta: torch.Tensor, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Per-channel sums and sums of squares of a conv output -> batch norm as y = z * scale + shift, and
    what backward needs; updates bn's running statistics (momentum, unbiased variance) as PyTorch does."""
    channels = len(gamma)
    mean = stats[:channels] / count
    var = (stats[channels:] / count - mean * mean).clamp_(min=0)  # biased, as the batch normalises with
    invstd = (var + bn.eps).rsqrt()
    g = gamma.detach().double()
    scale = (g * invstd).float()
    shift = (beta.detach().double() - mean * g * invstd).float()
    if bn.track_running_stats and bn.running_mean is not None:
        bn.num_batches_tracked += 1
        momentum = bn.momentum if bn.momentum is not None else 1 / float(bn.num_batches_tracked)
        bn.running_mean.lerp_(mean.float(), momentum)
        bn.running_var.lerp_((var * count / max(count - 1, 1)).float(), momentum)
    return scale, shift, (mean, invstd, g)


def _batch_norm_backward(sums: torch.Tensor, count: int, norm: tuple) -> tuple[torch.Tensor, ...]:
    """Per-channel sums of dy and dy * z -> (coefficients a, bz, c with dz = a dy + bz z + c, as one
    float32 tensor; d gamma; d beta)."""
    mean, invstd, g = norm
    channels = len(mean)
    sum_dy, sum_dyz = sums[:channels], sums[channels:]
    d_gamma = invstd * (sum_dyz - mean * sum_dy)  # sum of dy * xhat
    a = g * invstd
    bz = -a * invstd * d_gamma / count
    c = -a * sum_dy / count - bz * mean
    return torch.cat([a, bz, c]).float(), d_gamma.float(), sum_dy.float()


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
        if torch.is_grad_enabled():
            feats = _ClassicFeatures.apply(  # (N, 400)
                x.contiguous(),
                net.conv1.weight,
                net.conv1.bias,
                net.conv2.weight,
                net.conv2.bias,
                self._workspace,
            )
        else:  # evaluation: no activations kept
            feats = _classic_infer(x.contiguous(), net)
        h = torch.sigmoid(net.fc1(feats))  # (N, 120)
        h = torch.sigmoid(net.fc2(h))  # (N, 84)
        return net.fc3(h)  # (N, 10)


class FastModern(nn.Module):
    """`modern` with the fused kernels; shares the wrapped model's parameters and buffers.

    In training mode the kernels normalise with the batch's statistics and update the running ones; in eval
    mode without autograd (evaluation, prediction) they normalise with the running statistics. In eval mode
    with autograd, and for inputs the kernels cannot handle, the plain model runs, so the result is always
    the model's function.
    """

    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net
        self.head = net[list(dict(net.named_children())).index("flatten") + 1 :]  # fc1 ... fc3, shared
        self._workspace: list[torch.Tensor] = []
        self.train(net.training)  # a wrapper of a model in eval mode starts in eval mode too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        training = net.bn1.training  # the conv stages' batch norms decide, as they would in the plain model
        if (
            net.bn2.training != training
            or (not training and torch.is_grad_enabled())
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or x.shape[1:] != (1, 28, 28)
            or x.requires_grad
        ):
            return net(x)
        if not training:
            return self.head(_modern_infer(x.contiguous(), net))  # (N, 10)
        workspace = self._workspace if torch.is_grad_enabled() else None
        feats = _ModernFeatures.apply(  # (N, 400)
            x.contiguous(),
            net.conv1.weight,
            net.bn1.weight,
            net.bn1.bias,
            net.conv2.weight,
            net.bn2.weight,
            net.bn2.bias,
            net.bn1,
            net.bn2,
            workspace,
        )
        return self.head(feats)  # (N, 10)


def _infer_threads(n: int) -> int:
    # one thread per block of samples at most: a spare thread would only wait
    return max(1, min(torch.get_num_threads(), -(-n // _lib.lenet_sizes(4))))


def _classic_infer(x: torch.Tensor, net: nn.Sequential) -> torch.Tensor:
    """(N, 1, 28, 28) contiguous -> (N, 400): classic's conv stages, without autograd."""
    params = [
        t.detach().contiguous() for t in (net.conv1.weight, net.conv1.bias, net.conv2.weight, net.conv2.bias)
    ]
    feats = x.new_empty(len(x), 400)
    _lib.lenet_infer(_ptr(x), len(x), *map(_ptr, params), _ptr(feats), _infer_threads(len(x)))
    return feats


def _modern_infer(x: torch.Tensor, net: nn.Sequential) -> torch.Tensor:
    """(N, 1, 28, 28) -> (N, 400) in eval mode: each batch norm as y = z * scale + shift from its running
    statistics."""
    folded = []
    for bn in (net.bn1, net.bn2):
        scale = bn.weight.detach() * (bn.running_var + bn.eps).rsqrt()
        folded += [scale, bn.bias.detach() - bn.running_mean * scale]
    return _modern_kernel(x, net.conv1.weight, *folded[:2], net.conv2.weight, *folded[2:])


def _modern_kernel(x, w1, scale1, shift1, w2, scale2, shift2) -> torch.Tensor:
    """(N, 1, 28, 28) contiguous -> (N, 400): modern's conv stages, each conv's output z taken to
    relu(z * scale + shift) per channel, then max-pooled; without autograd."""
    w1, w2 = w1.detach().contiguous(), w2.detach().contiguous()
    feats = x.new_empty(len(x), 400)
    _lib.modern_infer(_ptr(x), len(x), _ptr(w1), _ptr(scale1), _ptr(shift1), _ptr(w2), _ptr(scale2),
                      _ptr(shift2), _ptr(feats), _infer_threads(len(x)))  # fmt: skip
    return feats


def _same_layers(model: nn.Module, build) -> bool:
    """Whether model is an nn.Sequential with the same named layers (types and settings) as build()."""
    return isinstance(model, nn.Sequential) and _layers(model) == _reference_layers(build)


def _layers(model: nn.Sequential) -> list[tuple[str, type, str | None]]:
    # any dropout rate
    return [(name, type(layer), None if isinstance(layer, nn.Dropout) else layer.extra_repr())
            for name, layer in model.named_children()]  # fmt: skip


@functools.cache
def _reference_layers(build) -> list[tuple[str, type, str | None]]:
    with torch.random.fork_rng(devices=[]):  # building the reference must not shift the caller's RNG
        return _layers(build())


def _folded_modern() -> nn.Sequential:
    from lenet.models import modern
    from lenet.predict import fold_batch_norm

    return fold_batch_norm(modern())


class FusedInference(nn.Module):
    """Logits (N, 10) of an inference-time `classic`, or `modern` with its batch norms folded
    (predict.fold_batch_norm, as predict.load gives it), from normalised float32 CPU inputs (N, 1, 28, 28),
    by the fused kernels: the wrapped model's function to float rounding. It reads the model's parameters
    at every call, so it follows a model that is still training. Without autograd only (predict_logits);
    with it, or for other inputs, the plain model runs in eval mode. It holds the model weakly: `inference`
    keeps one per model."""

    def __init__(self, net: nn.Sequential, kind: str):
        super().__init__()
        self._net, self.kind = weakref.ref(net), kind
        self.training = False  # (eval() would switch the wrapped model too)
        self._scales = torch.ones(6), torch.ones(16)  # modern's, folded: the batch norm is the conv's bias
        self._arrays: tuple[tuple, list[np.ndarray]] = ((), [])  # the parameters' addresses, numpy views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self._net()
        c1, c2, f1, f2, f3 = net.conv1, net.conv2, net.fc1, net.fc2, net.fc3
        if (
            torch.is_grad_enabled()
            or not x.is_cpu
            or x.shape[1:] != (1, 28, 28)
            or x.dtype != torch.float32
            or any(t.dtype != torch.float32 for t in _parameters(net))
        ):
            return _in_eval_mode(net, x)
        x = x.contiguous()
        if self.kind == "classic":
            feats, act = _classic_infer(x, net), torch.sigmoid  # (N, 400)
        else:
            s1, s2 = self._scales
            feats, act = _modern_kernel(x, c1.weight, s1, c1.bias, c2.weight, s2, c2.bias), torch.relu
        h = act(nn.functional.linear(feats, f1.weight, f1.bias))  # (N, 120)
        h = act(nn.functional.linear(h, f2.weight, f2.bias))  # (N, 84)
        return nn.functional.linear(h, f3.weight, f3.bias)  # (N, 10)

    def probabilities(self, images: np.ndarray, mean: float, std: float) -> np.ndarray | None:
        """Class probabilities (N, 10) float32 of uint8 images (N, 28, 28) as numpy, normalised as
        data.normalize does: the same kernels, then numpy for the fully connected layers and the softmax, so
        without a PyTorch op per layer, whose dispatch costs more than the arithmetic on a few dozen images
        (the candidates `read` classifies at once: docs/speed.md). forward's function to float rounding;
        None where forward would not compute it (parameters other than float32)."""
        params = self._numpy_parameters()
        if params is None:
            return None
        w1, b1, w2, b2, f1, g1, f2, g2, f3, g3 = params
        x = _levels(mean, std).take(images)  # (N, 28, 28) float32, C-contiguous
        n, threads = len(x), _infer_threads(len(x))
        feats = np.empty((n, 400), dtype=np.float32)
        if self.kind == "classic":
            conv = (w1, b1, w2, b2)
            _lib.lenet_infer(x.ctypes.data, n, *(a.ctypes.data for a in conv), feats.ctypes.data, threads)
            act = _sigmoid
        else:
            conv = (w1, self._scales[0].numpy(), b1, w2, self._scales[1].numpy(), b2)  # folded: scales 1
            _lib.modern_infer(x.ctypes.data, n, *(a.ctypes.data for a in conv), feats.ctypes.data, threads)
            act = _relu
        logits = act(act(feats @ f1.T + g1) @ f2.T + g2) @ f3.T + g3  # (N, 120), (N, 84), (N, 10)
        logits = np.exp(logits - logits.max(1, keepdims=True), out=logits)
        return logits / logits.sum(1, keepdims=True)

    def _numpy_parameters(self) -> list[np.ndarray] | None:
        """The wrapped model's parameters as contiguous numpy views, kept while the tensors stay where they
        are (an optimizer's steps update them in place); None where one is not float32. Copies of tensors
        that are not contiguous are made at every call, so that they too follow such updates."""
        tensors = _parameters(self._net())
        where = tuple(t.data_ptr() for t in tensors)
        if where != self._arrays[0]:
            if any(t.dtype != torch.float32 for t in tensors):
                return None
            arrays = [np.ascontiguousarray(t.detach().numpy()) for t in tensors]
            if not all(t.is_contiguous() for t in tensors):
                return arrays
            self._arrays = where, arrays
        return self._arrays[1]


def _parameters(net: nn.Sequential) -> list[torch.Tensor]:
    """The weight and bias of conv1, conv2, fc1, fc2 and fc3, in that order: what the fused paths read."""
    return [t for m in (net.conv1, net.conv2, net.fc1, net.fc2, net.fc3) for t in (m.weight, m.bias)]


@functools.lru_cache(maxsize=16)
def _levels(mean: float, std: float) -> np.ndarray:
    """(256,) float32: each grey level as data.normalize makes it."""
    from lenet.data import normalize

    return normalize(torch.arange(256, dtype=torch.uint8).view(1, 16, 16), mean, std).numpy().ravel()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.reciprocal(np.exp(np.negative(x, out=x), out=x) + 1, out=x)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0, out=x)


def _in_eval_mode(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = net.training
    net.eval()
    try:
        return net(x)
    finally:
        net.train(was_training)


def inference(model: nn.Module) -> FusedInference | None:
    """The fused kernels as `model`'s forward for predictions, or None when they do not compute it: model
    must be a `classic` or a folded `modern` (FusedInference), and the kernel built (not LENET_NO_EXT=1)."""
    layers = tuple(map(id, model.children()))
    known = _inference.get(model)
    if known is None or known[0] != layers:  # (the layers' settings are compared once per model)
        kind = _kind(model)
        known = _inference[model] = (layers, kind and FusedInference(model, kind))
    return known[1] if known[1] is not None and load_extension() is not None else None


def _kind(model: nn.Module) -> str | None:
    from lenet.models import classic

    if _same_layers(model, classic):
        return "classic"
    return "modern" if _same_layers(model, _folded_modern) else None


def affine_warp(images: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """augment.affine's resampling of uint8 CPU images (N, H, W) with its per-image coefficients (N, 5):
    float32 (N, H, W) in [0, 255]. Needs the kernel (load_extension)."""
    images, coef = images.contiguous(), coef.to(torch.float32).contiguous()
    out = torch.empty(images.shape, dtype=torch.float32)
    n, height, width = images.shape
    _lib.affine_warp(_ptr(images), n, height, width, _ptr(coef), _ptr(out), torch.get_num_threads())
    return out


def fma_gflop_s(rounds: int = 20_000_000, repeats: int = 3) -> float:
    """GFLOP/s of independent fused multiply-adds on the kernels' vectors at the current thread count, best
    of repeats: this CPU's peak fp32 rate as the kernels can use it. Needs the kernel (load_extension)."""
    return max(_lib.lenet_fma_rate(rounds, torch.get_num_threads()) for _ in range(repeats)) / 1e9


FUSED_CHUNK = 100  # about this many samples per kernel call: a Python round trip per ~100 samples


class FusedSDLM:
    """lenet5-1998 trained by SDLM with the MAP loss, whole chunks of samples per kernel call.

    `step(x, labels, lr)` runs the optimizer's steps over len(x) samples (a multiple of its batch size B,
    `samples_per_step`): after every B samples, w -= lr / (B mu + h) * (sum of their dE/dw), h the
    optimizer's curvature for the pass. That is `SDLM.step` on the batch's mean gradient, without a Python
    round trip per batch; at B = 1, the paper's update after every sample. Returns the loss (N,) and the
    outputs (N, 10) of each sample. `fused_sdlm` gives one, or None when the kernel does not apply.
    """

    def __init__(self, model: nn.Sequential, optimizer, j: float):
        self.params = [p for _, p in model.named_parameters()]
        self.optimizer, self.j = optimizer, float(j)
        self.batch = optimizer.param_groups[0]["samples_per_step"]
        self.chunk = self.batch * max(1, FUSED_CHUNK // self.batch)  # samples per call: whole batches
        table = model.c3.table
        self.pairs = torch.tensor(
            [[o, i] for o, inputs in enumerate(table) for i in inputs], dtype=torch.int32
        )
        self.centres = model.output.centres.detach().contiguous()
        self.pad = float(model.pad.value)
        self.grads = [torch.zeros_like(p) for p in self.params]  # sums over a batch; zero between calls
        self._params = (_P * len(self.params))(*map(_ptr, self.params))
        self._grads = (_P * len(self.grads))(*map(_ptr, self.grads))
        self._hessians: list = []
        self._scales: list[torch.Tensor] = []
        self._scale_ptrs = None

    def _step_scales(self):
        """1 / (B mu + h) per parameter element, recomputed when the optimizer's curvature changes."""
        state = self.optimizer.state
        hessians = [state[p].get("hessian") for p in self.params]
        if self._scale_ptrs is None or any(a is not b for a, b in zip(hessians, self._hessians, strict=True)):
            mu = self.optimizer.param_groups[0]["mu"] * self.batch
            self._scales = [
                1.0 / (mu + (h if h is not None else torch.zeros_like(p))).contiguous()
                for p, h in zip(self.params, hessians, strict=True)
            ]
            self._hessians = hessians
            self._scale_ptrs = (_P * len(self._scales))(*map(_ptr, self._scales))
        return self._scale_ptrs

    @torch.no_grad()
    def step(self, x: torch.Tensor, labels: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        x, labels = x.contiguous(), labels.to(torch.int64).contiguous()  # (N, 1, 28, 28), (N,)
        n = len(x)
        if n % self.batch:
            raise ValueError(f"{n} samples are not whole batches of {self.batch}")
        losses, outputs = x.new_empty(n), x.new_empty(n, 10)
        _lib.lenet5_sdlm_train(
            _ptr(x), _ptr(labels), n, self.batch, self._params, self._step_scales(), self._grads,
            _ptr(self.pairs), _ptr(self.centres), lr, self.pad, self.j, _ptr(outputs), _ptr(losses),
        )  # fmt: skip
        return losses, outputs


def fused_sdlm(model: nn.Module, optimizer, j: float) -> FusedSDLM | None:
    """A FusedSDLM for a float32, contiguous CPU lenet5-1998 and an SDLM optimizer, or None."""
    from lenet.models import C3_TABLE, lenet5_1998
    from lenet.sdlm import SDLM

    if not _same_layers(model, lenet5_1998) or not isinstance(optimizer, SDLM):
        return None
    if len(optimizer.param_groups) != 1 or model.c3.table != C3_TABLE:
        return None
    if tuple(model.output.centres.shape) != (10, 84):
        return None
    if any(
        p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous()
        for p in model.parameters()
    ):
        return None
    if load_extension() is None:
        return None
    return FusedSDLM(model, optimizer, j)


def fast_forward(model: nn.Module) -> FastClassic | FastModern | None:
    """A FastClassic or FastModern sharing `model`'s parameters, or None when no fused path applies."""
    from lenet.models import classic, modern

    wrapper = (
        FastClassic if _same_layers(model, classic) else FastModern if _same_layers(model, modern) else None
    )
    if wrapper is None:
        return None
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        return None
    if load_extension() is None:
        return None
    return wrapper(model)
