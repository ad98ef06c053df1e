"""The ImageNet-C severity table (cemabench.datasets.corruptions_imagenet) at 224 px, against values derived by hand
from Hendrycks & Dietterich's parameters; the side-by-side with imagecorruptions itself is in the README."""
import numpy as np
import pytest

from cemabench.datasets import corruptions_imagenet as table
from cemabench.datasets.corruptions import HENDRYCKS_ORDER, corrupt, table_for


def _photo(seed=0, size=224):
    """A smooth 224 px test image (low-frequency colour waves), not noise, so blurs change it little."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
    waves = [0.5 + 0.4 * np.sin(2 * np.pi * (k + 1) * xx + 3 * yy + p) for k, p in enumerate(phase)]
    return (np.stack(waves, -1) * 255).astype(np.uint8)[None]


def test_the_table_follows_the_image_size_or_is_named():
    assert table_for(np.zeros((1, 32, 32, 3), np.uint8)) == "cifar"
    assert table_for(np.zeros((1, 64, 64, 3), np.uint8)) == "cifar"  # the detection miniature's canvases
    assert table_for(np.zeros((1, 224, 224, 3), np.uint8)) == "imagenet"
    assert table_for(np.zeros((1, 224, 224, 3), np.uint8), "cifar") == "cifar"
    with pytest.raises(ValueError, match="unknown corruption table 'c10'; valid: cifar, imagenet"):
        table_for(np.zeros((1, 8, 8, 3), np.uint8), "c10")
    small = _photo(size=32)
    assert np.array_equal(corrupt(small, "fog", 3, np.random.default_rng(0)),
                          corrupt(small, "fog", 3, np.random.default_rng(0), table="cifar"))


def test_defocus_of_a_point_is_the_disk():
    """Severity 1 is a disk of radius 3 (29 pixels of the grid) smoothed by a 3 x 3 Gaussian of sigma 0.1, whose side
    taps are exp(-50) of the centre's: a single 255 spreads as 255 / 29 = 8.79 over the disk, truncated to 8."""
    image = np.zeros((1, 224, 224, 3), np.uint8)
    image[0, 100, 120] = 255
    out = corrupt(image, "defocus_blur", 1, np.random.default_rng(0))[0, :, :, 0].astype(int)
    yy, xx = np.mgrid[0:224, 0:224]
    inside = (yy - 100) ** 2 + (xx - 120) ** 2 <= 9
    assert inside.sum() == 29
    assert np.all(out[inside] == 8) and np.all(out[~inside] == 0)


def test_contrast_pulls_each_channel_to_its_own_mean():
    image = _photo(1)
    x = image[0] / 255.0
    for severity, c in enumerate((0.4, 0.3, 0.2, 0.1, 0.05), start=1):
        means = x.reshape(-1, 3).mean(0)
        expected = np.floor(np.clip((x - means) * c + means, 0, 1) * 255)
        got = corrupt(image, "contrast", severity, np.random.default_rng(0))[0]
        assert np.abs(got - expected).max() <= 1 and np.mean(got == expected) > 0.999


def test_brightness_adds_to_the_hsv_value_and_keeps_hue():
    image = np.zeros((1, 224, 224, 3), np.uint8)
    image[0, :112] = 100  # grey
    image[0, 112:, :, 0] = 200  # pure red
    for severity, c in enumerate((0.1, 0.2, 0.3, 0.4, 0.5), start=1):
        out = corrupt(image, "brightness", severity, np.random.default_rng(0))[0].astype(int)
        grey = int(np.floor(min(100 / 255 + c, 1) * 255 + 1e-9))
        red = int(np.floor(min(200 / 255 + c, 1) * 255 + 1e-9))
        assert abs(out[0, 0, 0] - grey) <= 1 and len(set(out[0, 0])) == 1
        assert abs(out[-1, -1, 0] - red) <= 1 and tuple(out[-1, -1, 1:]) == (0, 0)


def test_pixelate_shrinks_by_the_box_filter_and_enlarges_by_repetition():
    """Severity 5 shrinks 224 px to 56 (a factor 4): every 4 x 4 block becomes its mean, then nearest-neighbour
    enlarging repeats it, so the output is constant on 4 x 4 blocks and equals the block means (rounded)."""
    image = _photo(2)
    out = corrupt(image, "pixelate", 5, np.random.default_rng(0))[0].astype(float)
    means = image[0].reshape(56, 4, 56, 4, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(out[::4, ::4] - means).max() <= 1
    assert np.array_equal(out, np.repeat(np.repeat(out[::4, ::4], 4, 0), 4, 1))


def test_zoom_blur_keeps_a_flat_image():
    """Every zoomed copy of a flat image is flat; the average is taken in float32 and truncated to uint8 as in the
    original, so 77 / 255 may come back as 76.99998 and then 76, while 0 and 255 are exact."""
    for value, allowed in ((0, {0}), (255, {255}), (77, {76, 77})):
        flat = np.full((1, 224, 224, 3), value, np.uint8)
        out = corrupt(flat, "zoom_blur", 5, np.random.default_rng(0))
        assert len(np.unique(out)) == 1 and int(out.flat[0]) in allowed


def test_glass_blur_copies_the_neighbour_as_the_original_does(monkeypatch):
    """The original's tuple assignment on numpy views copies x[h', w'] into x[h, w] and leaves x[h', w'] as it was.
    Without the Gaussian and with every draw (dx, dy) = (-1, -1), the pixels visited (rows and columns 2 to 223,
    bottom-right first) each take their upper-left neighbour, not yet visited: the interior moves one pixel down and
    right, and rows and columns 0 and 1 keep their values (a true swap would carry values into row and column 1)."""
    class Fixed:
        def integers(self, low, high, size):
            assert (low, high) == (-1, 1)
            return np.full(size, -1)
    monkeypatch.setattr(table, "_smooth", lambda x, sigma: x)
    image = np.random.default_rng(3).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    out = table.glass_blur(image, 1, Fixed()) / 255 * 255  # severity 1: max_delta 1, two passes
    once = image.copy()
    once[2:, 2:] = image[1:-1, 1:-1]
    twice = once.copy()
    twice[2:, 2:] = once[1:-1, 1:-1]
    assert np.allclose(out, twice)
    kept = out.astype(np.uint8)
    assert np.array_equal(kept[:2], image[:2]) and np.array_equal(kept[:, :2], image[:, :2])


def test_fractional_severities_interpolate_the_table():
    assert table.at((0.08, 0.12, 0.18, 0.26, 0.38), 2.5, 0.0) == pytest.approx(0.15)
    assert table.at((60, 25, 12, 5, 3), 0.5, np.inf, inverse=True) == pytest.approx(120)
    image = _photo(4)
    for name in HENDRYCKS_ORDER:
        out = corrupt(image, name, 0.5, np.random.default_rng(0))
        assert out.shape == image.shape and out.dtype == np.uint8
