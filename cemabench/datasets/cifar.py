"""CIFAR-10/100 and CIFAR-10-C/100-C, read from disk in their published layouts (the ones RobustBench reads).

    ROOT/CIFAR-10-C/<corruption>.npy     uint8 (5*N, 32, 32, 3): severities 1..5 stacked, severity s = rows
                                         (s-1)*N : s*N (N = 10,000 in the published files)
    ROOT/CIFAR-10-C/labels.npy           integer labels (5*N,): the N test labels, once per severity
    ROOT/CIFAR-100-C/...                 the same for CIFAR-100-C
    ROOT/cifar-10-batches-py/test_batch  the clean test set, torchvision's (and RobustBench's) layout;
                                         data_batch_1..5 are the clean training set
    ROOT/cifar-100-python/test, train    the same for CIFAR-100 (fine labels)

Rows follow RobustBench 1.1.1's ``load_corruptions_cifar`` (robustbench/data.py): for one corruption at severity s
it takes the images ``x[(s-1)*10000 : s*10000][:n]`` and the labels ``labels[:n]``, in file order, no shuffling
(``shuffle=False`` is its default), with ``n = n_examples`` (its benchmark evaluates each corruption and severity
on its own, so ``n`` is per domain). The five label blocks of the published ``labels.npy`` are identical; a file
whose blocks differ is refused, since it is ambiguous which block belongs to which severity. Images are memory
mapped (``np.load(mmap_mode="r")``): only the rows of a batch are read; labels are read from disk each time
``labels()`` is called, never held by the domain.
"""
from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch

from cemabench.data import ArrayDomain, DatasetSource
from cemabench.datasets.corruptions import HENDRYCKS_ORDER
from cemabench.errors import UserError

SEVERITIES = (1, 2, 3, 4, 5)
EXTRA_CORRUPTIONS = ("gaussian_blur", "saturate", "spatter", "speckle_noise")  # in the release, not in the benchmark
CORRUPTIONS = HENDRYCKS_ORDER + EXTRA_CORRUPTIONS
IMAGE_SHAPE = (32, 32, 3)


@dataclass(frozen=True)
class Layout:
    """Where one CIFAR variant lives under ROOT."""

    name: str
    num_classes: int
    corrupted: str  # folder of the -C release
    clean: str  # torchvision's folder of the pickled batches
    test_files: tuple[str, ...]
    train_files: tuple[str, ...]
    label_key: str


CIFAR10 = Layout("CIFAR-10", 10, "CIFAR-10-C", "cifar-10-batches-py", ("test_batch",),
                 tuple(f"data_batch_{i}" for i in range(1, 6)), "labels")
CIFAR100 = Layout("CIFAR-100", 100, "CIFAR-100-C", "cifar-100-python", ("test",), ("train",), "fine_labels")


def _corrupted_layout(layout: Layout) -> str:
    return (f"expected ROOT/{layout.corrupted}/<corruption>.npy (uint8, shape (5*N, 32, 32, 3), severities 1-5 "
            f"stacked) and ROOT/{layout.corrupted}/labels.npy (5*N integer labels), as released by Hendrycks & "
            f"Dietterich and read by RobustBench")


def _load_npy(path: Path, layout: str) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path} is missing; {layout}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise UserError(f"{path} is not a readable .npy array ({error}); {layout}") from error


def _images(path: Path, rows: int | None, layout: str) -> np.ndarray:
    array = _load_npy(path, layout)
    ok = array.dtype == np.uint8 and array.ndim == 4 and array.shape[1:] == IMAGE_SHAPE and len(array) % 5 == 0
    if not ok or (rows is not None and len(array) != rows):
        expected = f"(5*N, 32, 32, 3) with N = {rows // 5}" if rows is not None else "(5*N, 32, 32, 3)"
        raise UserError(f"{path} holds {array.dtype} of shape {array.shape}; expected uint8 of shape {expected}")
    return array


def _check_labels(path: Path, layout: str, num_classes: int) -> int:
    """Validates labels.npy (read once, not kept) and returns its number of rows."""
    array = _load_npy(path, layout)
    if array.ndim != 1 or array.dtype.kind not in "iu" or len(array) % 5 or len(array) == 0:
        raise UserError(f"{path} holds {array.dtype} of shape {array.shape}; expected integer labels of shape (5*N,) "
                        f"(the N test labels once per severity)")
    blocks = np.array(array).reshape(5, -1)
    if (blocks != blocks[0]).any():
        raise UserError(f"the five severity blocks of {path} differ; the published file repeats the test labels "
                        f"and RobustBench reads the first block for every severity")
    if blocks.min() < 0 or blocks.max() >= num_classes:
        raise UserError(f"{path} has labels outside 0..{num_classes - 1} (found {blocks.min()}..{blocks.max()})")
    return len(array)


