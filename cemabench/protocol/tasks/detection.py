"""Object detection as a task of the protocol: what a prediction is, what an answer costs on the link, and how a
domain's stream is scored.

- A prediction is, per image, a set of detections: boxes ``(x1, y1, x2, y2)`` in the pixels of the image as the
  dataset gives it, a score and a category id each (:class:`Detections`).
- An answer crosses the link in one wire format (:func:`encode`): per image a little-endian ``uint32`` count, then per
  detection its box as four ``float32``, its score as a ``float32`` and its category as a ``uint16``: 4 + 22 n bytes
  for n detections. What the link charges is the length of those bytes, and what the edge receives is decoded from
  them.
- A domain's stream is scored by COCO's bbox evaluation (faster-coco-eval, checked against pycocotools in the tests)
  over every image of the stream, with the predictions made at arrival: mAP@[.5:.95], mAP@.5 and AR@100. Of each
  image's detections the best :data:`MAX_DETECTIONS` (100) by score are kept and scored.

A detection domain gives its ground truth with ``ground_truth()`` (a COCO instances document whose ``images`` are
listed in the domain's sample order), read from storage only when the harness scores a block.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from cemabench.config import TASK_METRICS
from cemabench.protocol.tasks.base import Task

METRICS = TASK_METRICS  # the primary one first
WIRE = np.dtype([("box", "<f4", (4,)), ("score", "<f4"), ("label", "<u2")])  # packed: 22 bytes per detection
COUNT = np.dtype("<u4")
MAX_LABEL = int(np.iinfo(np.uint16).max)
# At most this many detections per image are kept and scored, the best by score: the COCO detection challenge's rule
# and torchvision's detectors' default (COCOeval would otherwise keep up to 100 per image and category)
MAX_DETECTIONS = 100


@dataclass(frozen=True)
class Detections:
    """One image's detections: ``boxes`` (n, 4) ``x1, y1, x2, y2``, ``scores`` (n,) and ``labels`` (n,) integer
    category ids, as plain CPU tensors."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        n = len(self.scores) if self.scores.dim() == 1 else -1
        if tuple(self.boxes.shape) != (n, 4) or tuple(self.labels.shape) != (n,):
            raise ValueError(f"detections need boxes (n, 4), scores (n,) and labels (n,); got "
                             f"{tuple(self.boxes.shape)}, {tuple(self.scores.shape)} and {tuple(self.labels.shape)}")
        if self.labels.is_floating_point() or self.labels.is_complex():
            raise ValueError(f"detection labels must be integer category ids, got {self.labels.dtype}")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) > MAX_LABEL):
            raise ValueError(f"detection labels must be category ids in [0, {MAX_LABEL}]")
        if not (torch.isfinite(self.boxes).all() and torch.isfinite(self.scores).all()):
            raise ValueError("detection boxes and scores must be finite")

    def __len__(self) -> int:
        return len(self.scores)

    def best(self, k: int = MAX_DETECTIONS) -> Detections:
        """The ``k`` highest-scoring detections (all of them when there are no more), in score order."""
        if len(self) <= k:
            return self
        keep = self.scores.topk(k).indices
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])

    @classmethod
    def empty(cls) -> Detections:
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))


def encode(images: list[Detections]) -> bytes:
    """The bytes that cross the link for these images' detections (see the module's docstring)."""
    parts = []
    for d in images:
        rows = np.zeros(len(d), WIRE)
        rows["box"] = d.boxes.detach().to("cpu", torch.float32).numpy()
        rows["score"] = d.scores.detach().to("cpu", torch.float32).numpy()
        rows["label"] = d.labels.detach().cpu().numpy()
        parts += [np.array([len(d)], COUNT).tobytes(), rows.tobytes()]
    return b"".join(parts)


def decode(data: bytes, images: int) -> list[Detections]:
    """The detections of ``images`` images from their bytes; an error when the bytes are not exactly that."""
    out, at = [], 0
    for i in range(images):
        if at + COUNT.itemsize > len(data):
            raise ValueError(f"detection answer ends before image {i} of {images}")
        n = int(np.frombuffer(data, COUNT, 1, at)[0])
        at += COUNT.itemsize
        if at + n * WIRE.itemsize > len(data):
            raise ValueError(f"detection answer for image {i} says {n} detections, but fewer bytes follow")
        rows = np.frombuffer(data, WIRE, n, at)
        at += n * WIRE.itemsize
        out.append(Detections(torch.from_numpy(rows["box"].copy()), torch.from_numpy(rows["score"].copy()),
                              torch.from_numpy(rows["label"].astype(np.int64))))
    if at != len(data):
        raise ValueError(f"detection answer has {len(data) - at} bytes after its {images} images")
    return out


def nbytes(images: list[Detections]) -> int:
    """What the link charges for these images' detections: the length of :func:`encode`'s bytes."""
    return sum(COUNT.itemsize + len(d) * WIRE.itemsize for d in images)


