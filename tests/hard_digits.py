"""Hard cases of users' own digits, made from real handwriting (MNIST digits), deterministically.

`hard_digits(images, labels, per_condition, seed)` turns MNIST digits (white on black, (N, 28, 28) uint8)
into the pictures people send that the committed tests/digits set does not cover: small soft scans
enlarged, thin pen strokes on a large photo, thick marker, ruled and squared paper, shadows, a digit
touching the image border and faint pencil. Each comes back as encoded image bytes (JPEG or PNG) with its
label and condition. Tests build it from the MNIST test set; preprocessing's thresholds were chosen on the
same conditions built from the last 5,000 training digits.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

CONDITIONS = ("soft", "thin-pen", "marker", "ruled", "squared", "shadow", "border", "pencil")


def ink_of(digit: np.ndarray) -> np.ndarray:
    """An MNIST digit (28, 28) uint8 -> its ink in 0..1, cropped to the ink's extent."""
    ink = digit.astype(np.float32) / 255
    rows, cols = np.flatnonzero(ink.max(1) > 0.1), np.flatnonzero(ink.max(0) > 0.1)
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def resized(ink: np.ndarray, height: float, resample=Image.BICUBIC) -> np.ndarray:
    """Ink scaled to `height` pixels tall, aspect kept."""
    h, w = ink.shape
    size = (max(1, round(w * height / h)), max(1, round(height)))
    out = np.clip(np.asarray(Image.fromarray(ink, "F").resize(size, resample)), 0, 1)
    return np.where(out < 0.03, 0, out)  # no faint ringing around the digit


def skeleton(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a bool mask: the strokes' centre lines, one pixel wide."""
    skel = np.pad(mask.astype(bool), 1)
    while True:
        changed = False
        for step in (0, 1):
            p = [np.roll(np.roll(skel, -dy, 0), -dx, 1) for dy, dx in
                 ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))]  # fmt: skip
            neighbours = sum(q.astype(np.int8) for q in p)
            transitions = sum((~p[i] & p[(i + 1) % 8]).astype(np.int8) for i in range(8))
            if step == 0:
                extra = ~(p[0] & p[2] & p[4]) & ~(p[2] & p[4] & p[6])
            else:
                extra = ~(p[0] & p[2] & p[6]) & ~(p[0] & p[4] & p[6])
            remove = skel & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1) & extra
            if remove.any():
                skel &= ~remove
                changed = True
        if not changed:
            return skel[1:-1, 1:-1]


def pen_drawing(digit: np.ndarray, height: float, pen: float) -> np.ndarray:
    """An MNIST digit redrawn along its centre lines with a round pen `pen` pixels wide, `height` tall."""
    ink = resized(ink_of(digit), 4 * ink_of(digit).shape[0])  # thinned 4x finer than MNIST: smoother lines
    skel = skeleton(ink > 0.5)
    scale = height / ink.shape[0]
    pad = math.ceil(pen) + 2
    size = (round(ink.shape[1] * scale) + 2 * pad, round(ink.shape[0] * scale) + 2 * pad)
    image = Image.new("L", (size[0] * 2, size[1] * 2), 0)  # drawn at twice the size, then reduced
    draw = ImageDraw.Draw(image)
    ys, xs = np.nonzero(skel)
    on = set(zip(ys.tolist(), xs.tolist(), strict=True))

    def at(y: int, x: int) -> tuple[float, float]:
        return (2 * ((x + 0.5) * scale + pad), 2 * ((y + 0.5) * scale + pad))

    for y, x in on:
        cx, cy = at(y, x)
        draw.ellipse((cx - pen, cy - pen, cx + pen, cy + pen), fill=255)
        for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
            if (y + dy, x + dx) in on:
                draw.line([at(y, x), at(y + dy, x + dx)], fill=255, width=max(1, round(2 * pen)))
    return np.asarray(image.reduce(2), dtype=np.float32) / 255


def blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float image (separable, edges extended)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(pixels, radius, mode="edge")
    rows = sum(t * padded[i : i + pixels.shape[0]] for i, t in enumerate(taps))
    return sum(t * rows[:, j : j + pixels.shape[1]] for j, t in enumerate(taps))


