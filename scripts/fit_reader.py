"""Fit what the number reader (lenet/read.py) learns, for a checkpoint, and report its reading.

    python scripts/fit_reader.py CHECKPOINT [--write] [--scale 1.0] [--out FOLDER]

1. Numbers of MNIST training digits 0-54,999 (what the checkpoint trained on), half of them with touching
   neighbours: each candidate digit of their lattices is labelled with the digit whose ink it holds (at
   least 90% of its ink one digit's, and at least 85% of that digit's ink) or as not one digit, and the
   reader's candidate checker (`read._whole_digit`: a small CNN answering a digit or "not one digit") is
   trained on them. Their candidate pairs, and those of 48,000 more numbers of those digits with touching
   neighbours, are labelled with the two neighbouring digits they hold (at least 90% of the ink theirs, at
   least 85% of each one's) or as not two, and the pairs' network (`read._read_pairs`) is trained on them,
   each field randomly distorted (DISTORTION) every time it is seen.
2. Numbers of digits 55,000-57,499: WEIGHTS, PAIR_WEIGHTS and SKIP fitted as an averaged structured
   perceptron (Collins 2002): wherever the best-scoring split reads a number wrong, the weights move
   towards the best-scoring split that reads it right.
3. Numbers of digits 57,500-59,999, laid out like the tests' numbers: the measures of docs/reading.md.

Digits 55,000-59,999 are what `--val-split 5000` holds out, so CHECKPOINT must have held them out: one
trained on them (modern's default recipe trains on all 60,000) is refused; train one for this with
`lenet train --model modern --val-split 5000`. Nothing here looks at the test set. --write trains and saves
both networks (as lenet/whole_digit.npz and lenet/digit_pairs.npz, or in --out) and prints SKIP, WEIGHTS
and PAIR_WEIGHTS to paste into read.py; without it, read.py is measured as it is. --scale shrinks every set
(0.05 for a smoke run).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from handwritten_numbers import Number, candidate_owners, number_images, pair_owners, rates  # noqa: E402

from lenet import read  # noqa: E402
from lenet.checkpoint import load as load_checkpoint  # noqa: E402
from lenet.data import cache_dir, fetch, read_idx  # noqa: E402
from lenet.imagefiles import load_classifier  # noqa: E402
from lenet.preprocess import find_ink  # noqa: E402

SPLITS = {"train": (0, 55_000), "fit": (55_000, 57_500), "val": (57_500, 60_000)}
# (split, seed, count, touching share, lengths): the checker's, the weights' and the report's numbers
CHECKER_SETS = [("train", 1001, 3000, 0.5, (2, 8)), ("train", 1002, 3000, 0.5, (2, 8))]
# more numbers with touching neighbours, for the pairs' network alone: their candidate pairs only
PAIR_SETS = [("train", seed, 8000, 1.0, (2, 5)) for seed in range(2001, 2007)]
FIT_SETS = [("fit", 11, 800, 0.2, (2, 8)), ("fit", 12, 500, 1.0, (2, 8))]
REPORT_SETS = {  # as tests/test_read.py lays out its test numbers
    "mixed": ("val", 101, 300, 0.2, (2, 8)),
    "fours": ("val", 102, 200, 0.0, (4, 4)),
    "touching": ("val", 103, 600, 1.0, (2, 8)),
    "twos": ("val", 104, 200, 1.0, (2, 2)),
}
EPOCHS, BATCH, LR = 6, 256, 3e-3  # the checker's training
PAIR_EPOCHS = 12  # the pairs' network's
# its training fields' random distortions, each drawn uniformly within +-: rotation (degrees), scale,
# shear, shift (pixels)
DISTORTION = (8.0, 0.1, 0.2, 2.0)
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


class PairReader(torch.nn.Module):
    """The network `read._read_pairs` runs in numpy: the pair's field (28x56), conv 8@5x5, ReLU, max-pool 2,
    conv 16@5x5, ReLU, max-pool 2, FC 128, FC 21 (the left digit, the right digit, two whole digits)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 8, 5), torch.nn.Conv2d(8, 16, 5)
        self.fc1, self.fc2 = torch.nn.Linear(16 * 4 * 11, 128), torch.nn.Linear(128, 21)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(fields)), 2)  # (P, 8, 12, 26)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)  # (P, 16, 4, 11)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = cache_dir() / "mnist"
    start, stop = SPLITS[split]
    images = read_idx(folder / "train-images-idx3-ubyte")[start:stop]
    return images, read_idx(folder / "train-labels-idx1-ubyte")[start:stop]


