"""Training steps behind one interface, so the epoch loop reads the same whichever runs.

A step takes a slice of the epoch's uint8 batches (`load_size` samples: one batch, or for a fused kernel
a chunk of whole batches), the learning rate and how many steps the epoch has left; it trains on it and
returns `(loss summed over the samples, correct predictions, samples used, steps taken)`, the first two as
tensors on the device (reading them would make the device wait). `make_step` picks one:

- `PlainStep`: forward, loss, backward, optimizer step on any model; on one CPU process `classic` and
  `modern` run their conv stages as fused kernels (lenet/fastcpu.py) with the same parameters; wrapped in
  DistributedDataParallel under torchrun, or torch.compile'd on request.
- `FusedSDLMStep`: lenet5-1998 with SDLM and the MAP loss on one CPU process, whole chunks of batches per
  kernel call (the paper's batch of 1 included).
- `CudaGraphStep`: on one CUDA device with Adam or AdamW, the whole step (normalise, forward, loss,
  backward, fused optimizer step, the epoch's running sums) recorded once as a CUDA graph and replayed: one
  launch per step instead of dozens, which is what a network this small spends its time on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lenet import data
from lenet.models import map_loss

MAP_J = 1.0  # the paper's constant j of the MAP loss (it gives no value; see docs/lenet5-1998.md)


def loss_of(logits: torch.Tensor, labels: torch.Tensor, loss_name: str) -> torch.Tensor:
    return map_loss(logits, labels, MAP_J) if loss_name == "map" else F.cross_entropy(logits, labels)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: float,
    std: float,
    memory_format: torch.memory_format = torch.contiguous_format,
    loss_name: str = "cross-entropy",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a uint8 batch (B, 28, 28); returns the (detached) loss and the logits."""
    x = data.normalize(images, mean, std).contiguous(memory_format=memory_format)  # (B, 1, 28, 28)
    logits = model(x)
    loss = loss_of(logits, labels, loss_name)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # a device tensor a CUDA graph reads: fill it in place
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class PlainStep:
    """One optimizer step per call on `model` (possibly a fused, DDP or compiled wrapper of it)."""

    def __init__(self, model, optimizer, mean, std, batch_size, loss_name, memory_format):
        self.model, self.optimizer, self.mean, self.std = model, optimizer, mean, std
        self.module = model  # what .train() puts in training mode
        self.load_size, self.loss_name, self.memory_format = batch_size, loss_name, memory_format
        self.drop_last = True  # every step sees a full batch

    def __call__(self, images, labels, lr: float, steps_left: int):
        set_lr(self.optimizer, lr)
        loss, logits = train_step(
            self.model,
            self.optimizer,
            images,
            labels,
            self.mean,
            self.std,
            self.memory_format,
            self.loss_name,
        )
        return loss * len(labels), (logits.argmax(1) == labels).sum(), len(labels), 1


