"""Reading a handwritten number (one line of digits, any count): segmentation by recognition.

LeNet was built to read the amounts on cheques, where the strokes of one digit come apart (a 5's top, a
7's bar), neighbours touch, and stray marks share the line. As LeCun's group did, the ink is cut into
more pieces than there are digits, the network scores the candidate digits that runs of neighbouring
pieces make, and the reading is the left-to-right split into digits that scores best:

1. the ink, found as `preprocess` finds it, split into its connected pieces (8-neighbours);
2. specks (a stray dot) and lines (an underline, a stroke across) left out, judged by the line's height;
3. pieces wide enough to hold touching digits cut along the paths from top to bottom that cross the
   least ink (where neighbours touch), a few candidates each;
4. each run of up to MAX_ATOMS neighbouring pieces and parts (atoms) no wider than a digit prepared the
   MNIST way (`fit_ink`: cropped, fitted into 20x20, centred by mass, exactly as for one digit) and
   classified, in one batch;
5. digits that overlap, so that no cut from top to bottom parts them, read whole as a pair: each run of
   atoms without gaps that a cut joins (or one wide piece), PAIR_WIDTH line heights wide, fitted into
   20x40 and read by the reader's own pairs' network (`_read_pairs`: the left digit, the right one, and
   whether it is two whole digits at all);
6. the split chosen by dynamic programming: the one whose digits' and pairs' scores add up to the most. A
   candidate digit's score is WEIGHTS . its features: the network's confidence, its shape for the line (a
   digit is about as tall as the line, reaches its top and bottom, and is not much wider than the
   others), the cuts on its sides, which digit the network reads (a stroke cut off a digit readily
   passes for a 1 or a 0), and the reader's own checker: a small network that tells whole digits from
   fragments and merges (`_whole_digit`), which the network, trained on whole digits only, cannot. A
   pair's is PAIR_WEIGHTS . its features: the pairs' network's confidence and its shape and cuts.

Lengths are in line heights (the median height of the tallest pieces). scripts/fit_reader.py trains
the checker and the pairs' network on the candidates of numbers built from MNIST training digits
0-54,999 and fits WEIGHTS and PAIR_WEIGHTS together as an averaged structured perceptron (Collins 2002:
the split the scores choose, corrected towards the best split that reads the right number, a pair
counting as its two digits), the way LeCun et al. trained their segmentation graphs
discriminatively, on numbers built from digits 55,000-57,499; the features and thresholds were chosen on
numbers of digits 57,500-59,999 (tests/handwritten_numbers.py; digits 55,000-59,999 are what
`--val-split 5000` holds out, and the checkpoint they were fitted with held them out), never the test set
(docs/reading.md).
Torch-free: `classify` is any function from uint8 images (N, 28, 28) to probabilities (N, classes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lenet import native
from lenet.errors import LenetError
from lenet.preprocess import Ink, Source, components, find_ink, fit_ink, source_name, stroke_width

DIGITS = tuple("0123456789")
# MNIST digits' median width over height, digit by digit
ASPECTS = (0.9, 0.4, 0.9, 0.8, 0.8, 0.95, 0.7, 0.75, 0.75, 0.65)
MAX_PIECES = 64  # separate marks (specks and lines left out) beyond which a picture is not one number
MAX_ATOMS = 4  # atoms that one digit may be made of
MAX_WIDTH = 1.4  # the widest candidate digit of more than one atom
MAX_GAP = 0.6  # the widest gaps between the atoms of one candidate digit, all told
MAX_PAIR_ATOMS = 6  # atoms that a pair of touching digits, read whole, may be made of
PAIR_WIDTH = (1.0, 2.8)  # the narrowest and widest candidate pair (line heights)
PAIR_BOX = (20, 40)  # a pair's ink is fitted into this (h, w) and centred in a PAIR_FIELD field
PAIR_FIELD = (28, 56)
SPECK = 0.2  # a piece less than this tall and wide is a speck
LINE = (1.5, 0.25)  # a piece at least [0] wide and at most [1] tall is a line, not a digit
CUTTABLE = 0.7  # pieces at least this wide may hold touching digits
MAX_CUT = 3.0  # stroke widths of ink that a cut may cross
MIN_PART = 0.15  # the narrowest part a cut may leave
MIN_SIDE = 0.1  # of the piece's ink, the least a cut may leave on either side
CUT_SPACING = 0.3  # at most one cut per this much of a piece's width
STRAIGHT = 0.02  # ink a cut pays per column it moves sideways
CUT_ROWS = 64  # cuts are searched for at about this many rows per line height
WALL = 1e6  # the cost of the columns between pieces laid side by side for the search
PAIR_CUT = (0.4, 0.6)  # a pair read whole is split by the cheapest cut within this share of its ink
SKIPPABLE = 0.5  # atoms shorter than this may be left out of the reading, scoring SKIP
SKIP = -3.195
WEIGHTS = np.array([
    -2.439,  # 1 (a constant)
    0.263,  # width / the usual piece width
    1.207,  # the same, squared
    -1.017,  # (width / height - the predicted digit's usual) squared
    1.000,  # log p (the network's top probability)
    1.444,  # log p / p2 (over the second)
    -0.357,  # width
    0.393,  # width squared
    0.098,  # height
    -0.476,  # 0.6 - height where shorter
    -0.030,  # gaps between its atoms
    1.092,  # ink crossed by the cut on its left (stroke widths)
    0.479,  # strokes beyond one that cut crosses
    2.014,  # ink crossed by the cut on its right
    1.032,  # strokes beyond one that cut crosses
    2.685,  # atoms beyond one
    -0.705,  # cuts inside it, joined again
    -0.519,  # where it starts below the line's top (line heights)
    -2.154,  # where it ends above the line's bottom
    3.067,  # the checker's logit that it is one whole digit (_whole_digit)
    -2.493, -1.521, -0.522, 1.510, 1.048, 1.523, -1.947, -1.193, -1.705, 2.860,  # the predicted digit, 0 to 9
])  # fmt: skip
PAIRS = Path(__file__).with_name("digit_pairs.npz")  # _read_pairs' weights (scripts/fit_reader.py)
PAIR_WEIGHTS = np.array([
    -9.414,  # 1 (a constant)
    -0.287,  # log p of the left digit (the pairs' network's top probability)
    -0.173,  # log p of the right digit
    1.750,  # log p / p2 of the left digit
    1.080,  # log p / p2 of the right digit
    4.116,  # the pairs' network's logit that it is two whole digits
    1.406,  # width
    0.091,  # width squared
    2.264,  # height
    -0.024,  # 0.6 - height where shorter
    0.000,  # gaps between its atoms (pairs have none: a fixed 0)
    2.169,  # ink crossed by the cut on its left (stroke widths)
    1.136,  # strokes beyond one that cut crosses
    1.472,  # ink crossed by the cut on its right
    0.559,  # strokes beyond one that cut crosses
    0.982,  # atoms beyond one
    1.501,  # cuts inside it, joined again
    -0.122,  # where it starts below the line's top (line heights)
    -0.076,  # where it ends above the line's bottom
])  # fmt: skip
CHECKER = Path(__file__).with_name("whole_digit.npz")  # _whole_digit's weights (scripts/fit_reader.py)
CHECKER_SEES = [1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]  # the feature columns it weighs
CHECKER_COLUMN = 19  # its logit's column in the features: after the 19 above it in WEIGHTS


class NoNumberError(LenetError):
    """An image that can be read but holds no number: no digits (only specks and stray lines), or more
    separate marks than one line of digits."""


@dataclasses.dataclass(frozen=True)
class _Atom:
    """A piece of ink, or a part of one between cuts: its pixels `mask` (h, w) with top-left (y0, x0), and
    the cut on its left (where it does not begin a piece): the ink it crosses in stroke widths, and in how
    many separate strokes."""

    y0: int
    x0: int
    mask: np.ndarray
    cut: float = 0.0
    crossings: int = 0

    @property
    def y1(self) -> int:
        return self.y0 + self.mask.shape[0]

    @property
    def x1(self) -> int:
        return self.x0 + self.mask.shape[1]


def read_number(
    source: Source,
    classify: Callable[[np.ndarray], np.ndarray],
    invert: str = "auto",
    name: str | None = None,
    classes: Sequence[str] = DIGITS,
) -> dict:
    """Read one line of handwritten digits.

    source: what `preprocess` takes (a path, encoded bytes, a PIL image, a 2-D array); invert and name as
    there. classify: uint8 images (N, 28, 28) -> probabilities (N, len(classes)) as numpy, e.g.
    `predict.classifier(...)` or `export.OnnxModel.predict`.
    Returns {"number": "4096", "digits": [{"digit", "index", "probability", "probabilities" (floats),
    "box" [x0, y0, x1, y1] in the source's pixels (x1, y1 exclusive), "input" uint8 (28, 28)}, ...] left to
    right, "width", "height"} (the source's size). Raises LenetError in one line for an image that cannot
    be read, and its subclass NoNumberError for one that holds no digits, or more separate marks than a
    number (MAX_PIECES).
    """
    label = name if name is not None else source_name(source)
    found = find_ink(source, invert, label, one_digit=False)
    lattice = candidates(found, classify, len(classes), label)
    chosen = _best_split(lattice, lattice.scores(WEIGHTS, PAIR_WEIGHTS))
    if not chosen:
        raise NoNumberError(f"{label}: no digits found (only specks and stray marks)")
    digits = [digit for k in chosen for digit in _digits(lattice, k, classes, found)]
    return {"number": "".join(d["digit"] for d in digits), "digits": digits, "width": found.size[0],
            "height": found.size[1]}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Lattice:
    """The candidates of one line: its atoms left to right; the runs of them that may be digits (`spans`:
    (i, j, (width, height, gaps))), each prepared (`fields` uint8 (N, 28, 28)) and classified
    (`probabilities` (N, classes)), with their `features` (N, len(WEIGHTS)); the runs that may be two
    touching digits, read whole (`pairs`, `pair_fields` (P, 28, 56), `pair_probabilities` (P, 2, 10),
    `pair_features` (P, len(PAIR_WEIGHTS))); the line's top, bottom and height in pixels (`_line`), the
    ink (H, W) in 0..1 and where each atom's ink lies (`_reach`). Candidate k < N is spans[k], and k >= N
    is pairs[k - N]."""

    atoms: list[_Atom]
    spans: list[tuple[int, int, tuple[float, float, float]]]
    fields: np.ndarray
    probabilities: np.ndarray
    features: np.ndarray
    pairs: list[tuple[int, int, tuple[float, float, float]]]
    pair_fields: np.ndarray
    pair_probabilities: np.ndarray
    pair_features: np.ndarray
    line: tuple[float, float, float]
    ink: np.ndarray
    reaches: list[tuple[int, int, np.ndarray]]

    @property
    def height(self) -> float:
        """The line's height in pixels."""
        return self.line[2]

    @property
    def skippable(self) -> list[bool]:
        """Which atoms may be left out of the reading: those shorter than SKIPPABLE line heights."""
        return [atom.y1 - atom.y0 < SKIPPABLE * self.height for atom in self.atoms]

    @property
    def ends(self) -> list[tuple[int, int]]:
        """The atoms each candidate, digit or pair, begins and ends at: (i, j) for atoms[i:j]."""
        return [(i, j) for i, j, _ in self.spans + self.pairs]

    def read_as(self, k: int) -> list[int]:
        """The digits (class indices) candidate k reads as: one, or two for a pair."""
        if k < len(self.spans):
            return [int(self.probabilities[k].argmax())]
        return self.pair_probabilities[k - len(self.spans)].argmax(1).tolist()

    def scores(self, weights: np.ndarray, pair_weights: np.ndarray) -> np.ndarray:
        """Every candidate's score, the digits' then the pairs'."""
        return np.concatenate([self.features @ weights, self.pair_features @ pair_weights])


def candidates(found: Ink, classify: Callable[[np.ndarray], np.ndarray], classes: int, label: str) -> Lattice:
    """Steps 1-4 of the reading (the module's docstring) for the ink `find_ink` found."""
    ink = found.soft()  # (H, W) in 0..1
    labels, _, boxes = components(ink > 0.5)
    pieces, height = _marks(boxes, label)
    atoms = _atoms(labels, ink, pieces, boxes, height, max(stroke_width(labels > 0), 1.0))
    spans = _spans(atoms, height)
    reaches = [_reach(atom, labels) for atom in atoms]
    fields = np.stack([fit_ink(_ink_of(reaches[i:j], ink)[2]) for i, j, _ in spans])  # (N, 28, 28)
    probabilities = np.asarray(classify(fields), dtype=np.float64)
    if probabilities.shape != (len(spans), classes):
        raise ValueError(f"classify gave {probabilities.shape} for {len(spans)} images, {classes} classes")
    usual = _median(boxes[pieces, 2] - boxes[pieces, 0]) / height  # a piece's width
    line = _line(boxes[pieces], height)
    features = _features(atoms, spans, fields, probabilities, usual, line)
    pairs = _pairs(atoms, height) if classes == len(DIGITS) else []  # (the pairs' network reads digits)
    pair_fields = np.zeros((len(pairs), *PAIR_FIELD), dtype=np.uint8)
    for p, (i, j, _) in enumerate(pairs):
        pair_fields[p] = _pair_field(_ink_of(reaches[i:j], ink)[2])
    pair_probabilities, pair_features = _pair_features(atoms, pairs, pair_fields, line)
    return Lattice(atoms, spans, fields, probabilities, features, pairs, pair_fields, pair_probabilities,
                   pair_features, line, ink, reaches)  # fmt: skip


def _digits(lattice: Lattice, k: int, classes: Sequence[str], found: Ink) -> list[dict]:
    """Candidate k as the digits of the reading: one, or for a pair the ink left and right of the
    cheapest cut through the middle of its ink (`_pair_cut`), each with its box in the source's pixels."""
    n = len(lattice.spans)
    if k < n:
        i, j, _ = lattice.spans[k]
        atoms = lattice.atoms[i:j]
        box = (min(a.x0 for a in atoms), min(a.y0 for a in atoms), max(a.x1 for a in atoms),
               max(a.y1 for a in atoms))  # fmt: skip
        return [_digit(box, lattice.probabilities[k], lattice.fields[k], classes, found)]
    i, j, _ = lattice.pairs[k - n]
    y0, x0, ink = _ink_of(lattice.reaches[i:j], lattice.ink)
    left_of_cut = np.arange(ink.shape[1]) < _pair_cut(ink)[:, None]  # (h, w)
    digits = []
    for side, probabilities in zip(
        (left_of_cut, ~left_of_cut), lattice.pair_probabilities[k - n], strict=True
    ):
        half = np.where(side, ink, 0)
        ys, xs = np.nonzero(half > 0.5)
        box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
        digits.append(_digit(box, probabilities, fit_ink(half), classes, found))
    return digits


def _pair_cut(ink: np.ndarray) -> np.ndarray:
    """Where to split a pair's ink (h, w) into its two digits: for each row, the first column of the right
    digit, along the cheapest cut from top to bottom (`_cheapest`) within the PAIR_CUT share of its ink
    (columns by their ink left of them), leaving both sides some ink."""
    inked = ink > 0.5
    columns, mass = np.flatnonzero(inked.any(0)), np.cumsum(inked.sum(0))
    lo, hi = mass.searchsorted(np.array(PAIR_CUT) * mass[-1])
    cost = np.full(ink.shape, WALL)
    cost[:, lo : hi + 1] = ink[:, lo : hi + 1]
    totals, came = _cheapest(cost[None])
    at, x = np.empty(ink.shape[0], dtype=np.int64), int(totals[0, -1].argmin())
    for y in range(ink.shape[0] - 1, -1, -1):  # back up the cut: each row it entered at came, left at x
        entered = int(came[0, y, x])
        at[y], x = (entered + x + 1) // 2, entered
    return np.clip(at, columns[0] + 1, columns[-1])  # the first inked column left, the last right


def _digit(
    box: tuple, probabilities: np.ndarray, field: np.ndarray, classes: Sequence[str], found: Ink
) -> dict:
    """A digit of the reading: its box (x0, y0, x1, y1) in the ink's pixels, its probabilities and field."""
    best = int(probabilities.argmax())
    sx, sy = found.scale()
    x0, y0, x1, y1 = box
    box = [math.floor(x0 * sx), math.floor(y0 * sy), min(math.ceil(x1 * sx), found.size[0]),
           min(math.ceil(y1 * sy), found.size[1])]  # fmt: skip
    return {"digit": classes[best], "index": best, "probability": float(probabilities[best]),
            "probabilities": probabilities.tolist(), "box": box, "input": field}  # fmt: skip


def _marks(boxes: np.ndarray, label: str) -> tuple[list[int], float]:
    """The pieces that may be (parts of) digits, specks and lines left out, and the line's height."""
    if len(boxes) == 0:
        raise NoNumberError(f"{label}: no digits found")
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    height = _median(heights[heights >= 0.5 * heights.max()])
    speck = np.maximum(widths, heights) < SPECK * height
    line = (widths >= LINE[0] * height) & (heights <= LINE[1] * height)
    pieces = np.flatnonzero(~speck & ~line)
    if len(pieces) == 0:
        raise NoNumberError(f"{label}: no digits found (only specks and stray lines)")
    if len(pieces) > MAX_PIECES:
        raise NoNumberError(
            f"{label}: {len(pieces)} separate marks, more than {MAX_PIECES}: expected one line of digits"
        )
    return pieces.tolist(), height


def _atoms(
    labels: np.ndarray, ink: np.ndarray, pieces: list[int], boxes: np.ndarray, height: float, stroke: float
) -> list[_Atom]:
    """The pieces as atoms, left to right: each whole, or where it is wide enough to hold touching digits,
    its parts between the cheapest cuts from top to bottom (those that cross the least of its ink)."""
    regions = [(slice(y0, y1), slice(x0, x1)) for x0, y0, x1, y1 in boxes[pieces].tolist()]
    masks = [labels[region] == p + 1 for p, region in zip(pieces, regions, strict=True)]
    wide = [k for k, mask in enumerate(masks) if mask.shape[1] >= CUTTABLE * height]
    costs = [np.where(masks[k], ink[regions[k]], 0) for k in wide]
    cuts = dict(zip(wide, _cuts(costs, height, stroke), strict=True))
    atoms = []
    for k, mask in enumerate(masks):
        x0, y0 = boxes[pieces[k], :2].tolist()
        h, w = mask.shape
        if k not in cuts:  # the piece whole (its mask fills its box)
            atoms.append(_Atom(y0, x0, mask))
            continue
        columns, after, cut = np.arange(w), np.full(h, -1), (0.0, 0)
        for _, hi, strokes, crossings in [*cuts[k], (None, np.full(h, w), 0.0, 0)]:
            part = mask & (columns > after[:, None]) & (columns <= hi[:, None])  # the cut's own pixels too
            ys, xs = np.flatnonzero(part.any(1)), np.flatnonzero(part.any(0))
            if ys.size:
                crop = part[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
                atoms.append(_Atom(y0 + int(ys[0]), x0 + int(xs[0]), crop, *cut))
            after, cut = hi, (strokes, crossings)
    return sorted(atoms, key=lambda atom: atom.x0 + atom.x1)


def _cuts(costs: list[np.ndarray], height: float, stroke: float) -> list[list[tuple]]:
    """Cuts through pieces' ink (h, w) each: paths from the top row to the bottom that step down a row or
    sideways a column at a time, paying for the ink they cross. For each piece, those that cross at most
    MAX_CUT stroke widths, at most one per CUT_SPACING of its width, each at least MIN_PART from the others
    and the sides and leaving MIN_SIDE of the ink on either side: [(the columns the cut covers in each row,
    from (h,) to (h,) inclusive, the ink it crosses in stroke widths, the strokes it crosses)], left to
    right.

    Candidates are the cheapest cuts through each pixel of ink that is cheaper to cut through than its
    neighbours in its row, the cheapest first: the cheapest cut from top to bottom alone would cross a
    thin stroke of one digit, not the place where two digits touch, if that is a little thicker. The
    search runs at about CUT_ROWS rows per line height (block means), all pieces side by side between
    walls, so that it costs a few operations per row for the whole number.
    """
    if not costs:
        return []
    step = max(1, round(height / CUT_ROWS))
    small = [_reduced(cost, step) for cost in costs]
    starts = np.cumsum([1] + [c.shape[1] + 1 for c in small])  # pieces' first columns (a wall before each)
    strip = np.zeros((max(c.shape[0] for c in small), int(starts[-1])))
    strip[:, starts - 1] = WALL
    for c, x in zip(small, starts[:-1], strict=True):
        strip[: c.shape[0], x : x + c.shape[1]] = c
    totals, came = _cheapest(np.stack([strip, strip[::-1]]))
    down, up = totals[0], totals[1, ::-1]
    came_down, came_up = came[0].tolist(), came[1, ::-1].tolist()  # walked a pixel at a time by _trace
    through = down + up - strip  # the cheapest cut through each pixel
    inked = strip > 0.5
    inked_rows = inked.tolist()  # (read by _crossings a pixel at a time)
    candidate = inked & (strip < WALL) & (through <= MAX_CUT * stroke / step)
    candidate[:, 1:] &= through[:, 1:] <= through[:, :-1]  # no dearer than its neighbours in the row
    candidate[:, :-1] &= through[:, :-1] <= through[:, 1:]
    left_of = np.zeros((strip.shape[0], strip.shape[1] + 1))  # (h, W + 1): cost left of each column
    np.cumsum(strip, axis=1, out=left_of[:, 1:])
    found = []
    for c, x, full in zip(small, starts[:-1], costs, strict=True):
        h, w = c.shape
        ys, xs = np.nonzero(candidate[:h, x : x + w])
        order = np.argsort(through[ys, xs + x], kind="stable")
        # (h, w + 1): the share of the piece's ink left of each of its columns
        inside = (left_of[:h, x : x + w + 1] - left_of[:h, x : x + 1]) / max(float(c.sum()), 1e-9)
        cuts = _choose(came_down, came_up, inked_rows, inside, ys[order], xs[order] + x, through, x, w,
                       height / step, stroke / step)  # fmt: skip
        h, w = full.shape  # back to the piece's own pixels
        found.append([(np.repeat(lo - x, step)[:h] * step,
                       np.minimum(np.repeat(hi - x, step)[:h] * step + step - 1, w - 1), strokes, crossings)
                      for lo, hi, strokes, crossings in cuts])  # fmt: skip
    return found


def _reduced(cost: np.ndarray, step: int) -> np.ndarray:
    """The means of step x step blocks of cost (h, w), the last ones padded with zeros."""
    if step == 1:
        return cost
    h, w = cost.shape
    padded = np.pad(cost, ((0, -h % step), (0, -w % step)))
    return padded.reshape(-(-h // step), step, -(-w // step), step).mean((1, 3))


def _choose(came_down, came_up, ink, inside, ys, xs, through, x0, w, height, stroke) -> list[tuple]:
    """Cuts through the candidate pixels (ys, xs), cheapest first, of the piece at columns x0..x0 + w of the
    strip (inside: the share of its ink left of each of its columns, row by row): those far enough from
    the sides and each other, leaving MIN_SIDE of its ink on either side and not crossing, at most one
    per CUT_SPACING of its width. A few dozen candidates a piece, each a short walk: in plain Python."""
    part, room = MIN_PART * height, max(1, int(w / (CUT_SPACING * height)) - 1)
    shares = inside.tolist()  # the piece's rows (the strip's further rows are paper below shorter pieces)
    taken: list[tuple[list, list, float, float]] = []  # columns, centre, ink crossed (stroke widths)
    seen: list[tuple[list, list]] = []  # cuts traced, taken or not: others near them are alike
    for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
        if len(taken) >= room:
            break
        if any(lo[y] - part < x < hi[y] + part for lo, hi in seen):
            continue
        lo, hi = _trace(came_down, came_up, y, x)
        seen.append((lo, hi))
        centre = (sum(lo) + sum(hi)) / (2 * len(lo)) - x0
        if not part <= centre <= w - part or any(abs(centre - c) < part for _, _, c, _ in taken):
            continue
        left = sum(row[min(max(a - x0, 0), w)] for row, a in zip(shares, lo, strict=False))  # piece's rows
        if MIN_SIDE <= left <= 1 - MIN_SIDE and not any(_cross(lo, hi, a, b) for a, b, _, _ in taken):
            taken.append((lo, hi, centre, float(through[y, x]) / stroke))
    taken.sort(key=lambda cut: cut[2])  # left to right: cuts that do not cross are ordered by their centres
    return [(np.array(lo), np.array(hi), strokes, _crossings(ink, lo, hi)) for lo, hi, _, strokes in taken]


def _cross(lo: list[int], hi: list[int], other_lo: list[int], other_hi: list[int]) -> bool:
    """Whether two cuts (the columns they cover in each row) cross: neither lies wholly left of the other."""
    left_of = all(h < a for h, a in zip(hi, other_lo, strict=True))
    return not left_of and not all(b < a for b, a in zip(other_hi, lo, strict=True))


def _cheapest(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest paths from the top row of each cost (n, h, w) to each pixel, stepping down a row or
    sideways a column at a time, paying the cost of each pixel entered and STRAIGHT per sideways step (of
    two equally cheap cuts, the straighter): their totals (n, h, w), and the column at which each entered
    its last row. Compiled where the kernels build (native.load), the same doubles: the loop over rows is
    otherwise most of the search for cuts."""
    n, h, w = cost.shape
    lib = native.load()
    if lib is not None:
        cost = np.ascontiguousarray(cost, dtype=np.float64)
        totals, came = np.empty((n, h, w)), np.empty((n, h, w), dtype=np.int64)
        lib.cheapest_paths(cost.ctypes.data, n, h, w, STRAIGHT, totals.ctypes.data, came.ctypes.data)
        return totals, came
    # both directions as one array (2n, h, w): each cost walked rightwards, then each mirrored (in reverse
    # order, so that [::-1, ::-1] pairs every row with its own mirror image) walked rightwards, which is
    # leftwards in the cost. Sideways from x' to x costs sideways[x] - sideways[x'] (prefix sums).
    both = np.concatenate([cost, cost[::-1, :, ::-1]])
    sideways = np.cumsum(both + STRAIGHT, axis=2)
    totals, best = np.empty((2 * n, h, w)), np.empty((2 * n, h, w))
    arriving, above = np.empty((2 * n, w)), np.zeros((2 * n, w))
    for y in range(h):  # the row loop does only what the next row needs; where paths came from, after it
        np.add(above, both[:, y], out=arriving)  # stepping down into each column
        np.subtract(arriving, sideways[:, y], out=arriving)
        np.minimum.accumulate(arriving, axis=1, out=best[:, y])
        via = best[:, y] + sideways[:, y]
        above = np.minimum(via, via[::-1, ::-1], out=totals[:, y])  # the cheaper way in, mirrored alike
    entered = np.concatenate([np.zeros((2 * n, 1, w)), totals[:, :-1]], axis=1) + both
    index = np.arange(w)
    start = np.maximum.accumulate(np.where(entered - sideways == best, index, 0), axis=2)
    via = best + sideways
    mirrored = (slice(None, None, -1), slice(None), slice(None, None, -1))
    came = np.where(via[:n] <= via[mirrored][:n], start[:n], w - 1 - start[mirrored][:n])
    return totals[:n], came


def _trace(
    came_down: list[list[int]], came_up: list[list[int]], y: int, x: int
) -> tuple[list[int], list[int]]:
    """The cheapest cut through pixel (y, x): the first and last column it covers in each row. came_down,
    came_up as lists (h rows of columns): a walk reads them one pixel at a time."""
    h = len(came_down)
    into, out_of = [0] * h, [0] * h  # where it comes into each row and where it leaves it
    into[y], out_of[y] = came_down[y][x], came_up[y][x]
    for row in range(y - 1, -1, -1):  # up the way it came, then down the way it goes
        out_of[row] = into[row + 1]
        into[row] = came_down[row][out_of[row]]
    for row in range(y + 1, h):
        into[row] = out_of[row - 1]
        out_of[row] = came_up[row][into[row]]
    lo, hi = list(map(min, into, out_of)), list(map(max, into, out_of))
    lo[y], hi[y] = min(lo[y], x), max(hi[y], x)
    return lo, hi


def _crossings(ink: list[list[bool]], lo: list[int], hi: list[int]) -> int:
    """The strokes of ink (h rows of w) that a cut covering columns lo..hi (h,) of each row crosses: the
    separate runs of ink along it."""
    along = [inked for row, a, b in zip(ink, lo, hi, strict=True) for inked in row[a : b + 1]]
    return along[0] + sum(map(operator.gt, along[1:], along))  # its first pixel's, then each from paper


def _runs(
    atoms: list[_Atom], height: float, most: int, widest: float
) -> list[tuple[int, int, tuple[float, float, float], bool]]:
    """Runs atoms[i:j] of at most `most` atoms no wider than `widest` line heights, with gaps between their
    atoms of at most MAX_GAP, each atom alone always: (i, j, (width, height, gaps) in line heights, whether
    a cut joins two of its atoms)."""
    runs, boxes = [], [(a.x0, a.y0, a.x1, a.y1, a.cut) for a in atoms]
    for i in range(len(atoms)):
        x0, y0, x1, y1, _ = boxes[i]
        gaps, joined = 0, False
        for j in range(i + 1, min(i + most, len(atoms)) + 1):
            if j > i + 1:
                ax0, ay0, ax1, ay1, cut = boxes[j - 1]
                gaps, joined = gaps + max(0, ax0 - x1), joined or cut > 0
                x0, y0, x1, y1 = min(x0, ax0), min(y0, ay0), max(x1, ax1), max(y1, ay1)
            if j > i + 1 and (x1 - x0 > widest * height or gaps > MAX_GAP * height):
                break
            runs.append((i, j, ((x1 - x0) / height, (y1 - y0) / height, gaps / height), joined))
    return runs


def _spans(atoms: list[_Atom], height: float) -> list[tuple[int, int, tuple[float, float, float]]]:
    """Candidate digits: runs of at most MAX_ATOMS atoms no wider than MAX_WIDTH (an atom alone always), with
    their shape (width, height, gaps between their atoms) in line heights."""
    return [(i, j, shape) for i, j, shape, _ in _runs(atoms, height, MAX_ATOMS, MAX_WIDTH)]


def _pairs(atoms: list[_Atom], height: float) -> list[tuple[int, int, tuple[float, float, float]]]:
    """Candidate pairs of touching digits, read whole: runs of at most MAX_PAIR_ATOMS atoms, PAIR_WIDTH wide
    and two pixels at least (a column of ink for each digit), without gaps between their atoms, in which a
    cut joins two atoms (or one atom, uncut), with their shapes as `_spans` gives them."""
    runs = _runs(atoms, height, MAX_PAIR_ATOMS, PAIR_WIDTH[1])
    narrowest = max(PAIR_WIDTH[0], 1.5 / height)  # in line heights
    return [(i, j, shape) for i, j, shape, joined in runs
            if (joined or j == i + 1) and shape[0] >= narrowest and shape[2] == 0]  # fmt: skip


def _line(boxes: np.ndarray, height: float) -> tuple[float, float, float]:
    """The line's top and bottom (the median of its tall pieces') in pixels, and its height."""
    tall = boxes[boxes[:, 3] - boxes[:, 1] >= 0.5 * (boxes[:, 3] - boxes[:, 1]).max()]
    return _median(tall[:, 1]), _median(tall[:, 3]), height


def _median(values: np.ndarray) -> float:
    """np.median of a few whole numbers (pixels), without its cost per call, which is more than the work."""
    ordered = sorted(values.tolist())
    middle = len(ordered) // 2
    return float(ordered[middle]) if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _features(
    atoms: list[_Atom],
    spans: list[tuple],
    fields: np.ndarray,
    probabilities: np.ndarray,
    usual: float,
    line: tuple,
) -> np.ndarray:
    """What the scores of the candidate digits weigh (N, len(WEIGHTS)), a row per span (WEIGHTS says what
    each column is), from their shapes (width, height, gaps) in line heights, their fields (N, 28, 28),
    the network's probabilities (N, classes), the usual width of a piece, and the line's top, bottom and
    height (`_line`)."""
    width, height = np.array([shape[:2] for _, _, shape in spans]).T
    second, first = np.partition(probabilities, -2, axis=1)[:, -2:].T.clip(1e-12)
    read_as = probabilities.argmax(1)
    typical = np.asarray(ASPECTS)[read_as] if probabilities.shape[1] == len(ASPECTS) else 0.75
    relative = width / usual
    shape = np.column_stack([
        np.ones(len(spans)),
        relative,
        relative**2,
        (width / np.maximum(height, 1e-6) - typical) ** 2,
        np.log(first),
        np.minimum(np.log(first / second), 20.0),
        _run_columns(atoms, spans, line),
    ])  # fmt: skip
    whole = _whole_digit(fields, shape[:, CHECKER_SEES])
    return np.column_stack([shape, whole, read_as[:, None] == np.arange(len(ASPECTS))])  # the digit read


def _run_columns(atoms: list[_Atom], runs: list[tuple], line: tuple) -> np.ndarray:
    """What the scores of digits and pairs alike weigh of runs of atoms (N, 13): WEIGHTS' columns from
    "width" to "where it ends above the line's bottom", in that order."""
    top, bottom, line_height = line
    first_atom = np.array([i for i, _, _ in runs])
    after = np.array([j for _, j, _ in runs])  # the atom whose cut is each run's right edge
    width, height, gaps = np.array([shape for _, _, shape in runs]).T
    y0s, y1s = [a.y0 for a in atoms], [a.y1 for a in atoms]
    below_top = (np.array([min(y0s[i:j]) for i, j, _ in runs]) - top) / line_height
    above_bottom = (bottom - np.array([max(y1s[i:j]) for i, j, _ in runs])) / line_height
    cut = np.array([a.cut for a in atoms] + [0.0])  # (and none right of the last atom)
    beyond_one = np.maximum(np.array([a.crossings for a in atoms] + [0]) - 1, 0)
    joined = np.concatenate([[0], np.cumsum(cut > 0)])  # joined[k]: atoms before k with a cut on the left
    return np.column_stack([
        width,
        width * width,
        height,
        np.maximum(0.0, 0.6 - height),
        gaps,
        cut[first_atom],
        beyond_one[first_atom],
        cut[after],
        beyond_one[after],
        after - first_atom - 1,
        joined[after] - joined[first_atom + 1],
        np.maximum(0.0, below_top),
        np.maximum(0.0, above_bottom),
    ])  # fmt: skip


def _pair_features(
    atoms: list[_Atom], pairs: list[tuple], fields: np.ndarray, line: tuple, weights: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs' network's probabilities (P, 2, 10) for the candidate pairs' fields (P, 28, 56), and what
    their scores weigh (P, len(PAIR_WEIGHTS)), PAIR_WEIGHTS saying what each column is."""
    if not pairs:
        return np.zeros((0, 2, len(DIGITS))), np.zeros((0, len(PAIR_WEIGHTS)))
    probabilities, two = _read_pairs(fields, weights)
    ranked = np.sort(probabilities, axis=2).clip(1e-12)  # (P, 2, 10)
    first, margin = np.log(ranked[:, :, -1]), np.minimum(np.log(ranked[:, :, -1] / ranked[:, :, -2]), 20.0)
    columns = [np.ones(len(pairs)), first[:, 0], first[:, 1], margin[:, 0], margin[:, 1], two]
    return probabilities, np.column_stack([*columns, _run_columns(atoms, pairs, line)])


@functools.cache
def _saved(path: Path) -> dict[str, np.ndarray]:
    """The weights of one of the reader's own networks (CHECKER, PAIRS), float32, loaded without pickle."""
    with np.load(path, allow_pickle=False) as saved:
        return {name: saved[name].astype(np.float32) for name in saved.files}


def _whole_digit(fields: np.ndarray, shape: np.ndarray, weights: dict | None = None) -> np.ndarray:
    """How surely each candidate is one whole digit rather than a fragment of one or two merged (N,): the
    logit of the reader's own small network (weights from CHECKER unless given), which sees the fields
    uint8 (N, 28, 28) at half size and the candidates' shapes (N, len(CHECKER_SEES)), and answers a digit
    or "not one digit" (scripts/fit_reader.py trains it on the candidates of numbers built from MNIST
    training digits: LeCun et al. trained their cheque reader's recognizer on wrong segments too)."""
    w = _saved(CHECKER) if weights is None else weights
    n, f = len(fields), fields[..., None].astype(np.float32)
    x = (f[:, 0::2, 0::2] + f[:, 0::2, 1::2] + f[:, 1::2, 0::2] + f[:, 1::2, 1::2]) / 1020  # (N, 14, 14, 1)
    x = _conv_relu_pool(x, w["conv1.weight"], w["conv1.bias"])  # (N, 6, 6, 8), channels last
    x = _conv_relu_pool(x, w["conv2.weight"], w["conv2.bias"])  # (N, 2, 2, 16)
    x = np.concatenate([x.transpose(0, 3, 1, 2).reshape(n, -1), (shape - w["mean"]) / w["std"]], axis=1)
    x = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)
    answers = x @ w["fc2.weight"].T + w["fc2.bias"]  # (N, 11): the digits 0-9, then not one digit
    # log P(a digit) - log P(not one), bounded so that no one answer outweighs every other feature
    return np.clip(np.logaddexp.reduce(answers[:, :10], axis=1) - answers[:, 10], -15.0, 15.0)


def _pair_field(ink: np.ndarray) -> np.ndarray:
    """The ink (h, w) in 0..1 of a candidate pair -> its uint8 PAIR_FIELD field: cropped to the ink, fitted
    into PAIR_BOX keeping the aspect ratio, its darkest pixel made full ink, centred."""
    inked = ink > 0.5
    ys, xs = np.flatnonzero(inked.any(1)), np.flatnonzero(inked.any(0))
    crop = ink[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    h, w = crop.shape
    scale = min(PAIR_BOX[0] / h, PAIR_BOX[1] / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    fitted = np.asarray(Image.fromarray(crop.astype(np.float32), "F").resize(size, Image.BILINEAR))
    field = np.zeros(PAIR_FIELD, dtype=np.uint8)
    y0, x0 = (PAIR_FIELD[0] - size[1]) // 2, (PAIR_FIELD[1] - size[0]) // 2
    field[y0 : y0 + size[1], x0 : x0 + size[0]] = np.clip(fitted / max(fitted.max(), 1e-6), 0, 1) * 255 + 0.5
    return field


def _read_pairs(fields: np.ndarray, weights: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The reader's own network for two touching digits read whole (weights from PAIRS unless given): the
    fields uint8 (P, 28, 56) -> the probabilities of the left and the right digit (P, 2, 10), and the logit
    that the field holds two whole digits (P,) rather than one, three or fragments."""
    w = _saved(PAIRS) if weights is None else weights
    p = len(fields)
    x = fields[..., None].astype(np.float32) / 255  # (P, 28, 56, 1)
    x = _conv_relu_pool(x, w["conv1.weight"], w["conv1.bias"])  # (P, 12, 26, 8), channels last
    x = _conv_relu_pool(x, w["conv2.weight"], w["conv2.bias"])  # (P, 4, 11, 16)
    x = np.maximum(x.transpose(0, 3, 1, 2).reshape(p, -1) @ w["fc1.weight"].T + w["fc1.bias"], 0)
    answers = x @ w["fc2.weight"].T + w["fc2.bias"]  # (P, 21): the left digit, the right, two digits or not
    digits = answers[:, :20].reshape(p, 2, 10)
    digits = np.exp(digits - digits.max(2, keepdims=True))
    return digits / digits.sum(2, keepdims=True), np.clip(answers[:, 20], -15.0, 15.0)


def _conv_relu_pool(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A convolution (no padding), ReLU and 2x2 max pooling, the convolution one matrix product over the
    windows: x (N, H, W, C), weight (O, C, k, k) -> (N, (H - k + 1) / 2, (W - k + 1) / 2, O)."""
    out, channels, k, _ = weight.shape
    n, h, w = x.shape[0], x.shape[1] - k + 1, x.shape[2] - k + 1
    # each window's pixels row by row, channels innermost (contiguous in x): k * k shifted copies side by
    # side, quicker than a strided view of the windows copied into weight's own order
    shifted = [x[:, i : i + h, j : j + w] for i in range(k) for j in range(k)]  # (N, h, w, C) each
    columns = np.concatenate(shifted, axis=3).reshape(n * h * w, k * k * channels)
    y = (columns @ weight.transpose(0, 2, 3, 1).reshape(out, -1).T).reshape(n, h, w, out)
    pooled = np.maximum(
        np.maximum(y[:, 0::2, 0::2], y[:, 0::2, 1::2]), np.maximum(y[:, 1::2, 0::2], y[:, 1::2, 1::2])
    )
    return np.maximum(pooled + bias, 0)  # (the bias and ReLU commute with the max: on a quarter of it)


def _best_split(lattice: Lattice, scores: np.ndarray, skip: float = SKIP) -> list[int]:
    """The indices into the lattice's spans of the digits of the best-scoring split of its atoms, left to
    right, each candidate scoring scores[k] (short atoms may be left out, each scoring skip)."""
    atoms, ends, skippable = lattice.atoms, lattice.ends, lattice.skippable
    ending: list[list[int]] = [[] for _ in range(len(atoms) + 1)]
    for k, (_, j) in enumerate(ends):
        ending[j].append(k)
    best = np.full(len(atoms) + 1, -np.inf)
    best[0] = 0.0
    back: list[tuple[int, int | None]] = [(0, None)] * (len(atoms) + 1)  # (previous end, span or skip)
    for j in range(1, len(atoms) + 1):
        if skippable[j - 1] and best[j - 1] + skip > best[j]:
            best[j], back[j] = best[j - 1] + skip, (j - 1, None)
        for k in ending[j]:
            i = ends[k][0]
            if best[i] + scores[k] > best[j]:
                best[j], back[j] = best[i] + scores[k], (i, k)
    chosen, j = [], len(atoms)
    while j > 0:
        j, k = back[j]
        if k is not None:
            chosen.append(k)
    return chosen[::-1]


def _reach(atom: _Atom, labels: np.ndarray, pad: int = 2) -> tuple[int, int, np.ndarray]:
    """Where an atom's ink lies: its own pixels and the faint edges around them (anti-aliasing, blur) that
    belong to no piece, those up to `pad` pixels from them (8-neighbours), as (y0, x0, mask (h, w))."""
    y0, x0 = max(atom.y0 - pad, 0), max(atom.x0 - pad, 0)
    y1, x1 = min(atom.y1 + pad, labels.shape[0]), min(atom.x1 + pad, labels.shape[1])
    h, w = y1 - y0, x1 - x0
    own = np.zeros((h + 2 * pad, w + 2 * pad), dtype=bool)  # a margin of pad all round for the shifts
    own[atom.y0 - y0 + pad : atom.y1 - y0 + pad, atom.x0 - x0 + pad : atom.x1 - x0 + pad] = atom.mask
    taps = range(2 * pad + 1)
    rows = np.logical_or.reduce([own[i : i + h] for i in taps])  # (h, w + 2 pad)
    near = np.logical_or.reduce([rows[:, j : j + w] for j in taps])
    return y0, x0, own[pad:-pad, pad:-pad] | (near & (labels[y0:y1, x0:x1] == 0))


def _ink_of(reaches: list[tuple[int, int, np.ndarray]], ink: np.ndarray) -> tuple[int, int, np.ndarray]:
    """The ink (h, w) in 0..1 of a candidate: where its atoms' ink lies (`_reach`), with its top-left
    (y0, x0) in the whole ink's pixels."""
    y0, x0, keep = reaches[0]
    if len(reaches) > 1:
        y0, x0 = min(y for y, _, _ in reaches), min(x for _, x, _ in reaches)
        y1 = max(y + mask.shape[0] for y, _, mask in reaches)
        x1 = max(x + mask.shape[1] for _, x, mask in reaches)
        keep = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for y, x, mask in reaches:
            keep[y - y0 : y - y0 + mask.shape[0], x - x0 : x - x0 + mask.shape[1]] |= mask
    h, w = keep.shape
    return y0, x0, np.where(keep, ink[y0 : y0 + h, x0 : x0 + w], np.float32(0))  # (ink: float32)