def read_labels(path: str, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of a labels .npy file, read from disk now, as int64."""
    return np.asarray(np.load(path, mmap_mode="r")[start:stop], dtype=np.int64)


def corrupted(layout: Layout, data_root, severity: int = 5, domains=HENDRYCKS_ORDER,
              n_examples: int | None = None) -> DatasetSource:
    """One domain per corruption at one severity, from ``ROOT/<CIFAR-10-C | CIFAR-100-C>``."""
    name = f"{layout.name.lower().replace('-', '')}-c"
    where = _corrupted_layout(layout)
    if data_root is None:
        raise UserError(f"{name} reads its files from --data-root DIR; {where}")
    if severity not in SEVERITIES:
        raise UserError(f"severity must be one of 1, 2, 3, 4, 5 (got {severity})")
    unknown = [d for d in domains if d not in CORRUPTIONS and d != "clean"]
    if unknown:
        raise UserError(f"unknown {layout.name}-C corruption(s) {', '.join(unknown)}; valid: {', '.join(CORRUPTIONS)}, "
                        f"clean (the clean test set, from ROOT/{layout.clean})")
    folder = Path(data_root) / layout.corrupted
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist; {where}")
    labels_path = folder / "labels.npy"
    rows = _check_labels(labels_path, where, layout.num_classes)
    per_severity = rows // 5
    n = _n_examples(n_examples, per_severity, name)
    start = (severity - 1) * per_severity
    made = []
    for corruption in domains:
        if corruption == "clean":  # the clean test set beside the corruptions: its first n images, as RobustBench's
            test = _split(Path(data_root), layout, "test", required=True)
            images = np.concatenate([_unpickle(Path(p), layout)[0] for p in test.paths])
            if len(images) < n:
                raise UserError(f"the clean {layout.name} test set has {len(images)} images, fewer than the {n} per "
                                f"corruption; pass n_examples <= {len(images)}")
            made.append(ArrayDomain("clean", images[:n], partial(_first, test.paths, layout, n)))
            continue
        images = _images(folder / f"{corruption}.npy", rows, where)
        made.append(ArrayDomain(corruption, images[start:start + n],
                                partial(read_labels, str(labels_path), start, start + n)))
    return DatasetSource(
        name=name, num_classes=layout.num_classes, domains=made, clean=_split(Path(data_root), layout, "train", False),
        is_miniature=False,
        clean_hint=f"it reads the training batches from ROOT/{layout.clean}/{{{', '.join(layout.train_files)}}}",
        provenance={"dataset": f"{layout.name}-C", "severity": severity, "images_per_domain": n,
                    "rows": f"{start}:{start + n} of each <corruption>.npy (RobustBench's rows, not shuffled)",
                    "preprocessing": "none (32 px as stored); each model normalises with its own mean/std"})


def _n_examples(n_examples, available: int, name: str) -> int:
    if n_examples is None:
        return available
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or not 1 <= n_examples <= available:
        raise UserError(f"{name} n_examples must be an integer from 1 to {available} (the images per severity), "
                        f"got {n_examples!r}")
    return n_examples


def _unpickle(path: Path, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 from one of torchvision's pickled CIFAR batches."""
    files = ", ".join(layout.test_files + layout.train_files)
    where = (f"expected torchvision's layout ROOT/{layout.clean}/{{{files}}}"
             f" (pickled dicts with 'data' (N, 3072) uint8 and '{layout.label_key}')")
    if not path.is_file():
        raise UserError(f"{path} is missing; {where}")
    try:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        data, labels = np.asarray(entry["data"]), np.asarray(entry[layout.label_key])
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path} is not a {layout.name} batch ({type(error).__name__}: {error}); {where}") from error
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise UserError(f"{path} holds data {data.dtype} {data.shape} and labels of shape {labels.shape}; expected "
                        f"uint8 data of shape (N, 3072) and N labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise UserError(f"{path} has labels outside 0..{layout.num_classes - 1}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def read_pickled_labels(paths: tuple[str, ...], layout: Layout) -> np.ndarray:
    """The labels of pickled batches, read from disk now."""
    return np.concatenate([_unpickle(Path(p), layout)[1] for p in paths])


@dataclass
class PickledDomain:
    """A clean split kept in torchvision's pickled batches: the images are decoded on first use (a training split
    is only read by methods that use clean data), the labels re-read from the files at each ``labels()`` call."""

    name: str
    paths: tuple[str, ...]
    layout: Layout
    sample_nbytes: int = 32 * 32 * 3

    @cached_property
    def _decoded(self) -> ArrayDomain:
        images = np.concatenate([_unpickle(Path(p), self.layout)[0] for p in self.paths])
        return ArrayDomain(self.name, images, partial(read_pickled_labels, self.paths, self.layout))

    def __len__(self) -> int:
        return len(self._decoded)

    def labels(self) -> np.ndarray:
        return read_pickled_labels(self.paths, self.layout)

    def images(self, indices: np.ndarray) -> torch.Tensor:
        return self._decoded.images(indices)

    def batches(self, order: np.ndarray, batch_size: int, pin_memory: bool = False) -> Iterator[torch.Tensor]:
        return self._decoded.batches(order, batch_size, pin_memory)


def _split(root: Path, layout: Layout, split: str, required: bool) -> PickledDomain | None:
    """The clean ``test`` or ``train`` split, or None when its folder is absent and it is not ``required``."""
    files = layout.test_files if split == "test" else layout.train_files
    folder = root / layout.clean
    paths = [folder / f for f in files]
    if not required and not any(p.is_file() for p in paths):
        return None
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]} is missing; expected torchvision's layout ROOT/{layout.clean}/"
                        f"{{{', '.join(layout.test_files + layout.train_files)}}}")
    return PickledDomain(f"{layout.name.lower()}-{split}", tuple(str(p) for p in paths), layout)


