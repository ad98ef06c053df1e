"""Side by side: cemabench's ImageNet-C table (cemabench.datasets.corruptions_imagenet) against bethgelab's
imagecorruptions 1.1.2 on the same four photographs (scikit-image's astronaut, coffee and chelsea, imagecorruptions'
test_image.jpg), centre-cropped and resized to WxH (224x224 by default). Per corruption and severity 1 to 5:

- deterministic corruptions: the largest absolute pixel difference and the share of pixels that differ;
- random ones: the same, given the same draws (a numpy RandomState seeded as imagecorruptions' global state is,
  handed to cemabench through the adapter ``Legacy``);
- impulse noise, whose scikit-image call draws from a fresh unseeded Generator inside imagecorruptions: against
  scikit-image's s&p noise with the same seeded Generator, and the mean damage |corrupted - clean| of each.

Not run by the tests (imagecorruptions is not a dependency). In a scratch virtual environment with cemabench's
dependencies, opencv-python-headless and scikit-image, install imagecorruptions 1.1.2 with --no-deps and patch its
corruptions.py to import and run with current libraries: ``multichannel=True`` -> ``channel_axis=-1`` (scikit-image
>= 0.19) and ``np.float_`` -> ``np.float64`` (numpy 2). Put imagecorruptions' test_image.jpg beside this file, then

    python benchmarks/corruption_fidelity.py [WxH]
"""
import sys
import time
from pathlib import Path

import imagecorruptions
import numpy as np
import skimage.data
import skimage.util
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cemabench.datasets import corruptions_imagenet as cb  # noqa: E402

SIZE = tuple(int(v) for v in sys.argv[1].split("x")) if len(sys.argv) > 1 else (224, 224)


class Legacy:
    """A RandomState with a Generator's names, so cemabench's functions draw exactly what imagecorruptions draws."""
    def __init__(self, seed):
        self.rs = np.random.RandomState(seed)
    def normal(self, loc, scale, size=None): return self.rs.normal(loc, scale, size)
    def poisson(self, lam): return self.rs.poisson(lam)
    def uniform(self, low, high, size=None): return self.rs.uniform(low, high, size)
    def random(self, size=None): return self.rs.random_sample(size)
    def integers(self, low, high=None, size=None): return self.rs.randint(low, high, size)


def crop(a):
    im = Image.fromarray(a).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize(SIZE, Image.BICUBIC)
    return np.asarray(im)


DETERMINISTIC = ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression")
SAME_DRAWS = ("gaussian_noise", "shot_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
              "elastic_transform")
AMOUNTS = (0.03, 0.06, 0.09, 0.17, 0.27)  # impulse noise's table


def compare(name: str, severity: int, images: list[np.ndarray]) -> str:
    worst, share, damage, times = 0, 0.0, [], [0.0, 0.0]
    for k, img in enumerate(images):
        seed = 1000 * severity + k
        np.random.seed(seed)
        start = time.perf_counter()
        theirs = imagecorruptions.corrupt(img, severity, name)
        times[1] += time.perf_counter() - start
        if name == "impulse_noise":
            rng = np.random.default_rng(seed)
            reference = np.uint8(np.clip(skimage.util.random_noise(img / 255.0, mode="s&p", rng=seed,
                                                                   amount=AMOUNTS[severity - 1]), 0, 1) * 255)
        else:
            rng = Legacy(seed) if name in SAME_DRAWS else np.random.default_rng(seed)
            reference = theirs
        start = time.perf_counter()
        ours = cb.corrupt_each(img[None], name, severity, rng)[0]
        times[0] += time.perf_counter() - start
        d = np.abs(ours.astype(int) - reference.astype(int))
        worst, share = max(worst, int(d.max())), max(share, float((d > 0).mean()))
        damage.append((np.abs(ours.astype(int) - img).mean(), np.abs(theirs.astype(int) - img).mean()))
    kind = ("deterministic" if name in DETERMINISTIC else "same draws" if name in SAME_DRAWS
            else "vs scikit-image s&p, same Generator")
    ours_ms, theirs_ms = (1000 * t / len(images) for t in times)
    mean_damage = np.mean(damage, axis=0)
    return (f"{name:18s} s{severity} {kind:36s} max|diff| {worst:3d}  share differing {share:.6f}  "
            f"mean|corrupted-clean| ours {mean_damage[0]:.3f} imagecorruptions {mean_damage[1]:.3f}  "
            f"ms/image ours {ours_ms:.0f} imagecorruptions {theirs_ms:.0f}")


if __name__ == "__main__":
    photos = [crop(skimage.data.astronaut()), crop(skimage.data.coffee()), crop(skimage.data.chelsea()),
              crop(np.asarray(Image.open(Path(__file__).with_name("test_image.jpg"))))]
    for corruption in cb.CORRUPTIONS:
        for level in range(1, 6):
            print(compare(corruption, level, photos), flush=True)
