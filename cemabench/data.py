"""Data sources: a dataset is a list of domains (one per corruption, rendition, ...) plus clean in-distribution data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np
import torch


class DomainData(Protocol):
    """One test domain. Images come out as float tensors in [0, 1]; each model normalises its own input."""

    name: str
    sample_nbytes: int  # raw uint8 bytes of one sample, which is what an upload of it costs

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...

    def batches(self, order: np.ndarray, batch_size: int, pin_memory: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def sequential_batches(domain, order: np.ndarray, batch_size: int, pin_memory: bool = False
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` for a domain that only implements ``batch``: one call per batch, in order."""
    for start in range(0, len(order), batch_size):
        yield domain.batch(order[start:start + batch_size])


@dataclass
class ArrayDomain:
    """A domain held in memory as uint8 images of shape (N, H, W, 3)."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    @property
    def sample_nbytes(self) -> int:
        return int(np.prod(self.images.shape[1:]))

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(self.images[indices]).permute(0, 3, 1, 2).float().div_(255)
        return images.contiguous(), torch.from_numpy(self.labels[indices]).long()

    batches = sequential_batches


@dataclass
class DatasetSource:
    """What a dataset factory returns: the ordered test domains and the clean data the cloud may hold."""

    name: str
    num_classes: int
    domains: list[DomainData]
    clean: DomainData | None  # None when the dataset has no clean in-distribution images on disk
    is_miniature: bool
    scored_classes: torch.Tensor | None = None  # score the argmax over these classes only (e.g. ImageNet-R's 200)
    provenance: dict[str, Any] = field(default_factory=dict)