def clean(layout: Layout, data_root, severity: int = 0, domains=("test",), n_examples: int | None = None
          ) -> DatasetSource:
    """The clean test set as one domain (``test``), from torchvision's pickled batches; the training split, when
    present, is the clean data the cloud may hold."""
    name = layout.name.lower().replace("-", "")
    if data_root is None:
        raise UserError(f"{name} reads its files from --data-root DIR (torchvision's ROOT/{layout.clean}/...)")
    if list(domains) != ["test"]:
        raise UserError(f"{name} has one domain, test; got {', '.join(domains)}")
    root = Path(data_root)
    test = _split(root, layout, "test", required=True)
    images, labels = zip(*(_unpickle(Path(p), layout) for p in test.paths))  # validated now, before any compute
    n = _n_examples(n_examples, sum(len(x) for x in labels), name)
    domain = ArrayDomain("test", np.concatenate(images)[:n], partial(_first, test.paths, layout, n))
    return DatasetSource(
        name=name, num_classes=layout.num_classes, domains=[domain], clean=_split(root, layout, "train", False),
        is_miniature=False,
        clean_hint=f"it reads the training batches from ROOT/{layout.clean}/{{{', '.join(layout.train_files)}}}",
        provenance={"dataset": f"{layout.name} test set", "images_per_domain": n,
                    "rows": f"the first {n} test images in file order (RobustBench's load_{name}, not shuffled)",
                    "preprocessing": "none (32 px as stored); each model normalises with its own mean/std"})


def _first(paths: tuple[str, ...], layout: Layout, n: int) -> np.ndarray:
    return read_pickled_labels(paths, layout)[:n]


def cifar10_c(data_root=None, severity: int = 5, domains=HENDRYCKS_ORDER, n_examples: int | None = None
              ) -> DatasetSource:
    """Factory of ``cifar10-c``: ROOT/CIFAR-10-C/<corruption>.npy (option: n_examples per domain)."""
    return corrupted(CIFAR10, data_root, severity, domains, n_examples)


def cifar100_c(data_root=None, severity: int = 5, domains=HENDRYCKS_ORDER, n_examples: int | None = None
               ) -> DatasetSource:
    """Factory of ``cifar100-c``: ROOT/CIFAR-100-C/<corruption>.npy (option: n_examples per domain)."""
    return corrupted(CIFAR100, data_root, severity, domains, n_examples)


def cifar10(data_root=None, severity: int = 0, domains=("test",), n_examples: int | None = None) -> DatasetSource:
    """Factory of ``cifar10``: the clean test set from ROOT/cifar-10-batches-py (option: n_examples)."""
    return clean(CIFAR10, data_root, severity, domains, n_examples)


def cifar100(data_root=None, severity: int = 0, domains=("test",), n_examples: int | None = None) -> DatasetSource:
    """Factory of ``cifar100``: the clean test set from ROOT/cifar-100-python (option: n_examples)."""
    return clean(CIFAR100, data_root, severity, domains, n_examples)