def coco_results(image_ids: list[int], predictions: list[Detections], scales: list[float] | None = None
                 ) -> list[dict]:
    """Predictions in COCO's results format (``image_id``, ``category_id``, ``bbox`` as ``[x, y, w, h]``,
    ``score``), the image ids as in the ground truth; anyone can score them with their own tools. ``scales``: each
    image's letterbox scale, divided out so that the boxes are in the original image's pixels."""
    results = []
    for k, (image_id, d) in enumerate(zip(image_ids, predictions, strict=True)):
        boxes = d.boxes.detach().to("cpu", torch.float64) / (1.0 if scales is None else scales[k])
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        for box, score, label in zip(xywh, d.scores.tolist(), d.labels.tolist(), strict=True):
            results.append({"image_id": int(image_id), "category_id": int(label), "bbox": [float(v) for v in box],
                            "score": float(score)})
    return results


def original_frame(ground_truth: dict) -> dict:
    """A ground truth that a dataset moved into a letterboxed frame (images with ``letterbox_scale``), back in the
    original images' pixels, as their own annotation file has it; one without is returned as it is."""
    scale = {i["id"]: i.get("letterbox_scale", 1.0) for i in ground_truth["images"]}
    if all(s == 1.0 for s in scale.values()):
        return ground_truth
    images = [{k: v for k, v in i.items() if k not in ("letterbox_scale", "original_width", "original_height")}
              | {"width": i["original_width"], "height": i["original_height"]} for i in ground_truth["images"]]
    annotations = [{**a, "bbox": [v / scale[a["image_id"]] for v in a["bbox"]],
                    "area": a["area"] / scale[a["image_id"]] ** 2} for a in ground_truth["annotations"]]
    return {**ground_truth, "images": images, "annotations": annotations}


def score(ground_truth: dict, image_ids: list[int], predictions: list[Detections]) -> dict[str, float]:
    """COCO bbox evaluation of ``predictions`` (one per image id, in stream order) against ``ground_truth`` (a COCO
    instances document), over exactly those images: ``map`` (mAP@[.5:.95]), ``map50`` and ``ar100``, in percent.
    A metric with nothing to measure (no annotated image in the stream) is NaN."""
    from faster_coco_eval import COCO, COCOeval_faster

    truth = COCO(copy.deepcopy(ground_truth))
    found = truth.loadRes(coco_results(image_ids, predictions))
    evaluation = COCOeval_faster(truth, found, iouType="bbox", print_function=lambda *a, **k: None)
    evaluation.params.imgIds = sorted({int(i) for i in image_ids})
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    stats = evaluation.stats
    return {name: (100.0 * float(v) if v >= 0 else math.nan) for name, v in zip(METRICS, (stats[0], stats[1],
                                                                                         stats[8]))}


def _detections(d: dict[str, torch.Tensor], what: str) -> Detections:
    try:
        return Detections(d["boxes"], d["scores"], d["labels"])
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


class Detection(Task):
    """Per image, boxes, scores and category ids; answered in the wire format above; scored by COCO mAP over the
    domain's stream. A result is scored over one block (settings with several blocks per result are refused)."""

    name = "detection"

    def check(self, decision, batch):
        if decision.logits is not None:
            raise ValueError("EdgeDecision.logits is for classification; on a detection dataset the edge predicts "
                             "EdgeDecision.detections (one dict of boxes, scores and labels per image)")
        if decision.detections is not None and len(decision.detections) != batch:
            raise ValueError(f"EdgeDecision.detections has {len(decision.detections)} entries for a batch of {batch} "
                             f"images; give one dict of boxes, scores and labels per image")

    def own(self, decision, checks, batch_index):
        if decision.detections is None:
            return None
        return [_detections(d, f"the edge's detections at batch {batch_index} of the run unit").best()
                for d in decision.detections]

    def answered(self, own, batch, upload, answers, link, batch_index, checks):
        """Images with neither an edge prediction nor an answer have no prediction (None)."""
        if type(answers) is not list or len(answers) != len(upload):
            got = f"a list of {len(answers)}" if type(answers) is list else type(answers).__name__
            raise ValueError(f"the edge awaits answers for {len(upload)} uploaded images, so the cloud must return "
                             f"CloudReply(answers=[...]) with one dict of boxes, scores and labels per image; got "
                             f"{got}")
        what = f"the cloud's answers at batch {batch_index} of the run unit"
        data = encode([_detections(a, what) for a in answers])  # every answer crosses whole and is charged whole
        out = list(own) if own is not None else [None] * batch
        if link.answer(len(answers), len(data)):  # late answers do not count: the edge's own prediction stands
            try:
                received = decode(data, len(answers))
            except ValueError as error:  # finite in float64, say, and not in the float32 that crosses
                raise ValueError(f"{what}, as they cross in float32: {error}") from None
            for position, detections in zip(upload.index.tolist(), received, strict=True):
                out[position] = detections.best()
        return out

    def record(self, prediction, batch):
        return prediction

    def score(self, result, block, records):
        made = [d for batch in records for d in batch]
        if not made:
            return
        if block.which is not None:
            raise ValueError("detection scores one domain at a time; a block that mixes domains cannot be scored")
        truth = block.sources[0].ground_truth()
        ids = [truth["images"][k]["id"] for k in block.order[:len(made)]]
        result.seen = len(made)
        result.unanswered = sum(d is None for d in made)
        made = [Detections.empty() if d is None else d for d in made]
        result.metrics = score(truth, ids, made)
        if self.predictions is not None:  # in the original images' pixels, as their annotation file has them
            scales = [truth["images"][k].get("letterbox_scale", 1.0) for k in block.order[:len(made)]]
            self.predictions(result.device, block.result, coco_results(ids, made, scales))
