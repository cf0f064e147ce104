"""The LeNet family as plain nn.Sequential stacks with named layers.

Pure: no I/O, no device logic, no printing. Every model is an nn.Sequential, so the tutorial's
`for layer in net: X = layer(X)` loop works on it and each layer has a readable name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lenet.config import MODELS as MODEL_NAMES

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
POOLS = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


def lenet(activation: str, pool: str, batch_norm: bool, dropout: float | None) -> nn.Sequential:
    """The tutorial's skeleton (conv 6@5x5 pad 2, pool, conv 16@5x5, pool, FC 400-120-84-10) with a choice
    of each "modern improvement": the activation, the pooling, batch norm after every conv and hidden FC
    layer (which then have no bias of their own), and dropout after the hidden FC layers (None: no dropout
    layers at all; 0 keeps them, inactive)."""
    if activation not in ACTIVATIONS or pool not in POOLS:
        raise ValueError(
            f"activation in {', '.join(ACTIVATIONS)} and pool in {', '.join(POOLS)}, got {activation}, {pool}"
        )
    act, pooling = ACTIVATIONS[activation], POOLS[pool]
    layers: list[tuple[str, nn.Module]] = []

    def block(n: int, layer: nn.Module, norm: type[nn.Module], maps: int, after: list) -> None:
        layers.append((f"{'conv' if n < 3 else 'fc'}{n if n < 3 else n - 2}", layer))
        if batch_norm:
            layers.append((f"bn{n}", norm(maps)))
        layers.append((f"act{n}", act()))
        layers.extend(after)

    block(
        1, nn.Conv2d(1, 6, 5, padding=2, bias=not batch_norm), nn.BatchNorm2d, 6, [("pool1", pooling(2, 2))]
    )
    block(2, nn.Conv2d(6, 16, 5, bias=not batch_norm), nn.BatchNorm2d, 16, [("pool2", pooling(2, 2))])
    layers.append(("flatten", nn.Flatten()))  # (N, 400)
    drop = (lambda n: []) if dropout is None else (lambda n: [(f"drop{n}", nn.Dropout(dropout))])
    block(3, nn.Linear(16 * 5 * 5, 120, bias=not batch_norm), nn.BatchNorm1d, 120, drop(3))
    block(4, nn.Linear(120, 84, bias=not batch_norm), nn.BatchNorm1d, 84, drop(4))
    layers.append(("fc3", nn.Linear(84, 10)))
    return nn.Sequential(OrderedDict(layers))


def classic(
    activation: str = "sigmoid", pool: str = "avg", batch_norm: bool = False, dropout: float | None = None
) -> nn.Sequential:
    """The tutorial LeNet exactly: sigmoids, average pooling, 61,706 parameters. Input (N, 1, 28, 28).

    The arguments swap in one modern improvement at a time (`lenet reproduce improvements`); the defaults
    are the tutorial's network: conv1 (N, 6, 28, 28), pool1 (N, 6, 14, 14), conv2 (N, 16, 10, 10),
    pool2 (N, 16, 5, 5), fc1 120, fc2 84, fc3 10."""
    net = lenet(activation, pool, batch_norm, dropout)
    # Xavier init suits sigmoid units (PyTorch's default Kaiming-uniform leaves them slow to start).
    for layer in net:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return net


def modern(
    dropout: float = 0.25, activation: str = "relu", pool: str = "max", batch_norm: bool = True
) -> nn.Sequential:
    """The classic skeleton (6 and 16 maps, 120-84-10) with batch norm, ReLU, max pooling and dropout, and
    PyTorch's default initialisation. The arguments take one improvement away at a time."""
    return lenet(activation, pool, batch_norm, dropout)


# ---------------------------------------------------------------------------------------------------------
# The 1998 paper's networks (LeCun, Bottou, Bengio, Haffner, "Gradient-Based Learning Applied to Document
# Recognition", Proc. IEEE 86(11)). docs/lenet5-1998.md gives the paper's facts and every choice made here.

# The paper scales pixels so that background is -0.1 and ink 1.175 (mean about 0, variance about 1).
# As a (mean, std) of pixels in [0, 1]: (0 - mean) / std = -0.1 and (1 - mean) / std = 1.175.
PAPER_NORMALIZATION = (0.1 / 1.275, 1 / 1.275)
# Models whose input scaling is part of their definition: training uses this instead of the dataset's,
# and checkpoints store it, so evaluate/predict/serve/export feed them exactly what they were trained on.
INPUT_NORMALIZATION: dict[str, tuple[float, float]] = {
    "lenet5-1998": PAPER_NORMALIZATION,
    "lenet1": PAPER_NORMALIZATION,
    "lenet4": PAPER_NORMALIZATION,
}
_BACKGROUND = -PAPER_NORMALIZATION[0] / PAPER_NORMALIZATION[1]  # -0.1: what a 0 pixel becomes

