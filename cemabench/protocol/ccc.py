"""The ``ccc`` setting's stream: Continually Changing Corruptions (Press et al., "RDumb: A simple approach that
questions our progress in continual test-time adaptation", NeurIPS 2023), generated from a dataset's own corruption
generator (:class:`cemabench.data.Corruptor`).

As the official generator does (oripress/CCC at 656dec36, ``generate.py``): every image carries two corruptions, the
first at severity s1, then the second at s2, on a grid of severities (0 meaning none). For an ordered pair of
corruptions, a calibration matrix holds the source model's accuracy at every (s1, s2) of the grid. A transition walks
that matrix from (s, 0) to (0, s'), each move lowering s1 or raising s2 by one grid step, choosing at each point the
move whose path's mean accuracy stays nearer the target (the official dynamic programme, the same greedy rule), from
the start s whose whole path's mean is nearest the target. Each point of the walk takes ``speed`` images drawn at
random from the clean test images. When a walk ends, its second corruption becomes the first of the next pair, with a
new second one drawn at random, and the stream goes on until it holds ``length`` images. Every draw comes from the
seed.

Where this differs from the official code, for a miniature that is generated on the fly: the severity grid steps by
0.5 (the official by 0.25), the calibration set is a fixed subset of 100 clean test images drawn from the same test
images the stream draws from (the official measured on a calibration set of its own), images are not cropped,
flipped or JPEG-encoded before corruption (digits must not be flipped, and the miniature stores no JPEG), and the
corruptions are the table's domains (the official drops some per difficulty, those that cannot reach its target).

On ImageNet (imagenet-c with source = generated) the clean images are the validation images, resized to 256 and
centre-cropped to 224 when read, and corrupted with the ImageNet-C table; the stream is a :class:`GeneratedStream`,
each image generated when read from a generator of its own (the 7,500,000 images of a published stream cannot be
held), on the same 0.5 grid, calibrated on ``calibration_images`` validation images (100 by default; the official
generator reads a published matrix, ``ccc_accuracy_matrix.pickle``, measured on a calibration set it does not
ship), and not cropped at random, flipped or JPEG-encoded (the official does all three).
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cemabench.data import ArrayDomain, Corruptor, sequential_batches
from cemabench.protocol.execution import deterministic_threads
from cemabench.protocol.stream import derive_seed

LEVELS = tuple(float(s) for s in np.arange(0, 5.01, 0.5))  # the severity grid: 0 (none), 0.5, ..., 5


@dataclass(frozen=True)
class Step:
    """One point of a walk in the stream: ``count`` images from position ``start``, under ``first`` at ``s1`` and then
    ``second`` at ``s2``, calibrated at ``expected`` percent."""

    first: str
    s1: float
    second: str
    s2: float
    start: int
    count: int
    expected: float


def walk(accuracy: np.ndarray, target: float) -> list[tuple[int, int]]:
    """The calibrated transition through one pair's matrix ``accuracy[i, j]`` (first corruption at level i, second at
    level j): from (i, 0), i > 0, to (0, j); at each point, on to (i - 1, j) or (i, j + 1), whichever path's mean
    accuracy is nearer ``target`` (ties: the second), and from the start whose path's mean is nearest it."""
    rows, cols = accuracy.shape
    total: dict[tuple[int, int], float] = {}
    path: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def distance(point, here):
        if point[1] >= cols:  # past the grid: never taken
            return np.inf
        return abs((total[point] + here) / (len(path[point]) + 1) - target)

    for i in range(rows):
        for j in range(cols - 1, -1, -1):
            here = float(accuracy[i, j])
            if i == 0:
                total[i, j], path[i, j] = here, [(i, j)]
                continue
            down, right = (i - 1, j), (i, j + 1)
            step = down if distance(down, here) < distance(right, here) else right
            total[i, j], path[i, j] = total[step] + here, [(i, j), *path[step]]
    start = min(range(1, rows), key=lambda i: abs(total[i, 0] / len(path[i, 0]) - target))
    return path[start, 0]


class Calibration:
    """The source model's accuracy, in percent, on a fixed calibration subset of the clean test images under each
    (first, second) corruption pair at every point of the severity grid; a pair's matrix is measured when first
    needed."""

    def __init__(self, corruptor: Corruptor, model: nn.Module, size: int | None = None):
        images, size = corruptor.images(), size or corruptor.calibration_images
        pick = np.random.default_rng(derive_seed("ccc-calibration")).permutation(len(images))[:size]
        self.images, self.labels = images[pick], np.asarray(corruptor.labels())[pick]
        # an nn.Module's predictions here; a stand-in's for a model built apart (--isolate), its own ``predict``
        self.corrupt = corruptor.corrupt
        self.predict = functools.partial(predict, model) if isinstance(model, nn.Module) else model.predict
        self.matrices: dict[tuple[str, str], np.ndarray] = {}

    def accuracy(self, images: np.ndarray) -> float:
        return 100.0 * float((self.predict(images) == self.labels).mean())

    def matrix(self, first: str, second: str) -> np.ndarray:
        if (first, second) not in self.matrices:
            out = np.empty((len(LEVELS), len(LEVELS)))
            for i, s1 in enumerate(LEVELS):
                once = self.corrupt(self.images, first, s1, _rng("ccc-calibration", first, s1))
                for j, s2 in enumerate(LEVELS):
                    out[i, j] = self.accuracy(self.corrupt(once, second, s2, _rng("ccc-calibration", first, s1,
                                                                                   second, s2)))
            self.matrices[first, second] = out
        return self.matrices[first, second]


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))


