"""The ImageNet-C severity table of the 15 corruptions, for images of any size from 32 px up (ImageNet's 224 px,
COCO's 640 px): Hendrycks & Dietterich's ``make_imagenet_c.py`` parameters as bethgelab's ``imagecorruptions``
applies them to arbitrary sizes, written anew here and checked against it: release 1.1.2 on PyPI, whose plasma
fractal is float64 and whose glass blur loops in Python (GitHub's master, c959e659, has since moved them to float32
and numba).

Each function corrupts one uint8 image (H, W, 3) and returns float values on the 0-255 scale, drawing from ``rng``
in the same order and with the same calls as imagecorruptions draws from ``numpy.random`` (so a
``numpy.random.RandomState`` seeded alike gives its very pixels; see README, "Corruption tables"). Between integer
severities the parameters are interpolated linearly from the zero entries of the CCC generator (oripress/CCC at
656dec36, ``make_imagenet_c.py``), shot noise's photon count through its reciprocal.

Where imagecorruptions itself differs from ``make_imagenet_c.py`` it is followed (it is the version for arbitrary
sizes): motion blur is a sum of shifted copies instead of ImageMagick's, the frost texture is rescaled by 1.1 with a
cubic filter before its random crop, zoom blur keeps the top-left of each zoomed image, pixelate enlarges with
nearest-neighbour, and elastic transform is the displacement field without the random affine step. Glass blur's
"swap" copies the neighbour into the pixel and leaves the neighbour as it was, as the original's does (its tuple
assignment swaps two numpy views). Two parts are not bit-identical: frost's cubic rescale is computed in floating
point where OpenCV uses fixed point (at most one grey level apart), and impulse noise draws its masks with
``rng.random`` as scikit-image does, from the generator passed in.
"""
from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cemabench.datasets.severity import at

FROST_DIR = Path(__file__).parent / "frost"
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")


def gaussian_noise(img, severity, rng):
    c = at((0.08, 0.12, 0.18, 0.26, 0.38), severity, 0.0)
    x = img / 255.0
    return np.clip(x + rng.normal(0.0, c, x.shape), 0, 1) * 255


def shot_noise(img, severity, rng):
    c = at((60, 25, 12, 5, 3), severity, math.inf, inverse=True)
    x = img / 255.0
    return np.clip(rng.poisson(x * c) / float(c), 0, 1) * 255


def impulse_noise(img, severity, rng):
    amount = at((0.03, 0.06, 0.09, 0.17, 0.27), severity, 0.0)
    out = img / 255.0
    flipped = rng.random(out.shape) <= amount
    salted = rng.random(out.shape) <= 0.5
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return np.clip(out, 0, 1) * 255


def _gaussian_1d(sigma: float, size: int) -> np.ndarray:
    """OpenCV's Gaussian taps for an odd ``size`` and sigma > 0, summing to one."""
    t = np.arange(size) - (size - 1) / 2
    taps = np.exp(-(t ** 2) / (2 * sigma ** 2))
    return taps / taps.sum()


def disk(radius: float, alias_blur: float) -> np.ndarray:
    """The defocus kernel: a disk of ``radius`` on a grid of at least 17 x 17, normalised, then smoothed by a 3 x 3
    (5 x 5 above radius 8) Gaussian of sigma ``alias_blur`` with mirrored borders, in float32 as the original."""
    grid = np.arange(-8, 8 + 1) if radius <= 8 else np.arange(-radius, radius + 1)
    size = 3 if radius <= 8 else 5
    xx, yy = np.meshgrid(grid, grid)
    aliased = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float32)
    aliased /= np.sum(aliased)
    taps = _gaussian_1d(alias_blur, size) if alias_blur > 0 else np.eye(1, size, size // 2)[0]
    smooth = ndimage.correlate1d(aliased.astype(np.float64), taps, axis=0, mode="mirror")
    return ndimage.correlate1d(smooth, taps, axis=1, mode="mirror").astype(np.float32)


def defocus_blur(img, severity, rng):
    radius, alias_blur = at(((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)), severity, (0.0, 0.0))
    x = img / 255.0
    kernel = disk(radius, alias_blur).astype(np.float64)
    out = np.stack([ndimage.correlate(x[:, :, c], kernel, mode="mirror") for c in range(3)], axis=-1)
    return np.clip(out, 0, 1) * 255


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image's ``gaussian`` over the two spatial axes (edges repeated, truncated at 4 sigma)."""
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)


