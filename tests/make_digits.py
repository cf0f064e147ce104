"""Regenerate tests/digits/: digit images the way people hand them over, to test preprocessing on.

Run `python tests/make_digits.py` (needs the fonts listed in FONTS, found under the usual font folders or
matplotlib's bundled ones). The images are committed, so the tests do not need the fonts.

`python tests/make_digits.py --validation DIR` writes a larger set of the same kinds of picture to DIR
instead, from another seed and other fonts (VALIDATION_FONTS, which need Debian's fonts-liberation too): the
user-style validation set that training recipes are compared on (docs/recipes.md), so that no choice is
made on the committed set.

Each file is named `<label>_<index>_<how it was made>.<ext>`. The set mixes printed digits in several fonts
and hand-drawn-like strokes with: both polarities, sizes from a few percent to most of the canvas, offsets,
small rotations and slants, canvases from 28x28 to a few hundred pixels, thin and thick strokes, pen colours
on tinted paper with uneven light and noise, JPEG artefacts, transparent backgrounds, EXIF rotations and the
formats Pillow reads (PNG, JPEG, BMP, GIF, WebP, TIFF).
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

OUT = Path(__file__).parent / "digits"
PER_DIGIT = 26
SEED = 1998

FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-ExtraLight.ttf",
    "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralItalic.ttf",
    "cmss10.ttf",
    "cmr10.ttf",
)
# None of FONTS: the validation set's printed digits are in typefaces the committed set does not use.
VALIDATION_FONTS = (
    "LiberationSans-Regular.ttf",
    "LiberationSans-Bold.ttf",
    "LiberationSans-Italic.ttf",
    "LiberationSansNarrow-Regular.ttf",
    "LiberationSerif-Regular.ttf",
    "LiberationSerif-Bold.ttf",
    "LiberationMono-Regular.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
    "STIXGeneralBol.ttf",
    "cmb10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
    "DejaVuSerifCondensed.ttf",
)
VALIDATION_SEED, VALIDATION_BLOCKS = 2026, 4  # 4 x 26 pictures of each digit

# Hand-drawn digits as strokes through control points in a unit box (x right, y down), a few styles each.
STROKES: dict[int, list[list[list[tuple[float, float]]]]] = {
    0: [
        [
            [
                (0.5, 0.0),
                (0.15, 0.2),
                (0.1, 0.6),
                (0.4, 1.0),
                (0.8, 0.8),
                (0.85, 0.3),
                (0.55, 0.0),
                (0.4, 0.05),
            ]
        ],
        [
            [
                (0.6, 0.05),
                (0.25, 0.1),
                (0.15, 0.5),
                (0.3, 0.95),
                (0.7, 0.95),
                (0.85, 0.5),
                (0.7, 0.1),
                (0.5, 0.0),
            ]
        ],
    ],
    1: [
        [[(0.55, 0.0), (0.5, 1.0)]],
        [[(0.3, 0.2), (0.55, 0.0), (0.52, 1.0)]],
        [[(0.35, 0.15), (0.6, 0.0), (0.6, 1.0)], [(0.35, 1.0), (0.85, 1.0)]],
    ],
    2: [
        [[(0.15, 0.25), (0.35, 0.03), (0.7, 0.05), (0.8, 0.3), (0.6, 0.6), (0.1, 1.0), (0.9, 0.98)]],
        [[(0.2, 0.2), (0.5, 0.0), (0.8, 0.2), (0.7, 0.5), (0.2, 0.95), (0.5, 0.9), (0.9, 1.0)]],
    ],
    3: [
        [
            [
                (0.15, 0.1),
                (0.5, 0.0),
                (0.8, 0.15),
                (0.7, 0.4),
                (0.4, 0.48),
                (0.8, 0.6),
                (0.8, 0.9),
                (0.45, 1.0),
                (0.1, 0.88),
            ]
        ],
        [[(0.15, 0.05), (0.8, 0.05), (0.4, 0.42), (0.8, 0.62), (0.75, 0.92), (0.4, 1.0), (0.1, 0.85)]],
    ],
    4: [
        [[(0.6, 0.0), (0.1, 0.65), (0.9, 0.65)], [(0.65, 0.3), (0.65, 1.0)]],
        [[(0.2, 0.0), (0.15, 0.6), (0.85, 0.58)], [(0.75, 0.05), (0.7, 1.0)]],
    ],
    5: [
        [
            [
                (0.8, 0.0),
                (0.25, 0.02),
                (0.2, 0.45),
                (0.55, 0.38),
                (0.82, 0.6),
                (0.75, 0.9),
                (0.45, 1.0),
                (0.12, 0.88),
            ]
        ],
        [
            [(0.25, 0.02), (0.2, 0.45), (0.55, 0.38), (0.8, 0.62), (0.6, 0.95), (0.15, 0.9)],
            [(0.25, 0.02), (0.85, 0.0)],
        ],
    ],
    6: [
        [
            [
                (0.75, 0.02),
                (0.4, 0.15),
                (0.2, 0.5),
                (0.22, 0.85),
                (0.5, 1.0),
                (0.78, 0.82),
                (0.72, 0.58),
                (0.45, 0.52),
                (0.22, 0.68),
            ]
        ],
        [
            [
                (0.6, 0.0),
                (0.25, 0.45),
                (0.2, 0.8),
                (0.45, 1.0),
                (0.75, 0.85),
                (0.7, 0.6),
                (0.4, 0.55),
                (0.22, 0.7),
            ]
        ],
    ],
    7: [
        [[(0.1, 0.02), (0.9, 0.0), (0.45, 1.0)]],
        [[(0.1, 0.1), (0.15, 0.02), (0.88, 0.02), (0.55, 0.5), (0.4, 1.0)], [(0.3, 0.52), (0.78, 0.5)]],
    ],
    8: [
        [
            [
                (0.5, 0.48),
                (0.78, 0.28),
                (0.7, 0.04),
                (0.32, 0.04),
                (0.22, 0.28),
                (0.5, 0.48),
                (0.84, 0.72),
                (0.7, 0.98),
                (0.3, 0.98),
                (0.16, 0.72),
                (0.5, 0.48),
            ]
        ],
        [
            [
                (0.75, 0.1),
                (0.5, 0.0),
                (0.25, 0.15),
                (0.3, 0.35),
                (0.7, 0.6),
                (0.75, 0.9),
                (0.45, 1.0),
                (0.2, 0.85),
                (0.3, 0.6),
                (0.7, 0.35),
                (0.75, 0.1),
            ]
        ],
    ],
    9: [
        [
            [
                (0.8, 0.25),
                (0.6, 0.02),
                (0.25, 0.06),
                (0.2, 0.35),
                (0.5, 0.5),
                (0.8, 0.3),
                (0.8, 0.25),
                (0.75, 0.6),
                (0.6, 1.0),
            ]
        ],
        [[(0.75, 0.2), (0.5, 0.0), (0.2, 0.15), (0.25, 0.45), (0.6, 0.45), (0.78, 0.2), (0.78, 1.0)]],
    ],
}

CANVASES = ((28, 28), (48, 48), (64, 96), (120, 120), (200, 150), (160, 240), (300, 300), (400, 300))
FORMATS = ("png", "jpg", "png", "bmp", "webp", "png", "gif", "tiff", "jpg")


def find_font(name: str) -> Path:
    import matplotlib

    folders = [Path("/usr/share/fonts"), Path(matplotlib.get_data_path()) / "fonts" / "ttf"]
    for folder in folders:
        found = sorted(folder.rglob(name)) if folder.is_dir() else []
        if found:
            return found[0]
    sys.exit(f"font {name} not found in {', '.join(map(str, folders))}")


def catmull_rom(points: list[tuple[float, float]], per_segment: int = 12) -> list[tuple[float, float]]:
    """A smooth curve through the points (they stand for a pen's path)."""
    if len(points) < 3:
        return points
    padded = [points[0], *points, points[-1]]
    curve = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = (np.array(p) for p in padded[i - 1 : i + 3])
        for t in np.linspace(0, 1, per_segment, endpoint=False):
            curve.append(
                tuple(
                    0.5
                    * (
                        2 * p1
                        + (p2 - p0) * t
                        + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t * t
                        + (3 * p1 - p0 - 3 * p2 + p3) * t**3
                    )
                )
            )
    curve.append(points[-1])
    return curve


def drawn_glyph(digit: int, rng: random.Random, height: int, stroke: float) -> Image.Image:
    """Ink mask ("L", 255 = ink) of a hand-drawn-like digit about `height` pixels tall."""
    strokes = rng.choice(STROKES[digit])
    slant, aspect = rng.uniform(-0.25, 0.25), rng.uniform(0.55, 0.8)
    paths = []
    for points in strokes:
        moved = [(x + rng.gauss(0, 0.03), y + rng.gauss(0, 0.03)) for x, y in points]
        paths.append([((x * aspect + slant * (1 - y)) * height, y * height) for x, y in catmull_rom(moved)])
    pad = int(stroke) + 2
    left = min(x for path in paths for x, _ in path) - pad
    top = min(y for path in paths for _, y in path) - pad
    paths = [[(x - left, y - top) for x, y in path] for path in paths]
    size = (
        int(max(x for path in paths for x, _ in path)) + pad,
        int(max(y for path in paths for _, y in path)) + pad,
    )
    image = Image.new("L", size, 0)
    draw = ImageDraw.Draw(image)
    r = stroke / 2
    for path in paths:
        draw.line(path, fill=255, width=max(1, round(stroke)), joint="curve")
        for x, y in (path[0], path[-1]):  # round pen ends
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return image.crop(image.getbbox())


def font_glyph(digit: int, font_path: Path, height: int) -> Image.Image:
    font = ImageFont.truetype(str(font_path), size=max(8, int(height * 1.4)))
    image = Image.new("L", (height * 3, height * 3), 0)
    ImageDraw.Draw(image).text((height * 1.5, height * 1.5), str(digit), fill=255, font=font, anchor="mm")
    return image.crop(image.getbbox())


def place(glyph: Image.Image, canvas: tuple[int, int], rng: random.Random, fill: float) -> np.ndarray:
    """Rotate slightly, scale to `fill` of the canvas height and put it somewhere on it: float ink (H, W)."""
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.BICUBIC, expand=True)
    width, height = canvas
    scale = min(fill * height / glyph.height, 0.95 * width / glyph.width)
    size = (max(2, round(glyph.width * scale)), max(2, round(glyph.height * scale)))
    glyph = glyph.resize(size, Image.LANCZOS)
    ink = Image.new("L", canvas, 0)
    x = rng.randint(0, width - size[0]) if width > size[0] else 0
    y = rng.randint(0, height - size[1]) if height > size[1] else 0
    ink.paste(glyph, (x, y))
    return np.asarray(ink, dtype=np.float32) / 255