def predict(model: nn.Module, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """The model's class predictions on uint8 images, in eval mode without autograd, on one CPU thread (so that the
    calibration, and the stream built from it, are the same on every machine); its mode is left as it was."""
    training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad(), deterministic_threads(torch.device("cpu")):
            for start in range(0, len(images), batch):
                x = torch.from_numpy(images[start:start + batch]).permute(0, 3, 1, 2).float().div(255)
                out.append(model(x).argmax(1).numpy())
    finally:
        model.train(training)
    return np.concatenate(out)


def _labels_at(labels, chosen: np.ndarray) -> np.ndarray:
    return np.asarray(labels())[chosen]


@dataclass
class GeneratedStream:
    """A CCC stream generated when read (a lazy corruptor's: clean images too many to hold): the image at position p
    is clean image ``chosen[p]`` under its step's two corruptions, drawn from a generator seeded by ``key`` and p, so
    any batch, in any order, gives the same pixels."""

    name: str
    corruptor: Corruptor
    steps: list[Step]
    chosen: np.ndarray
    key: tuple

    def __post_init__(self):
        self._starts = [s.start for s in self.steps]

    @property
    def sample_nbytes(self) -> int:
        """Raw uint8 bytes of one sample (H * W * 3)."""
        return int(np.prod(self.corruptor.images().shape[1:]))

    def __len__(self) -> int:
        return len(self.chosen)

    def pixels_at(self, positions: np.ndarray) -> np.ndarray:
        """The uint8 images (N, H, W, 3) at stream ``positions``."""
        positions = np.asarray(positions, dtype=np.int64)
        clean = self.corruptor.images()[self.chosen[positions]]
        out = np.empty_like(clean)
        for k, position in enumerate(positions.tolist()):
            step = self.steps[bisect.bisect_right(self._starts, position) - 1]
            rng = _rng(*self.key, position)
            once = self.corruptor.corrupt(clean[k:k + 1], step.first, step.s1, rng)
            out[k] = self.corruptor.corrupt(once, step.second, step.s2, rng)[0]
        return out

    def images(self, indices: np.ndarray) -> torch.Tensor:
        """The images at ``indices`` as float (N, 3, H, W) in [0, 1]."""
        return torch.from_numpy(self.pixels_at(indices)).permute(0, 3, 1, 2).float().div_(255).contiguous()

    batches = sequential_batches

    def labels(self) -> np.ndarray:
        return _labels_at(self.corruptor.labels, self.chosen)


def build(corruptor: Corruptor, model: nn.Module, corruptions: tuple[str, ...], seed: int, difficulty: float,
          speed: int, length: int, calibration: Calibration | None = None
          ) -> tuple[ArrayDomain | GeneratedStream, list[Step]]:
    """The CCC stream (a domain named ``ccc``, its images in stream order) and its walk, from ``seed``; labels are
    read from the corruptor only when the domain's are. A lazy corruptor's stream is a :class:`GeneratedStream`,
    whose images are generated when read; the walk and the clean images drawn come from the same seed."""
    if len(corruptions) < 2:
        raise ValueError("the ccc setting needs at least two corruptions (the table's domains) to walk between")
    calibration = calibration or Calibration(corruptor, model)
    images = corruptor.images()
    key = ("ccc", seed, difficulty, speed, length, *corruptions)
    rng = _rng(*key)

    def other(than: str) -> str:
        return str(rng.choice([c for c in corruptions if c != than]))

    first = str(rng.choice(corruptions))
    second = other(first)
    pixels = None if corruptor.lazy else np.empty((length, *images.shape[1:]), dtype=np.uint8)
    chosen = np.empty(length, dtype=np.int64)
    steps: list[Step] = []
    position = 0
    while position < length:
        matrix = calibration.matrix(first, second)
        for i, j in walk(matrix, difficulty):
            count = min(speed, length - position)
            if count == 0:
                break
            pick = rng.choice(len(images), count, replace=count > len(images))
            if pixels is not None:
                x = corruptor.corrupt(images[pick], first, LEVELS[i], rng)
                pixels[position:position + count] = corruptor.corrupt(x, second, LEVELS[j], rng)
            chosen[position:position + count] = pick
            steps.append(Step(first, LEVELS[i], second, LEVELS[j], position, count, float(matrix[i, j])))
            position += count
        first, second = second, other(second)
    if pixels is None:
        return GeneratedStream("ccc", corruptor, steps, chosen, (*key, "image")), steps
    return ArrayDomain("ccc", pixels, functools.partial(_labels_at, corruptor.labels, chosen)), steps