SQUASH_A, SQUASH_S = 1.7159, 2 / 3

# Table I: the S2 maps (0-5) each C3 map (0-15) reads. 60 kernels of 5x5 + 16 biases = 1,516 parameters.
C3_TABLE: tuple[tuple[int, ...], ...] = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (0, 4, 5), (0, 1, 5),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (0, 3, 4, 5), (0, 1, 4, 5), (0, 1, 2, 5),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)  # fmt: skip

# LeNet-1's H3 (12 maps from 4): the 1990 paper gives only totals (2,578 parameters, 98,442 connections),
# which need 20 kernels; we take 4 maps reading one map each and 8 reading a pair.
LENET1_C3_TABLE: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,),
    (0, 1), (1, 2), (2, 3), (0, 3), (0, 2), (1, 3), (0, 2), (1, 3),
)  # fmt: skip

# LeNet-4's C3 (16 maps from the 8 S2 maps, which come in pairs from the 4 C1 maps): the paper gives no
# table; three inputs per map gives its "about 260,000 connections". Maps 0-7 read three neighbours,
# maps 8-15 three spread-out maps, so every S2 map feeds six C3 maps.
LENET4_C3_TABLE: tuple[tuple[int, ...], ...] = tuple(
    tuple(sorted({m, (m + 1) % 8, (m + 2) % 8})) for m in range(8)
) + tuple(tuple(sorted({m, (m + 3) % 8, (m + 5) % 8})) for m in range(8))

# The output layer's fixed parameter vectors: stylised 7x12 digits, ink +1 and background -1.
DIGIT_BITMAPS: tuple[tuple[str, ...], ...] = (
    (".......", "..###..", ".#...#.", "#.....#", "#.....#", "#.....#",
     "#.....#", "#.....#", "#.....#", ".#...#.", "..###..", "......."),
    (".......", "...#...", "..##...", ".#.#...", "...#...", "...#...",
     "...#...", "...#...", "...#...", "...#...", ".#####.", "......."),
    (".......", "..###..", ".#...#.", "#.....#", "......#", ".....#.",
     "....#..", "...#...", "..#....", ".#.....", "#######", "......."),
    (".......", "#######", ".....#.", "....#..", "...#...", "..####.",
     "......#", "......#", "......#", "#.....#", ".#####.", "......."),
    (".......", "....##.", "...#.#.", "..#..#.", ".#...#.", "#....#.",
     "#######", ".....#.", ".....#.", ".....#.", ".....#.", "......."),
    (".......", "#######", "#......", "#......", "######.", "......#",
     "......#", "......#", "......#", "#.....#", ".#####.", "......."),
    (".......", "...###.", "..#....", ".#.....", "#......", "#.###..",
     "##...#.", "#.....#", "#.....#", ".#...#.", "..###..", "......."),
    (".......", "#######", "......#", ".....#.", "....#..", "....#..",
     "...#...", "...#...", "..#....", "..#....", "..#....", "......."),
    (".......", ".#####.", "#.....#", "#.....#", "#.....#", ".#####.",
     "#.....#", "#.....#", "#.....#", "#.....#", ".#####.", "......."),
    (".......", ".#####.", "#.....#", "#.....#", "#.....#", "#.....#",
     ".######", "......#", "......#", ".....#.", ".####..", "......."),
)  # fmt: skip


def digit_bitmaps() -> torch.Tensor:
    """(10, 84) float32 of +1 (ink) and -1, row-major 12 rows x 7 columns per digit."""
    return torch.tensor([[1.0 if c == "#" else -1.0 for row in rows for c in row] for rows in DIGIT_BITMAPS])


def _uniform_fan_in(tensor: torch.Tensor, fan_in: int | torch.Tensor) -> None:
    """Uniform with standard deviation 1 / sqrt(F), F the fan-in of the unit the weight feeds: U(-sqrt(3/F),
    sqrt(3/F)). The paper writes U(-2.4/F, 2.4/F) and gives its aim, weighted sums whose spread lies in the
    squashing function's operating range in every layer. This rule (LeCun et al.'s "Efficient BackProp",
    1998) meets that aim. The literal 2.4/F shrinks the sums layer by layer and does not train; 2.4/sqrt(F)
    saturates units that then never recover (docs/lenet5-1998.md)."""
    with torch.no_grad():
        tensor.uniform_(-1, 1).mul_((3 / torch.as_tensor(fan_in, dtype=tensor.dtype)).sqrt())


