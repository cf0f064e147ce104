"""`lenet.load(checkpoint)`: a trained model with everything needed to use it, in one object.

A Classifier holds the model, its input normalisation, class names and device, so nobody threads `mean`
and `std` by hand: `clf.predict(image)`, `clf.evaluate()`, `clf.explain(image)`, `clf.read(image)`.
Images may be paths, bytes, PIL images, numpy arrays or torch tensors, one or a batch (see `images`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lenet import predict as forward
from lenet.errors import LenetError


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the most probable class, its probability, all of them, and the 28x28 input."""

    label: str
    index: int
    probability: float
    probabilities: list[float]
    input: np.ndarray  # (28, 28) uint8, what the network saw

    def __repr__(self) -> str:
        return f"Prediction(label={self.label!r}, probability={self.probability:.4f})"


@dataclass(frozen=True)
class Evaluation:
    """Accuracy, loss, per-class precision and recall and the confusion matrix on a labelled set."""

    accuracy: float
    loss: float
    per_class: list[dict]  # {"class", "precision", "recall", "support"}
    confusion: list[list[int]]  # rows: true class, columns: predicted
    text: str  # the report as `lenet evaluate` prints it

    def __repr__(self) -> str:
        return self.text


class Explanation:
    """The figure `lenet explain` draws (input, filters, feature maps, probabilities): shows itself in a
    notebook, `save(path)` writes it as PNG."""

    def __init__(self, figure: Any, prediction: Prediction):
        self.figure, self.prediction = figure, prediction

    def save(self, path: str | Path) -> Path:
        from lenet import atomic

        atomic.write_bytes(path, self._repr_png_())
        return Path(path)

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png")
        return buffer.getvalue()

    def __repr__(self) -> str:
        return f"Explanation({self.prediction!r})"


_IMAGE_TYPES = (str, Path, bytes, bytearray, memoryview)


def images(source: Any, invert: str = "auto") -> tuple[np.ndarray, bool]:
    """(N, 28, 28) uint8 network inputs from what a user has, and whether it was one image.

    - a path, encoded bytes, a file object or a PIL image: one image, prepared the MNIST way (preprocess);
    - a list or tuple of those (or of arrays): a batch, each prepared as it would be alone;
    - an array or tensor of grey levels (uint8 0..255, or floats in 0..1): (28, 28) is one network input as
      it is, (N, 28, 28) or (N, 1, 28, 28) a batch of them (MNIST's own images are already prepared); a 2-D
      array of another size, or (1, H, W), is one image to prepare.
    """
    from PIL import Image

    from lenet.preprocess import preprocess

    if isinstance(source, (*_IMAGE_TYPES, Image.Image)) or hasattr(source, "read"):
        return preprocess(source, invert)[None], True
    if isinstance(source, (list, tuple)) and source and not _is_number_row(source[0]):
        return np.stack([images(item, invert)[0][0] for item in source]), False
    pixels = _grey_levels(source)
    shape = pixels.shape
    if pixels.ndim == 4 and shape[1] == 1:
        pixels = pixels[:, 0]
    if pixels.ndim == 3 and shape[0] == 1 and shape[1:] != (28, 28):
        pixels = pixels[0]
    if pixels.ndim == 2:
        if pixels.shape == (28, 28):
            return pixels[None], True
        return preprocess(pixels, invert)[None], True
    if pixels.ndim == 3 and pixels.shape[1:] == (28, 28):
        return pixels, False
    raise LenetError(
        f"images: expected (28, 28), (N, 28, 28), (N, 1, 28, 28) or one image, got shape {shape}"
    )


def _is_number_row(item: Any) -> bool:
    return isinstance(item, (int, float)) or (
        isinstance(item, (list, tuple)) and bool(item) and isinstance(item[0], (int, float))
    )


def _grey_levels(source: Any) -> np.ndarray:
    array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
    if array.dtype == np.uint8:
        return array
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or array.size == 0:
        raise LenetError(
            f"images: expected grey levels, got an array of {array.dtype} with shape {array.shape}"
        )
    values = array.astype(np.float32)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 255:
        raise LenetError("images: expected grey levels 0..255 (or 0..1), found values outside that range")
    if values.max() <= 1:  # fractions, as torchvision's ToTensor gives
        values = values * 255
    return np.round(values).astype(np.uint8)


