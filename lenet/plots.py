"""Figures that show what training and the network did: learning curves, confusion matrix, the worst
mistakes, and one image's trip through the network (`lenet explain`).

matplotlib is optional (the `plot` extra) and imported inside the functions. Figures are drawn on
matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch) and written atomically.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lenet import atomic
from lenet.errors import LenetError, optional

MISSING = "plots skipped: they need matplotlib: pip install 'lenet[plot]'"


def available() -> bool:
    """Whether matplotlib can be imported (plots are skipped, or refused with a hint, without it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    (figure,) = optional("matplotlib.figure", purpose="plots")
    Figure = figure.Figure
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(figure, path: str | Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic.write_bytes(path, buffer.getvalue())
    return Path(path)


def curves(metrics_path: str | Path, out: str | Path) -> Path:
    """Loss and accuracy per epoch, train and test, from a run's metrics.jsonl, as a PNG."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        raise LenetError(f"{metrics_path}: no epochs recorded yet")
    epochs = [row["epoch"] for row in rows]
    figure = _figure(10, 4)
    loss_axes, acc_axes = figure.subplots(1, 2)
    for axes, key, title in ((loss_axes, "loss", "Loss"), (acc_axes, "acc", "Accuracy")):
        for split, style in (("train", "o-"), ("test", "s--")):
            axes.plot(epochs, [row[f"{split}_{key}"] for row in rows], style, label=split, markersize=4)
        axes.set_title(f"{title} per epoch")
        axes.set_xlabel("epoch")
        axes.set_ylabel("loss" if key == "loss" else "fraction correct")
        axes.grid(alpha=0.3)
        axes.legend()
        if len(epochs) < 15:
            axes.set_xticks(epochs)
    best = max(rows, key=lambda row: row["test_acc"])
    acc_axes.annotate(
        f"best test {best['test_acc']:.4f}",
        (best["epoch"], best["test_acc"]),
        textcoords="offset points",
        xytext=(-10, -25),
        ha="right",
        arrowprops={"arrowstyle": "->"},
    )
    return _save(figure, out)


def accuracy_curves(panels: dict[str, dict[str, list[float]]], out: str | Path) -> Path:
    """Side-by-side panels of test accuracy per epoch: {panel title: {line label: accuracies}}, as a PNG."""
    figure = _figure(6 * len(panels), 6)
    for axes, (title, lines) in zip(
        figure.subplots(1, len(panels), squeeze=False)[0], panels.items(), strict=True
    ):
        for label, values in lines.items():
            axes.plot(range(1, len(values) + 1), values, "o-", markersize=3, label=label)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.set_ylabel("test accuracy")
        # low enough to show where every line ends; the first epochs of slow starters may fall below
        lowest_end = min((values[-1] for values in lines.values() if values), default=1.0)
        axes.set_ylim(min(0.97, math.floor(lowest_end * 200) / 200), 1.0)
        axes.grid(alpha=0.3)
        if lines:
            # below the axes: inside, it would hide the curves that end low
            axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    return _save(figure, out)


def confusion(
    matrix: torch.Tensor | np.ndarray,
    classes: Sequence[str],
    out: str | Path,
    title: str = "Confusion matrix",
) -> Path:
    """The confusion matrix (rows true, columns predicted) as a PNG: colour is the share of the true class
    (so that mistakes show up next to the diagonal's thousands), each cell labelled with its count."""
    counts = np.asarray(matrix, dtype=np.int64)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(classes)
    figure = _figure(max(6, 0.6 * n + 2), max(5.2, 0.55 * n + 1.5))
    axes = figure.subplots()
    # colour on a log scale of the share: 1 error in 1000 is still visible
    image = axes.imshow(np.log10(np.maximum(share, 1e-4)), cmap="Blues", vmin=-4, vmax=0)
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                dark = share[i, j] > 0.1
                axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                          color="white" if dark else ("black" if i == j else "darkred"))  # fmt: skip
    axes.set_xticks(range(n), classes, rotation=45 if max(map(len, classes)) > 2 else 0, ha="right")
    axes.set_yticks(range(n), classes)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    accuracy = counts.trace() / max(counts.sum(), 1)
    axes.set_title(f"{title} (accuracy {accuracy:.4f}, {counts.sum():,} images)")
    bar = figure.colorbar(image, ax=axes, shrink=0.8, ticks=[-4, -3, -2, -1, 0])
    bar.ax.set_yticklabels(["0.01%", "0.1%", "1%", "10%", "100%"])
    bar.set_label("share of the true class")
    return _save(figure, out)


def misclassified(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    logits: torch.Tensor | np.ndarray,
    classes: Sequence[str],
    out: str | Path,
    count: int = 36,
) -> Path:
    """A grid of the most confident mistakes, each titled with its true and predicted class.

    images: uint8 (N, 28, 28); labels (N,); logits (N, classes). Worst = highest probability given to the
    wrong class.
    """
    images = torch.as_tensor(images).cpu()
    labels = torch.as_tensor(labels).cpu()
    probabilities = torch.softmax(torch.as_tensor(logits).float().cpu(), dim=1)
    confidence, predicted = probabilities.max(1)
    wrong = torch.nonzero(predicted != labels).flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)][:count].tolist()
    columns = max(1, min(9, math.ceil(math.sqrt(max(len(worst), 1)))))
    rows = max(1, math.ceil(len(worst) / columns))
    figure = _figure(max(5.0, 1.35 * columns + 0.3), 1.5 * rows + 0.6)
    figure.suptitle(
        f"Most confident mistakes: {len(worst)} of {len(wrong)} misclassified, of {len(labels):,} images"
        if worst
        else f"No mistakes in {len(labels):,} images"
    )
    grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axes in grid:
        axes.axis("off")
    for axes, index in zip(grid, worst, strict=False):
        axes.imshow(images[index].numpy(), cmap="gray", vmin=0, vmax=255)
        axes.set_title(
            f"true {classes[labels[index]]}\npred {classes[predicted[index]]} {confidence[index]:.2f}",
            fontsize=8,
            color="darkred",
        )
    return _save(figure, out)


