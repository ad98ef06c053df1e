"""The detection miniature's training objective, used by :mod:`.train` to train the shipped detectors and by methods
that train a detector of this family offline (ECCENTRIC's distilled edge detector and adapters):

- :func:`targets`: CenterNet's targets from COCO annotations (a Gaussian peak per object on its category's heatmap;
  width, height and the centre's offset at the object's cell);
- :func:`loss`: the family's own training loss (focal loss on the heatmaps, L1 on size and offset);
- :func:`distill`: response distillation from a teacher detector of the family (ours: the squared difference of the
  sigmoid heatmaps, and L1 on size and offset weighted by the teacher's peak heat at each cell).
"""
from __future__ import annotations

import torch

from cemabench.models.minidet import nets


def targets(doc: dict, count: int, grid: int = 64 // nets.STRIDE) -> torch.Tensor:
    """Per image the CenterNet targets: CLASSES heatmaps, then width, height and the centre's offsets, then a mask
    of the object cells (CLASSES + 5 channels, grid x grid)."""
    out = torch.zeros(count, nets.CLASSES + 5, grid, grid)
    ys, xs = torch.meshgrid(torch.arange(grid) + 0.5, torch.arange(grid) + 0.5, indexing="ij")
    for a in doc["annotations"]:
        i = a["image_id"] - 1
        x, y, w, h = (v / nets.STRIDE for v in a["bbox"])
        cx, cy = x + w / 2, y + h / 2
        row, col = min(int(cy), grid - 1), min(int(cx), grid - 1)
        sigma = max(0.5, min(w, h) / 6)
        peak = torch.exp(-((xs - (col + 0.5)) ** 2 + (ys - (row + 0.5)) ** 2) / (2 * sigma ** 2))
        c = a["category_id"] - 1
        out[i, c] = torch.maximum(out[i, c], peak)
        out[i, nets.CLASSES:nets.CLASSES + 5, row, col] = torch.tensor([w, h, cx - col - 0.5, cy - row - 0.5, 1.0])
    return out


def loss(maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    c = nets.CLASSES
    heat = maps[:, :c].sigmoid().clamp(1e-4, 1 - 1e-4)
    truth, mask = target[:, :c], target[:, c + 4:c + 5]
    positive = truth.eq(1).float()
    focal = -(positive * (1 - heat) ** 2 * heat.log()
              + (1 - positive) * (1 - truth) ** 4 * heat ** 2 * (1 - heat).log()).sum()
    objects = positive.sum().clamp(min=1)
    size = (mask * (maps[:, c:c + 2] - target[:, c:c + 2]).abs()).sum()
    offset = (mask * (maps[:, c + 2:c + 4] - target[:, c + 2:c + 4]).abs()).sum()
    return (focal + 0.1 * size + offset) / objects


def distill(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Response distillation of a student's raw maps towards a teacher's (the same layout): the summed squared
    difference of the sigmoid heatmaps, plus L1 on width, height and offsets weighted per cell by the teacher's
    highest heat there, divided by the teacher's total peak heat (its soft count of objects)."""
    c = nets.CLASSES
    teacher = teacher.detach()
    heat_s, heat_t = student[:, :c].sigmoid(), teacher[:, :c].sigmoid()
    weight = heat_t.amax(1, keepdim=True)
    geometry = (weight * (student[:, c:] - teacher[:, c:]).abs()).sum()
    return (((heat_s - heat_t) ** 2).sum() + 0.1 * geometry) / weight.sum().clamp(min=1)


def annotation_targets(annotations: list[list[dict]]) -> torch.Tensor:
    """:func:`targets` of images given as one list of COCO annotations each (``bbox`` in the image's pixels)."""
    doc = {"annotations": [{**a, "image_id": k + 1} for k, image in enumerate(annotations) for a in image]}
    return targets(doc, len(annotations))
