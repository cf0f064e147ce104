"""A user's digit image -> the 28x28 uint8 array MNIST would have made of it.

MNIST took bilevel scans, fitted each digit into a 20x20 box keeping its aspect ratio (anti-aliasing gave
the grey levels) and placed it in a 28x28 field with its centre of mass at the centre, white ink on black.
`preprocess` does the same to a photo, scan, drawing or array:

1. decode (any format Pillow reads; EXIF orientation honoured; first frame; transparent = background) to
   grey, large images box-reduced to at most WORK_SIDE pixels a side;
2. find the polarity (the border is mostly paper) and the paper's level; when the border is uneven (light
   falling across a photo), fit a smooth quadratic surface to the paper and subtract it;
3. split ink from paper with Otsu's threshold and map the grey levels between the paper's noise and the
   ink's typical level onto 0..1 (a lookup table over the 256 levels, so JPEG noise and faint anti-aliased
   edges keep their share without per-pixel work);
4. crop to the ink, leaving out specks set apart from the digit;
5. scale to fit 20x20, anti-aliased (bilinear onto a grid 4x finer, then 4x4 means, done as one matrix
   product per axis); strokes far thinner than MNIST's are first widened on that finer grid;
6. paste into 28x28 so that the centre of mass lands on pixel (14, 14), moving by whole pixels as MNIST did.

Only numpy and Pillow: no torch, so worker processes that preprocess start fast.
"""

from __future__ import annotations

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
MIN_CONTRAST = 20.0  # grey levels between the ink's typical level and the paper's
MIN_SNR = 5.0  # that difference over the paper's noise (standard deviation)
MAX_INK_FRACTION = 0.6  # more "ink" than this is not a digit on paper
# MNIST's stroke width, measured as 2 * area / boundary length of the >0.5 mask, is 1.3 to 3.1 pixels
# (5th-95th percentile, median 2.0) at 28x28. Strokes thinner than THIN are widened to about TARGET.
THIN, TARGET = 1.2, 1.8

