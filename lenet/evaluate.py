"""Accuracy, loss, per-class precision/recall and the confusion matrix of a model on a labelled set."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lenet.data import normalize


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, mean: float, std: float, batch_size: int = 2000
) -> torch.Tensor:
    """Logits (N, 10) for uint8 images (N, 28, 28), computed in batches on the images' device."""
    was_training = model.training
    if was_training:  # toggling walks every module: a third of a one-image call's time
        model.eval()
    outputs = [
        model(normalize(images[i : i + batch_size], mean, std)) for i in range(0, len(images), batch_size)
    ]
    if was_training:
        model.train()
    return torch.cat(outputs) if outputs else torch.zeros(0, 10, device=images.device)


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: rows are true classes, columns predicted ones."""
    index = labels.to(torch.int64) * num_classes + predicted.to(torch.int64)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def per_class(confusion: torch.Tensor) -> list[dict]:
    """Precision, recall and support per class from a confusion matrix."""
    true_pos = confusion.diag().double()
    predicted = confusion.sum(0).double()
    actual = confusion.sum(1).double()
    precision = torch.where(predicted > 0, true_pos / predicted.clamp(min=1), torch.zeros_like(true_pos))
    recall = torch.where(actual > 0, true_pos / actual.clamp(min=1), torch.zeros_like(true_pos))
    return [
        {"precision": float(p), "recall": float(r), "support": int(s)}
        for p, r, s in zip(precision, recall, actual, strict=True)
    ]


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: float,
    std: float,
    batch_size: int = 2000,
) -> dict:
    """Loss, accuracy, confusion matrix, per-class table and logits of model on (images, labels)."""
    logits = predict_logits(model, images, mean, std, batch_size)
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    predicted = logits.argmax(1)
    confusion = confusion_matrix(labels, predicted, logits.shape[1])
    return {
        "loss": loss,
        "accuracy": confusion.diag().sum().item() / max(len(labels), 1),
        "confusion": confusion,
        "per_class": per_class(confusion),
        "logits": logits,
    }


def format_report(result: dict, classes: list[str]) -> str:
    """Accuracy, loss, the per-class table and the confusion matrix as plain text."""
    width = max(6, *(len(c) for c in classes))
    lines = [f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}", ""]
    lines.append(f"{'class':<{width}}  precision  recall  support")
    for name, row in zip(classes, result["per_class"], strict=True):
        lines.append(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['support']:7d}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
    cell = max(5, len(str(int(result["confusion"].max()))) + 1)
    lines.append(" " * width + "".join(f"{c[: cell - 1]:>{cell}}" for c in classes))
    for name, counts in zip(classes, result["confusion"].tolist(), strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{n:>{cell}}" for n in counts))
    return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint_path: str, data_dir: str | None = None, device: str = "auto", out_dir=None
) -> dict:
    """Evaluate a checkpoint on its dataset's test set: a JSON-able report plus its text form.

    With matplotlib, also writes <checkpoint stem>-confusion.png and -misclassified.png (the most confident
    mistakes) into out_dir (default: the checkpoint's folder); report["plots"] names them.
    """
    from lenet import checkpoint, data, plots
    from lenet.device import resolve_device

    torch_device = resolve_device(device)
    model, meta = checkpoint.load_model(checkpoint_path, torch_device)
    dataset = data.load(meta["dataset"], data_dir).to(torch_device)
    norm = meta["normalization"]
    result = evaluate(model, dataset.test_images, dataset.test_labels, norm["mean"], norm["std"])
    classes = list(meta["classes"])
    written = {}
    if plots.available():
        folder, stem = Path(out_dir or Path(checkpoint_path).parent), Path(checkpoint_path).stem
        folder.mkdir(parents=True, exist_ok=True)
        images, labels = dataset.test_images, dataset.test_labels
        written["confusion"] = plots.confusion(result["confusion"], classes, folder / f"{stem}-confusion.png")
        written["misclassified"] = plots.misclassified(
            images, labels, result["logits"], classes, folder / f"{stem}-misclassified.png"
        )
    return {
        "checkpoint": str(checkpoint_path),
        "dataset": meta["dataset"],
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "per_class": [{"class": c, **row} for c, row in zip(classes, result["per_class"], strict=True)],
        "confusion": result["confusion"].tolist(),
        "plots": {name: str(path) for name, path in written.items()},
        "text": format_report(result, classes),
    }
