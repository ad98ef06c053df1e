"""The 15 ImageNet-C corruption types under two severity tables, chosen by image size or by name (``TABLES``).

``cifar``, vectorised over a batch of small images, builds the embedded miniatures: severity parameters follow
Hendrycks & Dietterich's table for 32-pixel images (the CIFAR-10-C variant), because the ImageNet table is calibrated
for 224-pixel images and would erase a 32-pixel digit. Two parts differ from the original by necessity: motion blur
uses a Gaussian line kernel instead of ImageMagick's, and frost uses a procedural ice texture instead of the six frost
photographs. ``imagenet`` (:mod:`cemabench.datasets.corruptions_imagenet`) is the ImageNet-C table for images of any
size, as imagecorruptions applies it (ImageNet's validation images for CCC, COCO for COCO-C). Every draw comes from
the ``numpy.random.Generator`` passed in.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from cemabench.datasets.corruptions_imagenet import corrupt_each
from cemabench.datasets.severity import at as _at

HENDRYCKS_ORDER = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)

Corruption = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
# snow's parameters at severity 0: no flake passes the threshold and the image is not greyed
SNOW_ZERO = (0.1, 0.2, 1, 1.0, 8, 3, 1.0)


def _per_channel(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return ndimage.convolve(images, kernel[None, :, :, None], mode="reflect")


def _gaussian(images: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode="reflect")


def gaussian_noise(x, severity, rng):
    c = _at((0.04, 0.06, 0.08, 0.09, 0.10), severity, 0.0)
    return x + rng.normal(scale=c, size=x.shape)


def shot_noise(x, severity, rng):
    c = _at((500, 250, 100, 75, 50), severity, math.inf, inverse=True)
    return rng.poisson(x * c) / c


def impulse_noise(x, severity, rng):
    amount = _at((0.01, 0.02, 0.03, 0.05, 0.07), severity, 0.0)
    u = rng.random(x.shape)
    out = x.copy()
    out[u < amount / 2] = 0.0
    out[(u >= amount / 2) & (u < amount)] = 1.0
    return out


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    half = max(1, int(np.ceil(radius)))
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    disk = ndimage.gaussian_filter(disk / disk.sum(), alias_blur)
    return disk / disk.sum()


def defocus_blur(x, severity, rng):
    radius, alias_blur = _at(((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), severity, (0.0, 0.0))
    return _per_channel(x, _disk(radius, alias_blur))


def glass_blur(x, severity, rng):
    sigma, max_delta, iterations = _at(((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)), severity,
                                       (0.0, 1, 0))
    max_delta, iterations = round(max_delta), round(iterations)  # whole pixels and passes between severities
    out = _gaussian(x, sigma)
    n, h, w, _ = out.shape
    images = np.arange(n)
    for _ in range(iterations):
        for row in range(h - max_delta, max_delta, -1):
            for col in range(w - max_delta, max_delta, -1):
                dy, dx = rng.integers(-max_delta, max_delta, size=(2, n))
                r2, c2 = row + dy, col + dx
                here = out[images, row, col].copy()
                out[images, row, col] = out[images, r2, c2]
                out[images, r2, c2] = here
    return _gaussian(out, sigma)


def _line_kernel(length: float, sigma: float, angle_deg: float) -> np.ndarray:
    half = int(np.ceil(length / 2))
    size = 2 * half + 1
    t = np.arange(0, half + 1, dtype=np.float64)
    weights = np.exp(-(t ** 2) / (2 * sigma ** 2))
    kernel = np.zeros((size, size))
    theta = np.deg2rad(angle_deg)
    rows = np.clip(np.round(half - t * np.sin(theta)).astype(int), 0, size - 1)
    cols = np.clip(np.round(half + t * np.cos(theta)).astype(int), 0, size - 1)
    np.add.at(kernel, (rows, cols), weights)
    return kernel / kernel.sum()


def _motion(images: np.ndarray, length: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    return np.stack([
        ndimage.convolve(img, _line_kernel(length, sigma, a)[:, :, None], mode="nearest")
        for img, a in zip(images, angles)
    ])


def motion_blur(x, severity, rng):
    length, sigma = _at(((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)), severity, (10, 0.0))
    return _motion(x, length, sigma, rng.uniform(-45, 45, size=len(x)))


def _zoom_center(x: np.ndarray, factor: float) -> np.ndarray:
    h = x.shape[1]
    crop = int(np.ceil(h / factor))
    top = (h - crop) // 2
    patch = torch.from_numpy(np.ascontiguousarray(x[:, top:top + crop, top:top + crop])).permute(0, 3, 1, 2)
    size = int(round(crop * factor))
    zoomed = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    trim = (size - h) // 2
    return zoomed[:, trim:trim + h, trim:trim + h]


def zoom_blur(x, severity, rng):
    stop = _at((1.06, 1.11, 1.16, 1.21, 1.26), severity, 1.0)
    factors = np.arange(1, stop, 0.01)
    out = x.copy()
    for factor in factors:
        out += _zoom_center(x, factor)
    return out / (len(factors) + 1)


def _plasma(n: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square fractal noise in [0, 1], one ``size`` x ``size`` map per image (size a power of two)."""
    maps = np.zeros((n, size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        wibble /= decay
        corners = maps[:, 0:size:step, 0:size:step]
        centre = (corners + np.roll(corners, -1, 1) + np.roll(corners, -1, 2) + np.roll(np.roll(corners, -1, 1), -1, 2))
        maps[:, half:size:step, half:size:step] = centre / 4 + rng.uniform(-wibble, wibble, centre.shape)
        centres = maps[:, half:size:step, half:size:step]
        corners = maps[:, 0:size:step, 0:size:step]
        up = (corners + np.roll(corners, -1, 2) + centres + np.roll(centres, 1, 1)) / 4
        left = (corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 2)) / 4
        maps[:, 0:size:step, half:size:step] = up + rng.uniform(-wibble, wibble, up.shape)
        maps[:, half:size:step, 0:size:step] = left + rng.uniform(-wibble, wibble, left.shape)
        step = half
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def fog(x, severity, rng):
    strength, decay = _at(((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)), severity, (0.0, 3))
    n, h, w, _ = x.shape
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    haze = _plasma(n, _power_of_two(max(h, w)), decay, rng)[:, :h, :w, None]
    return (x + strength * haze) * peak / (peak + strength)


def _grey(x: np.ndarray) -> np.ndarray:
    return (x @ np.array([0.299, 0.587, 0.114]))[..., None]


def snow(x, severity, rng):
    loc, scale, zoom, threshold, length, sigma, blend = _at((
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)), severity, SNOW_ZERO)
    n, h, w, _ = x.shape
    flakes = rng.normal(loc, scale, size=(n, h, w, 1))
    flakes = _zoom_center(flakes, zoom)
    flakes[flakes < threshold] = 0
    flakes = _motion(np.clip(flakes, 0, 1), length, sigma, rng.uniform(-135, -45, size=n))
    x = blend * x + (1 - blend) * np.maximum(x, _grey(x) * 1.5 + 0.5)
    return x + flakes + np.rot90(flakes, k=2, axes=(1, 2))