_LEVELS = np.arange(256)
_LEVELS_F32 = np.arange(256, dtype=np.float32)
_POSITIONS = np.arange(FIELD, dtype=np.float32)

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
    label = name if name is not None else _default_name(source)
    if invert not in INVERT_CHOICES:
        raise LenetError(f"--invert: expected one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
    grey = _as_array(source, label) if _is_array(source) else _decode(source, label)
    return _mnist_style(grey, invert, label)


def _default_name(source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "upload"
    if isinstance(source, Image.Image):
        return "image"
    return "array" if _is_array(source) else getattr(source, "name", "upload")


def _is_array(source) -> bool:
    return isinstance(source, (np.ndarray, list, tuple)) or type(source).__module__.startswith("torch")


def _as_array(source, label: str) -> np.ndarray:
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
    if max(grey.shape) > WORK_SIDE:
        grey = np.asarray(Image.fromarray(grey, "F").reduce(math.ceil(max(grey.shape) / WORK_SIDE)))
    return np.round(grey).astype(np.uint8)


def _decode(source, label: str) -> np.ndarray:
    """Decode to grey uint8 (H, W), transparent pixels turned into paper."""
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


def _pixels(image: Image.Image, label: str, opened: bool) -> np.ndarray:
    _check_size(image.width, image.height, label)
    if opened and image.format == "JPEG" and image.mode in ("RGB", "L"):  # (a caller's image: left as is)
        image.draft("L", (WORK_SIDE, WORK_SIDE))  # the decoder scales big photos by 1/2..1/8 as it reads
    image.load()
    if image.format == "TIFF" or "exif" in image.info:  # only these can hold an EXIF orientation
        if opened:  # in place: the full-size original is dropped as its turned copy takes its place
            ImageOps.exif_transpose(image, in_place=True)
        else:
            image = ImageOps.exif_transpose(image)
    if max(image.size) > WORK_SIDE:
        if image.mode in ("1", "P", "PA") or image.mode.startswith("I;16"):  # reduce() refuses these modes
            alpha = image.mode == "PA" or "transparency" in image.info  # or averages palette indices
            image = image.convert("I" if image.mode.startswith("I;16") else "LA" if alpha else "L")
        image = image.reduce(math.ceil(max(image.size) / WORK_SIDE))
    return _grey(image)


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


def _mnist_style(grey: np.ndarray, invert: str, label: str) -> np.ndarray:
    image, soft = _ink(grey, invert, label)  # soft[image]: the ink in 0..1, (H, W)
    mask = (soft > 0.5).take(image)  # more ink than paper
    rows, cols = _digit_extent(mask)
    return _fit_and_centre(soft.take(image[rows, cols]), _stroke_width(mask[rows, cols]))


def _ink(grey: np.ndarray, invert: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Where the ink is: a uint8 image and a table soft (256,) float32 with soft[image] in 0..1.

    Polarity, the paper's level and noise, Otsu's split and the ramp between paper and ink all act on
    grey levels, so they are computed on 256-bin histograms and composed into one table: on a small image
    this costs a few dozen operations on 256 numbers, not on every pixel. (Array methods, not the np.*
    functions that wrap them: at this size the wrappers' dispatch costs as much as the work.)
    """
    border = np.sort(grey.take(_border(*grey.shape)))
    paper = int(border[len(border) // 2])  # the border is mostly paper
    counts = np.bincount(grey.ravel(), minlength=256)
    present = counts.nonzero()[0]
    darkest, brightest = int(present[0]), int(present[-1])
    if brightest - darkest < MIN_RANGE:
        raise LenetError(f"{label}: the image is blank (grey levels {darkest} to {brightest})")
    # dark ink on light paper: the paper is nearer the brightest level than the darkest
    dark_ink = 2 * paper > darkest + brightest if invert == "auto" else invert == "yes"
    if int(border[-1]) - int(border[0]) >= MIN_RANGE:  # uneven paper (light across a photo): flatten it
        ink = (255 - grey if dark_ink else grey).astype(np.float32)
        ink -= _paper(ink)
        grey = np.round(np.clip(ink, 0, 255, out=ink)).astype(np.uint8)
        counts, to_ink = np.bincount(grey.ravel(), minlength=256), _LEVELS
    else:  # grey level -> ink level, the paper at 0
        to_ink = _ink_levels(paper, dark_ink)
    counts = np.bincount(to_ink, weights=counts, minlength=256)  # (256,) pixels per ink level
    cumulative = counts.cumsum()
    total = float(cumulative[-1])
    if int(cumulative.searchsorted(total)) < MIN_RANGE:  # the strongest ink level present
        shade, flag = ("darker", "no") if dark_ink else ("lighter", "yes")
        raise LenetError(
            f"{label}: no clear foreground (nothing is {shade} than the background; --invert {flag}?)"
        )
    threshold = _otsu(counts, cumulative)  # levels <= threshold: paper
    paper_count = float(cumulative[threshold])
    if total - paper_count > MAX_INK_FRACTION * total:
        raise LenetError(f"{label}: no clear foreground (no digit stands out from the background)")
    paper_level, typical = cumulative.searchsorted((paper_count / 2, (paper_count + total) / 2)).tolist()
    if counts[paper_level] >= paper_count / 2:  # most paper at one level (clean scans): median deviation 0
        noise = 0.0
    else:
        deviations = abs(_LEVELS[: threshold + 1] - paper_level)
        noise = 1.4826 * _median(np.bincount(deviations, weights=counts[: threshold + 1]))  # robust sigma
    contrast = typical - paper_level
    if contrast < MIN_CONTRAST or contrast < MIN_SNR * noise:
        raise LenetError(
            f"{label}: no clear foreground (ink differs from the background by {contrast:.0f} grey levels, "
            f"noise {noise:.0f})"
        )
    floor = min(paper_level + 3 * noise, (paper_level + threshold + 0.5) / 2)
    # 0.5 falls on Otsu's threshold or below, so all it calls ink is in the >0.5 mask that decides the
    # crop: faint strokes (a thin line, anti-aliased) stay part of the digit
    top = min(typical, 2 * (threshold + 0.5) - floor)
    soft = (_LEVELS_F32 - np.float32(floor)) * np.float32(1 / max(top - floor, 1.0))
    return grey, np.minimum(np.maximum(soft, 0, out=soft), 1, out=soft).take(to_ink)


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


@functools.lru_cache(maxsize=512)
def _border(h: int, w: int) -> np.ndarray:
    """Flat indices of an (h, w) image's border: its outer 2% (at least a pixel) on each side, corners in
    both a row and a column."""
    k = max(1, min(h, w) // 50)
    index = np.arange(h * w).reshape(h, w)
    border = np.concatenate((index[:k], index[-k:], index[:, :k].T, index[:, -k:].T), axis=None)
    border.flags.writeable = False  # shared by every call
    return border


def _paper(ink: np.ndarray) -> np.ndarray:
    """The paper under ink-is-bright (H, W) as a smooth quadratic surface: lit unevenly, it varies.

    Least squares on a subsample, refitted to the pixels at or below the last fit: ink (bright) drops out
    and the surface settles on the paper.
    """
    h, w = ink.shape
    step = max(1, math.isqrt(h * w // 4096))
    sample = ink[::step, ::step]
    y = np.linspace(-1, 1, h, dtype=np.float32)
    x = np.linspace(-1, 1, w, dtype=np.float32)
    sy, sx = np.meshgrid(y[::step], x[::step], indexing="ij")
    terms = np.stack([np.ones_like(sx), sx, sy, sx * sx, sx * sy, sy * sy], -1).reshape(-1, 6)  # (S, 6)
    values = sample.ravel()
    keep = np.ones(values.shape, dtype=bool)
    for _ in range(4):
        coef = np.linalg.lstsq(terms[keep], values[keep], rcond=None)[0]
        keep = values <= terms @ coef
        if keep.sum() < 6:
            break
    c = coef.astype(np.float32)
    y = y[:, None]
    return c[0] + c[1] * x + c[2] * y + c[3] * x * x + c[4] * y * x + c[5] * y * y


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
    rows, _ = _main_run(mask.sum(1))
    cols, dropped = _main_run(mask[rows].sum(0))
    if dropped:  # columns left out may have held the only ink of some rows
        rows, _ = _main_run(mask[:, cols].sum(1))
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


def _stroke_width(mask: np.ndarray) -> float:
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


def _fit_and_centre(digit: np.ndarray, width: float) -> np.ndarray:
    """Ink (h, w) in 0..1 with strokes `width` pixels wide -> fitted into 20x20 keeping the aspect ratio,
    centred by mass in 28x28, uint8."""
    h, w = digit.shape
    scale = BOX / max(h, w)
    out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    if width * scale >= THIN:
        box = _resampler(h, out_h).dot(digit).dot(_resampler(w, out_w).T)  # (out_h, out_w)
    else:  # thicken on a grid FINE times finer than the box, then average down
        fine = np.asarray(Image.fromarray(digit, "F").resize((out_w * FINE, out_h * FINE), Image.BILINEAR))
        if width * scale * FINE < 1:  # narrower than a fine pixel: shrinking spread it out, fainter
            fine = np.minimum(fine / (width * scale * FINE), 1)
        fine = _widen(fine, max(1, round((TARGET - width * scale) * FINE / 2)))
        box = fine.reshape(out_h, FINE, out_w, FINE).mean((1, 3))

    row_mass, col_mass = box.sum(1), box.sum(0)
    mass = row_mass.sum()
    com_y = float(row_mass.dot(_POSITIONS[:out_h])) / mass
    com_x = float(col_mass.dot(_POSITIONS[:out_w])) / mass
    # MNIST moved digits by whole pixels: its centres of mass sit on pixel 14 +- 0.5
    top, left = round(float(FIELD // 2 - com_y)), round(float(FIELD // 2 - com_x))
    field = np.zeros((FIELD, FIELD), dtype=np.uint8)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + out_h, FIELD), min(left + out_w, FIELD)
    # box is within 0..1: averages (non-negative weights summing to 1) of values within 0..1
    field[y0:y1, x0:x1] = box[y0 - top : y1 - top, x0 - left : x1 - left] * 255 + 0.5
    return field


def _widen(image: np.ndarray, radius: int) -> np.ndarray:
    """Grey dilation: the max over a (2r + 1)^2 square, computed separably, same size as the image."""
    h, w = image.shape
    padded = np.zeros((h + 2 * radius, w + 2 * radius), dtype=np.float32)
    padded[radius:-radius, radius:-radius] = image
    taps = range(2 * radius + 1)
    rows = np.max([padded[i : i + h] for i in taps], axis=0)  # (h, w + 2r)
    return np.max([rows[:, j : j + w] for j in taps], axis=0)
