"""The embedded detection miniature's images: scikit-learn's handwritten digits placed on 64-pixel canvases, one to
four per image, at random scales and positions, with exact boxes, and the 15 corruptions at five severities applied
to the whole canvas, as Michaelis et al. apply ImageNet-C's corruptions to COCO images for COCO-C.

The ground truth is a COCO instances document (categories 1..10 for the digits 0..9), so that the same metric code
scores the miniature and COCO. Train canvases use the digits of the classification miniature's train split, test
canvases those of its test split: no glyph is seen in both. Everything is drawn from seeded generators, and the
same seed gives the same bytes.

The dataset plugin is ``miniature-digits-det-c`` (:func:`dataset`); its detectors are ``minidet:edge`` and
``minidet:cloud`` (:mod:`cemabench.models.minidet`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cemabench.data import ArrayDomain, DatasetSource
from cemabench.datasets import corruptions
from cemabench.datasets.miniature import CLEAN, _split, check_choice

CANVAS = 64
SCALES = (14, 30)  # a digit's side in pixels, drawn uniformly
PER_IMAGE = (1, 4)  # digits per canvas, drawn uniformly
MAX_OVERLAP = 0.2  # the most a new digit's box may overlap (IoU) one already placed; else it is drawn again
CATEGORIES = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
VISIBLE = 0.15  # a digit's pixel shows (and counts toward its box) where it is this much lighter than the background
SEEDS = {"train": 1, "test": 2}  # of the canvases; the corruptions' seeds derive from the domain's name
COUNTS = {"train": 1000, "test": 300}  # canvases of the dataset's clean split and of each test domain


def _glyphs(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's digits as float32 intensities in [0, 1], (N, 8, 8), and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels, train, test = _split()
    index = train if split == "train" else test
    return (digits.images[index] / 16.0).astype(np.float32), labels[index]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boxes ``x1, y1, x2, y2``."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def canvases(split: str, count: int, seed: int | None = None) -> tuple[np.ndarray, dict]:
    """``count`` clean canvases, uint8 (count, 64, 64, 3), and their COCO instances document (image ids 1..count).

    Each digit is scaled (bilinear) to a square of a random side, and its box is the tight box of the pixels where
    it shows (:data:`VISIBLE` above the background), in the canvas's pixel coordinates (``[x, y, w, h]`` with
    exclusive right and bottom edges). Digits are drawn light on a dark background of a random grey; where two
    overlap, the lighter pixel shows."""
    if split not in SEEDS:
        raise ValueError(f"split must be one of {', '.join(SEEDS)}, got {split!r}")
    rng = np.random.default_rng(SEEDS[split] if seed is None else seed)
    glyphs, labels = _glyphs(split)
    images = np.empty((count, CANVAS, CANVAS, 3), np.uint8)
    doc = {"images": [], "annotations": [], "categories": CATEGORIES}
    for i in range(count):
        background = rng.uniform(0.0, 0.25)
        canvas = np.full((CANVAS, CANVAS), background, np.float32)
        canvas += rng.normal(0.0, 0.02, canvas.shape).astype(np.float32)
        boxes: list[np.ndarray] = []
        for _ in range(int(rng.integers(PER_IMAGE[0], PER_IMAGE[1] + 1))):
            for _attempt in range(20):
                side = int(rng.integers(SCALES[0], SCALES[1] + 1))
                x, y = (int(v) for v in rng.integers(0, CANVAS - side + 1, 2))
                k = int(rng.integers(len(glyphs)))
                glyph = F.interpolate(torch.from_numpy(glyphs[k])[None, None], size=side, mode="bilinear",
                                      align_corners=False)[0, 0].clamp(0, 1).numpy()
                rows, cols = np.nonzero(glyph > background + VISIBLE)
                box = np.array([x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1], np.float64)
                if all(_iou(box, other) <= MAX_OVERLAP for other in boxes):
                    break
            else:
                continue  # no free place for a further digit on this canvas
            region = canvas[y:y + side, x:x + side]
            np.maximum(region, glyph, out=region)
            boxes.append(box)
            w, h = box[2] - box[0], box[3] - box[1]
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": i + 1,
                                       "category_id": int(labels[k]) + 1, "bbox": [float(box[0]), float(box[1]),
                                                                                  float(w), float(h)],
                                       "area": float(w * h), "iscrowd": 0})
        images[i] = (np.clip(canvas, 0, 1)[..., None] * 255).round().astype(np.uint8)
        doc["images"].append({"id": i + 1, "width": CANVAS, "height": CANVAS, "file_name": f"{i + 1:06d}.png"})
    return images, doc


def corrupted(images: np.ndarray, corruption: str, severity: int) -> np.ndarray:
    """The canvases under one corruption at one severity, the whole canvas corrupted; seeded by the domain."""
    seed = int(hashlib.sha256(f"minidet/{corruption}/{severity}".encode()).hexdigest()[:16], 16)
    return corruptions.corrupt(images, corruption, severity, np.random.default_rng(seed))


@dataclass
class DetectionDomain(ArrayDomain):
    """A detection domain held in memory as uint8 canvases (N, H, W, 3); its ground truth is generated anew from the
    split's seed when the harness scores (:meth:`ground_truth`), so that the domain object holds none."""

    split: str = "test"

    def ground_truth(self) -> dict:
        """The COCO instances document of the domain's canvases, images in sample order."""
        return canvases(self.split, len(self))[1]


def _no_labels() -> np.ndarray:
    raise ValueError("a detection domain has no labels: its ground truth is ground_truth()")


def dataset(data_root=None, severity: int = 5, domains=corruptions.HENDRYCKS_ORDER) -> DatasetSource:
    """Factory of ``miniature-digits-det-c``: one domain per corruption at the given severity, each the same
    :data:`COUNTS` test canvases corrupted, ``clean`` for the uncorrupted ones, and the clean training canvases."""
    check_choice("detection miniature", data_root, severity, domains)
    test, _ = canvases("test", COUNTS["test"])
    train, _ = canvases("train", COUNTS["train"])
    return DatasetSource(
        name="miniature-digits-det-c", num_classes=len(CATEGORIES) + 1,
        domains=[DetectionDomain(d, test if d == CLEAN else corrupted(test, d, severity), _no_labels, "test")
                 for d in domains],
        clean=DetectionDomain("clean-train", train, _no_labels, "train"), is_miniature=True, task="detection",
        provenance={"dataset": "miniature-digits-det-c (EMBEDDED MINIATURE)", "severity": severity,
                    "images_per_domain": COUNTS["test"], "image_size": CANVAS})
