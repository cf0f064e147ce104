"""Handwritten numbers made from real handwriting (MNIST digits), deterministically, to test reading them.

`number_images(images, labels, count, seed, ...)` writes numbers of several digits on a line the way people
do: random gaps, each digit's size within +-20% of the line's, a wandering baseline, the whole line
slanted, and in about a fifth of the numbers neighbours that touch; rendered as clean scans or as photos
(paper texture, uneven light, noise, JPEG). Tests build them from the MNIST test set; read.py's
thresholds were chosen on numbers built from the last 5,000 training digits.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from hard_digits import blur, ink_of, lighting, resized
from PIL import Image


@dataclasses.dataclass
class Number:
    image: bytes
    text: str  # the digits, left to right
    touching: list[int]  # i where digits i and i + 1 touch
    photo: bool
    owner: np.ndarray | None = None  # uint8 (H, W): 1 + the digit whose ink each pixel mostly is, 0 paper


def touching_offset(left: np.ndarray, right: np.ndarray, dy: int) -> int:
    """The largest x at which `right` (its top at dy relative to `left`'s top) touches `left`'s ink when
    its left edge sits at x (both ink masks, 8-neighbours)."""
    h = max(left.shape[0], right.shape[0] + dy) - min(0, dy)
    top = -min(0, dy)
    left_edge = np.full(h, -(10**6))
    right_edge = np.full(h, 10**6)
    for y in range(left.shape[0]):
        xs = np.flatnonzero(left[y])
        if xs.size:
            left_edge[top + y] = xs[-1]
    for y in range(right.shape[0]):
        xs = np.flatnonzero(right[y])
        if xs.size:
            right_edge[top + dy + y] = xs[0]
    # touching: for some row pair within one row of each other, right's first ink <= left's last ink + 1
    best = -(10**6)
    for y in range(h):
        for near in (y - 1, y, y + 1):
            if 0 <= near < h and left_edge[near] > -(10**6) and right_edge[y] < 10**6:
                best = max(best, left_edge[near] + 1 - right_edge[y])
    return int(best)


def compose(
    digits: list[np.ndarray], rng: np.random.Generator, touching: bool
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """MNIST digits on one line: ink in 0..1 (H, W), the pairs that touch, and which digit each pixel's
    ink mostly belongs to (uint8 (H, W), 1 + its index, 0 on paper)."""
    height = rng.uniform(24, 64)
    inks = [resized(ink_of(d), ink_of(d).shape[0] / 20 * height * rng.uniform(0.8, 1.2)) for d in digits]
    touch = [touching and rng.random() < 0.3 for _ in range(len(inks) - 1)]
    if touching and not any(touch):
        touch[int(rng.integers(0, len(touch)))] = True
    margin = int(height * rng.uniform(0.3, 1.0)) + 4
    tops = [margin + int(height * 1.2 - ink.shape[0] + rng.normal(0, 0.05 * height)) for ink in inks]
    tops = [max(2, t) for t in tops]
    xs = [margin]
    for i in range(1, len(inks)):
        if touch[i - 1]:
            x = xs[-1] + touching_offset(inks[i - 1] > 0.3, inks[i] > 0.3, tops[i] - tops[i - 1])
            x -= int(rng.integers(0, 2))  # touching, or a pixel over
        else:
            x = xs[-1] + inks[i - 1].shape[1] + int(height * rng.uniform(0.12, 0.6))
        xs.append(x)
    shape = (max(t + ink.shape[0] for t, ink in zip(tops, inks, strict=True)) + margin,
             max(x + ink.shape[1] for x, ink in zip(xs, inks, strict=True)) + margin)  # fmt: skip
    canvas = np.zeros(shape, np.float32)
    owner = np.zeros(shape, np.uint8)
    for k, (t, x, ink) in enumerate(zip(tops, xs, inks, strict=True)):
        region = canvas[t : t + ink.shape[0], x : x + ink.shape[1]]
        owner[t : t + ink.shape[0], x : x + ink.shape[1]][(ink > region) & (ink > 0.1)] = k + 1
        np.maximum(region, ink, out=region)
    slant = rng.uniform(-0.25, 0.25)  # x moves by slant * (distance above the bottom)
    h, w = canvas.shape
    pad = int(abs(slant) * h) + 1
    shear = (1, slant, -slant * h, 0, 1, 0)
    image = Image.fromarray(np.pad(canvas, ((0, 0), (pad, pad))), "F")
    sheared = image.transform(image.size, Image.AFFINE, shear, Image.BILINEAR)
    owners = Image.fromarray(np.pad(owner, ((0, 0), (pad, pad)))).transform(image.size, Image.AFFINE, shear)
    return np.clip(np.asarray(sheared), 0, 1), [i for i, t in enumerate(touch) if t], np.asarray(owners)


def render(ink: np.ndarray, rng: np.random.Generator, photo: bool) -> tuple[bytes, float]:
    """Encoded image of the ink, and the scale it was drawn at (photos are taken closer)."""
    buffer = io.BytesIO()
    scale = 1.0
    if photo:
        scale = rng.uniform(1, 2)  # more pixels per stroke
        size = (round(ink.shape[1] * scale), round(ink.shape[0] * scale))
        ink = np.asarray(Image.fromarray(ink.astype(np.float32), "F").resize(size, Image.BILINEAR))
        paper = rng.uniform(170, 235) + blur(rng.normal(0, rng.uniform(3, 8), ink.shape), 1.5)  # texture
        pixels = (paper * (1 - ink) + rng.uniform(20, 80) * ink) * lighting(
            ink.shape, rng, rng.uniform(0.1, 0.4)
        )
        pixels = blur(pixels, rng.uniform(0.3, 1.0)) + rng.normal(0, rng.uniform(2, 6), ink.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(buffer, format="JPEG", quality=int(rng.integers(40, 86)))
    else:
        pixels = 255 - ink * rng.uniform(180, 235) + rng.normal(0, rng.uniform(0, 3), ink.shape)
        Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue(), scale


def number_images(
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    seed: int = 0,
    lengths: tuple[int, int] = (2, 8),
    touching: float = 0.2,
    owners: bool = False,
) -> list[Number]:
    """`count` numbers of lengths[0]..lengths[1] MNIST digits, a `touching` share of them with touching
    neighbours, half of them photos; the same for the same arguments. owners: keep each number's owner
    map (which digit each pixel belongs to), at the image's size."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(lengths[0], lengths[1] + 1))
        picks = rng.integers(0, len(images), n)
        ink, touch, owner = compose([images[i] for i in picks], rng, rng.random() < touching)
        photo = bool(rng.random() < 0.5)
        text = "".join(str(int(labels[i])) for i in picks)
        image, scale = render(ink, rng, photo)
        if owners and scale != 1:
            size = (round(owner.shape[1] * scale), round(owner.shape[0] * scale))
            owner = np.asarray(Image.fromarray(owner).resize(size, Image.NEAREST))
        out.append(Number(image, text, touch, photo, owner if owners else None))
    return out


def edits(got: str, text: str) -> list[list[int]]:
    """cost[i][j]: the fewest edits (insertions, deletions, substitutions) from text[:i] to got[:j]."""
    cost = [[i + j if i * j == 0 else 0 for j in range(len(got) + 1)] for i in range(len(text) + 1)]
    for i in range(1, len(text) + 1):
        for j in range(1, len(got) + 1):
            cost[i][j] = min(
                cost[i - 1][j] + 1, cost[i][j - 1] + 1, cost[i - 1][j - 1] + (text[i - 1] != got[j - 1])
            )
    return cost


def matched(got: str, text: str) -> set[int]:
    """The positions of text read right in got: those an optimal alignment (fewest edits) pairs with an
    equal character."""
    cost = edits(got, text)
    i, j, right = len(text), len(got), set()
    while i > 0 and j > 0:
        if cost[i][j] == cost[i - 1][j - 1] + (text[i - 1] != got[j - 1]):
            if text[i - 1] == got[j - 1]:
                right.add(i - 1)
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j] + 1:
            i -= 1
        else:
            j -= 1
    return right