def _lattices(job: tuple) -> list[tuple[Number, read.Lattice, np.ndarray, np.ndarray]]:
    """The numbers of one set, each with its lattice, its candidate digits' owners (the digit whose ink each
    holds, -1 for not one digit) and its candidate pairs' (the first of the two digits, -1 for not two)."""
    checkpoint, (split, seed, count, touching, lengths) = job
    classify, _ = load_classifier(checkpoint, "torch")  # (one torch thread: two of these run at once)
    images, labels = _digits(split)
    out = []
    for number in number_images(images, labels, count, seed, lengths, touching, owners=True):
        found = find_ink(number.image, one_digit=False)
        lattice = read.candidates(found, classify, 10, number.text)
        shape = found.soft().shape
        out.append(
            (number, lattice, candidate_owners(lattice, number, shape), pair_owners(lattice, number, shape))
        )
        number.owner = None  # (not needed any more)
    return out


def _pair_examples(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs of one set's numbers: their fields (P, 28, 56) and the two digits each holds
    (P, 2), -1 for not two whole digits. The digits' probabilities are left out (not needed for pairs)."""
    _, (split, seed, count, touching, lengths) = job
    images, labels = _digits(split)
    fields, digits = [], []
    for number in number_images(images, labels, count, seed, lengths, touching, owners=True):
        found = find_ink(number.image, one_digit=False)
        lattice = read.candidates(found, lambda f: np.full((len(f), 10), 0.1), 10, number.text)
        fields.append(lattice.pair_fields)
        digits.append(_pair_digits(number.text, pair_owners(lattice, number, found.soft().shape)))
    return np.concatenate(fields), np.concatenate(digits)


def _pair_digits(text: str, owners: np.ndarray) -> np.ndarray:
    """The two digits (P, 2) that each candidate pair holds, from its owner (`pair_owners`), or -1, -1."""
    return np.array([[int(text[d]), int(text[d + 1])] if d >= 0 else [-1, -1] for d in owners], int).reshape(
        -1, 2
    )


def build(
    checkpoint: str, sets: list[tuple], scale: float, workers: int = 2, what: Callable = _lattices
) -> list:
    """Each set's numbers with their lattices and owners (`_lattices`, or what `what` gives), `scale`
    times as many, in processes of their own (spawned: this one's torch has threads running)."""
    jobs = [
        (checkpoint, (split, seed, max(2, round(count * scale)), *rest)) for split, seed, count, *rest in sets
    ]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(what, jobs))


def train_checker(numbers: list[tuple]) -> dict[str, np.ndarray]:
    """The checker's weights as `read._whole_digit` takes them, trained on the candidates of `numbers`."""
    fields = np.concatenate([lattice.fields for _, lattice, _, _ in numbers])
    shapes = np.concatenate([lattice.features[:, read.CHECKER_SEES] for _, lattice, _, _ in numbers])
    answers = np.concatenate(
        [[int(n.text[d]) if d >= 0 else 10 for d in owners] for n, _, owners, _ in numbers]
    )
    mean, std = shapes.mean(0), shapes.std(0) + 1e-6
    x = torch.tensor(fields[:, None] / 255, dtype=torch.float32)
    s = torch.tensor((shapes - mean) / std, dtype=torch.float32)
    y = torch.tensor(answers)
    torch.manual_seed(0)
    net = Checker()
    _train(
        net,
        len(x),
        EPOCHS,
        lambda batch: torch.nn.functional.cross_entropy(net(x[batch], s[batch]), y[batch]),
    )
    weights = {name: t.detach().numpy().copy() for name, t in net.state_dict().items()}
    weights.update(mean=mean.astype(np.float32), std=std.astype(np.float32))
    with torch.no_grad():  # the numpy network is this one
        answers = net(x[:512], s[:512]).double()
    expected = (torch.logsumexp(answers[:, :10], 1) - answers[:, 10]).clamp(-15, 15).numpy()
    got = read._whole_digit(fields[:512], shapes[:512], weights)
    assert np.abs(got - expected).max() < 1e-3, np.abs(got - expected).max()
    return weights


