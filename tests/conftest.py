import os
from pathlib import Path

import pytest
import torch

from lenet import data


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding verified real MNIST under `<root>/mnist/`, filled once per session.

    Reuses $LENET_DATA_DIR when it is set, so that CI can keep one cache between runs. Point the code at it
    with `monkeypatch.setenv("LENET_DATA_DIR", str(mnist_cache))`, or pass `mnist_cache / "mnist"` as
    data_dir.
    """
    env = os.environ.get("LENET_DATA_DIR")
    root = Path(env) if env else tmp_path_factory.mktemp("lenet-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENET_DATA_DIR", str(root))
        data.fetch("mnist")
    return root


@pytest.fixture(scope="session")
def tiny_dataset() -> data.Dataset:
    """A small, learnable, MNIST-shaped set: each class is a bright bar at its own place, plus noise."""
    generator = torch.Generator().manual_seed(0)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 10
        images = torch.randint(0, 60, (n, 28, 28), generator=generator, dtype=torch.uint8)
        for digit in range(10):
            images[labels == digit, 4 + 2 * digit : 6 + 2 * digit, 6:22] = 255
        return images, labels

    train_images, train_labels = make(640)
    test_images, test_labels = make(200)
    return data.Dataset(
        "mnist",
        data.DATASETS["mnist"].classes,
        train_images,
        train_labels,
        test_images,
        test_labels,
        "synthetic",
    )


def _train_briefly(model: str, epochs: int, mnist_cache: Path, factory: pytest.TempPathFactory) -> Path:
    from lenet.device import torch_threads
    from lenet.train import fit

    out = factory.mktemp(f"{model}-run")
    data_dir = str(mnist_cache / "mnist")
    # One thread, whatever the machine or an earlier test set: the kernels' sums (and so the weights, and
    # the margins of the tests that read with them) depend on the thread count.
    with torch_threads(1):
        run = fit(model, epochs=epochs, data_dir=data_dir, out=str(out), device="cpu", log=lambda _: None)
    return run.checkpoint


@pytest.fixture(scope="session")
def modern_checkpoint(mnist_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `modern` checkpoint trained on real MNIST with the default recipe cut to 2 epochs (~99% test acc)."""
    return _train_briefly("modern", 2, mnist_cache, tmp_path_factory)


@pytest.fixture(scope="session")
def classic_checkpoint(mnist_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `classic` checkpoint trained briefly on real MNIST: the recipe cut to 2 epochs (~98% test accuracy;
    one epoch of its one-cycle schedule leaves the sigmoid net near 80%)."""
    return _train_briefly("classic", 2, mnist_cache, tmp_path_factory)