def rates(numbers: list[Number], readings: list[str]) -> dict[str, tuple[int, int]]:
    """What docs/reading.md reports, as (right, of) counts: "digits" in the numbers whose digits do not
    touch (those left once the edits that make the reading right are done), "pairs" of touching neighbours
    read right in a reading of the right length, "aligned" pairs whose two digits an alignment of the
    reading with the number finds right (a slip elsewhere in the number not counted), "exact" numbers."""
    counts = dict.fromkeys(("digits", "pairs", "aligned", "exact"), (0, 0))

    def add(key: str, right: int, of: int) -> None:
        counts[key] = (counts[key][0] + right, counts[key][1] + of)

    for number, got in zip(numbers, readings, strict=True):
        text = number.text
        add("exact", got == text, 1)
        if not number.touching:
            add("digits", max(0, len(text) - edits(got, text)[-1][-1]), len(text))
        right = matched(got, text) if number.touching else set()
        for i in number.touching:
            add("pairs", len(got) == len(text) and got[i : i + 2] == text[i : i + 2], 1)
            add("aligned", {i, i + 1} <= right, 1)
    return counts


def _atom_owners(lattice, number: Number, shape: tuple[int, int]) -> np.ndarray:
    """Each atom's pixels counted by the digit of `number` they belong to (atoms, 1 + digits; 0: paper)."""
    owner = np.asarray(Image.fromarray(number.owner).resize(shape[::-1], Image.NEAREST))
    ink = np.zeros((len(lattice.atoms), len(number.text) + 1))
    for k, atom in enumerate(lattice.atoms):
        pixels = owner[atom.y0 : atom.y1, atom.x0 : atom.x1][atom.mask]
        ink[k] = np.bincount(pixels, minlength=ink.shape[1])[: ink.shape[1]]
    return ink


