"""A user's digit image -> the 28x28 uint8 array MNIST would have made of it.

MNIST took bilevel scans, fitted each digit into a 20x20 box keeping its aspect ratio (anti-aliasing gave
the grey levels) and placed it in a 28x28 field with its centre of mass at the centre, white ink on black.
`preprocess` does the same to a photo, scan, drawing or array:

1. decode (any format Pillow reads; EXIF orientation honoured; first frame; transparent = background) to
   grey, large images box-reduced to at most WORK_SIDE pixels a side;
2. find the polarity (the ink lies further beyond the paper's levels, the border's, than the paper's own
   spread) and the paper's level; when the border is uneven (light falling across a photo, a shadow, rule
   lines, ink at the edge), estimate the paper's surface (a grey opening: what no stroke is wide enough
   to hold up) and subtract it, and the rule lines of ruled or squared paper with it;
3. estimate the paper's noise from the pixels on its far side from the ink (the soft edges of blurred
   strokes lie on the ink's side, so they do not pass for noise), split ink from paper with Otsu's
   threshold, refuse what is only noise or specks, and map the grey levels between the paper's noise and
   the ink's typical level onto 0..1 (a lookup table over the 256 levels, so JPEG noise and faint
   anti-aliased edges keep their share without per-pixel work);
4. crop to the ink, leaving out specks set apart from the digit;
5. scale to fit 20x20, anti-aliased (bilinear onto a grid 4x finer, then 4x4 means, done as one matrix
   product per axis); strokes far thinner than MNIST's are first widened on that finer grid;
6. paste into 28x28 so that the centre of mass lands on pixel (14, 14), moving by whole pixels as MNIST did.

`steps` returns what each step made of an image (to show the work); `find_ink` (1-3) and `fit_ink` (4-6)
are the two halves, which lenet.read uses on each digit of a number. Only numpy and Pillow: no torch, so
worker processes that preprocess start fast. Thresholds were chosen on pictures made of the last 5,000
MNIST training digits (tests/hard_digits.py), never the test set.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lenet.errors import LenetError

MAX_PIXELS = 40_000_000  # refuse larger images before decoding (Pillow's own bomb guard stays on as well)
MAX_SIDE = 1_000_000  # and longer sides: Pillow spends a pointer on every row, so 1 x MAX_PIXELS costs 9x
WORK_SIDE = 800  # larger images are box-reduced to at most this many pixels a side before any analysis
INVERT_CHOICES = ("auto", "yes", "no")
BOX, FIELD = 20, 28  # MNIST: digit fitted into 20x20, placed in 28x28
FINE = 4  # scaling goes through a grid FINE times finer than the 20x20 box
MIN_RANGE = 24.0  # grey levels between darkest and brightest below which an image counts as blank
MIN_CONTRAST = 10.0  # grey levels between the ink's typical level and the paper's
MIN_SNR = 5.0  # that difference over the paper's noise (standard deviation)
MAX_INK_FRACTION = 0.6  # more "ink" than this is not a digit on paper
MIN_PIECE_SHARE = 0.2  # of the ink, in its largest connected piece: less is specks, not strokes
UNEVEN = 6  # grey levels between the edges' means from which the paper counts as unevenly lit
PAPER_GRID = 32  # uneven paper is estimated on a grid of at most this many cells a side
PAPER_WINDOW = 0.5  # of the picture's longer side: wider than the strokes of a digit that fills it
RULE_WIDTH = 0.015  # rule lines are at most this thick for their length (digits' strokes are thicker)
# MNIST's stroke width, measured as 2 * area / boundary length of the >0.5 mask, is 1.3 to 3.1 pixels
# (5th-95th percentile, median 2.0) at 28x28. Strokes thinner than THIN are widened to about TARGET.
THIN, TARGET = 1.2, 1.8

_LEVELS = np.arange(256)
_LEVELS_F32 = np.arange(256, dtype=np.float32)
_POSITIONS = np.arange(FIELD, dtype=np.float32)
_sum = np.add.reduce  # ndarray.sum without its Python wrapper, which costs more than the work on a digit

Source = str | Path | bytes | bytearray | memoryview | BinaryIO | Image.Image | np.ndarray | list


def preprocess(source: Source, invert: str = "auto", name: str | None = None) -> np.ndarray:
    """A digit image -> (28, 28) uint8 array in MNIST convention (white ink on black, centred by mass).

    source: a file path, encoded image bytes, a binary file object, a PIL image, or a 2-D array (numpy,
    torch or nested lists, e.g. from JSON) of grey levels 0..255 of any size.
    invert: "auto" detects the polarity (paper is what the border mostly shows); "yes" means dark ink on
    light paper, "no" light ink on dark.
    name: what error messages call the image (default: the path, "upload" for bytes, "image", "array").
    Raises LenetError naming the image if it cannot be read, is too large, is blank or has no clear digit.
    """
    return fit_ink(find_ink(source, invert, name).soft())


@dataclasses.dataclass(frozen=True)
class Ink:
    """Where an image's ink is. levels: uint8 (H, W) and table: float32 (256,), with table[levels] the ink in
    0..1 (paper 0); size: the source image's (width, height) in pixels as displayed (EXIF orientation
    applied), of which levels may be a box-reduced copy."""

    levels: np.ndarray
    table: np.ndarray
    size: tuple[int, int]

    def soft(self) -> np.ndarray:
        """The ink in 0..1, float32 (H, W)."""
        return self.table.take(self.levels)

    def scale(self) -> tuple[float, float]:
        """Source pixels per pixel of levels, (x, y)."""
        return self.size[0] / self.levels.shape[1], self.size[1] / self.levels.shape[0]


def find_ink(source: Source, invert: str = "auto", name: str | None = None, one_digit: bool = True) -> Ink:
    """Decode an image (as `preprocess` takes it) and separate its ink from the paper: steps 1-3 above.

    one_digit: the image should hold one digit, so that ink scattered in many small pieces is specks, not
    a digit (False for a number, whose digits are as many pieces).
    Raises LenetError naming the image if it cannot be read, is too large, is blank or has no clear ink.
    """
    label = name if name is not None else source_name(source)
    if invert not in INVERT_CHOICES:
        raise LenetError(f"--invert: expected one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
    grey, size = _as_array(source, label) if _is_array(source) else _decode(source, label)
    levels, table = _ink(grey, invert, label, one_digit)
    return Ink(levels, table, size)


def fit_ink(ink: np.ndarray) -> np.ndarray:
    """Ink (H, W) in 0..1 -> the (28, 28) uint8 MNIST field: cropped to the ink (specks set apart left out),
    fitted into 20x20 and centred by mass (steps 4-6 above)."""
    mask = ink > 0.5  # more ink than paper
    rows, cols = _digit_extent(mask)
    return _place(_fit(ink[rows, cols], stroke_width(mask[rows, cols])))[0]


def steps(source: Source, invert: str = "auto", name: str | None = None) -> dict:
    """What `preprocess` does to an image, step by step, for showing its work:

    - "size": [width, height] of the source image as displayed;
    - "crop": [x0, y0, x1, y1], the digit's extent in the source's pixels (x1, y1 exclusive);
    - "fitted": uint8 (20, 20), the crop scaled to fit 20x20 keeping its aspect ratio, centred in the box;
    - "fitted_box": [x0, y0, x1, y1], where the scaled digit lies in "fitted";
    - "centre_of_mass": [x, y], the scaled digit's centre of mass in "fitted" pixels;
    - "shift": [dx, dy], where fitted's pixel (0, 0) lands in the 28x28 field: centre_of_mass + shift is
      within half a pixel of (14, 14), as MNIST moved its digits by whole pixels;
    - "input": uint8 (28, 28), what the network sees (equal to preprocess's result).
    Raises LenetError as preprocess does.
    """
    found = find_ink(source, invert, name)
    ink = found.soft()
    mask = ink > 0.5
    rows, cols = _digit_extent(mask)
    box = _fit(ink[rows, cols], stroke_width(mask[rows, cols]))  # (h, w), the longer side BOX
    field, (top, left), (com_y, com_x) = _place(box)
    h, w = box.shape
    y0, x0 = (BOX - h) // 2, (BOX - w) // 2
    fitted = np.zeros((BOX, BOX), dtype=np.uint8)
    fitted[y0 : y0 + h, x0 : x0 + w] = box * 255 + 0.5
    sx, sy = found.scale()
    return {
        "size": list(found.size),
        "crop": [
            math.floor(cols.start * sx),
            math.floor(rows.start * sy),
            min(math.ceil(cols.stop * sx), found.size[0]),
            min(math.ceil(rows.stop * sy), found.size[1]),
        ],
        "fitted": fitted,
        "fitted_box": [x0, y0, x0 + w, y0 + h],
        "centre_of_mass": [com_x + x0, com_y + y0],
        "shift": [left - x0, top - y0],
        "input": field,
    }


def source_name(source) -> str:
    """What error messages call an image: its path, "upload" for bytes, "image", "array"."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "upload"
    if isinstance(source, Image.Image):
        return "image"
    return "array" if _is_array(source) else getattr(source, "name", "upload")


def _is_array(source) -> bool:
    return isinstance(source, (np.ndarray, list, tuple)) or type(source).__module__.startswith("torch")


def _as_array(source, label: str) -> tuple[np.ndarray, tuple[int, int]]:
    if type(source).__module__.startswith("torch"):
        source = source.detach().cpu().numpy()
    try:
        grey = np.asarray(source, dtype=np.float32)
    except (ValueError, TypeError):
        raise LenetError(f"{label}: expected a 2-D array of grey levels 0..255") from None
    if grey.ndim == 3 and grey.shape[0] == 1:
        grey = grey[0]  # (1, H, W) as a model input holds it
    if grey.ndim != 2 or grey.size == 0:
        raise LenetError(f"{label}: expected a 2-D array of grey levels 0..255, got shape {grey.shape}")
    _check_size(grey.shape[1], grey.shape[0], label)
    if not np.isfinite(grey).all() or grey.min() < 0 or grey.max() > 255:
        raise LenetError(f"{label}: expected grey levels 0..255, found values outside that range")
    size = (grey.shape[1], grey.shape[0])
    if max(grey.shape) > WORK_SIDE:
        grey = np.asarray(Image.fromarray(grey, "F").reduce(math.ceil(max(grey.shape) / WORK_SIDE)))
    return np.round(grey).astype(np.uint8), size


def _decode(source, label: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode to grey uint8 (h, w), transparent pixels turned into paper, and the (width, height) of the
    image as displayed, of which (h, w) may be a reduced copy."""
    try:
        if isinstance(source, Image.Image):
            return _pixels(source, label, opened=False)
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(source)
        elif isinstance(source, (str, Path)):
            source = _file(source, label)
        elif hasattr(source, "read"):
            source = io.BytesIO(source.read())
        else:  # e.g. a number or null where JSON should have held rows of pixels
            raise LenetError(f"{label}: expected an image or a 2-D array, got {type(source).__name__}")
        with Image.open(source) as image:
            return _pixels(image, label, opened=True)
    except FileNotFoundError:
        raise LenetError(f"{label}: no such file") from None
    except Image.DecompressionBombError as e:
        raise LenetError(f"{label}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:  # (Pillow's own words name the buffer the file was read into)
        raise LenetError(f"{label}: not a readable image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LenetError(f"{label}: not a readable image ({detail})") from None


def _file(path: str | Path, label: str) -> io.BytesIO | str | Path:
    """What Pillow opens for a path: a regular file's bytes, read in one go (Pillow reading the file piece
    by piece costs a sixth of a small PNG's preprocessing); anything else, e.g. a pipe, as the path, of
    which Pillow reads only what it needs."""
    kind = os.stat(path).st_mode
    if stat.S_ISDIR(kind):
        raise LenetError(f"{label}: is a folder, not an image")
    if not stat.S_ISREG(kind):
        return path
    with open(path, "rb", buffering=0) as file:
        return io.BytesIO(file.read())


def _check_size(width: int, height: int, label: str) -> None:
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
        limits = f"{MAX_PIXELS:,} pixels or {MAX_SIDE:,} a side"
        raise LenetError(f"{label}: {width}x{height} is more than {limits}")


def _pixels(image: Image.Image, label: str, opened: bool) -> tuple[np.ndarray, tuple[int, int]]:
    _check_size(image.width, image.height, label)
    size = image.size
    if opened and image.format == "JPEG" and image.mode in ("RGB", "L"):  # (a caller's image: left as is)
        image.draft("L", (WORK_SIDE, WORK_SIDE))  # the decoder scales big photos by 1/2..1/8 as it reads
    image.load()
    if image.format == "TIFF" or "exif" in image.info:  # only these can hold an EXIF orientation
        if opened:  # in place: the full-size original is dropped as its turned copy takes its place
            ImageOps.exif_transpose(image, in_place=True)
        else:
            image = ImageOps.exif_transpose(image)
        if image.width != image.height and (image.width > image.height) != (size[0] > size[1]):
            size = size[::-1]  # turned by a quarter
    if max(image.size) > WORK_SIDE:
        if image.mode in ("1", "P", "PA") or image.mode.startswith("I;16"):  # reduce() refuses these modes
            alpha = image.mode == "PA" or "transparency" in image.info  # or averages palette indices
            image = image.convert("I" if image.mode.startswith("I;16") else "LA" if alpha else "L")
        image = image.reduce(math.ceil(max(image.size) / WORK_SIDE))
    return _grey(image), size


def _grey(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):  # 16-bit and float scans
        grey = np.asarray(image, dtype=np.float32)
        top = 65535.0 if grey.max() > 255 else (1.0 if image.mode == "F" and grey.max() <= 1 else 255.0)
        return np.round(np.clip(grey * (255.0 / top), 0, 255)).astype(np.uint8)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        grey = image if image.mode == "L" else image.convert("L")
        # (the bytes as they are: np.asarray goes through __array_interface__, slower on small images)
        return np.frombuffer(grey.tobytes(), np.uint8).reshape(grey.height, grey.width)
    grey, alpha = np.moveaxis(np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32), -1, 0)
    alpha /= 255.0
    opaque = grey[alpha > 0.5]
    if opaque.size == 0:
        return np.zeros(grey.shape, np.uint8)  # fully transparent: blank
    level = float(np.median(opaque))
    # a drawing on a transparent layer: the opaque part is the ink, paper is its opposite;
    # an opaque picture with transparent margins: the margins are more of its paper
    paper = (255.0 if level < 128 else 0.0) if opaque.size < grey.size / 2 else level
    return np.round(grey * alpha + paper * (1 - alpha)).astype(np.uint8)


def _ink(grey: np.ndarray, invert: str, label: str, one_digit: bool) -> tuple[np.ndarray, np.ndarray]:
    """Where the ink is: a uint8 image and a table soft (256,) float32 with soft[image] in 0..1.

    On even paper, polarity, the paper's level and noise, Otsu's split and the ramp between paper and ink
    all act on grey levels, so they are computed on 256-bin histograms and composed into one table: on a
    small image this costs a few dozen operations on 256 numbers, not on every pixel. (Array methods, not
    the np.* functions that wrap them: at this size the wrappers' dispatch costs as much as the work.)
    Uneven paper is flattened pixel by pixel first.
    """
    border = np.sort(grey.take(_border(*grey.shape)))
    paper = int(border[len(border) // 2])  # the border is mostly paper
    counts = np.bincount(grey.ravel(), minlength=256)
    present = counts.nonzero()[0]
    darkest, brightest = int(present[0]), int(present[-1])
    if brightest - darkest < MIN_RANGE:
        raise LenetError(f"{label}: the image is blank (grey levels {darkest} to {brightest})")
    if invert == "auto":  # the ink lies further beyond the paper than the paper's own levels (the border's)
        low, high = int(border[len(border) // 10]), int(border[-1 - len(border) // 10])
        dark_ink = low - darkest > brightest - high
    else:
        dark_ink = invert == "yes"
    spread = int(border[-1]) - int(border[0])
    if spread >= MIN_RANGE or (spread >= UNEVEN and _lit_unevenly(grey)):  # or rule lines, ink at the border
        grey, noise = _flattened(grey, dark_ink)
        counts, to_ink = np.bincount(grey.ravel(), minlength=256), _LEVELS
    else:  # grey level -> ink level, the paper at 0
        to_ink = _ink_levels(paper, dark_ink)
        noise = _noise(counts[paper:] if dark_ink else counts[paper::-1])
    counts = np.bincount(to_ink, weights=counts, minlength=256)  # (256,) pixels per ink level
    threshold, contrast = _split(counts, noise, label, dark_ink)
    if one_digit and noise > 0:  # (a picture without noise has no specks of it)
        _check_strokes((to_ink > threshold).take(grey), label)
    floor = min(3 * noise, (threshold + 0.5) / 2)
    # 0.5 falls on Otsu's threshold or below, so all it calls ink is in the >0.5 mask that decides the
    # crop: faint strokes (a thin line, anti-aliased) stay part of the digit
    top = min(contrast, 2 * (threshold + 0.5) - floor)
    soft = (_LEVELS_F32 - np.float32(floor)) * np.float32(1 / max(top - floor, 1.0))
    return grey, np.minimum(np.maximum(soft, 0, out=soft), 1, out=soft).take(to_ink)


def _flattened(grey: np.ndarray, dark_ink: bool) -> tuple[np.ndarray, float]:
    """Uneven paper (H, W) -> ink levels uint8 (H, W) over flat paper at 0 (its lighting and rule lines
    taken out) and the paper's noise."""
    ink = (255 - grey if dark_ink else grey).astype(np.float32)
    ink -= _paper(grey, dark_ink)
    ink -= _rule_lines(ink)
    centre = float(np.median(ink.take(_border(*ink.shape))))
    sample = ink.ravel()[:: max(1, ink.size // 16384)]
    noise = 1.4826 * float(np.median(centre - sample[sample <= centre]))  # the paper's side: no ink there
    return np.round(np.clip(ink - centre, 0, 255)).astype(np.uint8), noise


def _split(counts: np.ndarray, noise: float, label: str, dark_ink: bool) -> tuple[int, int]:
    """Otsu's threshold between paper and ink on the ink levels' histogram (256,) and the ink's typical
    level; raises LenetError where no ink stands clear of the paper and its noise."""
    cumulative = counts.cumsum()
    total = float(cumulative[-1])
    if int(cumulative.searchsorted(total)) < MIN_RANGE:  # the strongest ink level present
        shade, flag = ("darker", "no") if dark_ink else ("lighter", "yes")
        raise LenetError(
            f"{label}: no clear foreground (nothing is {shade} than the background; --invert {flag}?)"
        )
    threshold = _otsu(counts, cumulative)  # levels <= threshold: paper
    beyond = min(math.ceil(3 * noise) + 1, 255)
    if threshold < beyond:  # the paper's own spread took the split (a thin pen on a large photo)
        above = counts.copy()
        above[:beyond] = 0
        threshold = max(_otsu(above, above.cumsum()), beyond - 1)  # ink against what lies beyond the noise
    paper_count = float(cumulative[threshold])
    if total - paper_count > MAX_INK_FRACTION * total:
        raise LenetError(f"{label}: no clear foreground (no digit stands out from the background)")
    typical = int(cumulative.searchsorted((paper_count + total) / 2))  # the paper is at 0
    if typical < MIN_CONTRAST or typical < MIN_SNR * noise:
        raise LenetError(
            f"{label}: no clear foreground (ink differs from the background by {typical} grey levels, "
            f"noise {noise:.0f})"
        )
    return threshold, typical


def _check_strokes(mask: np.ndarray, label: str) -> None:
    """Refuse ink (H, W) that is only scattered specks: no piece of it holds MIN_PIECE_SHARE of the ink."""
    _, areas, _ = components(mask)
    if areas.max() < MIN_PIECE_SHARE * areas.sum():
        raise LenetError(
            f"{label}: no clear foreground (only specks: {len(areas)} of them, the largest "
            f"{areas.max() / areas.sum():.0%} of the ink)"
        )


@functools.lru_cache(maxsize=512)
def _ink_levels(paper: int, dark_ink: bool) -> np.ndarray:
    """(256,) grey level -> ink level on even paper: how far beyond the paper towards the ink, else 0."""
    levels = np.maximum(paper - _LEVELS if dark_ink else _LEVELS - paper, 0)
    levels.flags.writeable = False  # shared by every call
    return levels


def _median(counts: np.ndarray) -> int:
    """The median level of a histogram (counts per level)."""
    cumulative = counts.cumsum()
    return int(cumulative.searchsorted(cumulative[-1] / 2))


def _noise(away: np.ndarray) -> float:
    """The paper's noise (a robust standard deviation) from the pixels at and beyond the paper's level on
    the side away from the ink: counts (n,) at 0, 1, 2... levels from the paper. Ink, and the soft edges of
    its strokes, lie on the other side, so they cannot pass for noise."""
    half = away.astype(np.float64)
    half[0] /= 2  # the pixels at the paper's level itself are split between both sides
    return 1.4826 * _median(half)  # the median deviation of a normal distribution is 0.6745 sigma


def _lit_unevenly(grey: np.ndarray) -> bool:
    """Whether the mean levels along the four edges differ by UNEVEN or more (light across the page)."""
    k = max(1, min(grey.shape) // 50)
    sides = [float(side.mean()) for side in (grey[:k], grey[-k:], grey[:, :k], grey[:, -k:])]
    return max(sides) - min(sides) >= UNEVEN


@functools.lru_cache(maxsize=512)
def _border(h: int, w: int) -> np.ndarray:
    """Flat indices of an (h, w) image's border: its outer 2% (at least a pixel) on each side, corners in
    both a row and a column."""
    k = max(1, min(h, w) // 50)
    index = np.arange(h * w).reshape(h, w)
    border = np.concatenate((index[:k], index[-k:], index[:, :k].T, index[:, -k:].T), axis=None)
    border.flags.writeable = False  # shared by every call
    return border


def _paper(grey: np.ndarray, dark_ink: bool) -> np.ndarray:
    """The paper under an image (H, W) whose light varies (falling off, a shadow's edge), as ink levels:
    float32 (H, W), bright where the paper is darker.

    A grey opening (a running minimum, then a running maximum) of the ink over a square window wider than
    any digit's stroke: strokes, too narrow to hold the window, drop out, while every surface that rises or
    falls steadily across the window is kept exactly. Computed on a grid of at most PAPER_GRID cells a side,
    each the mean of its block of pixels (less noise, so less bias in the minima), then smoothed and spread
    back bilinearly.
    """
    h, w = grey.shape
    step = max(1, math.ceil(max(h, w) / PAPER_GRID))
    ph, pw = -(-h // step) * step, -(-w // step) * step
    blocks = np.pad(grey, ((0, ph - h), (0, pw - w)), mode="edge").reshape(ph // step, step, pw // step, step)
    grid = _running(blocks.mean((1, 3), dtype=np.float32), 3, np.mean)  # (ph / step, pw / step)
    k = max(3, round(PAPER_WINDOW * max(grid.shape)) | 1)  # odd: windows centred on their pixel
    surface = _running(_opening(255 - grid if dark_ink else grid, k), max(1, k // 2), np.mean)
    if step > 1:
        surface = np.asarray(Image.fromarray(surface, "F").resize((pw, ph), Image.BILINEAR))[:h, :w]
    return surface


def _opening(ink: np.ndarray, k: int) -> np.ndarray:
    """The grey opening of ink (h, w) over k x k windows: for each pixel, the most, over the windows that
    hold it, of the least in the window.

    Beyond its edges the image is continued by a plane fitted under it plus what lies above that plane at
    the nearest edge, so that light rising towards an edge goes on rising there: cut off by the edge, it
    would be a peak, which an opening removes.
    """
    h, w = ink.shape
    y, x = np.mgrid[-(k - 1) : h + k - 1, -(k - 1) : w + k - 1].astype(np.float32)
    inside = (slice(k - 1, k - 1 + h), slice(k - 1, k - 1 + w))
    terms = np.stack([np.ones_like(x), x, y], -1)  # (h + 2k - 2, w + 2k - 2, 3)
    values, plane_terms = ink.ravel(), terms[inside].reshape(-1, 3)
    keep = np.ones(values.shape, dtype=bool)
    for _ in range(4):  # refitted to the points at or below the last fit: the ink (bright) drops out
        coef = np.linalg.lstsq(plane_terms[keep], values[keep], rcond=None)[0]
        keep = values <= plane_terms @ coef
        if keep.sum() < 3:
            break
    plane = (terms @ coef.astype(np.float32)).astype(np.float32)
    extended = plane + np.pad(ink - plane[inside], k - 1, mode="edge")
    view = np.lib.stride_tricks.sliding_window_view
    eroded = view(view(extended, k, axis=0).min(-1), k, axis=1).min(-1)  # (h + k - 1, w + k - 1)
    return view(view(eroded, k, axis=0).max(-1), k, axis=1).max(-1)


def _running(image: np.ndarray, k: int, reduce) -> np.ndarray:
    """reduce (np.min, np.max, np.mean) over the k x k window around each pixel, windows cut at the edges
    (for min and max; mean repeats the edge), done along one axis, then the other."""
    for axis in (0, 1):
        before = (k - 1) // 2
        pad = [(0, 0), (0, 0)]
        pad[axis] = (before, k - 1 - before)
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(image, pad, mode="edge"), k, axis=axis)
        image = reduce(windows, axis=-1)
    return image


def _rule_lines(ink: np.ndarray) -> np.ndarray:
    """The ink (H, W) of straight rule lines across a picture (ruled or squared paper), to subtract.

    A row's level is the least of the medians of its left tenth, its middle and its right tenth: a line
    drawn across the whole picture raises all three, a digit's stroke, which does not reach from edge to
    edge, not the median of both tenths. Then the same for columns, once the rows' lines are gone.
    """
    rows = _line_levels(ink)
    return rows[:, None] + _line_levels((ink - rows[:, None]).T)[None, :]


def _line_levels(ink: np.ndarray) -> np.ndarray:
    """(H,) how far each row of ink (H, W) lies above most rows on all of its width, where such rows form
    thin bands (rule lines: at most RULE_WIDTH of the width, or 4 rows), else 0."""
    h, w = ink.shape
    if w < 3:
        return np.zeros(h, dtype=np.float32)
    edge, step = max(1, w // 10), max(1, w // 256)
    parts = (ink[:, :edge:step], ink[:, edge : w - edge : step], ink[:, w - edge :: step])
    level = np.min([np.median(part, axis=1) for part in parts], axis=0)
    level -= np.median(level)
    raised = np.concatenate([[False], level > 4 * np.median(abs(level)) + 1, [False]])
    bands = np.flatnonzero(np.diff(raised)).reshape(-1, 2)  # [start, end) of runs of raised rows
    lines = np.zeros(h, dtype=np.float32)
    for start, end in bands[bands[:, 1] - bands[:, 0] <= max(4, RULE_WIDTH * w)]:
        lines[start:end] = level[start:end]
    return lines


def _otsu(counts: np.ndarray, cumulative: np.ndarray) -> int:
    """The level that best splits a 256-bin histogram in two (Otsu 1979): levels <= it form one class.

    Maximises the between-class variance, (mass_all * n(k) - mass(k) * n_all)^2 / (n(k) (n_all - n(k)))
    up to a constant, with n(k) the pixels at levels <= k and mass(k) the sum of their levels.
    """
    total = cumulative[-1]
    mass = (counts * _LEVELS).cumsum()
    between = (mass[-1] * cumulative - mass * total) ** 2 / np.maximum(
        cumulative * (total - cumulative), 1e-9
    )
    return int(between.argmax())


def _digit_extent(mask: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns of the ink, leaving out specks separated from the bulk of it by a clear gap."""
    rows, _ = _main_run(_sum(mask, 1))
    cols, dropped = _main_run(_sum(mask[rows], 0))
    if dropped:  # columns left out may have held the only ink of some rows
        rows, _ = _main_run(_sum(mask[:, cols], 1))
    return rows, cols


def _main_run(profile: np.ndarray) -> tuple[slice, bool]:
    """The stretch of the profile that holds the digit: the heaviest run of ink and its neighbours, except
    light ones (under 5% of the ink, e.g. dust) beyond a gap of 5% of the profile's length. Also whether
    any ink was left out."""
    filled = profile.nonzero()[0]
    if filled.size == 0:
        return slice(0, len(profile)), False
    first, last = int(filled[0]), int(filled[-1])
    if last - first + 1 == filled.size:  # one run, the usual case
        return slice(first, last + 1), False
    breaks = np.flatnonzero(np.diff(filled) > 1)
    starts = filled[np.concatenate([[0], breaks + 1])]
    ends = filled[np.concatenate([breaks, [filled.size - 1]])] + 1  # runs [start, end)
    mass = np.array([profile[s:e].sum() for s, e in zip(starts, ends, strict=True)], dtype=np.float64)
    far, light = max(2, len(profile) // 20), mass < 0.05 * mass.sum()
    first = last = int(np.argmax(mass))
    while first > 0 and not (light[first - 1] and starts[first] - ends[first - 1] > far):
        first -= 1
    while last < len(mass) - 1 and not (light[last + 1] and starts[last + 1] - ends[last] > far):
        last += 1
    return slice(int(starts[first]), int(ends[last])), first > 0 or last < len(mass) - 1


def stroke_width(mask: np.ndarray) -> float:
    """Stroke width in pixels of a mask: for a stroke of length L and width W, 2 L W / (2 L + 2 W) ~ W.

    The boundary, edges along the mask's own border included, is 4 edges per ink pixel less 2 per pair of
    ink pixels side by side."""
    ink = np.count_nonzero(mask)
    touching = np.count_nonzero(mask[1:] & mask[:-1]) + np.count_nonzero(mask[:, 1:] & mask[:, :-1])
    return 2 * ink / max(4 * ink - 2 * touching, 1)


@functools.lru_cache(maxsize=512)
def _resampler(n: int, m: int) -> np.ndarray:
    """(m, n) weights that take n samples to m: Pillow's bilinear onto m * FINE points (anti-aliased when
    shrinking), then means of FINE, i.e. the fine-grid path as one matrix (both steps are linear)."""
    impulses = Image.fromarray(np.eye(n, dtype=np.float32), "F").resize((m * FINE, n), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(impulses).reshape(n, m, FINE).mean(2).T)


def _fit(digit: np.ndarray, width: float) -> np.ndarray:
    """Ink (h, w) in 0..1 with strokes `width` pixels wide -> fitted into 20x20 keeping the aspect ratio,
    (out_h, out_w) float32 in 0..1 with the longer side BOX."""
    h, w = digit.shape
    scale = BOX / max(h, w)
    out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    if width * scale >= THIN:
        return _resampler(h, out_h).dot(digit).dot(_resampler(w, out_w).T)
    # thicken on a grid FINE times finer than the box, then average down
    fine = np.asarray(Image.fromarray(digit, "F").resize((out_w * FINE, out_h * FINE), Image.BILINEAR))
    if width * scale * FINE < 1:  # narrower than a fine pixel: shrinking spread it out, fainter
        fine = np.minimum(fine / (width * scale * FINE), 1)
    fine = _widen(fine, max(1, round((TARGET - width * scale) * FINE / 2)))
    return fine.reshape(out_h, FINE, out_w, FINE).mean((1, 3))


def _place(box: np.ndarray) -> tuple[np.ndarray, tuple[int, int], tuple[float, float]]:
    """A fitted digit (out_h, out_w) in 0..1 -> the 28x28 uint8 field with its centre of mass at the centre,
    the (top, left) where the digit's pixel (0, 0) went, and its centre of mass (y, x) in its own pixels."""
    out_h, out_w = box.shape
    row_mass, col_mass = _sum(box, 1), _sum(box, 0)
    mass = _sum(row_mass)
    com_y = float(row_mass.dot(_POSITIONS[:out_h])) / mass
    com_x = float(col_mass.dot(_POSITIONS[:out_w])) / mass
    # MNIST moved digits by whole pixels: its centres of mass sit on pixel 14 +- 0.5
    top, left = round(float(FIELD // 2 - com_y)), round(float(FIELD // 2 - com_x))
    field = np.zeros((FIELD, FIELD), dtype=np.uint8)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + out_h, FIELD), min(left + out_w, FIELD)
    # box is within 0..1: averages (non-negative weights summing to 1) of values within 0..1
    field[y0:y1, x0:x1] = box[y0 - top : y1 - top, x0 - left : x1 - left] * 255 + 0.5
    return field, (top, left), (com_y, com_x)


def _widen(image: np.ndarray, radius: int) -> np.ndarray:
    """Grey dilation: the max over a (2r + 1)^2 square, computed separably, same size as the image."""
    h, w = image.shape
    padded = np.zeros((h + 2 * radius, w + 2 * radius), dtype=np.float32)
    padded[radius:-radius, radius:-radius] = image
    taps = range(2 * radius + 1)
    rows = np.max([padded[i : i + h] for i in taps], axis=0)  # (h, w + 2r)
    return np.max([rows[:, j : j + w] for j in taps], axis=0)


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The connected pieces of a mask (H, W) (8-neighbours), found run by run:
    labels int32 (H, W), 0 off the mask and 1 + the piece's index on it; areas (n,) in pixels; boxes (n, 4)
    as [x0, y0, x1, y1] (x1, y1 exclusive). Pieces are numbered in the order their first rows appear."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    change = np.diff(padded.ravel())
    starts, ends = np.flatnonzero(change == 1) + 1, np.flatnonzero(change == -1) + 1  # in padded, flat
    rows = starts // (w + 2)
    starts, ends = starts - rows * (w + 2) - 1, ends - rows * (w + 2) - 1  # columns, ends exclusive
    keys = rows * (w + 2)
    # the runs of the row above that touch each run, diagonally included: a range [lo, hi) of run indices
    lo = np.searchsorted(keys + ends, keys - (w + 2) + starts, side="left")
    hi = np.searchsorted(keys + starts, keys - (w + 2) + ends, side="right")
    touching = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(len(rows)), touching)
    b = np.arange(touching.sum()) - np.repeat(np.cumsum(touching) - touching - lo, touching)
    parent = np.arange(len(rows))
    while True:  # hook roots onto the smaller root of each touching pair, then flatten, until settled
        while not np.array_equal(parent, parent[parent]):
            parent = parent[parent]
        pa, pb = parent[a], parent[b]
        if np.array_equal(pa, pb):
            break
        low = np.minimum(pa, pb)
        np.minimum.at(parent, pa, low)
        np.minimum.at(parent, pb, low)
    # each piece's root is its first run (hooks only lower a parent): pieces by rank of their roots
    roots = parent == np.arange(len(parent))
    piece = (np.cumsum(roots) - 1)[parent]
    n = int(np.count_nonzero(roots))
    areas = np.bincount(piece, weights=ends - starts, minlength=n).astype(np.int64)
    boxes = np.empty((n, 4), dtype=np.int64)
    boxes[:, :2], boxes[:, 2:] = [w, h], 0
    np.minimum.at(boxes[:, 0], piece, starts)
    np.minimum.at(boxes[:, 1], piece, rows)
    np.maximum.at(boxes[:, 2], piece, ends)
    np.maximum.at(boxes[:, 3], piece, rows + 1)
    steps = np.zeros((h, w + 1), dtype=np.int32)
    steps[rows, starts] = piece + 1
    steps[rows, ends] -= piece + 1
    return np.cumsum(steps, axis=1, dtype=np.int32)[:, :w], areas, boxes