def glass_blur(img, severity, rng):
    sigma, max_delta, iterations = at(((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)), severity,
                                      (0.0, 1, 0))
    d, iterations = max(1, round(max_delta)), round(iterations)  # whole pixels and passes between severities
    x = np.uint8(_smooth(img / 255.0, sigma) * 255)
    h, w = x.shape[:2]
    rows = np.repeat(np.arange(h - d, d, -1), max(0, w - 2 * d))
    cols = np.tile(np.arange(w - d, d, -1), max(0, h - 2 * d))
    packed = (x[..., 0].astype(np.int64) << 16 | x[..., 1].astype(np.int64) << 8 | x[..., 2]).ravel().tolist()
    for _ in range(iterations):
        shifts = rng.integers(-d, d, size=(len(rows), 2))  # (dx, dy) per pixel, in the original's order
        targets = ((rows + shifts[:, 1]) * w + cols + shifts[:, 0]).tolist()
        for here, there in zip((rows * w + cols).tolist(), targets):
            packed[here] = packed[there]
    flat = np.asarray(packed, dtype=np.int64).reshape(h, w)
    x = np.stack([flat >> 16, flat >> 8 & 255, flat & 255], axis=-1).astype(np.uint8)
    return np.clip(_smooth(x / 255.0, sigma), 0, 1) * 255


