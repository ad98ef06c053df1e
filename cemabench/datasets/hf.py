"""Test domains kept as Hugging Face ``datasets``: a local image folder or parquet files per domain, or a hub
dataset with one configuration per domain (only where the machine has network).

    --dataset hf --dataset-option layout="imagenet-c/{domain}/{severity}"            (ROOT/<layout>/<wnid>/*.JPEG)
    --dataset hf --dataset-option builder=parquet --dataset-option layout="{domain}"  (ROOT/<domain>/*.parquet)
    --dataset hf --dataset-option hub=OWNER/NAME --dataset-option layout="{domain}-{severity}"

Class names that are all ImageNet wnids map to the 1000 ImageNet indices; other class names keep their own
indices. Needs the optional extra: ``pip install 'cemabench[hf]'``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cemabench.data import DatasetSource, sequential_batches
from cemabench.datasets.imagenet import RESIZE_CROP, imagenet_wnids, to_tensor
from cemabench.errors import UserError

BUILDERS = ("imagefolder", "parquet")


@dataclass
class HFDomain:
    """One domain backed by a ``datasets.Dataset``; images are decoded batch by batch."""

    name: str
    dataset: object
    label_column: str
    image_column: str
    resize: bool
    sample_nbytes: int

    def __len__(self) -> int:
        return len(self.dataset)

    def images(self, indices: np.ndarray) -> torch.Tensor:
        images = self.dataset[[int(i) for i in indices]][self.image_column]
        pixels = [to_tensor(image) for image in images]
        if self.resize:
            pixels = [RESIZE_CROP(p) for p in pixels]
        return torch.stack(pixels).float().div_(255)

    def labels(self) -> np.ndarray:
        """Read from the (memory-mapped) Arrow table when the harness scores."""
        return _labels(self.dataset, self.label_column)[0]

    batches = sequential_batches


def _labels(dataset, label_column: str) -> tuple[np.ndarray, int, bool]:
    feature = dataset.features[label_column]
    raw = np.asarray(dataset[label_column], dtype=np.int64)
    names = getattr(feature, "names", None)
    if names:
        wnids = imagenet_wnids()
        if all(n in wnids for n in names):
            index = np.asarray([wnids.index(n) for n in names])
            return index[raw], 1000, True
        return raw, len(names), False
    return raw, int(raw.max()) + 1, False


def _split(splits, split: str | None, domain: str):
    """The requested split, or the only one there is (``datasets`` names a split after its files, e.g. 'val')."""
    if split is None and len(splits) == 1:
        return next(iter(splits.values()))
    if split not in splits:
        raise UserError(f"domain {domain}: no split {split!r}; splits: {', '.join(splits)} (set split)")
    return splits[split]


def hf_dataset(data_root=None, severity: int = 5, domains=None, builder: str = "imagefolder",
               layout: str = "{domain}", hub: str | None = None, split: str | None = None, image_column: str = "image",
               label_column: str = "label", resize: bool = False, cache_dir: str | None = None) -> DatasetSource:
    """Factory of the ``hf`` dataset; every option is a ``--dataset-option``."""
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise UserError("the hf dataset needs Hugging Face datasets: pip install 'cemabench[hf]'") from error
    if not domains:
        raise UserError("the hf dataset needs the domains to read (--domains, or the table spec's domains)")
    if builder not in BUILDERS:
        raise UserError(f"hf builder must be one of {', '.join(BUILDERS)}, got {builder!r}")
    if hub is None and data_root is None:
        raise UserError("the hf dataset needs --data-root (local folders) or --dataset-option hub=OWNER/NAME")
    made, classes, is_imagenet = [], set(), set()
    for name in domains:
        where = layout.format(domain=name, severity=severity)
        if hub is not None:
            splits = load_dataset(hub, name=where, cache_dir=cache_dir)
        else:
            folder = Path(data_root) / where
            if not folder.is_dir():
                raise UserError(f"{folder} does not exist; the hf layout {layout!r} expects ROOT/{where}")
            splits = load_dataset(builder, data_dir=str(folder), cache_dir=cache_dir)
        dataset = _split(splits, split, name)
        missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
        if missing:
            raise UserError(f"domain {name}: no column {', '.join(missing)}; columns: {', '.join(dataset.column_names)}"
                            f" (set image_column / label_column)")
        _, count, imagenet = _labels(dataset, label_column)
        classes.add(count)
        is_imagenet.add(imagenet)
        first = to_tensor(dataset[0][image_column])
        nbytes = 3 * 224 * 224 if resize else int(first.numel())
        made.append(HFDomain(name, dataset, label_column, image_column, resize, nbytes))
    if len(classes) != 1:
        raise UserError(f"the domains disagree on their classes ({sorted(classes)} classes)")
    return DatasetSource(
        name="hf", num_classes=classes.pop(), domains=made, clean=None, is_miniature=False,
        provenance={"dataset": f"Hugging Face datasets ({hub or builder})", "layout": layout, "split": split,
                    "severity": severity, "labels": "ImageNet wnids" if is_imagenet.pop() else "dataset classes",
                    "images_per_domain": {d.name: len(d) for d in made},
                    "preprocessing": "resize 256, centre crop 224" if resize else "none (as stored)"})
