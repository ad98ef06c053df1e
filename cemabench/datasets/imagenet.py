"""ImageNet-C and ImageNet-R, read from disk in their published folder layouts, or ImageNet-C generated from the
validation images with cemabench's ImageNet-C table (``source = "generated"``; the ``ccc`` setting's source).

    ROOT/imagenet-c/<corruption>/<severity>/<wnid>/*.JPEG   (already 224 px: no resize, no crop)
    ROOT/imagenet-r/<wnid>/*.jpg                            (200 classes: resize 256, centre crop 224)
    ROOT/imagenet/val/<wnid>/*.JPEG                         (clean images: EATA's Fisher; the generated source)

Labels are indices into the 1000 ImageNet classes in sorted-wnid order (torchvision's and timm's order).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cemabench.data import Corruptor, DatasetSource, sequential_batches
from cemabench.datasets.corruptions import HENDRYCKS_ORDER, corrupt
from cemabench.errors import UserError
from cemabench.protocol.stream import derive_seed

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
SUBSETS = ("all", "robustbench-5000")
SCORINGS = ("mask-200", "argmax-1000")
SOURCES = ("disk", "generated")
CLEAN_HINT = "it reads ImageNet's validation images from ROOT/imagenet/val/<wnid>/*.JPEG"
# ImageNet-C's clean split: the validation images, which ImageNet-C corrupts (EATA's official Fisher reads them, with
# no label); their labels are the test stream's
WITHHELD = ("the labels of ImageNet-C's clean split are withheld: it is ImageNet's validation set, the very images "
            "ImageNet-C corrupts, so its labels are the test stream's; a method that trains on labelled source data "
            "needs ImageNet's training split, which cemabench does not read yet")
CCC_CALIBRATION = 100  # clean validation images the ccc setting's calibration measures the source model on
RESIZE_CROP = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])


class DataError(RuntimeError):
    """A file of the dataset cannot be used; the message names it."""


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order, from timm's bundled class list."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageFiles(Dataset):
    """Image files decoded to uint8 (3, H, W) and passed through ``transform(pixels, path)``; whatever fails on one
    image is a DataError that names it."""

    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:
            with Image.open(path) as image:
                pixels = to_tensor(image)
            return self.transform(pixels, path)
        except DataError:
            raise
        except Exception as error:  # whatever fails on one image, the message names the image
            raise DataError(f"cannot read image {path}: {error}") from error


def _imagenet_pixels(pixels: torch.Tensor, path: Path, resize: bool) -> torch.Tensor:
    """ImageNet-R's resize and centre crop; ImageNet-C's images must already be 224 px."""
    if resize:
        return RESIZE_CROP(pixels)
    if tuple(pixels.shape[1:]) != (224, 224):
        raise DataError(f"{path} is {pixels.shape[2]}x{pixels.shape[1]} px; ImageNet-C images are 224x224, so "
                        f"this is not an ImageNet-C folder (or it was resized)")
    return pixels


@dataclass
class ImageFolderDomain:
    """A domain of image files; batches are decoded by a DataLoader with ``workers`` processes. A file's label is
    its class folder's index in ``label_of``, looked up only when the harness scores (``labels()``); ``withheld``
    says why no one may read them (a clean split made of the test stream's images)."""

    name: str
    files: list[Path]
    label_of: dict[str, int]
    resize: bool
    workers: int = 0
    withheld: str = ""

    sample_nbytes = 3 * 224 * 224

    def __len__(self) -> int:
        return len(self.files)

    def _loader(self, order: np.ndarray, batch_size: int, pin_memory: bool) -> DataLoader:
        batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        return DataLoader(ImageFiles(self.files, partial(_imagenet_pixels, resize=self.resize)), batch_sampler=batches,
                          num_workers=self.workers, pin_memory=pin_memory, persistent_workers=False)

    def images(self, indices: np.ndarray) -> torch.Tensor:
        return next(self.batches(np.asarray(indices), len(indices)))

    def batches(self, order: np.ndarray, batch_size: int, pin_memory: bool = False) -> Iterator[torch.Tensor]:
        for pixels in loaded(self._loader(order, batch_size, pin_memory)):
            yield pixels.float().div_(255)

    def labels(self) -> np.ndarray:
        if self.withheld:
            raise LookupError(self.withheld)
        return np.asarray([self.label_of[f.parent.name] for f in self.files], dtype=np.int64)


@dataclass
class CleanImages:
    """The clean validation images as uint8 (N, 224, 224, 3), decoded (resize 256, centre crop 224) only when
    indexed with an integer array: 50,000 of them are never held at once."""

    files: list[Path]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), 224, 224, 3)

    def __getitem__(self, indices) -> np.ndarray:
        decode = ImageFiles(self.files, partial(_imagenet_pixels, resize=True))
        picked = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(picked), 224, 224, 3), dtype=np.uint8)
        for k, i in enumerate(picked.tolist()):
            out[k] = decode[i].permute(1, 2, 0).numpy()
        return out


