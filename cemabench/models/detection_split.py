"""Split detectors: cut a torchvision Faster R-CNN, RetinaNet or FCOS (``torchvision:fasterrcnn_*``, ``retinanet_*``,
``fcos_*``) at a stage of its backbone's body, in front of the FPN, as SC2 (Matsubara et al., SC2 Benchmark: Supervised
Compression for Split Computing, TMLR 2023) splits Faster R-CNN at ``backbone.body``; cut an SSDlite
(``ssdlite320_mobilenet_v3_large``) after a block of its MobileNetV3 features or extra layers, in front of the SSD
heads. SSD300 (VGG) is refused.

The head runs the detector's own resize-and-normalise transform and the body's stages up to the cut; the tail runs
the rest of the body, the FPN, then the detector's own heads and postprocessing: a Faster R-CNN's region proposals
and box heads, or a one-stage detector's head, anchors and per-level decoding, as torchvision's ``forward`` runs
them in eval mode. What crosses is every
tensor the tail needs (:func:`split_detector`): the activation at the cut, each body output the FPN takes that is
already computed (a ResNet's ``layer1`` when the cut is at ``layer2``, say), and the image sizes before and after the
transform, as int64. Its bytes are those of the resolution the transform made, the one that actually crosses.

Head and tail hold the detector's own modules, so head then tail computes exactly what the detector computes (the
same operations in the same order; ``tests/test_coco.py`` checks the boxes, scores and labels are equal).

A method that adapts one detector's features into another runs the edge's head, then the cloud's tail on its own
maps in place of what the cloud's head would give, and trains them through the frozen cloud with
:meth:`DetectorTail.losses`, the detector's own training losses.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteFeatureExtractorMobileNet
from torchvision.models.detection.transform import resize_boxes

from cemabench.errors import UserError

SIZES = ("image_sizes", "original_sizes", "batch_shape")  # the metadata that crosses beside the features


ONE_STAGE = (RetinaNet, FCOS)  # a head over every FPN level, anchors, and per-level decoding


def _net(model: nn.Module) -> nn.Module:
    net = getattr(model, "net", model)  # cemabench.models.zoo.Detector wraps torchvision's detector
    if isinstance(net, SSD) and isinstance(net.backbone, SSDLiteFeatureExtractorMobileNet):
        return net  # (SSD300's VGG backbone rescales its first map apart from the blocks that follow: refused)
    if not isinstance(net, (GeneralizedRCNN, *ONE_STAGE)) or not hasattr(net.backbone, "body") or not hasattr(
            net.backbone, "fpn"):
        raise UserError(f"a detector split needs a torchvision Faster R-CNN, RetinaNet or FCOS with a backbone body "
                        f"and an FPN, or an SSDlite (the zoo's fasterrcnn_*, retinanet_*, fcos_* and ssdlite* "
                        f"detectors), got {type(net).__name__}")
    return net


def _stages(net: nn.Module) -> list[tuple[str, nn.Module, str | None]]:
    """The backbone's modules in the order it runs them: (stage name, module, the key of the feature map its output
    is, or None). A body's stages are its children, whose outputs the FPN takes by ``return_layers``; an SSDlite's
    are the blocks of its two ``features`` parts (``features.P.B``), each part's last block giving one of the heads'
    feature maps, then its ``extra`` blocks (``extra.K``), each giving the next one."""
    if isinstance(net, SSD):
        blocks = [(f"features.{p}.{b}", block, b == len(part) - 1) for p, part in enumerate(net.backbone.features)
                  for b, block in enumerate(part)]
        blocks += [(f"extra.{k}", block, True) for k, block in enumerate(net.backbone.extra)]
        levels = iter(range(len(blocks)))
        return [(name, block, str(next(levels)) if level else None) for name, block, level in blocks]
    body = net.backbone.body
    return [(name, module, body.return_layers.get(name)) for name, module in body.items()]


def _prefix(net: nn.Module) -> str:
    """How the feature maps that cross are named: an FPN's inputs, or an SSDlite's heads' levels."""
    return "level:" if isinstance(net, SSD) else "fpn:"