class FusedSDLMStep:
    """Whole batches of a chunk per kernel call, each its own SDLM step at the chunk's first learning rate."""

    def __init__(self, fused, model: nn.Module, mean: float, std: float):
        self.fused, self.module, self.mean, self.std = fused, model, mean, std
        self.memory_format = torch.contiguous_format  # the kernel reads rows
        self.batch, self.load_size = fused.batch, fused.chunk
        self.drop_last = False  # a chunk's whole batches are kept; the epoch's last partial batch is not

    def __call__(self, images, labels, lr: float, steps_left: int):
        keep = min(len(labels) // self.batch, steps_left) * self.batch
        images, labels = images[:keep], labels[:keep]
        losses, logits = self.fused.step(data.normalize(images, self.mean, self.std), labels, lr)
        return losses.sum(), (logits.argmax(1) == labels).sum(), keep, keep // self.batch


class CudaGraphStep:
    """Eager steps first (WARMUP of them, on a side stream, as CUDA graph capture requires), then the step
    captured once and replayed for every batch. The batch is copied into static buffers; the learning rate
    lives in a device tensor that the fused optimizer reads, so neither needs the host to wait."""

    WARMUP = 3

    def __init__(self, model: nn.Module, optimizer, mean: float, std: float, batch_size: int, loss_name: str):
        device = next(model.parameters()).device
        self.model, self.module, self.optimizer = model, model, optimizer
        self.mean, self.std, self.loss_name = mean, std, loss_name
        self.load_size, self.drop_last, self.memory_format = batch_size, True, torch.contiguous_format
        self.pixels = torch.zeros(batch_size, 28, 28, device=device)  # 0..255, as loaded or distorted
        self.labels = torch.zeros(batch_size, dtype=torch.int64, device=device)
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.side = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on the static batch; what the graph records."""
        x = self.pixels.div(255).sub_(self.mean).div_(self.std).unsqueeze(1)  # (B, 1, 28, 28)
        logits = self.model(x)
        loss = loss_of(logits, self.labels, self.loss_name)
        loss.backward()
        self.optimizer.step()
        return loss.detach() * len(self.labels), (logits.argmax(1) == self.labels).sum()

    def __call__(self, images, labels, lr: float, steps_left: int):
        set_lr(self.optimizer, lr)
        self.pixels.copy_(images)
        self.labels.copy_(labels)
        if self.graph is None and self.eager_steps < self.WARMUP:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.optimizer.zero_grad(set_to_none=True)
                outputs = self._step()
            torch.cuda.current_stream().wait_stream(self.side)
            self.eager_steps += 1
            return (*outputs, len(labels), 1)
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=True)  # backward in the graph then writes the gradients
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self._step()
        self.graph.replay()
        return (*self.outputs, len(labels), 1)


def describe_step(step, device: torch.device, world_size: int, cfg) -> str:
    """How this run's steps are taken, in words, with why where a faster path does not apply."""
    if isinstance(step, CudaGraphStep):
        return "one CUDA graph per step (captured after 3 eager steps), fused optimizer"
    if isinstance(step, FusedSDLMStep):
        return "the fused SDLM kernel, whole chunks of batches per call"
    if device.type == "cuda":
        why = (
            "under torchrun DDP's gradient hooks are not captured"
            if world_size > 1
            else "--compile is on"
            if cfg.compile
            else f"only Adam and AdamW are captured, not {cfg.optimizer}"
        )
        return f"plain PyTorch (no CUDA graph: {why})"  # fmt: skip
    fused = type(step.model).__name__ in ("FastClassic", "FastModern")
    return "the fused CPU kernels for the conv stages" if fused else "plain PyTorch"


def _is_builtin_sequential(model: nn.Module) -> bool:
    # our models are nn.Sequential stacks; a user's forward may use x.view, which channels-last breaks
    return type(model) is nn.Sequential


def make_step(cfg, model: nn.Module, optimizer, mean: float, std: float, device, world_size: int):
    """The step for this run, and the module to evaluate with (sharing the model's parameters)."""
    from lenet import fastcpu

    single_cpu = device.type == "cpu" and world_size == 1 and not cfg.compile
    if device.type == "cuda" and world_size == 1 and not cfg.compile and cfg.optimizer in ("adam", "adamw"):
        # (under torchrun, DDP's gradient hooks are not captured: those processes take plain steps)
        return CudaGraphStep(model, optimizer, mean, std, cfg.batch_size, cfg.loss), model
    if single_cpu and cfg.loss == "map":
        fused = fastcpu.fused_sdlm(model, optimizer, MAP_J)
        if fused is not None:
            return FusedSDLMStep(fused, model, mean, std), model
    train_model = eval_model = (fastcpu.fast_forward(model) or model) if single_cpu else model
    # Channels-last lets oneDNN pick faster convolution kernels on CPU, but CPU batch norm is slower in it and
    # the fused kernels read rows (it would cost them a weight copy per step): only plain models without
    # batch norm switch (docs/speed.md).
    has_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    plain = train_model is model and _is_builtin_sequential(model)
    channels_last = device.type == "cpu" and not has_norm and plain
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        if cfg.sync_batchnorm:  # swaps the norm layers in place, sharing their parameters and buffers
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)
    step = PlainStep(train_model, optimizer, mean, std, cfg.batch_size // world_size, cfg.loss, memory_format)
    return step, eval_model