def frost(x, severity, rng):
    image_weight, frost_weight = _at(((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)), severity, (1, 0))
    n, h, w, _ = x.shape
    crystals = _plasma(n, _power_of_two(max(h, w)), 1.5, rng)[:, :h, :w]
    needles = ndimage.gaussian_filter(rng.random((n, h, w)), sigma=(0, 0.5, 0.5)) > 0.55
    ice = np.clip(0.6 * crystals + 0.5 * needles, 0, 1)[..., None] * np.array([0.85, 0.92, 1.0])
    return image_weight * x + frost_weight * ice


def brightness(x, severity, rng):
    """Adds c to the HSV value channel: scaling RGB by (V + c) / V keeps hue and saturation."""
    c = _at((0.05, 0.1, 0.15, 0.2, 0.3), severity, 0.0)
    value = x.max(axis=-1, keepdims=True)
    new_value = np.clip(value + c, 0, 1)
    return np.where(value > 0, x * new_value / np.maximum(value, 1e-12), new_value)


def contrast(x, severity, rng):
    c = _at((0.75, 0.5, 0.4, 0.3, 0.15), severity, 1.0)
    means = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - means) * c + means


def elastic_transform(x, severity, rng):
    alpha, sigma, affine = _at(((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                                (0.1, 0.03, 0.03)), severity, (0.0, 0.0, 0.0))
    n, h, w, ch = x.shape
    alpha, sigma, affine = alpha * h, sigma * h, affine * h
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    out = np.empty_like(x)
    for i in range(n):
        shift = rng.uniform(-affine, affine, size=(2, 3)) / h
        matrix = np.eye(2) + shift[:, :2]
        centred = np.stack([rows - h / 2, cols - w / 2])
        centre = np.array([h / 2, w / 2])[:, None, None]
        warped = np.tensordot(matrix, centred, axes=1) + centre + shift[:, 2:, None] * h
        if sigma > 0:
            field = rng.uniform(-1, 1, size=(2, h, w))
            warped = warped + alpha * ndimage.gaussian_filter(field, sigma=(0, sigma, sigma), mode="reflect")
        for c in range(ch):
            out[i, :, :, c] = ndimage.map_coordinates(x[i, :, :, c], warped, order=1, mode="reflect")
    return out


def _through_pil(x: np.ndarray, convert: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    pixels = np.clip(np.round(x * 255), 0, 255).astype(np.uint8)
    return np.stack([np.asarray(convert(Image.fromarray(p))) for p in pixels]).astype(np.float64) / 255


def pixelate(x, severity, rng):
    c = _at((0.95, 0.9, 0.85, 0.75, 0.65), severity, 1.0)
    h, w = x.shape[1:3]
    small = (int(w * c), int(h * c))
    return _through_pil(x, lambda im: im.resize(small, Image.BOX).resize((w, h), Image.BOX))


def jpeg_compression(x, severity, rng):
    quality = round(_at((80, 65, 58, 50, 40), severity, 100))

    def roundtrip(im: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    return _through_pil(x, roundtrip)


CORRUPTIONS: dict[str, Corruption] = {name: globals()[name] for name in HENDRYCKS_ORDER}
TABLES = ("cifar", "imagenet")
SMALL = 64  # images no larger than this on either side take the 32 px table unless one is named


def table_for(images: np.ndarray, table: str | None = None) -> str:
    """The severity table for ``images`` (N, H, W, 3): ``table`` when given, else ``cifar`` for images of at most
    ``SMALL`` px on each side (the miniatures' 32 and 64 px) and ``imagenet`` for larger ones."""
    if table is None:
        return "cifar" if max(images.shape[1:3]) <= SMALL else "imagenet"
    if table not in TABLES:
        raise ValueError(f"unknown corruption table {table!r}; valid: {', '.join(TABLES)}")
    return table


def corrupt(images: np.ndarray, name: str, severity: float, rng: np.random.Generator,
            table: str | None = None) -> np.ndarray:
    """Corrupt uint8 images of shape (N, H, W, 3); returns uint8 of the same shape. ``severity`` is 1 to 5, or any
    value from 0 (the images as they are) to 5 between them (parameters interpolated: CCC's finer severities).
    ``table`` names the severity table (``TABLES``); by default it follows the image size (``table_for``)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(HENDRYCKS_ORDER)}")
    if not 0 <= severity <= 5:
        raise ValueError(f"severity must be from 0 to 5, got {severity}")
    table = table_for(images, table)
    if severity == 0:
        return images.copy()
    if table == "imagenet":
        return corrupt_each(images, name, severity, rng)
    out = CORRUPTIONS[name](images.astype(np.float64) / 255, severity, rng)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
