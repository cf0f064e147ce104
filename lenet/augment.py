"""Random distortions of a whole batch at once, on the batch's device: one grid_sample call per batch.

Both take uint8 (or float) images (N, H, W) with values in [0, 255] and return float32 (N, H, W) in the
same range, which `data.normalize` accepts like the uint8 batch. Pixels pulled in from outside the image
are 0, the background of MNIST and Fashion-MNIST. Random numbers come from the `generator` passed in (a
CPU generator), so a run is repeatable and resumable.

- `affine`: the paper's distorted training set (LeCun et al. 1998, section III): horizontal and vertical
  translation, scaling, squeezing (horizontal compression with vertical elongation, or the reverse) and
  horizontal shearing, drawn independently per image.
- `elastic`: Simard, Steinkraus and Platt 2003: a random displacement field, uniform in [-1, 1] per pixel
  and coordinate, smoothed by a Gaussian of standard deviation sigma pixels and scaled by alpha pixels.

On CPU, `affine` resamples uint8 images in the fused C++ kernel (lenet/csrc) when it is available: the
same random draws and the same sampling, within float rounding, without grid_sample and its dozen tensor
operations per batch. What each distortion costs a training step is in docs/speed.md.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

AUGMENTS = ("none", "affine", "elastic")

# Largest distortion at strength 1 (the paper shows examples but gives no numbers; docs/lenet5-1998.md).
TRANSLATE_PX = 2.0
SCALE = 0.10  # factor in [0.9, 1.1]
SQUEEZE = 0.15  # horizontal factor q in [0.85, 1.15], vertical 1 / q
SHEAR = 0.3  # x += shear * y
ELASTIC_ALPHA, ELASTIC_SIGMA = 34.0, 4.0  # Simard et al.'s values for MNIST


def _resample(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of images (N, H, W) at grid (N, H, W, 2), normalised coordinates, 0 outside."""
    x = images.to(torch.float32).unsqueeze(1)  # (N, 1, H, W)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(1)
    return out.clamp_(0, 255)  # bilinear weights sum to 1 only up to rounding: 255.00002 happens


def affine(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Each image translated, scaled, squeezed and sheared by its own random amounts (0 strength: none)."""
    n, height, width = images.shape
    u = (torch.rand(n, 5, generator=generator) * 2 - 1) * strength  # (N, 5) uniform in [-1, 1]
    scale, squeeze, shear = 1 + SCALE * u[:, 0], 1 + SQUEEZE * u[:, 1], SHEAR * u[:, 2]
    # forward map of a point p (normalised coordinates, x then y): p' = M p + t, with
    # M = scale * [[squeeze, squeeze * shear], [0, 1 / squeeze]] (shear, then squeeze, then scale)
    a, b, d = scale * squeeze, scale * squeeze * shear, scale / squeeze
    t = torch.stack([u[:, 3] * TRANSLATE_PX * 2 / width, u[:, 4] * TRANSLATE_PX * 2 / height], dim=1)
    # grid_sample asks, for every output pixel, where to read: the inverse map p = M^-1 (p' - t), with
    # M^-1 = [[1 / a, -b / (a d)], [0, 1 / d]]
    coef = torch.stack([1 / a, -b / (a * d), 1 / d, t[:, 0], t[:, 1]], dim=1)  # (N, 5)
    if images.device.type == "cpu" and images.dtype == torch.uint8:
        from lenet import fastcpu

        if fastcpu.load_extension() is not None:  # the same sampling in one pass (csrc/fused_lenet.cpp)
            return fastcpu.affine_warp(images, coef)
    coef = _to(coef, images.device).view(n, 5, 1, 1)  # broadcast over (H, W)
    points = _identity_grid(height, width, images.device)  # (1, H, W, 2)
    x, y = points[..., 0] - coef[:, 3], points[..., 1] - coef[:, 4]  # (N, H, W)
    grid = torch.empty(n, height, width, 2, device=images.device)  # written in place: stack is 2x slower
    torch.mul(coef[:, 0], x, out=grid[..., 0])
    grid[..., 0] += coef[:, 1] * y
    torch.mul(coef[:, 2], y, out=grid[..., 1])
    return _resample(images, grid)


@functools.lru_cache(maxsize=8)
def _blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size) M with M @ v the Gaussian blur of v (truncated at 3 sigma, zero beyond the ends)."""
    radius = max(1, math.ceil(3 * sigma))
    offset = torch.arange(size).view(-1, 1) - torch.arange(size).view(1, -1)
    kernel = torch.exp(-(offset.to(torch.float32) ** 2) / (2 * sigma**2)) * (offset.abs() <= radius)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return kernel / torch.exp(-(taps**2) / (2 * sigma**2)).sum()


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on device; to a GPU through pinned memory, so the copy does not make the host wait for
    the device (a plain copy from pageable memory synchronises the stream)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _identity_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(1, H, W, 2): the pixel centres in grid_sample's normalised coordinates (x, then y)."""
    xs = (torch.arange(width, device=device, dtype=torch.float32) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=device, dtype=torch.float32) * 2 + 1) / height - 1
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).unsqueeze(0)


def _uniform_field(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform in [-1, 1] on 256 even levels, eight per 64-bit random draw: 5x faster than torch.rand
    here, and after the Gaussian blur (about 100 values per output) the levels are invisible."""
    count = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, (-(-count // 8),), dtype=torch.int64, generator=generator)
    levels = words.view(torch.uint8)[:count].to(torch.float32)  # 0..255
    return levels.mul_(1 / 128).sub_(1 - 0.5 / 128).view(shape)


def elastic(
    images: torch.Tensor,
    generator: torch.Generator,
    alpha: float = ELASTIC_ALPHA,
    sigma: float = ELASTIC_SIGMA,
) -> torch.Tensor:
    """Simard et al.'s elastic distortion; alpha 0 leaves the images unchanged."""
    n, height, width = images.shape
    device = images.device
    field = _to(_uniform_field((n, 2, height, width), generator), device)  # (N, 2, H, W)
    # separable Gaussian blur as two small matrix products (a 25-tap depthwise conv is 20x slower on CPU)
    field = _to(_blur_matrix(height, sigma), device) @ field @ _to(_blur_matrix(width, sigma), device).T
    # pixels -> normalised units (align_corners=False: the image spans 2 units over `width` pixels)
    points = _identity_grid(height, width, device)  # (1, H, W, 2)
    grid = torch.empty(n, height, width, 2, device=device)
    torch.add(points[..., 0], field[:, 0], alpha=alpha * 2 / width, out=grid[..., 0])
    torch.add(points[..., 1], field[:, 1], alpha=alpha * 2 / height, out=grid[..., 1])
    return _resample(images, grid)


def apply(name: str, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The named distortion at its default strength ("none" returns the images as they are)."""
    if name == "affine":
        return affine(images, generator)
    if name == "elastic":
        return elastic(images, generator)
    if name == "none":
        return images
    raise ValueError(f"unknown augmentation {name!r}: expected one of {', '.join(AUGMENTS)}")
