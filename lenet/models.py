"""The LeNet family as plain nn.Sequential stacks with named layers.

Pure: no I/O, no device logic, no printing. Every model is an nn.Sequential, so the tutorial's
`for layer in net: X = layer(X)` loop works on it and each layer has a readable name.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

MODEL_NAMES = ("classic", "modern")


def classic() -> nn.Sequential:
    """The tutorial LeNet exactly: sigmoids, average pooling, 61,706 parameters. Input (N, 1, 28, 28)."""
    net = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 6, kernel_size=5, padding=2),  # (N, 6, 28, 28)
            act1=nn.Sigmoid(),
            pool1=nn.AvgPool2d(kernel_size=2, stride=2),  # (N, 6, 14, 14)
            conv2=nn.Conv2d(6, 16, kernel_size=5),  # (N, 16, 10, 10)
            act2=nn.Sigmoid(),
            pool2=nn.AvgPool2d(kernel_size=2, stride=2),  # (N, 16, 5, 5)
            flatten=nn.Flatten(),  # (N, 400)
            fc1=nn.Linear(16 * 5 * 5, 120),
            act3=nn.Sigmoid(),
            fc2=nn.Linear(120, 84),
            act4=nn.Sigmoid(),
            fc3=nn.Linear(84, 10),
        )
    )
    # Xavier init suits sigmoid units (PyTorch's default Kaiming-uniform leaves them slow to start).
    for layer in net:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return net


def modern(dropout: float = 0.25) -> nn.Sequential:
    """The classic skeleton (6 and 16 maps, 120-84-10) with batch norm, ReLU, max pooling and dropout."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 6, kernel_size=5, padding=2, bias=False),  # (N, 6, 28, 28)
            bn1=nn.BatchNorm2d(6),
            act1=nn.ReLU(),
            pool1=nn.MaxPool2d(kernel_size=2, stride=2),  # (N, 6, 14, 14)
            conv2=nn.Conv2d(6, 16, kernel_size=5, bias=False),  # (N, 16, 10, 10)
            bn2=nn.BatchNorm2d(16),
            act2=nn.ReLU(),
            pool2=nn.MaxPool2d(kernel_size=2, stride=2),  # (N, 16, 5, 5)
            flatten=nn.Flatten(),  # (N, 400)
            fc1=nn.Linear(16 * 5 * 5, 120, bias=False),
            bn3=nn.BatchNorm1d(120),
            act3=nn.ReLU(),
            drop3=nn.Dropout(dropout),
            fc2=nn.Linear(120, 84, bias=False),
            bn4=nn.BatchNorm1d(84),
            act4=nn.ReLU(),
            drop4=nn.Dropout(dropout),
            fc3=nn.Linear(84, 10),
        )
    )


_BUILDERS = {"classic": classic, "modern": modern}


def build(name: str, **kwargs) -> nn.Sequential:
    """Build a model by name; kwargs go to its constructor (and are stored in checkpoints)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_table(model: nn.Sequential, input_shape: tuple[int, ...] = (1, 28, 28), batch: int = 1):
    """Rows of (layer name, output shape without the batch dim, parameter count), one per layer."""
    rows = []
    was_training = model.training
    model.eval()
    x = torch.zeros(batch, *input_shape)
    with torch.no_grad():
        for name, layer in model.named_children():
            try:
                x = layer(x)
            except RuntimeError as e:
                shape = "x".join(map(str, input_shape))
                raise ValueError(
                    f"input {shape} does not fit layer {name}: {str(e).splitlines()[0]}"
                ) from None
            rows.append((name, tuple(x.shape[1:]), count_parameters(layer)))
    model.train(was_training)
    return rows