@dataclass
class GeneratedDomain:
    """ImageNet-C generated when read: clean image i under ``name`` at ``severity`` with cemabench's ImageNet-C table,
    from a generator seeded by (``seed``, name, severity, i), so any batch in any order gives the same pixels."""

    name: str
    clean: CleanImages
    severity: float
    seed: int
    label_source: Callable[[], np.ndarray] = field(repr=False)

    sample_nbytes = 3 * 224 * 224

    def __len__(self) -> int:
        return len(self.clean)

    def pixels_at(self, indices: np.ndarray) -> np.ndarray:
        clean = self.clean[indices]
        return np.concatenate([corrupt(clean[k:k + 1], self.name, self.severity, np.random.default_rng(
            derive_seed("imagenet-c-generated", self.seed, self.name, self.severity, i)), table="imagenet")
            for k, i in enumerate(np.asarray(indices).reshape(-1).tolist())]) if len(clean) else clean

    def images(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.pixels_at(indices)).permute(0, 3, 1, 2).float().div_(255).contiguous()

    batches = sequential_batches

    def labels(self) -> np.ndarray:
        return np.asarray(self.label_source(), dtype=np.int64)


def loaded(loader: DataLoader) -> Iterator:
    """A DataLoader's batches; a worker's DataError re-raised with the file's message first (:func:`_from_worker`).
    However the iteration ends, the loader's workers and its queues' threads are ended with it: a failed batch's
    traceback holds the iterator, and the unit's end checks that nothing it started still runs."""
    iterator = iter(loader)
    try:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except DataError as error:
                raise _from_worker(error) from error
            yield batch
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator; idempotent
        if shutdown is not None:
            shutdown()


def _from_worker(error: DataError) -> DataError:
    """A worker's DataError arrives as "Caught DataError in DataLoader worker process N." and the worker's traceback,
    whose last line is the message that names the file: that message comes first again."""
    text = str(error)
    if not text.startswith("Caught DataError"):
        return error
    return DataError(f"{text.rstrip().rsplit('DataError: ', 1)[-1]} ({text.splitlines()[0][7:].rstrip('.')})")


def _class_folders(folder: Path, wnids: list[str], where: str) -> list[tuple[Path, int]]:
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist; {where}")
    index = {w: i for i, w in enumerate(wnids)}
    folders = sorted(p for p in folder.iterdir() if p.is_dir())
    if not folders:
        raise UserError(f"{folder} has no class folders; {where}")
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise UserError(f"{folder} has folders that are not ImageNet wnids ({', '.join(unknown[:3])}); {where}")
    return [(p, index[p.name]) for p in folders]


def _files(classes: list[tuple[Path, int]], where: str) -> list[Path]:
    files = []
    for folder, _ in classes:
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UserError(f"class folder {folder} holds no images (.JPEG, .jpg, .png); {where}")
        files += images
    return files


def _label_of(classes: list[tuple[Path, int]]) -> dict[str, int]:
    return {folder.name: label for folder, label in classes}