def motion(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """imagecorruptions' motion blur of ``x`` (H, W[, C]): a Gaussian-weighted sum of copies shifted by whole pixels
    along ``angle`` (degrees), edges repeated."""
    width = int(round(2 * radius)) + 1
    if sigma > 0:
        taps = np.exp(-(np.arange(width) ** 2) / (2 * (sigma ** 2))) / (np.sqrt(2 * np.pi) * sigma)
    else:
        taps = np.eye(1, width)[0]
    taps = taps / np.sum(taps)
    point = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(point[0], point[1])
    h, w = x.shape[:2]
    out = np.zeros(x.shape, dtype=np.float64)
    for i in range(width):
        dy, dx = -math.ceil(i * point[0] / hypot - 0.5), -math.ceil(i * point[1] / hypot - 0.5)
        if abs(dy) >= h or abs(dx) >= w:  # the motion left the image
            break
        rows = np.clip(np.arange(h) - dy, 0, h - 1)
        cols = np.clip(np.arange(w) - dx, 0, w - 1)
        out = out + taps[i] * x[rows][:, cols]
    return out


def motion_blur(img, severity, rng):
    radius, sigma = at(((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)), severity, (0.0, 0.0))
    return np.clip(motion(img, radius, sigma, rng.uniform(-45, 45)), 0, 255)


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """The centre of ``x`` (H, W, C) enlarged by ``factor`` with linear interpolation (corners kept), not cropped
    back: the caller keeps its top-left H x W."""
    h, w = x.shape[:2]
    ch, cw = int(np.ceil(h / float(factor))), int(np.ceil(w / float(factor)))
    top, left = (h - ch) // 2, (w - cw) // 2
    return ndimage.zoom(x[top:top + ch, left:left + cw], (factor, factor, 1), order=1)


def zoom_blur(img, severity, rng):
    stop, step = at(((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)), severity, (1.0, 0.01))
    factors = np.arange(1, stop, step)
    x = (img / 255.0).astype(np.float32)
    h, w = x.shape[:2]
    out = np.zeros_like(x)
    for factor in factors:
        out += clipped_zoom(x, factor)[:h, :w]
    return np.clip((x + out) / (len(factors) + 1), 0, 1) * 255


def plasma(size: int, decay: float, rng) -> np.ndarray:
    """The original's diamond-square height map, ``size`` x ``size`` (a power of two), scaled to [0, 1]; at each
    level the random offsets are wibble * U(-wibble, wibble), wibble starting at 100 and divided by ``decay``."""
    heights = np.zeros((size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = heights[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        heights[half:size:step, half:size:step] = square / 4 + wibble * rng.uniform(-wibble, wibble, square.shape)
        centres = heights[half:size:step, half:size:step]
        corners = heights[0:size:step, 0:size:step]
        top = (centres + np.roll(centres, 1, axis=0)) + (corners + np.roll(corners, -1, axis=1))
        heights[0:size:step, half:size:step] = top / 4 + wibble * rng.uniform(-wibble, wibble, top.shape)
        left = (centres + np.roll(centres, 1, axis=1)) + (corners + np.roll(corners, -1, axis=0))
        heights[half:size:step, 0:size:step] = left / 4 + wibble * rng.uniform(-wibble, wibble, left.shape)
        step //= 2
        wibble /= decay
    heights -= heights.min()
    return heights / heights.max()


def fog(img, severity, rng):
    strength, decay = at(((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)), severity, (0.0, 2.0))
    h, w = img.shape[:2]
    size = 1 << (max(h, w, 3) - 1).bit_length()
    x = img / 255.0
    peak = x.max()
    x += strength * plasma(size, decay, rng)[:h, :w][..., np.newaxis]
    return np.clip(x * peak / (peak + strength), 0, 1) * 255


def _cubic_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's bicubic resampling along one axis (a = -0.75, pixel centres aligned, edges repeated): for each
    output pixel, its four source indices and weights."""
    centre = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    base = np.floor(centre).astype(np.int64)
    t = centre - base
    a = -0.75
    weights = np.stack([((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                        ((a + 2) * t - (a + 3)) * t * t + 1,
                        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a], axis=1)
    index = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, size_in - 1)
    return index, weights


def cubic_resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """A uint8 (H, W, C) image resized to ``height`` x ``width`` with OpenCV's bicubic filter, rounded to uint8."""
    rows, row_w = _cubic_weights(pixels.shape[0], height)
    cols, col_w = _cubic_weights(pixels.shape[1], width)
    x = pixels.astype(np.float64)
    x = np.einsum("ok,okwc->owc", row_w, x[rows])
    x = np.einsum("pk,hpkc->hpc", col_w, x[:, cols])
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=32)
def frost_texture(index: int, height: int, width: int) -> np.ndarray:
    """Frost photograph ``index`` (RGB) rescaled as imagecorruptions does for an image of ``height`` x ``width``: by
    the factor that makes it cover the image (1 when it already does), times 1.1."""
    with Image.open(FROST_DIR / FROST_FILES[index]) as image:
        texture = np.asarray(image.convert("RGB"))
    fh, fw = texture.shape[:2]
    scale = 1.0
    if fh < height or fw < width:
        scale = max(height / fh if fh < height else 0, width / fw if fw < width else 0)
    scale *= 1.1
    texture = cubic_resize(texture, int(np.ceil(fw * scale)), int(np.ceil(fh * scale)))
    texture.flags.writeable = False
    return texture


def frost(img, severity, rng):
    image_weight, frost_weight = at(((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)), severity,
                                    (1.0, 0.0))
    index = int(rng.integers(5))  # the original draws from the first five of its six photographs
    h, w = img.shape[:2]
    texture = frost_texture(index, h, w)
    top, left = int(rng.integers(0, texture.shape[0] - h)), int(rng.integers(0, texture.shape[1] - w))
    return np.clip(image_weight * img.astype(np.float64) + frost_weight * texture[top:top + h, left:left + w], 0,
                   255)


def snow(img, severity, rng):
    loc, scale, zoom, threshold, radius, sigma, blend = at((
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)), severity,
        (0.1, 0.3, 3, 1.0, 10, 4, 1.0))
    x = img.astype(np.float32) / 255.0
    h, w = x.shape[:2]
    flakes = clipped_zoom(rng.normal(loc, scale, (h, w))[..., np.newaxis], zoom)
    flakes[flakes < threshold] = 0
    flakes = motion(np.clip(flakes.squeeze(-1), 0, 1), radius, sigma, rng.uniform(-135, -45))
    flakes = (np.round(flakes * 255).astype(np.uint8) / 255.0)[..., np.newaxis][:h, :w]
    grey = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., np.newaxis]
    x = blend * x + (1 - blend) * np.maximum(x, grey * 1.5 + 0.5)
    return np.clip(x + flakes + np.rot90(flakes, k=2), 0, 1) * 255


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """scikit-image's RGB to HSV conversion (all in [0, 1]), hue 0 where the pixel is grey."""
    value = rgb.max(-1)
    delta = np.ptp(rgb, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        saturation = np.where(delta == 0, 0.0, delta / value)
        hue = np.zeros_like(value)
        for channel, offset in ((0, 0.0), (1, 2.0), (2, 4.0)):
            at_max = rgb[..., channel] == value
            after, before = rgb[..., (channel + 1) % 3], rgb[..., (channel + 2) % 3]
            hue[at_max] = offset + (after[at_max] - before[at_max]) / delta[at_max]
        hue = (hue / 6.0) % 1.0
    hue[delta == 0] = 0.0
    out = np.stack([hue, saturation, value], axis=-1)
    out[np.isnan(out)] = 0
    return out


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """scikit-image's HSV to RGB conversion."""
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(hue * 6)
    f = hue * 6 - sector
    p, q, t = value * (1 - saturation), value * (1 - f * saturation), value * (1 - (1 - f) * saturation)
    choices = np.stack([np.stack(c, axis=-1) for c in ((value, t, p), (q, value, p), (p, value, t), (p, q, value),
                                                        (t, p, value), (value, p, q))])
    sector = np.stack([sector] * 3, axis=-1).astype(np.uint8) % 6
    return np.choose(sector, choices)


def brightness(img, severity, rng):
    c = at((0.1, 0.2, 0.3, 0.4, 0.5), severity, 0.0)
    hsv = rgb_to_hsv(img / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(hsv_to_rgb(hsv), 0, 1) * 255


def contrast(img, severity, rng):
    c = at((0.4, 0.3, 0.2, 0.1, 0.05), severity, 1.0)
    x = img / 255.0
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def elastic_transform(img, severity, rng):
    alpha = 250 * at((0.05, 0.065, 0.085, 0.1, 0.12), severity, 0.0)
    image = img.astype(np.float32) / 255.0
    h, w = image.shape[:2]
    sigma = np.array((h, w)) * 0.01
    reach = h * 0.005  # the original bounds both displacements by the height
    dx, dy = ((ndimage.gaussian_filter(rng.uniform(-reach, reach, (h, w)), sigma, mode="reflect", truncate=3)
               * alpha).astype(np.float32) for _ in range(2))
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([rows + dy, cols + dx])
    out = np.stack([ndimage.map_coordinates(image[:, :, c], coords, order=1, mode="reflect") for c in range(3)],
                   axis=-1)
    return np.clip(out, 0, 1) * 255


def pixelate(img, severity, rng):
    c = at((0.6, 0.5, 0.4, 0.3, 0.25), severity, 1.0)
    h, w = img.shape[:2]
    image = Image.fromarray(img).resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.NEAREST)
    return np.asarray(image).astype(np.float64)


def jpeg_compression(img, severity, rng):
    quality = round(at((25, 18, 15, 10, 7), severity, 85))
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "JPEG", quality=quality)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        return np.asarray(image.convert("RGB")).astype(np.float64)


CORRUPTIONS = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur, snow, frost, fog,
    brightness, contrast, elastic_transform, pixelate, jpeg_compression)}


def corrupt_each(images: np.ndarray, name: str, severity: float, rng) -> np.ndarray:
    """Corrupt uint8 images (N, H, W, 3) one at a time, in order, under the ImageNet table; uint8 out, truncated as
    the original's ``np.uint8`` does."""
    function = CORRUPTIONS[name]
    return np.stack([np.uint8(np.clip(function(np.ascontiguousarray(img), severity, rng), 0, 255))
                     for img in images]) if len(images) else images.copy()