class ScaledTanh(nn.Module):
    """The paper's squashing function f(a) = 1.7159 tanh(2a/3): f(1) = 1, f(-1) = -1."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return SQUASH_A * torch.tanh(SQUASH_S * a)


class Subsampling(nn.Module):
    """Per map: the sum of each 2x2 block times a trainable coefficient, plus a trainable bias.

    fanout > 1 gives every input map that many subsampled copies, each with its own coefficient and bias
    (LeNet-4's 8 S2 maps from 4 C1 maps).
    """

    def __init__(self, maps: int, fanout: int = 1):
        super().__init__()
        self.fanout = fanout
        self.weight = nn.Parameter(torch.empty(maps * fanout))
        self.bias = nn.Parameter(torch.empty(maps * fanout))
        _uniform_fan_in(self.weight, 4)
        _uniform_fan_in(self.bias, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, 2) * 4  # (N, C, H/2, W/2) block sums
        if self.fanout > 1:
            x = x.repeat_interleave(self.fanout, dim=1)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class SparseConv2d(nn.Module):
    """A 'valid' convolution where output map o sees only the input maps table[o] (C3's Table I).

    Only the connected kernels are parameters (weight: (kernels, k, k)); a fixed 0/1 matrix places them
    in a dense (out, in, k, k) kernel for F.conv2d.
    """

    def __init__(self, table: Sequence[Sequence[int]], in_maps: int, kernel_size: int = 5):
        super().__init__()
        self.table = tuple(tuple(inputs) for inputs in table)
        self.in_maps, self.kernel_size = in_maps, kernel_size
        pairs = [(o, i) for o, inputs in enumerate(self.table) for i in inputs]
        place = torch.zeros(len(self.table) * in_maps, len(pairs))
        for n, (o, i) in enumerate(pairs):
            place[o * in_maps + i, n] = 1.0
        self.register_buffer("place", place, persistent=False)  # rebuilt from the table, not stored
        self.weight = nn.Parameter(torch.empty(len(pairs), kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(len(self.table)))
        area = kernel_size * kernel_size
        _uniform_fan_in(
            self.weight, torch.tensor([len(self.table[o]) * area for o, _ in pairs]).view(-1, 1, 1)
        )
        _uniform_fan_in(self.bias, torch.tensor([len(inputs) * area for inputs in self.table]))

    def connected(self) -> torch.Tensor:
        """(out, in) bool: which input maps each output map reads."""
        return self.place.sum(1).view(len(self.table), self.in_maps) > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        dense = (self.place @ self.weight.flatten(1)).view(len(self.table), self.in_maps, k, k)
        return F.conv2d(x, dense, self.bias)


class EuclideanRBF(nn.Module):
    """The output layer: unit i's penalty is y_i = sum_j (x_j - w_ij)^2 with fixed centres w_i.

    Returns -y (N, classes): the largest output is the prediction, as with logits, so evaluation,
    prediction and export work unchanged; softmax(-y) is the paper's posterior with j -> infinity.
    """

    def __init__(self, centres: torch.Tensor):
        super().__init__()
        self.register_buffer("centres", centres)  # (classes, features), fixed: not a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(x.unsqueeze(1) - self.centres).pow(2).sum(-1)  # (N, 1, 84) - (10, 84) -> (N, 10)


class ShrinkCentred(nn.Module):
    """Shrink images (bilinear) to size x size and pad them back, centred, with the background value."""

    def __init__(self, size: int, background: float):
        super().__init__()
        self.size, self.background = size, background

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[-1]
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        before = (height - self.size) // 2
        after = height - self.size - before
        return F.pad(x, (before, after, before, after), value=self.background)


def _lecun_init(*layers: nn.Module) -> None:
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            fan_in = layer.weight[0].numel()
        elif isinstance(layer, nn.Linear):
            fan_in = layer.in_features
        else:
            continue
        _uniform_fan_in(layer.weight, fan_in)
        _uniform_fan_in(layer.bias, fan_in)


def lenet5_1998() -> nn.Sequential:
    """LeNet-5 as the 1998 paper describes it: 60,000 trainable parameters, RBF output.

    Input (N, 1, 28, 28) normalised with INPUT_NORMALIZATION (background -0.1, ink 1.175), padded to 32x32
    with the background value. Output: minus the 10 RBF penalties (argmax is the prediction).
    """
    net = nn.Sequential(
        OrderedDict(
            pad=nn.ConstantPad2d(2, _BACKGROUND),  # (N, 1, 32, 32)
            c1=nn.Conv2d(1, 6, kernel_size=5),  # (N, 6, 28, 28)
            act1=ScaledTanh(),
            s2=Subsampling(6),  # (N, 6, 14, 14)
            act2=ScaledTanh(),
            c3=SparseConv2d(C3_TABLE, in_maps=6),  # (N, 16, 10, 10)
            act3=ScaledTanh(),
            s4=Subsampling(16),  # (N, 16, 5, 5)
            act4=ScaledTanh(),
            c5=nn.Conv2d(16, 120, kernel_size=5),  # (N, 120, 1, 1)
            act5=ScaledTanh(),
            flatten=nn.Flatten(),  # (N, 120)
            f6=nn.Linear(120, 84),
            act6=ScaledTanh(),
            output=EuclideanRBF(digit_bitmaps()),  # (N, 10)
        )
    )
    _lecun_init(net.c1, net.c5, net.f6)
    return net


def lenet1() -> nn.Sequential:
    """LeNet-1 (about 2,600 parameters; 2,578 here): 16x16 digits centred in 28x28, two conv/subsampling
    stages (4 and 12 maps) and 10 fully connected outputs (logits, trained with cross-entropy)."""
    net = nn.Sequential(
        OrderedDict(
            resize=ShrinkCentred(22, _BACKGROUND),  # (N, 1, 28, 28): MNIST's 20x20 digits become ~16x16
            c1=nn.Conv2d(1, 4, kernel_size=5),  # (N, 4, 24, 24)
            act1=ScaledTanh(),
            s2=Subsampling(4),  # (N, 4, 12, 12)
            act2=ScaledTanh(),
            c3=SparseConv2d(LENET1_C3_TABLE, in_maps=4),  # (N, 12, 8, 8)
            act3=ScaledTanh(),
            s4=Subsampling(12),  # (N, 12, 4, 4)
            act4=ScaledTanh(),
            flatten=nn.Flatten(),  # (N, 192)
            output=nn.Linear(192, 10),
        )
    )
    _lecun_init(net.c1, net.output)
    return net


def lenet4() -> nn.Sequential:
    """LeNet-4: 32x32 input, 4 C1 maps, 8 S2 maps (two per C1 map), 16 C3 maps, 16 S4 maps, a fully
    connected layer of 120 units, 10 outputs (logits, trained with cross-entropy)."""
    net = nn.Sequential(
        OrderedDict(
            pad=nn.ConstantPad2d(2, _BACKGROUND),  # (N, 1, 32, 32)
            c1=nn.Conv2d(1, 4, kernel_size=5),  # (N, 4, 28, 28)
            act1=ScaledTanh(),
            s2=Subsampling(4, fanout=2),  # (N, 8, 14, 14)
            act2=ScaledTanh(),
            c3=SparseConv2d(LENET4_C3_TABLE, in_maps=8),  # (N, 16, 10, 10)
            act3=ScaledTanh(),
            s4=Subsampling(16),  # (N, 16, 5, 5)
            act4=ScaledTanh(),
            flatten=nn.Flatten(),  # (N, 400)
            f5=nn.Linear(400, 120),
            act5=ScaledTanh(),
            output=nn.Linear(120, 10),
        )
    )
    _lecun_init(net.c1, net.f5, net.output)
    return net


def map_loss(outputs: torch.Tensor, labels: torch.Tensor, j: float) -> torch.Tensor:
    """The paper's MAP criterion (its eq. 9), averaged over the batch.

    outputs are minus the RBF penalties y (N, classes): E = y_D + log(exp(-j) + sum_i exp(-y_i)).
    exp(-j) is a 'rubbish class' that stops pushing up penalties already larger than about j. This is
    cross-entropy over the classes plus one extra class with constant logit -j, which keeps it stable.
    """
    rubbish = outputs.new_full((outputs.shape[0], 1), -j)
    return F.cross_entropy(torch.cat([outputs, rubbish], dim=1), labels)


def connections(model: nn.Sequential, input_shape: tuple[int, ...] = (1, 28, 28)) -> dict[str, int]:
    """Connections per layer as the paper counts them (every weighted input of every unit, biases
    included; a shared weight counts once per unit that uses it), for the layers with weights."""
    counts = {}
    for name, shape, _ in layer_table(model, input_shape):
        layer = getattr(model, name)
        units_per_map = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
        if isinstance(layer, SparseConv2d):
            per_map = [len(inputs) * layer.kernel_size**2 + 1 for inputs in layer.table]
            counts[name] = sum(per_map) * units_per_map
        elif isinstance(layer, nn.Conv2d):
            counts[name] = shape[0] * units_per_map * (layer.weight[0].numel() + 1)
        elif isinstance(layer, Subsampling):
            counts[name] = shape[0] * units_per_map * 5  # 4 inputs and the bias
        elif isinstance(layer, nn.Linear):
            counts[name] = layer.out_features * (layer.in_features + 1)
        elif isinstance(layer, EuclideanRBF):
            counts[name] = layer.centres.numel()  # one per (unit, input); no bias
    return counts


_BUILDERS = {
    "classic": classic,
    "modern": modern,
    "lenet5-1998": lenet5_1998,
    "lenet1": lenet1,
    "lenet4": lenet4,
}


def build(name: str, **kwargs) -> nn.Sequential:
    """Build a model by name; kwargs go to its constructor (and are stored in checkpoints).

    The model remembers what it is (`lenet_spec`), so that training the module itself records it by name."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    model = _BUILDERS[name](**kwargs)
    model.lenet_spec = {"name": name, "kwargs": dict(kwargs)}
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trace(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """Every call of a leaf module (one without children) in one forward pass of x, in order:
    (its name in the model, the module, its output). Hooks see what forward really does, whatever the model
    is: a shared module called twice appears twice. Outputs that are tuples give their first tensor.
    A RuntimeError inside a leaf is raised again as RuntimeError("layer NAME: ...")."""
    calls: list[tuple[str, nn.Module, torch.Tensor]] = []
    names = {module: name or type(module).__name__ for name, module in model.named_modules()}
    running: list[str] = []

    def enter(module: nn.Module, _inputs) -> None:
        running.append(names.get(module, type(module).__name__))

    def record(module: nn.Module, _inputs, output) -> None:
        first = output[0] if isinstance(output, (tuple, list)) else output
        calls.append((running.pop(), module, first))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_pre_hook(enter) for m in leaves]
    handles += [m.register_forward_hook(record) for m in leaves]
    try:
        model(x)
    except RuntimeError as e:
        where = f"layer {running[-1]}" if running else f"after layer {calls[-1][0]}" if calls else "the model"
        raise RuntimeError(f"{where}: {str(e).strip().splitlines()[0]}") from None
    finally:
        for handle in handles:
            handle.remove()
    return calls


def layer_table(model: nn.Module, input_shape: tuple[int, ...] = (1, 28, 28), batch: int = 1):
    """Rows of (layer name, output shape without the batch dim, parameter count), one per leaf-module call
    in forward order (a module called again shows its parameters once). Any module, any input size;
    ValueError, saying which layer, when the input does not fit."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    x = torch.zeros(batch, *input_shape, device=param.device if param is not None else None)
    try:
        with torch.no_grad():
            calls = trace(model, x)
    except RuntimeError as e:
        shape = "x".join(map(str, input_shape))
        raise ValueError(f"input {shape} does not fit {e}") from None
    finally:
        model.train(was_training)
    rows, counted = [], set()
    for name, module, output in calls:
        params = 0 if module in counted else count_parameters(module)
        counted.add(module)
        rows.append((name, tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else (), params))
    return rows


@dataclass
class Summary:
    """Per-layer output shapes and parameters; prints (and shows in a notebook) as a table."""

    rows: list[tuple[str, str, tuple[int, ...], int]]  # (name, type, output shape, parameters)
    input_shape: tuple[int, ...]  # with the batch dimension
    parameters: int  # all of the model's, counted once

    def __str__(self) -> str:
        width = max([len("layer"), *(len(name) for name, *_ in self.rows)])
        kind = max([len("type"), *(len(k) for _, k, *_ in self.rows)])
        lines = [
            f"input {'x'.join(map(str, self.input_shape))}",
            f"{'layer':<{width}}  {'type':<{kind}}  {'output shape':<16} {'params':>8}",
        ]
        for name, k, shape, params in self.rows:
            lines.append(f"{name:<{width}}  {k:<{kind}}  {'x'.join(map(str, shape)):<16} {params:>8,}")
        lines.append(f"{'total':<{width}}  {'':<{kind}}  {'':<16} {self.parameters:>8,}")
        return "\n".join(lines)

    __repr__ = __str__


def summary(model: nn.Module, input_size: tuple[int, int] = (28, 28), batch: int = 1) -> Summary:
    """The output shape and parameter count of every layer call of model on a (batch, 1, H, W) input.

    Works on any nn.Module (hooks record what forward really calls). ValueError when the input does not fit.
    """
    calls = layer_table(model, (1, *input_size), batch=batch)
    kinds = dict(model.named_modules())
    rows = [
        (name, type(kinds[name]).__name__ if name in kinds else name, shape, p) for name, shape, p in calls
    ]
    return Summary(rows, (batch, 1, *input_size), count_parameters(model))