def detector_stages(model: nn.Module, last: bool = False) -> list[str]:
    """The stages of the backbone a detector can be cut after, in order (all but the last, unless ``last``)."""
    names = [name for name, _, _ in _stages(_net(model))]
    return names if last else names[:-1]


class DetectorHead(nn.Module):
    """Images in [0, 1] (N, 3, H, W) to what crosses: ``fpn:NAME`` (``level:I`` for an SSDlite) for each feature map
    the rest of the detector takes that is computed by then, ``x`` (the activation after the cut, unless it is one
    of those) and the image sizes (:data:`SIZES`)."""

    def __init__(self, net: nn.Module, stage: str):
        super().__init__()
        self.transform, self.stage, self.prefix = net.transform, stage, _prefix(net)
        stages = _stages(net)
        cut = [name for name, _, _ in stages].index(stage)
        self.names = [(name, tap) for name, _, tap in stages[:cut + 1]]
        self.blocks = nn.ModuleList(module for _, module, _ in stages[:cut + 1])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        images = list(x.unbind(0))
        original = torch.tensor([list(i.shape[-2:]) for i in images], dtype=torch.int64)
        batch, _ = self.transform(images)
        out = {"original_sizes": original, "image_sizes": torch.tensor(batch.image_sizes, dtype=torch.int64),
               "batch_shape": torch.tensor(list(batch.tensors.shape[-2:]), dtype=torch.int64)}
        x = batch.tensors
        for (_, tap), module in zip(self.names, self.blocks):
            x = module(x)
            if tap is not None:
                out[self.prefix + tap] = x
        if self.names[-1][1] is None:  # else the activation at the cut crosses once, as a feature map
            out["x"] = x
        return out

    def activation(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The activation at the cut, of what :meth:`forward` returned."""
        tap = self.names[-1][1]
        return out["x"] if tap is None else out[self.prefix + tap]


class DetectorTail(nn.Module):
    """What crossed to the detector's output: one dict of boxes, scores and labels per image, in the pixels of the
    images the head was given."""

    def __init__(self, net: nn.Module, stage: str):
        super().__init__()
        self.net, self.stage = net, stage

    def forward(self, crossed: dict[str, torch.Tensor]):
        net = self.net
        features, batch, original = self.features(crossed)
        sizes = batch.image_sizes
        if isinstance(net, SSD):  # its heads take the feature maps in order, without an FPN
            levels = list(features.values())
            detections = net.postprocess_detections(net.head(levels), net.anchor_generator(batch, levels), sizes)
            return net.transform.postprocess(detections, sizes, original)
        if isinstance(net, GeneralizedRCNN):
            proposals, _ = net.rpn(batch, features)
            detections, _ = net.roi_heads(features, proposals, sizes)
        else:
            detections = _one_stage(net, batch, list(features.values()))
        return net.transform.postprocess(detections, sizes, original)

    def features(self, crossed: dict[str, torch.Tensor]) -> tuple[OrderedDict, ImageList, list[tuple[int, int]]]:
        """What the detector's heads take: the FPN's outputs (an SSDlite's feature maps, in order), the batch's
        geometry (its pixels are not needed: the anchors take only its shape), and the images' sizes before the
        transform."""
        net, prefix = self.net, _prefix(self.net)
        stages = _stages(net)
        names = [name for name, _, _ in stages]
        tap = stages[names.index(self.stage)][2]
        x = crossed["x"] if tap is None else crossed[prefix + tap]
        features = OrderedDict((k[len(prefix):], v) for k, v in crossed.items() if k.startswith(prefix))
        for _, module, tap in stages[names.index(self.stage) + 1:]:
            x = module(x)
            if tap is not None:
                features[tap] = x
        sizes = [tuple(s) for s in crossed["image_sizes"].tolist()]
        original = [tuple(s) for s in crossed["original_sizes"].tolist()]
        h, w = crossed["batch_shape"].tolist()
        batch = ImageList(x.new_empty(()).expand(len(sizes), 3, h, w), sizes)
        if isinstance(net, SSD):
            return OrderedDict((k, features[k]) for k in sorted(features, key=int)), batch, original
        features = net.backbone.fpn(OrderedDict(sorted(features.items(), key=lambda kv: int(kv[0])))
                                    if all(k.isdigit() for k in features) else features)
        return features, batch, original

    def losses(self, features: OrderedDict, batch: ImageList, original: list[tuple[int, int]],
               targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The detector's own training losses on what :meth:`features` gave, computed by its own code as its
        ``forward`` does in training mode (a Faster R-CNN's RPN and box-head losses, a RetinaNet's or an FCOS's head
        losses), while every module stays in eval mode (only the RPN's and the box heads' own flags are set for the
        call, so that no BatchNorm statistic moves). ``targets``: per image, ``boxes`` (x1, y1, x2, y2, in the pixels
        of the images the head was given) and ``labels`` (int64)."""
        net = self.net
        if not trains(net):
            raise UserError(f"the training losses of a split {type(net).__name__} are not computed (a Faster R-CNN, "
                            f"RetinaNet or FCOS has them)")
        dtype = next(iter(features.values())).dtype
        for t in targets:  # torchvision's own forward asserts this; the losses of a box of no area are not finite
            if len(t["boxes"]) and not bool((t["boxes"][:, 2:] > t["boxes"][:, :2]).all()):
                raise ValueError("a training target has a box of no area (x2 <= x1 or y2 <= y1); leave it out")
        targets = [{"boxes": resize_boxes(t["boxes"].to(dtype), o, s), "labels": t["labels"]}
                   for t, o, s in zip(targets, original, batch.image_sizes, strict=True)]
        if isinstance(net, GeneralizedRCNN):
            with _training(net.rpn, net.roi_heads):
                proposals, rpn = net.rpn(batch, features, targets)
                _, heads = net.roi_heads(features, proposals, batch.image_sizes, targets)
            return {**rpn, **heads}
        levels = list(features.values())
        outputs, anchors = net.head(levels), net.anchor_generator(batch, levels)
        if isinstance(net, FCOS):
            return net.compute_loss(targets, outputs, anchors, [level.size(2) * level.size(3) for level in levels])
        return net.compute_loss(targets, outputs, anchors)


def trains(model: nn.Module) -> bool:
    """Whether :meth:`DetectorTail.losses` computes the detector's training losses (not an SSDlite's)."""
    return isinstance(getattr(model, "net", model), (GeneralizedRCNN, *ONE_STAGE))


def splits(model: nn.Module) -> bool:
    """Whether ``model`` is a detector :func:`split_detector` cuts."""
    try:
        _net(model)
    except UserError:
        return False
    return True


@contextlib.contextmanager
def _training(*modules: nn.Module):
    """The modules' own training flags set (their children's left as they are), put back afterwards."""
    before = [m.training for m in modules]
    try:
        for m in modules:
            m.training = True
        yield
    finally:
        for m, flag in zip(modules, before):
            m.training = flag


def _one_stage(net: nn.Module, batch: ImageList, levels: list[torch.Tensor]) -> list[dict]:
    """A RetinaNet's or an FCOS's eval-mode detections from its FPN levels, as its ``forward`` computes them: the
    head's outputs and the anchors split per level (A anchors per location: 9 for RetinaNet, 1 for FCOS), decoded by
    the detector's own ``postprocess_detections``."""
    outputs = net.head(levels)
    anchors = net.anchor_generator(batch, levels)
    locations = [level.size(2) * level.size(3) for level in levels]
    per_location = outputs["cls_logits"].size(1) // sum(locations)
    counts = [n * per_location for n in locations]
    split = {k: list(v.split(counts, dim=1)) for k, v in outputs.items()}
    return net.postprocess_detections(split, [list(a.split(counts)) for a in anchors], batch.image_sizes)


def split_detector(model: nn.Module, stage: str) -> tuple[DetectorHead, DetectorTail]:
    """Head and tail of a Faster R-CNN, RetinaNet or FCOS cut after ``stage`` of its backbone's body, or of an
    SSDlite cut after one of its backbone's blocks (one line naming the valid stages when it has no such stage)."""
    net = _net(model)
    valid = detector_stages(model)
    if stage not in valid:
        raise UserError(f"the detector has no stage {stage!r} to cut at; valid: {', '.join(valid)}")
    return DetectorHead(net, stage).eval(), DetectorTail(net, stage).eval()