def robustbench_subset(subset_file: str | None) -> set[str]:
    """RobustBench's fixed 5,000-image ImageNet-C list ('wnid/file' lines), from a given file or from the
    installed robustbench package (located without importing it, since its imports are fragile)."""
    if subset_file is None:
        spec = importlib.util.find_spec("robustbench")
        package = Path(spec.submodule_search_locations[0]) if spec else None
        candidate = package / "helper_files" / "imagenet_test_image_ids.txt" if package else None
        if candidate is None or not candidate.is_file():
            raise UserError("subset 'robustbench-5000' needs RobustBench's list imagenet_test_image_ids.txt: install "
                            "the robustbench package, or set subset_file to a copy of that list")
        subset_file = str(candidate)
    lines = Path(subset_file).read_text().split()
    if not lines:
        raise UserError(f"subset file {subset_file} is empty")
    return set(lines)


def _root(data_root, dataset: str, layout: str) -> Path:
    """The data root of a real dataset, or a UserError when --data-root is missing or not a folder."""
    if data_root is None:
        raise UserError(f"the {dataset} dataset needs --data-root DIR, the folder that holds {layout}")
    if not Path(data_root).is_dir():
        raise UserError(f"--data-root {data_root} is not a directory; the {dataset} dataset expects {layout} in it")
    return Path(data_root)


def _clean(root: Path, wnids: list[str], workers: int, withheld: str = "") -> ImageFolderDomain | None:
    val = root / "imagenet" / "val"
    if not val.is_dir():
        return None
    classes = _class_folders(val, wnids, "expected ROOT/imagenet/val/<wnid>/*.JPEG")
    files = _files(classes, "expected ROOT/imagenet/val/<wnid>/*.JPEG")
    return ImageFolderDomain("imagenet-val", files, _label_of(classes), resize=True, workers=workers,
                             withheld=withheld)


def generated_only(seed, dataset: str, source: str) -> None:
    """The generator's ``seed``: an integer >= 0, and only where the corruptions are generated (read from disk,
    another seed would name other data and read the same)."""
    if type(seed) is not int or seed < 0:
        raise UserError(f"{dataset} option seed must be an integer >= 0, got {seed!r}")
    if seed != 0 and source != "generated":
        raise UserError(f"{dataset} option seed={seed} seeds the generated corruptions, and source = {source} reads "
                        f"them from disk: add source=generated, or leave seed out")