def explain(
    image: np.ndarray | torch.Tensor,
    maps: dict[str, torch.Tensor],
    filters: tuple[str, torch.Tensor],
    probabilities: Sequence[float],
    classes: Sequence[str],
    out: str | Path,
    title: str = "",
) -> Path:
    """explain_figure, written to out as PNG."""
    return _save(explain_figure(image, maps, filters, probabilities, classes, title), out)


def explain_figure(
    image: np.ndarray | torch.Tensor,
    maps: dict[str, torch.Tensor],
    filters: tuple[str, torch.Tensor],
    probabilities: Sequence[float],
    classes: Sequence[str],
    title: str = "",
):
    """One figure of a prediction: the preprocessed 28x28 input, the first layer's filters, every feature
    map of each conv layer, and the class probabilities as bars (a matplotlib Figure).

    maps: from predict.feature_maps; filters: (name, (maps, k, k)) from predict.first_filters.
    """
    filter_name, kernels = filters
    stages = list(maps.items())
    map_rows = [math.ceil(len(m) / _TILE_COLUMNS) for _, m in stages]
    kernel_rows = math.ceil(len(kernels) / _TILE_COLUMNS)
    figure = _figure(11, 3.6 + 1.25 * (sum(map_rows) + kernel_rows))
    figure.suptitle(title or "What the network sees", fontsize=13)
    heights = [3.0, 0.25, *([1] * kernel_rows)]
    for rows in map_rows:
        heights += [0.3, *([1] * rows)]
    grid = figure.add_gridspec(len(heights), _TILE_COLUMNS, height_ratios=heights)
    _input_and_bars(figure, grid[0, :], image, list(probabilities), classes)

    k = kernels.shape[-1]
    _section(
        figure, grid[1, :], f"{filter_name} filters ({len(kernels)} of {k}x{k}; red positive, blue negative)"
    )
    _tiles(figure, grid, 2, kernels, "filter ", "bwr", symmetric=True)
    row = 2 + kernel_rows
    for (name, stack), rows in zip(stages, map_rows, strict=True):
        h, w = stack.shape[-2:]
        text = f"{name} feature maps ({len(stack)} of {h}x{w}, after its activation; bright = strong)"
        _section(figure, grid[row, :], text)
        _tiles(figure, grid, row + 1, stack, "map ", "viridis", symmetric=False)
        row += 1 + rows
    return figure


_TILE_COLUMNS = 8  # feature maps and filters per row of explain_figure


def _input_and_bars(figure, cell, image, probabilities: list[float], classes: Sequence[str]) -> None:
    """explain_figure's top row: the 28x28 input beside the class probabilities, the best in orange."""
    top = cell.subgridspec(1, 3, width_ratios=[1, 0.15, 2.2])
    axes = figure.add_subplot(top[0, 0])
    axes.imshow(np.asarray(image).reshape(28, 28), cmap="gray", vmin=0, vmax=255)
    axes.set_title("input, preprocessed (28x28)", fontsize=10)
    axes.set_xticks([])
    axes.set_yticks([])
    axes = figure.add_subplot(top[0, 2])
    best = int(np.argmax(probabilities))
    colours = ["tab:orange" if i == best else "tab:blue" for i in range(len(probabilities))]
    axes.bar(range(len(probabilities)), probabilities, color=colours)
    axes.set_xticks(range(len(classes)), classes)
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("class")
    axes.set_ylabel("probability")
    axes.set_title(f"prediction: {classes[best]} ({probabilities[best]:.3f})", fontsize=10)
    axes.grid(axis="y", alpha=0.3)


def _section(figure, cell, text: str) -> None:
    label = figure.add_subplot(cell)
    label.axis("off")
    label.text(0, 0.2, text, fontsize=10, fontweight="bold", transform=label.transAxes)


def _tiles(
    figure, grid, first_row: int, stack: torch.Tensor, prefix: str, cmap: str, symmetric: bool
) -> None:
    """One small image per map of stack (C, H, W), _TILE_COLUMNS to a row of grid from first_row."""
    stack = stack.detach().float().cpu()
    limit = float(stack.abs().max()) or 1.0
    for k in range(len(stack)):
        axes = figure.add_subplot(grid[first_row + k // _TILE_COLUMNS, k % _TILE_COLUMNS])
        if symmetric:  # filters: zero is white, so positive and negative weights read at a glance
            axes.imshow(stack[k].numpy(), cmap=cmap, vmin=-limit, vmax=limit)
        else:
            axes.imshow(stack[k].numpy(), cmap=cmap)
        axes.set_title(f"{prefix}{k}", fontsize=7)
        axes.set_xticks([])
        axes.set_yticks([])


def training_plots(run_dir: str | Path, matrix: torch.Tensor, classes: Sequence[str]) -> list[Path]:
    """curves.png and confusion.png in a run folder; nothing (an empty list) without matplotlib."""
    if not available():
        return []
    run_dir = Path(run_dir)
    return [
        curves(run_dir / "metrics.jsonl", run_dir / "curves.png"),
        confusion(matrix, classes, run_dir / "confusion.png", title="Test set confusion matrix"),
    ]
