import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lenet import plots
from lenet.errors import LenetError
from lenet.models import build
from lenet.predict import feature_maps, first_filters, predict
from lenet.train import TrainConfig, fit

CLASSES = list("0123456789")


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_curves_from_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "train_acc": 1 - 0.1 / e,
            "test_loss": 1.2 / e,
            "test_acc": 1 - 0.12 / e,
        }
        for e in range(1, 6)
    ]
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = plots.curves(metrics, tmp_path / "curves.png")
    assert png_size(out) == (1000, 400) and out.stat().st_size > 20_000
    metrics.write_text("")
    with pytest.raises(LenetError, match="no epochs"):
        plots.curves(metrics, tmp_path / "empty.png")


def test_confusion_and_mistakes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 10
    logits = torch.nn.functional.one_hot(labels, 10).float() * 2 + torch.randn(200, 10, generator=generator)
    images = torch.randint(0, 256, (200, 28, 28), dtype=torch.uint8, generator=generator)
    matrix = torch.bincount(labels * 10 + logits.argmax(1), minlength=100).view(10, 10)
    assert matrix.trace() <= 200 - 12  # enough mistakes to fill the grid
    width, height = png_size(plots.confusion(matrix, CLASSES, tmp_path / "confusion.png"))
    assert width >= 600 and height >= 500 and (tmp_path / "confusion.png").stat().st_size > 20_000
    out = plots.misclassified(images, labels, logits, CLASSES, tmp_path / "worst.png", count=12)
    assert png_size(out) == (570, 510) and out.stat().st_size > 20_000  # 4x3 grid
    perfect = torch.nn.functional.one_hot(labels, 10).float()
    assert plots.misclassified(images, labels, perfect, CLASSES, tmp_path / "none.png").exists()


def test_explain_figure_holds_input_filters_maps_and_bars(tmp_path):
    model = build("modern").eval()
    image = np.zeros((28, 28), np.uint8)
    image[6:22, 12:16] = 255
    maps = feature_maps(model, image, 0.13, 0.31)
    probabilities = predict(model, image[None], 0.13, 0.31)[0].tolist()
    out = plots.explain(
        image, maps, first_filters(model), probabilities, CLASSES, tmp_path / "x.png", "a bar"
    )
    width, height = png_size(out)
    assert width == 1100 and height > 800 and out.stat().st_size > 50_000


def test_training_writes_curves_and_confusion(tmp_path, tiny_dataset):
    cfg = TrainConfig(
        model="classic",
        epochs=2,
        batch_size=32,
        lr=0.01,
        out=str(tmp_path / "run"),
        device="cpu",
        val_split=0,
    )
    fit(cfg, log=lambda _: None, dataset=tiny_dataset)
    for name in ("curves.png", "confusion.png"):
        assert png_size(tmp_path / "run" / name)[0] >= 600


def test_without_matplotlib_training_skips_plots_and_explain_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert not plots.available()
    assert plots.training_plots(tmp_path, torch.zeros(10, 10), CLASSES) == []
    with pytest.raises(LenetError, match=r"pip install 'lenet\[plot\]'"):
        plots.confusion(torch.zeros(10, 10), CLASSES, tmp_path / "c.png")


@pytest.mark.real_data
def test_evaluate_writes_the_confusion_matrix_and_the_worst_mistakes(
    modern_checkpoint, mnist_cache, tmp_path
):
    from lenet.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(str(modern_checkpoint), str(mnist_cache / "mnist"), "cpu", out_dir=tmp_path)
    stem = modern_checkpoint.stem
    assert report["plots"] == {
        "confusion": str(tmp_path / f"{stem}-confusion.png"),
        "misclassified": str(tmp_path / f"{stem}-misclassified.png"),
    }
    assert png_size(report["plots"]["confusion"])[0] >= 600
    assert png_size(report["plots"]["misclassified"])[1] >= 600  # 36 mistakes: a 6x6 grid
