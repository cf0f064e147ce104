"""Fit what the number reader (lenet/read.py) learns, for a checkpoint, and report its reading.

    python scripts/fit_reader.py CHECKPOINT [--write] [--scale 1.0]

1. Numbers of MNIST training digits 0-54,999 (what the checkpoint trained on), half of them with touching
   neighbours: each candidate digit of their lattices is labelled with the digit whose ink it holds (at
   least 90% of its ink one digit's, and at least 85% of that digit's ink) or as not one digit, and the
   reader's candidate checker (`read._whole_digit`: a small CNN answering a digit or "not one digit") is
   trained on them.
2. Numbers of digits 55,000-57,499: WEIGHTS and SKIP fitted as an averaged structured perceptron (Collins
   2002): wherever the best-scoring split reads a number wrong, the weights move towards the best-scoring
   split that reads it right.
3. Numbers of digits 57,500-59,999, laid out like the tests' numbers: the measures of docs/reading.md.

Digits 55,000-59,999 are the training runs' validation split: no checkpoint trains on them, and nothing
here looks at the test set. --write trains and saves the checker (as lenet/whole_digit.npz, or --out)
and prints WEIGHTS and SKIP to paste into read.py; without it, read.py is measured as it is. --scale
shrinks every set (0.05 for a smoke run).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from handwritten_numbers import Number, candidate_owners, number_images, rates  # noqa: E402

from lenet import read  # noqa: E402
from lenet.data import cache_dir, fetch, read_idx  # noqa: E402
from lenet.imagefiles import load_classifier  # noqa: E402
from lenet.preprocess import find_ink  # noqa: E402

SPLITS = {"train": (0, 55_000), "fit": (55_000, 57_500), "val": (57_500, 60_000)}
# (split, seed, count, touching share, lengths): the checker's, the weights' and the report's numbers
CHECKER_SETS = [("train", 1001, 3000, 0.5, (2, 8)), ("train", 1002, 3000, 0.5, (2, 8))]
FIT_SETS = [("fit", 11, 800, 0.2, (2, 8)), ("fit", 12, 500, 1.0, (2, 8))]
REPORT_SETS = {  # as tests/test_read.py lays out its test numbers
    "mixed": ("val", 101, 300, 0.2, (2, 8)),
    "fours": ("val", 102, 200, 0.0, (4, 4)),
    "touching": ("val", 103, 600, 1.0, (2, 8)),
    "twos": ("val", 104, 200, 1.0, (2, 2)),
}
EPOCHS, BATCH, LR = 6, 256, 3e-3  # the checker's training
PASSES = 10  # the perceptron's, over the fitting numbers


class Checker(torch.nn.Module):
    """The network `read._whole_digit` runs in numpy: the field at half size (14x14), conv 8@3x3, ReLU,
    max-pool 2, conv 16@3x3, ReLU, max-pool 2, then with the candidate's shape features FC 64 and FC 11
    (the digits, then not one digit). As small as that for speed: at full size with 5x5 kernels it
    read 0.5 points more touching pairs on the validation numbers and took almost four times as long."""

    def __init__(self, shapes: int = len(read.CHECKER_SEES)):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 16, 3)
        self.fc1, self.fc2 = torch.nn.Linear(16 * 2 * 2 + shapes, 64), torch.nn.Linear(64, 11)

    def forward(self, fields: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.avg_pool2d(fields, 2)  # (N, 1, 14, 14)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)  # (N, 8, 6, 6)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)  # (N, 16, 2, 2)
        return self.fc2(torch.relu(self.fc1(torch.cat([x.flatten(1), shapes], 1))))


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = cache_dir() / "mnist"
    start, stop = SPLITS[split]
    images = read_idx(folder / "train-images-idx3-ubyte")[start:stop]
    return images, read_idx(folder / "train-labels-idx1-ubyte")[start:stop]


def _lattices(job: tuple) -> list[tuple[Number, read.Lattice, np.ndarray]]:
    """The numbers of one set, each with its lattice and its candidates' owners (the digit whose ink each
    holds, -1 for not one digit)."""
    checkpoint, (split, seed, count, touching, lengths) = job
    classify, _ = load_classifier(checkpoint, "torch")  # (one torch thread: two of these run at once)
    images, labels = _digits(split)
    out = []
    for number in number_images(images, labels, count, seed, lengths, touching, owners=True):
        found = find_ink(number.image, one_digit=False)
        lattice = read.candidates(found, classify, 10, number.text)
        out.append((number, lattice, candidate_owners(lattice, number, found.soft().shape)))
        number.owner = None  # (not needed any more)
    return out


def build(checkpoint: str, sets: list[tuple], scale: float, workers: int = 2) -> list[list[tuple]]:
    """Each set's numbers with their lattices and owners (`_lattices`), `scale` times as many, in
    processes of their own (spawned: this one's torch has threads running)."""
    jobs = [
        (checkpoint, (split, seed, max(2, round(count * scale)), *rest)) for split, seed, count, *rest in sets
    ]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_lattices, jobs))


