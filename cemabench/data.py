"""Data sources: a dataset is a list of domains (one per corruption, rendition, ...) plus clean in-distribution data.

Labels never travel with images. A domain hands out images only; its ``labels()`` reads them from storage when the
harness asks, which it does after the run unit's stream has ended, so that no label is in the process's memory
while method code runs (``cemabench.protocol`` records predictions at arrival and scores them afterwards).
"""
from __future__ import annotations

import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class DomainData(typing.Protocol):
    """One test domain. Images come out as float tensors in [0, 1]; each model normalises its own input."""

    name: str
    sample_nbytes: int  # raw uint8 bytes of one sample, which is what an upload of it costs

    def __len__(self) -> int:
        """The number of samples."""
        ...

    def images(self, indices: np.ndarray) -> torch.Tensor:
        """The images at ``indices``, as a float tensor (N, C, H, W) in [0, 1]."""
        ...

    def batches(self, order: np.ndarray, batch_size: int, pin_memory: bool = False) -> Iterator[torch.Tensor]:
        """The images in ``order``, ``batch_size`` at a time (a loader may read ahead, e.g. with DataLoader workers)."""
        ...

    def labels(self) -> np.ndarray:
        """Every sample's label (int64, in index order), read from storage at call time: the domain object must
        not hold them, so that method code cannot find them in memory."""
        ...


def sequential_batches(domain, order: np.ndarray, batch_size: int, pin_memory: bool = False
                       ) -> Iterator[torch.Tensor]:
    """``batches`` for a domain that only implements ``images``: one call per batch, in order."""
    for start in range(0, len(order), batch_size):
        yield domain.images(order[start:start + batch_size])


@dataclass
class ArrayDomain:
    """A domain held in memory as uint8 images of shape (N, H, W, 3); ``label_source`` reads its labels when
    called (from a file, say), so the labels are not held beside the images."""

    name: str
    pixels: np.ndarray
    label_source: Callable[[], np.ndarray]

    @property
    def sample_nbytes(self) -> int:
        """Raw uint8 bytes of one sample (H * W * 3)."""
        return int(np.prod(self.pixels.shape[1:]))

    def __len__(self) -> int:
        """The number of images."""
        return len(self.pixels)

    def images(self, indices: np.ndarray) -> torch.Tensor:
        """The images at ``indices`` as float (N, 3, H, W) in [0, 1]."""
        return torch.from_numpy(self.pixels[indices]).permute(0, 3, 1, 2).float().div_(255).contiguous()

    def labels(self) -> np.ndarray:
        """The labels, read from ``label_source`` now; their count must match the images'."""
        labels = np.asarray(self.label_source(), dtype=np.int64)
        if labels.shape != (len(self),):
            raise ValueError(f"domain {self.name!r} has {len(self)} images but {labels.shape} labels")
        return labels

    batches = sequential_batches


@dataclass(frozen=True)
class Corruptor:
    """What a dataset that generates its own corruptions offers a generated stream (the ``ccc`` setting): its clean
    test images (uint8, N x H x W x 3: an array, or where they are too many to hold, a view with ``len``, ``shape``
    and indexing by an integer array that decodes them when indexed), their labels (read when called, as a
    domain's), and its generator ``corrupt(images, corruption, severity, rng)``, severity from 0 (none) to 5 in any
    step. ``lazy`` streams are generated when read, each image from a generator of its own; ``calibration_images`` is
    the size of the subset that CCC's calibration measures the source model on."""

    images: Callable[[], np.ndarray]
    labels: Callable[[], np.ndarray]
    corrupt: Callable[[np.ndarray, str, float, np.random.Generator], np.ndarray]
    lazy: bool = False
    calibration_images: int = 100


@dataclass
class DatasetSource:
    """What a dataset factory returns: the ordered test domains and the clean data the cloud may hold."""

    name: str
    num_classes: int
    domains: list[DomainData]
    clean: DomainData | None  # None when the dataset has no clean in-distribution images on disk
    is_miniature: bool
    scored_classes: torch.Tensor | None = None  # score the argmax over these classes only (e.g. ImageNet-R's 200)
    # what the edge predicts and how a stream is scored (cemabench.protocol.tasks): "classification", whose domains
    # give labels(), or "detection", whose domains give ground_truth() (a COCO instances document, images in the
    # domain's sample order) and whose num_classes is its largest category id + 1
    task: str = "classification"
    provenance: dict[str, Any] = field(default_factory=dict)
    corruptor: Corruptor | None = None  # where it generates its corruptions (the miniature): the ccc setting's source
    # how the dataset gets a clean split when it has none (a layout, an option), for the line that refuses a method
    # needing one
    clean_hint: str = ""

    def clean_missing(self) -> str | None:
        """None when the dataset has a clean split; otherwise the clause that says so, and how it gets one."""
        if self.clean is not None:
            return None
        return f"dataset {self.name} has none" + (f": {self.clean_hint}" if self.clean_hint else "")