class Classifier:
    """A checkpoint's model with its normalisation, class names and device. Make one with `lenet.load`."""

    def __init__(self, model: nn.Module, meta: dict, device: torch.device, path: Path | None = None):
        self.model = model.eval()  # as trained (batch norms in place): what explain shows
        self.meta, self.device, self.path = meta, device, path
        self.mean = float(meta["normalization"]["mean"])
        self.std = float(meta["normalization"]["std"])
        self.classes = list(meta["classes"])
        self.dataset = meta.get("dataset", "mnist")
        self._fast = forward.fold_batch_norm(self.model)  # the same function in fewer layers

    def __repr__(self) -> str:
        name = self.meta.get("model", {}).get("name")
        return f"Classifier({name}, {len(self.classes)} classes, {self.dataset}, device {self.device})"

    def probabilities(self, source: Any, invert: str = "auto") -> np.ndarray:
        """Probabilities (N, classes) for one image or a batch (see `images` for what source may be)."""
        batch, _ = images(source, invert)
        return forward.predict(self._fast, batch, self.mean, self.std).cpu().numpy()

    def predict(self, source: Any, invert: str = "auto") -> Prediction | list[Prediction]:
        """The answer for one image (a Prediction) or for each image of a batch (a list).

        invert: "auto" finds the polarity of photos and scans; "yes" means dark ink on light paper.
        """
        batch, single = images(source, invert)
        probabilities = forward.predict(self._fast, batch, self.mean, self.std).cpu().numpy()
        answers = [self._answer(p, x) for p, x in zip(probabilities, batch, strict=True)]
        return answers[0] if single else answers

    def _answer(self, probabilities: np.ndarray, image: np.ndarray) -> Prediction:
        best = int(probabilities.argmax())
        return Prediction(self.classes[best], best, float(probabilities[best]), probabilities.tolist(), image)

    def evaluate(self, dataset: Any = None, data_dir: str | None = None) -> Evaluation:
        """Accuracy and the per-class table on the test set of the dataset the model was trained on
        (or on `dataset`: a lenet Dataset, or a (images (N, 28, 28) uint8, labels (N,)) pair)."""
        from lenet import data
        from lenet.evaluate import evaluate, format_report

        if dataset is None:
            dataset = data.load(self.dataset, data_dir)
        images_, labels = (
            (dataset.test_images, dataset.test_labels) if hasattr(dataset, "test_images") else dataset
        )
        result = evaluate(self.model, torch.as_tensor(images_).to(self.device), torch.as_tensor(labels),
                          self.mean, self.std)  # fmt: skip
        rows = [{"class": c, **row} for c, row in zip(self.classes, result["per_class"], strict=True)]
        return Evaluation(result["accuracy"], result["loss"], rows, result["confusion"].tolist(),
                          format_report(result, self.classes))  # fmt: skip

    def explain(
        self, source: Any, out: str | Path | None = None, invert: str = "auto", title: str | None = None
    ) -> Explanation:
        """The figure of one image: its 28x28 input, the first layer's filters, every conv layer's feature
        maps and the probabilities (needs matplotlib: pip install 'lenet[plot]'). out: also save it as PNG.
        title: the figure's, where "{label}" becomes the answer."""
        from lenet import plots

        batch, single = images(source, invert)
        if not single:
            raise LenetError("explain: expected one image, got a batch")
        prediction = self.predict(batch[0])
        maps = forward.feature_maps(self.model, batch[0], self.mean, self.std)
        title = (title or f"{self.meta.get('model', {}).get('name')} says {{label}}").format(
            label=prediction.label
        )
        filters = forward.first_filters(self.model)
        figure = plots.explain_figure(batch[0], maps, filters, prediction.probabilities, self.classes, title)
        explanation = Explanation(figure, prediction)
        if out is not None:
            explanation.save(out)
        return explanation

    def read(self, source: Any, invert: str = "auto") -> dict:
        """The handwritten number (one line of digits) in an image: {"number": "4096", "digits": [{"digit",
        "probability", "probabilities", "box" (x0, y0, x1, y1 in the image's pixels), "input"}], "width",
        "height"} (lenet/read.py). LenetError when it holds no digits."""
        from lenet.read import read_number

        return read_number(source, self.probabilities, invert, classes=self.classes)


def load(checkpoint: str | Path, device: str = "cpu", model: nn.Module | None = None) -> Classifier:
    """A Classifier from a checkpoint file (best.safetensors, last.safetensors of a run).

    The checkpoint rebuilds its own model, a module of your own too where its class can be imported; else
    pass one of the right architecture as `model` and its weights are loaded into it.
    """
    from lenet import checkpoint as ckpt
    from lenet.device import resolve_device

    torch_device = resolve_device(device)
    net, meta = ckpt.load_model(checkpoint, torch_device, model=model)
    return Classifier(net, meta, torch_device, Path(checkpoint))
