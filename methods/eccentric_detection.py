"""ECCENTRIC's architectures on object detection (:mod:`.eccentric` has the methods; this module what detection
changes in them), the paper's headline setting (a YOLOv5 edge and cloud on COCO).

They run on a detector family that describes its cut points and its offline training
(:func:`cemabench.models.layouts.register_layout` and :func:`~cemabench.models.layouts.register_detector_training`):
the detection miniature's (``minidet:``); or between two torchvision detectors (:mod:`.eccentric_fpn`: the adapter
makes every map the cloud's FPN takes at its entry, and the edge is distilled with the cloud's detections as targets).

- **ECC-I**: the edge detector, distilled from the cloud detector on the clean split (the family's own loss on the
  split's boxes, plus the family's response distillation towards the cloud's raw outputs), offloads the raw images
  it is unsure of; the cloud detector answers them.
- **ECC-A**: the edge's backbone feature at ``edge_stage`` crosses; the adapter maps it into the cloud detector where
  ``cloud_stage`` begins, and the cloud runs the rest of its backbone and its head, then its postprocessing.
  Knowledge adaptation is the same MSE to the cloud's own feature at the entry; fine-tuning through the frozen cloud
  tail uses the family's loss on the split's boxes plus response distillation towards the cloud's own raw outputs
  (the analogue of classification's cross-entropy plus distillation).
- **ECC-D**: ECC-A plus the edge's decision per image; **learned switcher**: as on classification.

Where the paper is silent on detection we chose, and say so here:

- An image's confidence (the ``confidence`` gate, ECC-I's gate) is the mean score of its detections that score at
  least :data:`SCORE_MIN`, the statistic of KubeEdge Sedna's threshold router; an image with no such detection has
  confidence 0 and is sent up (Sedna keeps it on the edge): the edge found nothing it would report.
- A learned gate sees the image's :data:`GATE_SCORES` highest scores, sorted and padded with zeros, and its
  confidence.
- The edge's answer for an image *stands* when its detections scoring at least :data:`SCORE_MIN` match the reference
  one to one at IoU >= 0.5 with the same category (a perfect bipartite matching exists). The reference is the ground
  truth (ECC-D's learned gate: the edge is "wrong") or the cloud's detections scoring at least :data:`SCORE_MIN` (the
  switcher: they "disagree").
- The distillation has no temperature: ``temperature`` is refused on detection unless left at its default.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_iou

from cemabench.errors import UserError
from cemabench.models.layouts import DetectorTraining, detector_training
from cemabench.models.split import split, stage_names
from cemabench_methods.eccentric_blocks import Objectives
from cemabench_methods.eccentric_fpn import boxes_of, fits

SCORE_MIN = 0.3  # a detection the deployment reports (Sedna's box threshold in its examples)
GATE_SCORES = 20
IOU = 0.5


def family(edge: nn.Module, foundation: nn.Module) -> DetectorTraining:
    """The training description both detectors share; one line when either has none or they differ."""
    try:
        found = detector_training(edge)
        other = detector_training(foundation)
    except UserError as error:
        raise UserError(f"ECCENTRIC on detection trains between two torchvision detectors, or between detectors of a "
                        f"family that describes its offline training; {error}") from None
    if other is not found:
        raise UserError(f"ECCENTRIC on detection distils and adapts between detectors of one family; the edge is a "
                        f"{type(edge).__name__} and the cloud a {type(foundation).__name__}")
    return found


def torchvision_pair(edge: nn.Module, foundation: nn.Module) -> bool:
    """Whether training between ``edge`` and ``foundation`` takes :mod:`.eccentric_fpn`'s path: both are torchvision
    detectors."""
    return fits(edge) and fits(foundation)


def confidence(prediction: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Per image, the mean score of its detections scoring at least :data:`SCORE_MIN` (0 when it has none)."""
    values = []
    for d in prediction:
        reported = d["scores"][d["scores"] >= SCORE_MIN]
        values.append(reported.mean() if len(reported) else d["scores"].new_zeros(()))
    return torch.stack(values).float()


def stands(found: dict[str, torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether ``found``'s reported detections match the reference ``boxes`` (x1, y1, x2, y2) and ``labels`` one to
    one: a perfect matching in which every pair has the same category and IoU >= 0.5 (found as a maximum-weight
    assignment, so that a box near two references cannot hide a valid matching, whatever the detections' order)."""
    keep = found["scores"] >= SCORE_MIN
    if int(keep.sum()) != len(boxes):
        return False
    if not len(boxes):
        return True
    mine = found["boxes"][keep].double().cpu()
    overlap = torch.nan_to_num(box_iou(mine, boxes.double().cpu()), nan=0.0)  # two empty boxes: no overlap
    valid = (overlap >= IOU) & (found["labels"][keep].cpu()[:, None] == labels.cpu()[None])
    rows, cols = linear_sum_assignment(valid.numpy(), maximize=True)
    return bool(valid.numpy()[rows, cols].all())


class Detection(Objectives):
    """ECCENTRIC's objectives on detection (the module's docstring). ``models``: the training stage's
    :class:`~cemabench.method.TrainingResources`, whose detectors' family gives the loss and the targets."""

    def __init__(self, resources=None):
        self.family = None
        if resources is not None and not torchvision_pair(resources.edge(), resources.foundation()):
            self.family = family(resources.edge(), resources.foundation())
        self.annotations: list[list[dict]] = []

    def gate_width(self, num_classes):
        return GATE_SCORES

    def targets(self, clean, chosen):
        truth = clean.ground_truth()
        by_image = defaultdict(list)
        for a in truth["annotations"]:
            by_image[a["image_id"]].append(a)
        self.annotations = [by_image[truth["images"][int(k)]["id"]] for k in chosen]
        if self.family is None:  # a stage that trains no detector (the switcher's gate): the images' positions
            return torch.arange(len(chosen))
        return self.family.targets(self.annotations)

    def raw(self, model):
        head, tail = split(model, stage_names(model)[0])
        return nn.Sequential(head, tail)

    def predict(self, model, out):
        if fits(model):  # a split torchvision detector's tail gives its detections
            return out
        return detector_training(model).postprocess(out)

    def losses(self, out, target, teacher):
        return [self.family.loss(out, target), self.family.distill(out, teacher)]

    def confidence(self, prediction):
        return confidence(prediction)

    def gate_inputs(self, prediction):
        top = [F.pad(d["scores"].float().sort(descending=True).values[:GATE_SCORES],
                     (0, max(0, GATE_SCORES - len(d["scores"])))) for d in prediction]
        return torch.cat([torch.stack(top), confidence(prediction)[:, None]], 1)

    def wrong(self, prediction, order, target, reference):
        truth = ([boxes_of([a for a in self.annotations[int(k)] if not a.get("iscrowd", 0)]) for k in order]
                 if reference is None else self.reported(reference))  # (a crowd region is no object to find)
        verdicts = [not stands(found, boxes, labels) for found, (boxes, labels) in zip(prediction, truth, strict=True)]
        return torch.tensor(verdicts, device=prediction[0]["scores"].device)

    def reported(self, prediction) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, the boxes and categories of the detections the deployment reports (scoring at least
        :data:`SCORE_MIN`)."""
        return [(d["boxes"][d["scores"] >= SCORE_MIN], d["labels"][d["scores"] >= SCORE_MIN]) for d in prediction]

    def no_answers(self, count, num_classes):
        empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
        return [dict(empty) for _ in range(count)]
