"""Stochastic diagonal Levenberg-Marquardt (the 1998 paper's appendix C).

Each parameter w_k gets its own step size eta / (mu + h_kk), where h_kk is a Gauss-Newton estimate of the
second derivative of the per-sample loss with respect to w_k, averaged over a few hundred samples and
re-estimated before every pass. The estimate back-propagates second derivatives the way gradients are
back-propagated, with every weight squared and every activation's slope squared, dropping off-diagonal
terms:

    d2E/da_i^2 = f'(a_i)^2 * sum_k w_ki^2 * d2E/da_k^2       (a unit's input a_i, output x_i = f(a_i))
    h_kk       = sum over the connections that share w_k of d2E/da_i^2 * x_j^2

Those are exactly the vector-Jacobian products of a "squared" copy of the network (weights w^2, slopes
f'(a)^2, applied to the inputs x^2 each layer saw), so autograd computes them: see `curvature`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lenet.errors import LenetError
from lenet.models import SQUASH_A, SQUASH_S, EuclideanRBF, ScaledTanh, SparseConv2d, Subsampling

HESSIAN_SAMPLES = 500  # the paper re-estimates on 500 samples before each pass
MU = 0.02  # the paper's mu


_LINEAR = (nn.Conv2d, nn.Linear, SparseConv2d, Subsampling)


def _slope(layer: nn.Module, a: torch.Tensor) -> torch.Tensor | None:
    """f'(a) for an elementwise activation; None for any other layer."""
    if isinstance(layer, ScaledTanh):
        return SQUASH_A * SQUASH_S * (1 - torch.tanh(SQUASH_S * a) ** 2)
    if isinstance(layer, nn.Tanh):
        return 1 - torch.tanh(a) ** 2
    if isinstance(layer, nn.Sigmoid):
        s = torch.sigmoid(a)
        return s * (1 - s)
    if isinstance(layer, nn.ReLU):
        return (a > 0).to(a.dtype)
    return None


def _squared_layer(layer: nn.Module, x: torch.Tensor, s: torch.Tensor, leaves: dict) -> torch.Tensor:
    """One layer of the squared network. x: what the layer saw in the forward pass; s: the squared
    network's signal from below (its values do not matter, only its vector-Jacobian products do)."""
    params = dict(layer.named_parameters())
    if isinstance(layer, _LINEAR):  # linear in its input and in each weight: weights squared, bias as is
        squared = {n: p.detach() if n == "bias" else p.detach() ** 2 for n, p in params.items()}
        wrt = {n: t.clone().requires_grad_() for n, t in squared.items()}
        for n, p in params.items():
            leaves[p] = wrt[n]
        # the gradient w.r.t. `wrt` is d2E/da^2 times x^2 summed over the units sharing each weight;
        # the gradient w.r.t. s carries d2E/da^2 down through the squared weights.
        return functional_call(layer, wrt, (x.detach() ** 2,)) + functional_call(layer, squared, (s,))
    slope = _slope(layer, x)
    if slope is not None:
        return s * slope.detach() ** 2
    if isinstance(layer, (nn.Flatten, nn.ConstantPad2d, nn.ZeroPad2d, nn.Identity)):
        return layer(s)  # moves or copies values: coefficients 0 and 1, their own squares
    if isinstance(layer, nn.AvgPool2d):
        k = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
        return layer(s) / k**2  # coefficients 1/k^2 squared
    raise LenetError(  # e.g. batch norm (its weight is not the input's coefficient) or max pooling
        f"--optimizer sdlm: cannot estimate curvature through layer {type(layer).__name__} "
        "(supported: convolution, linear, subsampling, tanh/sigmoid/ReLU, pooling, flatten, padding)"
    )


def curvature(model: nn.Sequential, x: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample Gauss-Newton diagonal h_kk, averaged over the normalised images x (N, 1, 28, 28).

    At the output: an EuclideanRBF layer's correct-class penalty y_D = sum_j (x_j - w_Dj)^2 has second
    derivative 2 w.r.t. every input x_j (the MAP term's curvature is left out, as it keeps the
    estimate positive); logits trained with cross-entropy have p (1 - p).
    """
    layers = list(model)
    param_layers = [i for i, layer in enumerate(layers) if any(True for _ in layer.parameters())]
    if not param_layers:
        raise LenetError("--optimizer sdlm: the model has no parameters")
    inputs = []
    with torch.no_grad():
        h = x
        for layer in layers:
            inputs.append(h)
            h = layer(h)
    if isinstance(layers[-1], EuclideanRBF):
        top, seed = len(layers) - 1, torch.full_like(inputs[-1], 2.0)
    else:
        p = F.softmax(h, dim=1)
        top, seed = len(layers), p * (1 - p)
    leaves: dict[nn.Parameter, torch.Tensor] = {}
    with torch.enable_grad():
        s = torch.zeros_like(inputs[param_layers[0]])
        for i in range(param_layers[0], top):
            s = _squared_layer(layers[i], inputs[i], s, leaves)
        grads = torch.autograd.grad(s, list(leaves.values()), grad_outputs=seed)
    return {p: g / len(x) for p, g in zip(leaves, grads, strict=True)}


class SDLM(torch.optim.Optimizer):
    """w_k -= B lr / (B mu + h_kk) * dE/dw_k, with h from `set_curvature` and B = samples_per_step.

    lr is the paper's per-sample global rate eta and mu its safety term; the gradient is the mean over a
    batch of B samples. Where the curvature is well known (h_kk >> B mu) one step stands for B per-sample
    steps, B eta / h_kk. Where it is small or badly estimated, mu bounds the step: at B mu the bound is
    the paper's own per-sample bound eta / mu, no larger; at mu it would be B times larger, and batches of
    8 or 16 then diverge (docs/lenet5-1998.md). B = 1 is the paper's rule exactly. Until set_curvature is
    called h is 0.
    """

    def __init__(self, params, lr: float, mu: float = MU, samples_per_step: int = 1):
        if lr <= 0 or mu <= 0 or samples_per_step < 1:
            raise ValueError(f"need lr, mu > 0 and samples_per_step >= 1; got {lr}, {mu}, {samples_per_step}")
        super().__init__(params, dict(lr=lr, mu=mu, samples_per_step=samples_per_step))

    @torch.no_grad()
    def set_curvature(self, hessian: dict[nn.Parameter, torch.Tensor]) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p in hessian:
                    self.state[p]["hessian"] = hessian[p].to(p.dtype).clone()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            scale = group["lr"] * group["samples_per_step"]
            mu = group["mu"] * group["samples_per_step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                h = self.state[p].get("hessian")
                denominator = mu + (h if h is not None else torch.zeros_like(p))
                p.addcdiv_(p.grad, denominator, value=-scale)
        return loss