def place(ink: np.ndarray, canvas: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Ink pasted at a random place of a canvas (H, W), where it fits."""
    out = np.zeros(canvas, np.float32)
    h, w = min(ink.shape[0], canvas[0]), min(ink.shape[1], canvas[1])
    y, x = rng.integers(0, canvas[0] - h + 1), rng.integers(0, canvas[1] - w + 1)
    out[y : y + h, x : x + w] = ink[:h, :w]
    return out


def encode(pixels: np.ndarray, rng: np.random.Generator, jpeg: bool = True) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    if jpeg:
        image.save(buffer, format="JPEG", quality=int(rng.integers(35, 85)))
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def lighting(shape: tuple[int, int], rng: np.random.Generator, depth: float) -> np.ndarray:
    """Light falling off across a page: 1 on the bright side, down to 1 - depth."""
    h, w = shape
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = np.cos(angle) * xx / w + np.sin(angle) * yy / h
    return 1 - depth * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)


def photo(ink: np.ndarray, rng: np.random.Generator, paper: float, pen: float, noise: float) -> np.ndarray:
    """Ink on paper under uneven light, with sensor noise and a little blur: grey (H, W) float."""
    pixels = (paper * (1 - ink) + pen * ink) * lighting(ink.shape, rng, rng.uniform(0.1, 0.35))
    pixels += rng.normal(0, noise, ink.shape)
    return blur(pixels, rng.uniform(0.3, 1))


def soft(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Written 8-16 px tall, scanned at that resolution (blurred), enlarged to about 32x32."""
    ink = resized(ink_of(digit), rng.uniform(8, 16), Image.LANCZOS)
    side = max(ink.shape) + int(rng.integers(2, 7))
    small = place(ink, (side, side), rng)
    paper, pen = rng.uniform(170, 240), rng.uniform(10, 90)
    grey = paper * (1 - small) + pen * small
    grey = blur(grey, rng.uniform(0.4, 1)).astype(np.float32)
    big = np.asarray(Image.fromarray(grey, "F").resize((32, 32), Image.BICUBIC))
    return encode(big + rng.normal(0, rng.uniform(1, 8), big.shape), rng)


def thin_pen(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    canvas = (int(rng.integers(400, 700)), int(rng.integers(500, 800)))
    ink = pen_drawing(digit, rng.uniform(0.25, 0.6) * canvas[0], rng.uniform(0.8, 1.6))
    return encode(photo(place(ink, canvas, rng), rng, rng.uniform(180, 240), rng.uniform(20, 80), 4), rng)


def marker(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    height = rng.uniform(60, 160)
    ink = pen_drawing(digit, height, rng.uniform(0.06, 0.1) * height)
    canvas = (int(height * rng.uniform(1.2, 2)), int(height * rng.uniform(1.2, 2.5)))
    return encode(photo(place(ink, canvas, rng), rng, rng.uniform(190, 245), rng.uniform(5, 60), 3), rng)


def lined(digit: np.ndarray, rng: np.random.Generator, squared: bool) -> bytes:
    """Ruled (or squared) paper: rule lines lighter than the ink, about the digit's height apart or less."""
    height = rng.uniform(50, 150)
    ink = resized(ink_of(digit), height)
    canvas = (int(height * rng.uniform(1.3, 2.2)), int(height * rng.uniform(1.3, 2.5)))
    spacing = height * rng.uniform(0.35, 0.8)
    width = rng.uniform(1, 2.5)
    yy, xx = np.mgrid[0 : canvas[0], 0 : canvas[1]]
    offset = rng.uniform(0, spacing, 2)
    lines = np.clip(width / 2 + 0.5 - abs((yy + offset[0]) % spacing - spacing / 2), 0, 1)
    if squared:
        lines = np.maximum(
            lines, np.clip(width / 2 + 0.5 - abs((xx + offset[1]) % spacing - spacing / 2), 0, 1)
        )
    paper = rng.uniform(200, 245)
    ruled = paper - lines * rng.uniform(25, 70)  # light blue or grey rule lines
    written = place(ink, canvas, rng)
    pen = rng.uniform(10, 70)
    pixels = ruled * (1 - written) + pen * written
    pixels = pixels * lighting(canvas, rng, rng.uniform(0, 0.3)) + rng.normal(0, 3, canvas)
    return encode(pixels, rng)


def shadow(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A photo half in the shadow of a hand or phone: a soft-edged darker region."""
    height = rng.uniform(60, 200)
    ink = resized(ink_of(digit), height)
    canvas = (int(height * rng.uniform(1.5, 2.5)), int(height * rng.uniform(1.5, 2.5)))
    h, w = canvas
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    across = (np.cos(angle) * (xx - w / 2) + np.sin(angle) * (yy - h / 2)) / max(h, w)
    edge = rng.uniform(-0.3, 0.3)
    soft_edge = rng.uniform(0.08, 0.25)
    dark = 1 - rng.uniform(0.3, 0.55) / (1 + np.exp(-(across - edge) / soft_edge * 4))
    written = place(ink, canvas, rng)
    pixels = (rng.uniform(190, 240) * (1 - written) + rng.uniform(10, 60) * written) * dark
    return encode(pixels + rng.normal(0, 4, canvas), rng)


def border(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A digit that touches an edge of the picture (cropped tight on one or two sides)."""
    height = rng.uniform(40, 120)
    ink = resized(ink_of(digit), height)
    margin = [int(rng.integers(0, 3)) if rng.random() < 0.5 else int(rng.integers(5, 40)) for _ in range(4)]
    side = int(rng.integers(0, 4))
    margin[side] = 0  # at least one side touches
    top, bottom, left, right = margin
    written = np.pad(ink, ((top, bottom), (left, right)))
    pixels = rng.uniform(180, 245) * (1 - written) + rng.uniform(10, 70) * written
    return encode(pixels + rng.normal(0, 3, written.shape), rng, jpeg=rng.random() < 0.5)


def pencil(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Faint, grainy pencil: ink 25-50 grey levels darker than the paper."""
    height = rng.uniform(40, 160)
    ink = resized(ink_of(digit), height)
    grain = np.clip(rng.normal(0.85, 0.2, ink.shape), 0.3, 1)
    canvas = (int(height * rng.uniform(1.3, 2.2)), int(height * rng.uniform(1.3, 2.5)))
    written = place(ink * grain, canvas, rng)
    paper = rng.uniform(200, 240)
    pixels = paper - written * rng.uniform(25, 50)
    pixels = pixels * lighting(canvas, rng, rng.uniform(0, 0.15)) + rng.normal(0, 2.5, canvas)
    return encode(pixels, rng)


MAKERS: dict[str, Callable[[np.ndarray, np.random.Generator], bytes]] = {
    "soft": soft,
    "thin-pen": thin_pen,
    "marker": marker,
    "ruled": lambda digit, rng: lined(digit, rng, squared=False),
    "squared": lambda digit, rng: lined(digit, rng, squared=True),
    "shadow": shadow,
    "border": border,
    "pencil": pencil,
}


def hard_digits(
    images: np.ndarray, labels: np.ndarray, per_condition: int, seed: int = 0
) -> list[tuple[bytes, int, str]]:
    """[(encoded image, label, condition)]: `per_condition` digits for each of CONDITIONS, each made from a
    different MNIST digit, the same ones for the same arguments."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    out = []
    for c, condition in enumerate(CONDITIONS):
        for i in order[c * per_condition : (c + 1) * per_condition]:
            out.append((MAKERS[condition](images[i], rng), int(labels[i]), condition))
    return out


BLANKS = ("paper", "light", "shadow", "uniform-noise", "texture", "specks", "ruled", "squared")


def blank_picture(kind: str, rng: np.random.Generator) -> bytes:
    """A picture with no digit in it: paper (noisy, unevenly lit, in shadow, ruled, dusty) or only noise."""
    h, w = int(rng.integers(24, 400)), int(rng.integers(24, 400))
    paper = rng.uniform(120, 245)
    noise = rng.normal(0, rng.uniform(1, 20), (h, w))
    if kind == "paper":
        pixels = paper + noise
    elif kind == "light":
        pixels = paper * lighting((h, w), rng, rng.uniform(0.1, 0.5)) + noise
    elif kind == "shadow":
        yy, xx = np.mgrid[0:h, 0:w]
        across = (xx - w * rng.uniform(0.2, 0.8)) / w * rng.uniform(5, 30)
        pixels = paper * (1 - rng.uniform(0.3, 0.55) / (1 + np.exp(-across))) + noise
    elif kind == "uniform-noise":
        pixels = rng.uniform(0, 256, (h, w))
    elif kind == "texture":  # grain of paper or fabric: noise blurred over a few pixels
        pixels = paper + blur(rng.normal(0, rng.uniform(10, 40), (h, w)), rng.uniform(1, 4)) * 2
    elif kind == "specks":  # isolated dust specks
        pixels = paper + rng.normal(0, 2, (h, w))
        specks = rng.random((h, w)) < rng.uniform(0.0005, 0.01)
        pixels[specks] = rng.uniform(0, 80)
    else:
        spacing = rng.uniform(12, 40)
        yy, xx = np.mgrid[0:h, 0:w]
        lines = np.clip(1.5 - abs(yy % spacing - spacing / 2), 0, 1)
        if kind == "squared":
            lines = np.maximum(lines, np.clip(1.5 - abs(xx % spacing - spacing / 2), 0, 1))
        pixels = paper - lines * rng.uniform(25, 70) + rng.normal(0, 3, (h, w))
    return encode(pixels, rng, jpeg=rng.random() < 0.5)


def blank_pictures(per_kind: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """[(encoded image, kind)]: `per_kind` pictures of each of BLANKS."""
    rng = np.random.default_rng(seed)
    return [(blank_picture(kind, rng), kind) for kind in BLANKS for _ in range(per_kind)]