def candidate_owners(lattice, number: Number, shape: tuple[int, int]) -> np.ndarray:
    """Which digit of `number` (made with owners=True) each candidate digit of its `read.Lattice` holds
    (N,): the index of the digit whose ink is at least 90% of the candidate's and of which it holds at
    least 85%, or -1 (a fragment, two digits merged, a stray mark). shape: the ink's (`find_ink`)."""
    ink = _atom_owners(lattice, number, shape)
    whole = ink.sum(0)
    owners = []
    for i, j, _ in lattice.spans:
        held = ink[i:j].sum(0)
        d = int(held[1:].argmax()) + 1
        owners.append(d - 1 if held[d] >= 0.9 * held.sum() and held[d] >= 0.85 * whole[d] else -1)
    return np.array(owners)


def pair_owners(lattice, number: Number, shape: tuple[int, int]) -> np.ndarray:
    """Which neighbouring digits d, d + 1 of `number` each candidate pair of its `read.Lattice` holds (P,):
    d where their ink is at least 90% of the candidate's and it holds at least 85% of each, or -1."""
    ink = _atom_owners(lattice, number, shape)
    whole = ink.sum(0)
    owners = []
    for i, j, _ in lattice.pairs:
        held = ink[i:j].sum(0)
        both = held[1:-1] + held[2:]  # digits d and d + 1, from d = 0
        d = int(both.argmax()) if len(both) else 0
        right = (
            len(both)
            and both[d] >= 0.9 * held.sum()
            and min(held[d + 1] / whole[d + 1], held[d + 2] / whole[d + 2]) >= 0.85
        )
        owners.append(d if right else -1)
    return np.array(owners, dtype=int)