def render(ink: np.ndarray, rng: random.Random, condition: str, dark_ink: bool) -> Image.Image:
    """Paper and pen: turn an ink map into what a camera, scanner or drawing program would give."""
    h, w = ink.shape
    if condition == "alpha":  # a drawing program's transparent layer: colour everywhere, ink in alpha
        colour = (20, 20, 20) if dark_ink else (250, 250, 250)
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[..., :3] = colour
        rgba[..., 3] = np.round(ink * 255)
        return Image.fromarray(rgba)
    if condition == "photo":  # tinted paper, light falling off across the page, pen colour, sensor noise
        paper = np.array([rng.uniform(200, 245), rng.uniform(195, 240), rng.uniform(170, 225)])
        pen = np.array(rng.choice([(30, 40, 130), (35, 35, 40), (20, 60, 30)]), dtype=np.float64)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h) * rng.uniform(0.25, 0.45)
        light = 1 - ramp + ramp.min()  # one side of the page up to ~40% darker
        if not dark_ink:  # chalk on a blackboard
            paper, pen = np.array([40.0, 55.0, 45.0]), np.array([235.0, 235.0, 225.0])
        pixels = (paper * (1 - ink[..., None]) + pen * ink[..., None]) * light[..., None]
        pixels += np.random.default_rng(rng.randrange(2**32)).normal(0, 6, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    grey = ink * 255 if not dark_ink else 255 - ink * 255
    return Image.fromarray(np.round(grey).astype(np.uint8))


def save(image: Image.Image, path: Path, fmt: str, rng: random.Random, exif_turn: bool) -> Path:
    path = path.with_suffix("." + fmt)
    if fmt == "jpg":
        image = image.convert("RGB") if image.mode not in ("L", "RGB") else image
        kwargs: dict = {"quality": rng.randint(35, 80)}
        if exif_turn:  # the camera stored the pixels turned; EXIF orientation 6 says to turn them back
            image = image.transpose(Image.ROTATE_90)
            exif = Image.Exif()
            exif[0x0112] = 6
            kwargs["exif"] = exif
        image.save(path, **kwargs)
    elif fmt in ("bmp", "gif") and image.mode == "RGBA":
        image.convert("RGB").save(path)
    elif fmt == "webp":
        image.save(path, lossless=image.mode == "RGBA" or image.width * image.height < 5000, quality=70)
    elif fmt == "tiff":
        image.save(path, compression="tiff_deflate")
    else:
        image.save(path, optimize=True)
    return path


def write_set(out: Path, seed: int, font_names: tuple[str, ...], blocks: int) -> None:
    """Write `blocks` x PER_DIGIT pictures of each digit to out; each block prints 12 of them in fonts."""
    rng = random.Random(seed)
    fonts = [find_font(name) for name in font_names]
    out.mkdir(exist_ok=True)
    for old in out.glob("[0-9]_*"):  # a set written before; nothing else in the folder
        old.unlink()
    conditions = ("clean", "clean", "photo", "alpha", "clean", "photo")
    index = 0
    for digit in range(10):
        for i in range(PER_DIGIT * blocks):
            canvas = CANVASES[(i + digit) % len(CANVASES)]
            if rng.random() < 0.5:
                canvas = canvas[::-1]
            fill = rng.uniform(0.25, 0.9) if min(canvas) > 28 else rng.uniform(0.6, 0.95)
            work = max(64, int(canvas[1] * fill * 3))  # draw large, then scale down (anti-aliased)
            block, slot = divmod(i, PER_DIGIT)
            if slot < len(FONTS):
                font = (block * len(FONTS) + slot) % len(fonts)
                glyph, how = font_glyph(digit, fonts[font], work), Path(font_names[font]).stem
            else:
                stroke_kind = ("thin", "medium", "thick")[i % 3]
                # pen width in the final image's pixels: a line in a picture is at least a pixel wide
                digit_height = fill * canvas[1]
                low, share = {"thin": (1.2, 0.03), "medium": (1.8, 0.08), "thick": (2.5, 0.16)}[stroke_kind]
                stroke = max(low, share * digit_height) * work / digit_height
                glyph, how = drawn_glyph(digit, rng, work, stroke), f"drawn-{stroke_kind}"
            condition = conditions[(i + digit) % len(conditions)]
            fmt = FORMATS[(i * 7 + digit) % len(FORMATS)]
            if condition == "photo":
                fmt = "jpg"
            if condition == "alpha":
                fmt = rng.choice(("png", "webp"))
            dark_ink = (i + digit) % 2 == 0
            ink = place(glyph, canvas, rng, fill)
            image = render(ink, rng, condition, dark_ink)
            exif_turn = fmt == "jpg" and rng.random() < 0.3
            name = f"{digit}_{index:03d}_{how}-{condition}-{'dark' if dark_ink else 'light'}"
            save(image, out / name, fmt, rng, exif_turn)
            index += 1
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {index} images, {total / 1e6:.2f} MB, to {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--validation"] and len(sys.argv) == 3:
        write_set(Path(sys.argv[2]), VALIDATION_SEED, VALIDATION_FONTS, VALIDATION_BLOCKS)
    elif len(sys.argv) == 1:
        write_set(OUT, SEED, FONTS, 1)
    else:
        sys.exit("usage: python tests/make_digits.py [--validation DIR]")