def _train(net: torch.nn.Module, size: int, epochs: int, loss: Callable) -> None:
    """AdamW with a one-cycle schedule over `size` examples in random batches, loss(indices) each."""
    optimizer = torch.optim.AdamW(net.parameters(), LR, weight_decay=1e-4)
    steps = size // BATCH
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=epochs * steps)
    for _ in range(epochs):
        order = torch.randperm(size)
        for b in range(steps):
            batch_loss = loss(order[b * BATCH : (b + 1) * BATCH])
            optimizer.zero_grad()
            batch_loss.backward()
            optimizer.step()
            schedule.step()


def train_pairs(numbers: list[tuple], extra: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """The pairs' network's weights as `read._read_pairs` takes them, trained on the candidate pairs of
    `numbers` and the `extra` ones (`_pair_examples`): whether each is two whole digits, and for those that
    are, the two."""
    ours = [(lattice.pair_fields, _pair_digits(n.text, owners)) for n, lattice, _, owners in numbers]
    fields = np.concatenate([f for f, _ in ours + extra])
    digits = np.concatenate([d for _, d in ours + extra])
    x = torch.tensor(fields[:, None] / 255, dtype=torch.float32)
    y = torch.tensor(digits)
    two = y[:, 0] >= 0
    torch.manual_seed(0)
    net = PairReader()

    def loss(batch: torch.Tensor) -> torch.Tensor:
        answers, pair = net(_distorted(x[batch])), two[batch]
        told = torch.nn.functional.binary_cross_entropy_with_logits(answers[:, 20], pair.float())
        if not pair.any():
            return told
        both = answers[pair, :20].reshape(-1, 10)  # (2 x pairs, 10): each pair's left digit, then its right
        return told + torch.nn.functional.cross_entropy(both, y[batch][pair].flatten())

    _train(net, len(x), PAIR_EPOCHS, loss)
    weights = {name: t.detach().numpy().copy() for name, t in net.state_dict().items()}
    with torch.no_grad():  # the numpy network is this one
        answers = net(x[:256]).double()
    got, logit = read._read_pairs(fields[:256], weights)
    expected = torch.softmax(answers[:, :20].reshape(-1, 2, 10), 2).numpy()
    assert (
        np.abs(got - expected).max() < 1e-3
        and np.abs(logit - answers[:, 20].clamp(-15, 15).numpy()).max() < 1e-3
    )
    print(f"pairs: {len(x)} candidates, {int(two.sum())} of two whole digits")
    return weights


def _distorted(fields: torch.Tensor) -> torch.Tensor:
    """Fields (P, 1, 28, 56) each rotated, scaled, sheared and shifted at random within DISTORTION: the
    pairs' network reads the test writers' digits better for it (docs/reading.md)."""
    p, (_, _, h, w) = len(fields), fields.shape
    most_turn, most_stretch, most_shear, most_shift = DISTORTION
    limits = (most_turn * np.pi / 180, most_stretch, most_shear, most_shift, most_shift)
    angle, stretch, shear, shift_x, shift_y = ((torch.rand(p) * 2 - 1) * limit for limit in limits)
    scale = 1 + stretch
    # where each field pixel is sampled from, in affine_grid's coordinates: -1..1 across each side, so a
    # unit is w / 2 pixels across and h / 2 down (hence h / w and w / h for a rotation in pixels)
    theta = torch.zeros(p, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = (shear - torch.sin(angle)) / scale * h / w
    theta[:, 0, 2] = shift_x * 2 / w
    theta[:, 1, 0] = torch.sin(angle) / scale * w / h
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, 1, 2] = shift_y * 2 / h
    grid = torch.nn.functional.affine_grid(theta, list(fields.shape), align_corners=False)
    return torch.nn.functional.grid_sample(fields, grid, align_corners=False)


def repaired(numbers: list[tuple], weights: dict) -> None:
    """The lattices' pairs read by the pairs' network of `weights`."""
    for _, lattice, _, _ in numbers:
        if lattice.pairs:
            probabilities, features = read._pair_features(
                lattice.atoms, lattice.pairs, lattice.pair_fields, lattice.line, weights
            )
            lattice.pair_probabilities[:], lattice.pair_features[:] = probabilities, features


def rechecked(numbers: list[tuple], weights: dict) -> None:
    """The lattices' checker column from `weights`."""
    for _, lattice, _, _ in numbers:
        shapes = lattice.features[:, read.CHECKER_SEES]
        lattice.features[:, read.CHECKER_COLUMN] = read._whole_digit(lattice.fields, shapes, weights)


def reading(lattice: read.Lattice, split: list[int]) -> str:
    return "".join(str(d) for k in split for d in lattice.read_as(k))


def right_split(lattice: read.Lattice, scores: np.ndarray, skip: float, text: str) -> list[int] | None:
    """The best-scoring split that reads `text`, or None where no split of candidates does."""
    n, length = len(lattice.atoms), len(text)
    best = np.full((n + 1, length + 1), -np.inf)
    best[0, 0] = 0.0
    back: dict[tuple[int, int], tuple[int, int, int | None]] = {}
    ends = lattice.ends
    reads = ["".join(map(str, lattice.read_as(k))) for k in range(len(ends))]
    ending: list[list[int]] = [[] for _ in range(n + 1)]  # the candidates that end at each atom
    for k, (_, j) in enumerate(ends):
        ending[j].append(k)
    for j, skippable in enumerate(lattice.skippable, start=1):
        for t in range(length + 1):
            if skippable and best[j - 1, t] + skip > best[j, t]:
                best[j, t], back[j, t] = best[j - 1, t] + skip, (j - 1, t, None)
        for k in ending[j]:
            i, size = ends[k][0], len(reads[k])
            for t in range(size, length + 1):
                if reads[k] == text[t - size : t] and best[i, t - size] + scores[k] > best[j, t]:
                    best[j, t], back[j, t] = best[i, t - size] + scores[k], (i, t - size, k)
    if not np.isfinite(best[n, length]):
        return None
    split, j, t = [], n, length
    while j > 0:
        j, t, k = back[j, t]
        if k is not None:
            split.append(k)
    return split[::-1]


def fit_weights(numbers: list[tuple]) -> tuple[np.ndarray, np.ndarray, float]:
    """WEIGHTS, PAIR_WEIGHTS and SKIP, an averaged structured perceptron from log p alone (pairs left out),
    scaled to log p's weight 1."""
    singles, pairs = read.WEIGHTS.size, read.PAIR_WEIGHTS.size
    weights = np.zeros(singles + pairs + 1)  # the last: SKIP, per atom left out
    weights[4], weights[singles] = 1.0, -100.0  # log p; pairs' constant
    total, rng = np.zeros_like(weights), np.random.default_rng(0)

    def counts(lattice: read.Lattice, split: list[int]) -> np.ndarray:
        ends = lattice.ends
        used = sum(ends[k][1] - ends[k][0] for k in split)
        digit = [k for k in split if k < len(lattice.spans)]
        pair = [k - len(lattice.spans) for k in split if k >= len(lattice.spans)]
        return np.concatenate([lattice.features[digit].sum(0), lattice.pair_features[pair].sum(0),
                               [len(lattice.atoms) - used]])  # fmt: skip

    for _ in range(PASSES):
        for n in rng.permutation(len(numbers)):
            number, lattice, _, _ = numbers[n]
            scores = lattice.scores(weights[:singles], weights[singles:-1])
            chosen = read._best_split(lattice, scores, weights[-1])
            if reading(lattice, chosen) != number.text:
                right = right_split(lattice, scores, weights[-1], number.text)
                if right is not None:
                    weights += counts(lattice, right) - counts(lattice, chosen)
            total += weights
    total /= total[4]
    return total[:singles], total[singles:-1], float(total[-1])


def report(
    sets: dict[str, list[tuple]], weights: np.ndarray, pair_weights: np.ndarray, skip: float
) -> dict[str, float]:
    readings = {
        name: [
            reading(lattice, read._best_split(lattice, lattice.scores(weights, pair_weights), skip))
            for _, lattice, _, _ in numbers
        ]
        for name, numbers in sets.items()
    }
    together = [n for name in ("mixed", "fours", "touching") for n, _, _, _ in sets[name]]
    counts = rates(together, [got for name in ("mixed", "fours", "touching") for got in readings[name]])
    share = {key: right / max(of, 1) for key, (right, of) in counts.items() if key != "exact"}
    for name in ("fours", "twos"):
        right, of = rates([n for n, _, _, _ in sets[name]], readings[name])["exact"]
        share[name] = right / of
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--write", action="store_true", help="save the networks, print the weights")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every set (0.05: a smoke run)")
    parser.add_argument("--out", default=str(read.CHECKER.parent), help="where --write saves the networks")
    args = parser.parse_args()
    _check_held_out(args.checkpoint)
    fetch("mnist")
    started = time.perf_counter()
    if not args.write:
        report_sets = dict(
            zip(REPORT_SETS, build(args.checkpoint, REPORT_SETS.values(), args.scale), strict=True)
        )
        print(f"as read.py reads: {_shown(report(report_sets, read.WEIGHTS, read.PAIR_WEIGHTS, read.SKIP))}")
        return
    parts = build(args.checkpoint, [*REPORT_SETS.values(), *CHECKER_SETS, *FIT_SETS], args.scale)
    report_sets = dict(zip(REPORT_SETS, parts, strict=False))
    fitting = [n for part in parts[-len(FIT_SETS) :] for n in part]
    training = [n for part in parts[len(REPORT_SETS) : -len(FIT_SETS)] for n in part]
    extra = build(args.checkpoint, PAIR_SETS, args.scale, what=_pair_examples)
    checker, pairs = train_checker(training), train_pairs(training, extra)
    for numbers in [fitting, *report_sets.values()]:
        rechecked(numbers, checker)
        repaired(numbers, pairs)
    candidates = [(lattice.features[:, read.CHECKER_COLUMN] > 0) == (owners >= 0)
                  for numbers in report_sets.values() for _, lattice, owners, _ in numbers]  # fmt: skip
    print(f"checker: {np.concatenate(candidates).mean():.2%} of the report's candidates told whole or not")
    weights, pair_weights, skip = fit_weights(fitting)
    print(f"refitted: {_shown(report(report_sets, weights, pair_weights, skip))}")
    out = Path(args.out)
    np.savez(out / read.CHECKER.name, **checker)
    np.savez(out / read.PAIRS.name, **pairs)
    print(f"wrote {out / read.CHECKER.name}, {out / read.PAIRS.name} ({time.perf_counter() - started:.0f} s)")
    print("SKIP =", round(skip, 3))
    for name, values in (("WEIGHTS", weights), ("PAIR_WEIGHTS", pair_weights)):
        print(f"{name} =", np.array2string(values, precision=3, separator=", ", max_line_width=100))


def _check_held_out(path: str) -> None:
    """Exit in one line unless the checkpoint held out the digits the weights are fitted and measured on."""
    held_out = load_checkpoint(path).meta["config"].get("val_split", 0)
    first, end = SPLITS["fit"][0], SPLITS["val"][1]
    if held_out < end - first:
        sys.exit(
            f"{path}: trained on MNIST training digits {first:,}-{end - 1:,} (--val-split {held_out}), "
            f"which the reader is fitted and measured on: fit it with a checkpoint trained with "
            f"--val-split {end - first}"
        )


def _shown(share: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.2%}" for key, value in share.items())


if __name__ == "__main__":
    main()
