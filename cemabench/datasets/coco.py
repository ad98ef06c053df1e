"""COCO 2017 val and COCO-C, read from disk in their published layouts, for the detection task.

    ROOT/val2017/*.jpg                                   (COCO 2017 val: the clean domain, "clean")
    ROOT/annotations/instances_val2017.json              (its instances ground truth)
    ROOT/coco-c/<corruption>/<severity>/<file_name>      (COCO-C, as imagecorruptions writes it: the same file names)
    ROOT/train2017/*.jpg                                 (COCO 2017 train: the clean training split, read only with
    ROOT/annotations/instances_train2017.json             the option train_images = N, its first N images)

or, with the option ``source = "generated"``, COCO-C generated from val2017 when read, with cemabench's ImageNet-C
table (:mod:`cemabench.datasets.corruptions_imagenet`, imagecorruptions' operations and parameters, which Michaelis et
al. applied to COCO's images at their own size): each image is corrupted at its original size, from a generator
seeded by (``seed``, corruption, severity, file name), then letterboxed; no coco-c folder is read.

Every image is letterboxed to ``image_size`` x ``image_size`` (scaled to fit, aspect kept, bilinear with
antialiasing, then padded with grey 114 at the right and bottom): that is what the edge sees and what an upload
carries, so its bytes are ``3 * image_size ** 2``. The ground truth is moved into the same frame (scaled; the
padding adds no offset), which leaves every IoU, and so COCO's mAP over all areas, as in the original frame; areas,
and with them the small/medium/large breakdown, are those of the letterboxed image.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cemabench.data import DatasetSource
from cemabench.datasets.corruptions import HENDRYCKS_ORDER, corrupt
from cemabench.datasets.imagenet import SOURCES, ImageFiles, _root, generated_only, loaded
from cemabench.errors import UserError
from cemabench.protocol.stream import derive_seed

CLEAN = "clean"
ANNOTATIONS = Path("annotations") / "instances_val2017.json"
TRAIN_ANNOTATIONS = Path("annotations") / "instances_train2017.json"
LAYOUT = "val2017/*.jpg and annotations/instances_val2017.json (COCO 2017 val), and coco-c/<corruption>/<severity>/"
PAD = 114 / 255


def letterbox(pixels: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """A uint8 image (3, H, W) scaled to fit ``size`` x ``size`` (aspect kept) and padded at the right and bottom, as
    floats in [0, 1]; and the scale."""
    h, w = pixels.shape[1:]
    scale = size / max(h, w)
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    resized = F.interpolate(pixels[None].float().div_(255), size=new, mode="bilinear", antialias=True,
                            align_corners=False)[0].clamp_(0, 1)
    out = torch.full((3, size, size), PAD)
    out[:, :new[0], :new[1]] = resized
    return out, scale


def _letterboxed(pixels: torch.Tensor, path: Path, size: int) -> torch.Tensor:
    return letterbox(pixels, size)[0]


def _corrupted(pixels: torch.Tensor, path: Path, size: int, corruption: str, severity: int, seed: int
               ) -> torch.Tensor:
    """COCO-C generated: the image at its own size under ``corruption`` (ImageNet-C table), then letterboxed."""
    rng = np.random.default_rng(derive_seed("coco-c-generated", seed, corruption, severity, path.name))
    image = corrupt(pixels.permute(1, 2, 0).numpy()[None], corruption, severity, rng, table="imagenet")[0]
    return letterbox(torch.from_numpy(image).permute(2, 0, 1), size)[0]


def read_annotations(path: Path) -> dict:
    """The instances document, checked for what scoring needs; one line naming the file otherwise."""
    if not path.is_file():
        raise UserError(f"{path} not found: the COCO layout is {LAYOUT}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not JSON ({error}); it should be COCO's {path.name}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
            raise UserError(f"{path} is not a COCO instances file: it has no {key!r} list")
    bad = next((a for a in doc["annotations"] if not {"image_id", "category_id", "bbox"} <= set(a)), None)
    if bad is not None:
        raise UserError(f"{path} is not a COCO instances file: an annotation lacks image_id, category_id or bbox "
                        f"({sorted(bad)})")
    return doc


class CocoDomain:
    """One domain of COCO images (clean or a corruption at a severity), letterboxed; its ground truth is read from
    the annotations file when the harness scores (:meth:`ground_truth`)."""

    def __init__(self, name: str, files: list[Path], image_ids: list[int], annotations: Path, size: int,
                 workers: int = 0, generated: tuple[int, int] | None = None):
        self.name, self.files, self.image_ids, self.annotations = name, files, image_ids, annotations
        self.size, self.workers = size, workers
        # (severity, seed): the domain's corruption is generated from the clean files when read
        self.transform = partial(_letterboxed, size=size) if generated is None else partial(
            _corrupted, size=size, corruption=name, severity=generated[0], seed=generated[1])

    @property
    def sample_nbytes(self) -> int:
        return 3 * self.size * self.size

    def __len__(self) -> int:
        return len(self.files)

    def images(self, indices: np.ndarray) -> torch.Tensor:
        return next(self.batches(np.asarray(indices), len(indices)))

    def batches(self, order: np.ndarray, batch_size: int, pin_memory: bool = False) -> Iterator[torch.Tensor]:
        batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        yield from loaded(DataLoader(ImageFiles(self.files, self.transform), batch_sampler=batches,
                                     num_workers=self.workers, pin_memory=pin_memory))

    def ground_truth(self) -> dict:
        """The domain's images (in sample order) and their annotations, in the letterboxed frame; each image says its
        scale and original size (:func:`cemabench.protocol.tasks.detection.original_frame` undoes it)."""
        doc = read_annotations(self.annotations)
        images = {i["id"]: i for i in doc["images"]}
        mine = [images[i] for i in self.image_ids]
        scale = {i["id"]: self.size / max(i["height"], i["width"]) for i in mine}
        annotations = []
        for a in doc["annotations"]:
            s = scale.get(a["image_id"])
            if s is None:
                continue
            annotations.append({**{k: v for k, v in a.items() if k != "segmentation"},
                                "bbox": [v * s for v in a["bbox"]], "area": a.get("area", 0.0) * s * s})
        return {"images": [{**i, "width": self.size, "height": self.size, "letterbox_scale": scale[i["id"]],
                            "original_width": i["width"], "original_height": i["height"]} for i in mine],
                "annotations": annotations, "categories": doc["categories"]}

    def labels(self) -> np.ndarray:
        raise ValueError(f"{self.name} is a detection domain: its ground truth is ground_truth(), not labels()")


def _listed(root: Path, folder: str, annotations: Path, count: int) -> tuple[dict, list[dict]]:
    """The instances document and its first ``count`` images (all for 0) in file-name order, each on disk."""
    doc = read_annotations(root / annotations)
    listed = sorted(doc["images"], key=lambda i: i.get("file_name", ""))
    if not listed:
        raise UserError(f"{root / annotations} lists no images")
    listed = listed[:count] if count else listed
    missing = [i["file_name"] for i in listed if not (root / folder / i["file_name"]).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) listed in {root / annotations} are not in {root / folder} "
                        f"(first: {missing[0]}): is the folder complete?")
    return doc, listed


def _train_split(root: Path, count: int, image_size: int, workers: int) -> CocoDomain | None:
    """COCO 2017 train's first ``count`` images (file-name order) and their instances, letterboxed as the stream is:
    the clean training split of methods with an offline stage (None for 0)."""
    if not count:
        return None
    if not (root / "train2017").is_dir():
        raise UserError(f"{root / 'train2017'} not found: the option train_images reads COCO 2017 train as "
                        f"train2017/*.jpg and {TRAIN_ANNOTATIONS}; leave it out (0) to run without a training split")
    _, listed = _listed(root, "train2017", TRAIN_ANNOTATIONS, count)
    if len(listed) < count:
        raise UserError(f"train_images = {count}, and {root / TRAIN_ANNOTATIONS} lists {len(listed)} images")
    return CocoDomain("clean-train", [root / "train2017" / i["file_name"] for i in listed], [i["id"] for i in listed],
                      root / TRAIN_ANNOTATIONS, image_size, workers)


def coco_c(data_root=None, severity: int = 5, domains=HENDRYCKS_ORDER, image_size: int = 640, n_images: int = 0,
           workers: int = 0, source: str = "disk", seed: int = 0, train_images: int = 0) -> DatasetSource:
    """Factory of ``coco-c``: COCO 2017 val (``clean``) and COCO-C's corruptions at a severity, letterboxed to
    ``image_size``. ``n_images``: the first that many val images in file-name order (0: all 5,000). ``source``:
    ``disk`` reads coco-c/, ``generated`` corrupts val2017 when read (seeded by ``seed``). ``train_images``: the first
    that many COCO 2017 train images are the clean training split (0: none)."""
    root = _root(data_root, "coco-c", LAYOUT)
    if source not in SOURCES:
        raise UserError(f"coco-c source must be one of {', '.join(SOURCES)}, got {source!r}")
    generated_only(seed, "coco-c", source)
    unknown = [d for d in domains if d not in HENDRYCKS_ORDER and d != CLEAN]
    if unknown:
        raise UserError(f"unknown COCO-C domain(s) {', '.join(unknown)}; valid: {', '.join(HENDRYCKS_ORDER)}, {CLEAN}")
    if severity not in (1, 2, 3, 4, 5):
        raise UserError(f"severity must be one of 1, 2, 3, 4, 5 (got {severity})")
    for name, value, low in (("image_size", image_size, 32), ("n_images", n_images, 0), ("workers", workers, 0),
                             ("train_images", train_images, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"coco-c option {name} must be an integer >= {low}, got {value!r}")
    if not (root / "val2017").is_dir():
        raise UserError(f"{root / 'val2017'} not found: the COCO layout is {LAYOUT}")
    doc, listed = _listed(root, "val2017", ANNOTATIONS, n_images)
    ids = [i["id"] for i in listed]
    out = []
    for d in domains:
        if d != CLEAN and source == "generated":
            files = [root / "val2017" / i["file_name"] for i in listed]
            out.append(CocoDomain(d, files, ids, root / ANNOTATIONS, image_size, workers, (severity, seed)))
            continue
        folder = root / "val2017" if d == CLEAN else root / "coco-c" / d / str(severity)
        if not folder.is_dir():
            raise UserError(f"{folder} not found: COCO-C is read as coco-c/<corruption>/<severity>/<file_name>, "
                            f"the layout imagecorruptions writes (or generated from val2017 with the dataset option "
                            f"source=generated)")
        files = [folder / i["file_name"] for i in listed]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise UserError(f"{len(absent)} of {len(files)} images are missing from {folder} (first: {absent[0]})")
        out.append(CocoDomain(d, files, ids, root / ANNOTATIONS, image_size, workers))
    generated = {"dataset": "COCO 2017 val / COCO-C generated", "source": source, "seed": seed,
                 "generator": "cemabench's ImageNet-C table (corruptions_imagenet: imagecorruptions 1.1.2's "
                              "operations and parameters) on each val2017 image at its own size, then the "
                              "letterbox; not JPEG-encoded after corruption"}
    return DatasetSource(
        name="coco-c", num_classes=max(c["id"] for c in doc["categories"]) + 1, domains=out,
        clean=_train_split(root, train_images, image_size, workers),
        is_miniature=False, task="detection",
        clean_hint="the option train_images = N reads the first N images of COCO 2017 train (ROOT/train2017/, "
                   f"ROOT/{TRAIN_ANNOTATIONS})",
        provenance={"dataset": "COCO 2017 val / COCO-C", "severity": severity, "images_per_domain": len(ids),
                    "image_size": image_size, "resize": f"letterbox to {image_size} px, grey padding",
                    **({"train_images": train_images} if train_images else {}),
                    **(generated if source == "generated" else {})})