def train_checker(numbers: list[tuple]) -> dict[str, np.ndarray]:
    """The checker's weights as `read._whole_digit` takes them, trained on the candidates of `numbers`."""
    fields = np.concatenate([lattice.fields for _, lattice, _ in numbers])
    shapes = np.concatenate([lattice.features[:, read.CHECKER_SEES] for _, lattice, _ in numbers])
    answers = np.concatenate([[int(n.text[d]) if d >= 0 else 10 for d in owners] for n, _, owners in numbers])
    mean, std = shapes.mean(0), shapes.std(0) + 1e-6
    x = torch.tensor(fields[:, None] / 255, dtype=torch.float32)
    s = torch.tensor((shapes - mean) / std, dtype=torch.float32)
    y = torch.tensor(answers)
    torch.manual_seed(0)
    net = Checker()
    optimizer = torch.optim.AdamW(net.parameters(), LR, weight_decay=1e-4)
    steps = len(x) // BATCH
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=EPOCHS * steps)
    for _ in range(EPOCHS):
        order = torch.randperm(len(x))
        for b in range(steps):
            batch = order[b * BATCH : (b + 1) * BATCH]
            loss = torch.nn.functional.cross_entropy(net(x[batch], s[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    weights = {name: t.detach().numpy().copy() for name, t in net.state_dict().items()}
    weights.update(mean=mean.astype(np.float32), std=std.astype(np.float32))
    with torch.no_grad():  # the numpy network is this one
        answers = net(x[:512], s[:512]).double()
    expected = (torch.logsumexp(answers[:, :10], 1) - answers[:, 10]).clamp(-15, 15).numpy()
    got = read._whole_digit(fields[:512], shapes[:512], weights)
    assert np.abs(got - expected).max() < 1e-3, np.abs(got - expected).max()
    return weights


def rechecked(numbers: list[tuple], weights: dict) -> None:
    """The lattices' checker column from `weights`."""
    for _, lattice, _ in numbers:
        shapes = lattice.features[:, read.CHECKER_SEES]
        lattice.features[:, read.CHECKER_COLUMN] = read._whole_digit(lattice.fields, shapes, weights)


def reading(lattice: read.Lattice, split: list[int]) -> str:
    return "".join(str(int(lattice.probabilities[k].argmax())) for k in split)


def right_split(lattice: read.Lattice, scores: np.ndarray, skip: float, text: str) -> list[int] | None:
    """The best-scoring split that reads `text`, or None where no split of candidates does."""
    n, length = len(lattice.atoms), len(text)
    best = np.full((n + 1, length + 1), -np.inf)
    best[0, 0] = 0.0
    back: dict[tuple[int, int], tuple[int, int, int | None]] = {}
    reads = lattice.probabilities.argmax(1)
    ending: list[list[int]] = [[] for _ in range(n + 1)]  # the candidates that end at each atom
    for k, (_, j, _) in enumerate(lattice.spans):
        ending[j].append(k)
    for j, skippable in enumerate(lattice.skippable, start=1):
        for t in range(length + 1):
            if skippable and best[j - 1, t] + skip > best[j, t]:
                best[j, t], back[j, t] = best[j - 1, t] + skip, (j - 1, t, None)
        for k in ending[j]:
            i = lattice.spans[k][0]
            for t in range(1, length + 1):
                if str(reads[k]) == text[t - 1] and best[i, t - 1] + scores[k] > best[j, t]:
                    best[j, t], back[j, t] = best[i, t - 1] + scores[k], (i, t - 1, k)
    if not np.isfinite(best[n, length]):
        return None
    split, j, t = [], n, length
    while j > 0:
        j, t, k = back[j, t]
        if k is not None:
            split.append(k)
    return split[::-1]


def fit_weights(numbers: list[tuple]) -> tuple[np.ndarray, float]:
    """WEIGHTS and SKIP, an averaged structured perceptron from log p alone, scaled to log p's weight 1."""
    weights = np.zeros(read.WEIGHTS.size + 1)  # the last: SKIP, per atom left out
    weights[4] = 1.0  # log p
    total, rng = np.zeros_like(weights), np.random.default_rng(0)

    def counts(lattice: read.Lattice, split: list[int]) -> np.ndarray:
        used = sum(lattice.spans[k][1] - lattice.spans[k][0] for k in split)
        return np.append(lattice.features[split].sum(0), len(lattice.atoms) - used)

    for _ in range(PASSES):
        for n in rng.permutation(len(numbers)):
            number, lattice, _ = numbers[n]
            scores = lattice.features @ weights[:-1]
            chosen = read._best_split(lattice, scores, weights[-1])
            if reading(lattice, chosen) != number.text:
                right = right_split(lattice, scores, weights[-1], number.text)
                if right is not None:
                    weights += counts(lattice, right) - counts(lattice, chosen)
            total += weights
    total /= total[4]
    return total[:-1], float(total[-1])


def report(sets: dict[str, list[tuple]], weights: np.ndarray, skip: float) -> dict[str, float]:
    readings = {
        name: [
            reading(lattice, read._best_split(lattice, lattice.features @ weights, skip))
            for _, lattice, _ in numbers
        ]
        for name, numbers in sets.items()
    }
    together = [n for name in ("mixed", "fours", "touching") for n, _, _ in sets[name]]
    counts = rates(together, [got for name in ("mixed", "fours", "touching") for got in readings[name]])
    share = {key: right / max(of, 1) for key, (right, of) in counts.items() if key != "exact"}
    for name in ("fours", "twos"):
        right, of = rates([n for n, _, _ in sets[name]], readings[name])["exact"]
        share[name] = right / of
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--write", action="store_true", help="save the checker, print WEIGHTS and SKIP")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every set (0.05: a smoke run)")
    parser.add_argument("--out", default=str(read.CHECKER), help="where --write saves the checker")
    args = parser.parse_args()
    fetch("mnist")
    started = time.perf_counter()
    if not args.write:
        report_sets = dict(
            zip(REPORT_SETS, build(args.checkpoint, REPORT_SETS.values(), args.scale), strict=True)
        )
        print(f"as read.py reads: {_shown(report(report_sets, read.WEIGHTS, read.SKIP))}")
        return
    parts = build(args.checkpoint, [*REPORT_SETS.values(), *CHECKER_SETS, *FIT_SETS], args.scale)
    report_sets = dict(zip(REPORT_SETS, parts, strict=False))
    fitting = [n for part in parts[-len(FIT_SETS) :] for n in part]
    checker = train_checker([n for part in parts[len(REPORT_SETS) : -len(FIT_SETS)] for n in part])
    for numbers in [fitting, *report_sets.values()]:
        rechecked(numbers, checker)
    candidates = [(lattice.features[:, read.CHECKER_COLUMN] > 0) == (owners >= 0)
                  for numbers in report_sets.values() for _, lattice, owners in numbers]  # fmt: skip
    print(f"checker: {np.concatenate(candidates).mean():.2%} of the report's candidates told whole or not")
    weights, skip = fit_weights(fitting)
    print(f"refitted: {_shown(report(report_sets, weights, skip))}")
    np.savez(args.out, **checker)
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s); for read.py:")
    print("SKIP =", round(skip, 3))
    print("WEIGHTS =", np.array2string(weights, precision=3, separator=", ", max_line_width=100))


def _shown(share: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.2%}" for key, value in share.items())


if __name__ == "__main__":
    main()
