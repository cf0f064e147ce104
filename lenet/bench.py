"""Speed benchmarks. Each one measures a baseline in the same process, so the ratio is what counts.

`train`: the tutorial's loop (a per-sample Dataset that makes a PIL image, resizes it and converts it to
a float tensor, as torchvision's Resize + ToTensor do; a DataLoader with batch 256 and shuffle; Adam)
against ours (batches sliced from in-memory uint8 tensors, normalised per batch, channels-last), both
training `classic` at batch 256 on real MNIST, plus our evaluation throughput.
"""

from __future__ import annotations

import time

import numpy as np
import torch

BATCH = 256


class TutorialDataset(torch.utils.data.Dataset):
    """The tutorials' per-sample path: uint8 array -> PIL image -> resize -> float tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = Image.fromarray(self.images[index], mode="L").resize((28, 28), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        return pixels.view(1, 28, 28).float().div(255), int(self.labels[index])


def _tutorial_images_per_s(dataset, steps: int) -> float:
    import torch.nn.functional as F

    from lenet.models import classic

    torch.manual_seed(0)
    model = classic()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        TutorialDataset(dataset.train_images.numpy(), dataset.train_labels.numpy()),
        batch_size=BATCH,
        shuffle=True,
    )
    seen, started = 0, 0.0
    for step, (x, y) in enumerate(loader):
        if step == 2:  # the first batches pay one-off start-up costs
            started, seen = time.perf_counter(), 0
        if step == steps + 2:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - started)


def _ours_images_per_s(dataset, steps: int) -> float:
    from lenet import data
    from lenet.models import classic
    from lenet.train import train_step

    torch.manual_seed(0)
    model = classic().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    mean, std = data.MNIST_MEAN, data.MNIST_STD
    batches = data.batches(
        dataset.train_images, dataset.train_labels, BATCH, shuffle=True, generator=generator
    )
    seen, started = 0, 0.0
    for step, (images, labels) in enumerate(batches):
        if step == 2:
            started, seen = time.perf_counter(), 0
        if step == steps + 2:
            break
        train_step(model, optimizer, images, labels, mean, std, torch.channels_last)
        seen += len(labels)
    return seen / (time.perf_counter() - started)


def _eval_images_per_s(dataset, repeats: int) -> float:
    from lenet import data
    from lenet.evaluate import predict_logits
    from lenet.models import classic

    model = classic().to(memory_format=torch.channels_last).eval()
    predict_logits(model, dataset.test_images[:2000], data.MNIST_MEAN, data.MNIST_STD)
    started = time.perf_counter()
    for _ in range(repeats):
        predict_logits(model, dataset.test_images, data.MNIST_MEAN, data.MNIST_STD)
    return repeats * len(dataset.test_images) / (time.perf_counter() - started)


def bench_train(steps: int = 60, rounds: int = 2) -> dict:
    """Images/s of the tutorial loop and of ours on `classic`, batch 256; best of alternating rounds."""
    from lenet import data

    dataset = data.load("mnist")
    baseline, ours = [], []
    for _ in range(rounds):  # alternate, so a noisy moment hurts both sides alike
        baseline.append(_tutorial_images_per_s(dataset, steps))
        ours.append(_ours_images_per_s(dataset, steps))
    result = {
        "suite": "train",
        "model": "classic",
        "batch_size": BATCH,
        "threads": torch.get_num_threads(),
        "baseline_images_per_s": round(max(baseline), 1),
        "images_per_s": round(max(ours), 1),
    }
    result["speedup"] = round(result["images_per_s"] / result["baseline_images_per_s"], 2)
    result["eval_images_per_s"] = round(_eval_images_per_s(dataset, repeats=max(1, steps // 20)), 1)
    return result


def run(suite: str, quick: bool = False) -> dict:
    if suite == "train":
        return bench_train(steps=5, rounds=1) if quick else bench_train()
    raise ValueError(f"unknown benchmark suite {suite!r}")


def format_result(result: dict) -> str:
    return "\n".join(f"{key:>24}: {value}" for key, value in result.items())