def imagenet_c(data_root, severity: int = 5, domains=HENDRYCKS_ORDER, subset: str = "all",
               subset_file: str | None = None, workers: int = 4, source: str = "disk", seed: int = 0,
               ccc_calibration: int = CCC_CALIBRATION) -> DatasetSource:
    """Factory of the ``imagenet-c`` dataset (options: subset = all | robustbench-5000, subset_file, workers, source
    = disk | generated, and for generated: seed, ccc_calibration)."""
    if source not in SOURCES:
        raise UserError(f"imagenet-c source must be one of {', '.join(SOURCES)}, got {source!r}")
    generated_only(seed, "imagenet-c", source)
    if source == "disk":
        root = _root(data_root, "imagenet-c", "imagenet-c/<corruption>/<severity>/<wnid>/*.JPEG")
    else:
        root = _root(data_root, "imagenet-c", "imagenet/val/<wnid>/*.JPEG (source = generated)")
    if subset not in SUBSETS:
        raise UserError(f"imagenet-c subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    unknown = [d for d in domains if d not in HENDRYCKS_ORDER]
    if unknown:
        raise UserError(f"unknown ImageNet-C corruption(s) {', '.join(unknown)}; valid: {', '.join(HENDRYCKS_ORDER)}")
    if not (type(ccc_calibration) is int and ccc_calibration >= 1):
        raise UserError(f"imagenet-c ccc_calibration must be a whole number of images >= 1, got {ccc_calibration!r}")
    wnids = imagenet_wnids()
    keep = robustbench_subset(subset_file) if subset == "robustbench-5000" else None
    if source == "generated":
        return _generated(root, wnids, severity, domains, subset, keep, seed, ccc_calibration, workers)
    layout = "expected ROOT/imagenet-c/<corruption>/<severity>/<wnid>/*.JPEG"
    made = []
    for corruption in domains:
        classes = _class_folders(root / "imagenet-c" / corruption / str(severity), wnids, layout)
        files = _files(classes, layout)
        if keep is not None:
            files = [f for f in files if f"{f.parent.name}/{f.name}" in keep]
            if not files:
                raise UserError(f"none of the images under {root / 'imagenet-c' / corruption / str(severity)} is "
                                f"in the robustbench-5000 list")
        made.append(ImageFolderDomain(corruption, files, _label_of(classes), resize=False, workers=workers))
    return DatasetSource(
        name="imagenet-c", num_classes=1000, domains=made, clean=_clean(root, wnids, workers, WITHHELD),
        is_miniature=False,
        clean_hint=CLEAN_HINT,
        provenance={"dataset": "ImageNet-C", "severity": severity, "subset": subset,
                    "images_per_domain": {d.name: len(d) for d in made},
                    "preprocessing": "none (224 px as stored); each model normalises with its own mean/std"})


def _generated(root: Path, wnids: list[str], severity: int, domains, subset: str, keep: set[str] | None, seed: int,
               calibration: int, workers: int) -> DatasetSource:
    """ImageNet-C generated from ROOT/imagenet/val: each domain lazily, and a lazy corruptor for the ccc setting."""
    where = "expected ROOT/imagenet/val/<wnid>/*.JPEG (source = generated corrupts the validation images)"
    classes = _class_folders(root / "imagenet" / "val", wnids, where)
    files = _files(classes, where)
    if keep is not None:
        files = [f for f in files if f"{f.parent.name}/{f.name}" in keep]
        if not files:
            raise UserError(f"none of the images under {root / 'imagenet' / 'val'} is in the robustbench-5000 list")
    label_of = _label_of(classes)
    clean_images = CleanImages(files)
    labels = ImageFolderDomain("imagenet-val", files, label_of, resize=True, workers=0).labels
    made = [GeneratedDomain(name, clean_images, severity, seed, labels) for name in domains]
    return DatasetSource(
        name="imagenet-c", num_classes=1000, domains=made,
        clean=ImageFolderDomain("imagenet-val", files, label_of, resize=True, workers=workers, withheld=WITHHELD),
        is_miniature=False,
        corruptor=Corruptor(lambda: clean_images, labels, partial(corrupt, table="imagenet"), lazy=True,
                            calibration_images=calibration),
        provenance={"dataset": "ImageNet-C generated from the ImageNet validation images", "severity": severity,
                    "subset": subset, "images_per_domain": {d.name: len(d) for d in made},
                    "generator": "cemabench's ImageNet-C table (corruptions_imagenet; imagecorruptions 1.1.2's "
                                 "operations and make_imagenet_c.py's parameters), each image from its own seeded "
                                 "generator, not JPEG-encoded after corruption",
                    "seed": seed, "ccc_calibration_images": calibration,
                    "preprocessing": "resize 256, centre crop 224, then corruption; each model normalises with its "
                                     "own mean/std"})


def imagenet_r(data_root, severity: int = 0, domains=("imagenet-r",), scoring: str = "mask-200",
               workers: int = 4) -> DatasetSource:
    """Factory of the ``imagenet-r`` dataset, one domain (options: scoring = mask-200 | argmax-1000, workers).

    ``mask-200`` scores the argmax over the 200 ImageNet-R classes of the 1000-way output; ``argmax-1000`` scores
    the plain 1000-way argmax, as CEMA's released code does. Methods always see the 1000-way logits."""
    if scoring not in SCORINGS:
        raise UserError(f"imagenet-r scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    root = _root(data_root, "imagenet-r", "imagenet-r/<wnid>/*.jpg") / "imagenet-r"
    layout = "expected ROOT/imagenet-r/<wnid>/*.jpg with the 200 ImageNet-R classes"
    wnids = imagenet_wnids()
    classes = _class_folders(root, wnids, layout)
    scored = torch.tensor([label for _, label in classes]) if scoring == "mask-200" else None
    domain = ImageFolderDomain("imagenet-r", _files(classes, layout), _label_of(classes), resize=True, workers=workers)
    return DatasetSource(
        name="imagenet-r", num_classes=1000, domains=[domain], clean=_clean(Path(data_root), wnids, workers),
        is_miniature=False, scored_classes=scored, clean_hint=CLEAN_HINT,
        provenance={"dataset": "ImageNet-R", "classes": len(classes), "scoring": scoring,
                    "images_per_domain": {"imagenet-r": len(domain)},
                    "preprocessing": "resize 256, centre crop 224; each model normalises with its own mean/std"})

