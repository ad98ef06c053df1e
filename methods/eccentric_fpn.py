"""ECCENTRIC's training and adapted path on torchvision's detectors (:mod:`.eccentric` has the methods): the edge is any
detector :mod:`cemabench.models.detection_split` cuts (a Faster R-CNN, RetinaNet or FCOS at a stage of its backbone's
body, an SSDlite after a block); the cloud of ECC-A and ECC-D is a Faster R-CNN, RetinaNet or FCOS.

What is particular to them, and what we chose where the paper (whose detectors are YOLOv5) is silent:

- **Several maps at the entry.** The cloud's FPN takes every stage of its body, so where the cloud begins
  (``cloud_stage``) the adapter must produce each body output the FPN takes that is computed by then, and the
  activation at the cut where it is not one of them: the cloud's *entry maps*, what its own head would send across
  a split there. The adapter has one branch per entry map, each the classification adapter
  (:class:`~cemabench_methods.eccentric_parts.Adapter`: resampling to the map's size, then ``adapter_depth`` x (3x3
  conv, BatchNorm, ReLU)), all fed by the one edge feature that crosses: the edge's activation at ``edge_stage``,
  at the resolution its own transform made. A branch ends without its ReLU where the cloud's own map is negative
  somewhere on the first training image (a MobileNetV3 body's outputs; a ResNet's are non-negative).
- **One frame.** cemabench's detection datasets letterbox every image to one size, so the cloud's transform gives
  every image one size. The adapter records that frame from the clean split (each image's size before and after
  the cloud's transform, and the padded batch's) and gives it to the cloud's tail beside the maps; nothing but the
  feature crosses. A feature of another shape than the one it was trained on is refused.
- **Training.** Knowledge adaptation (the paper) is the sum over the entry maps of the MSE to the cloud's own map.
  Fine-tuning through the frozen cloud uses the cloud detector's own training losses on the clean split's boxes,
  computed by torchvision's code as in training while every module stays in eval mode
  (:meth:`~cemabench.models.detection_split.DetectorTail.losses`), plus distillation: the MSE of the FPN's outputs
  to those the cloud computes from its own entry maps (torchvision computes its losses inside ``forward``, and a
  Faster R-CNN's raw outputs are sampled proposals, so the teacher's response is taken at the FPN).
- **Distilling the edge** (ECC-I's, and ECC-D's ``distill``): the edge detector's own training losses on the clean
  split's boxes, plus the same losses on the cloud's reported detections (scoring at least the gates' 0.3) as targets:
  the teacher's response as hard pseudo-labels, which needs nothing in common between the two detectors but their
  categories (their raw outputs differ in kind: a Faster R-CNN's are sampled proposals). Every BatchNorm keeps its
  statistics: torchvision freezes them in its first detectors' pretrained backbones (``FrozenBatchNorm2d``) but not in
  the v2 detectors or those built at random; we keep them all, so that a distillation on a thousand images does not
  move them. The split's targets leave out crowd regions and boxes of no area, as torchvision's reference training
  does, and a loss that is not finite fails the training rather than writing NaN into every weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cemabench.errors import UserError
from cemabench.models.detection_split import DetectorHead, DetectorTail, splits, trains
from cemabench_methods.eccentric_parts import (
    LR,
    Adapter,
    adapt_knowledge,
    frozen,
    optimise,
    prefixed,
    training_shift,
    unprefixed,
)

fits = splits  # whether a model takes this path


MAX_SIDE = 1 << 14  # pixels: the largest image side an adapter's recorded frame may name


def input_frame(artefacts: dict | None) -> tuple[int, int] | None:
    """The (height, width) of the images the adapter was trained on, where the artefacts hold an adapter into a
    torchvision detector."""
    frame = (artefacts or {}).get("adapter_fpn_frame")
    return None if frame is None else tuple(int(v) for v in frame[1].tolist())


class _InFrame(nn.Module):
    """Refuses a batch of images of another size than the adapter's frame (the cloud answers in that frame: boxes in
    the wrong pixels otherwise, where an edge resizes every input to one size and its feature does not tell)."""

    def __init__(self, frame: tuple[int, int] | None):
        super().__init__()
        self.frame = frame

    def check(self, x: torch.Tensor) -> None:
        if self.frame is not None and tuple(x.shape[-2:]) != self.frame:
            raise ValueError(f"ecc: the adapter was trained on {self.frame[0]}x{self.frame[1]} images (the clean "
                             f"split's frame), and the stream's are {x.shape[-2]}x{x.shape[-1]}")


def check_cloud(cloud: nn.Module) -> None:
    if not trains(cloud):
        raise UserError(f"ecc: an adapter into a torchvision detector is fine-tuned through the cloud's own training "
                        f"losses, so the cloud is a Faster R-CNN, RetinaNet or FCOS (the zoo's fasterrcnn_*, "
                        f"retinanet_*, fcos_*), got a {type(getattr(cloud, 'net', cloud)).__name__}")


def boxes_of(annotations: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """COCO annotations as boxes (x1, y1, x2, y2; float64) and category ids."""
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return boxes, torch.tensor([a["category_id"] for a in annotations], dtype=torch.long)


class EdgeHead(_InFrame):
    """Images (of the adapter's ``frame``, where one is given) to the edge detector's activation at ``stage`` (what
    ECC-A's edge sends)."""

    def __init__(self, model: nn.Module, stage: str, frame: tuple[int, int] | None = None):
        super().__init__(frame)
        self.head = DetectorHead(getattr(model, "net", model), stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.head.activation(self.head(x))


class EdgeSplit(_InFrame):
    """Images to (the activation at ``stage``, the edge detector's detections), in one pass (ECC-D's edge)."""

    def __init__(self, model: nn.Module, stage: str, frame: tuple[int, int] | None = None):
        super().__init__(frame)
        net = getattr(model, "net", model)
        self.head, self.tail = DetectorHead(net, stage), DetectorTail(net, stage)

    def forward(self, x: torch.Tensor):
        self.check(x)
        out = self.head(x)
        return self.head.activation(out), self.tail(out)


class Entry:
    """The cloud detector where the adapter enters, after its stage ``before``: its own head to there (``head``:
    images to what crosses a split there), the names of the entry maps, and the rest (``tail``)."""

    def __init__(self, cloud: nn.Module, before: str):
        net = getattr(cloud, "net", cloud)
        self.head, self.tail = DetectorHead(net, before), DetectorTail(net, before)
        taps = [self.head.prefix + tap for _, tap in self.head.names if tap is not None]
        self.names = taps + (["x"] if self.head.names[-1][1] is None else [])


class MapsAdapter(nn.Module):
    """The edge feature to what the cloud's tail takes at its entry: one :class:`Adapter` branch per entry map, and
    the frame the adapter was trained in (``frame``: each image's size after the cloud's transform, before it, and
    the padded batch's, as (3, 2) int64)."""

    def __init__(self, edge_shape, names: list[str], shapes: list[tuple[int, int, int]], relus: list[bool],
                 frame: torch.Tensor, depth: int):
        super().__init__()
        self.edge_shape, self.names, self.frame = tuple(int(v) for v in edge_shape), list(names), frame
        self.branches = nn.ModuleList(Adapter(self.edge_shape[0], shape, depth, relu)
                                      for shape, relu in zip(shapes, relus, strict=True))

    def forward(self, feature: torch.Tensor) -> dict[str, torch.Tensor]:
        if tuple(feature.shape[1:]) != self.edge_shape:
            raise ValueError(f"ecc: the adapter was trained on edge features of shape {self.edge_shape} (the clean "
                             f"split's frame), got {tuple(feature.shape[1:])}: the stream's images are in another "
                             f"frame")
        out = {name: branch(feature) for name, branch in zip(self.names, self.branches)}
        image, original, batch = self.frame.tolist()
        n = len(feature)
        out.update(image_sizes=torch.tensor([image] * n, dtype=torch.int64),
                   original_sizes=torch.tensor([original] * n, dtype=torch.int64),
                   batch_shape=torch.tensor(batch, dtype=torch.int64))
        return out

    def artefacts(self) -> dict[str, torch.Tensor]:
        state = prefixed("adapter", self.eval())
        state["adapter_fpn_edge"] = torch.tensor(self.edge_shape)
        state["adapter_fpn_maps"] = torch.tensor([[b.layers[0].out_channels, *b.size,
                                                   int(isinstance(b.layers[-1], nn.ReLU))]
                                                  for b in self.branches])
        state["adapter_fpn_frame"] = self.frame.clone()
        return state


def _frame(own: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frame of a batch the cloud's head saw (:class:`MapsAdapter`; a batch is one tensor, so one frame)."""
    return torch.stack([own["image_sizes"][0], own["original_sizes"][0], own["batch_shape"]]).to(torch.int64).cpu()


def load_adapter(state: dict, depth: int, cloud: nn.Module, before: str) -> MapsAdapter:
    """The trained adapter, its recorded shapes checked: the frame's sizes are sizes, and each map's shape is the one
    the cloud's own head gives in that frame (so that no artefact makes the cloud allocate what its head would not)."""
    entry = Entry(cloud, before)
    frame, maps, edge = state["adapter_fpn_frame"], state["adapter_fpn_maps"], state["adapter_fpn_edge"]
    if frame.shape != (3, 2) or not bool(((frame >= 1) & (frame <= MAX_SIDE)).all()):
        raise ValueError(f"ecc: the adapter's frame is not three sizes of at most {MAX_SIDE} px: {frame.tolist()}")
    if maps.dim() != 2 or len(maps) != len(entry.names):
        raise UserError(f"ecc: the adapter was trained for {len(maps)} entry maps, and the cloud takes "
                        f"{len(entry.names)} after {before}")
    with torch.no_grad():
        reference = next(iter(cloud.parameters()))
        own = entry.head(torch.zeros(1, 3, *frame[1].tolist(), dtype=reference.dtype, device=reference.device))
    expected = [list(own[k].shape[1:]) for k in entry.names]
    if [m[:3] for m in maps.tolist()] != expected or not set(maps[:, 3].tolist()) <= {0, 1}:
        raise ValueError(f"ecc: the adapter's maps {maps.tolist()} are not the cloud's own in its frame ({expected})")
    if edge.shape != (3,) or not bool((edge >= 1).all()):
        raise ValueError(f"ecc: the adapter's edge feature shape is not a shape: {edge.tolist()}")
    adapter = MapsAdapter(edge.tolist(), entry.names, [tuple(m[:3]) for m in maps.tolist()],
                          [bool(m[3]) for m in maps.tolist()], frame.clone(), depth)
    adapter.load_state_dict(unprefixed("adapter", state))
    return adapter.eval()


def tail(cloud: nn.Module, before: str) -> DetectorTail:
    """The cloud detector after ``before``: an adapter's maps (with their frame) to its detections."""
    return Entry(cloud, before).tail


def _finite(losses: list[torch.Tensor], what: str) -> list[torch.Tensor]:
    """The losses, or a ValueError where one is not finite (a step would write NaN into every weight it trains)."""
    if not all(bool(torch.isfinite(loss)) for loss in losses):
        raise ValueError(f"ecc: {what} has a loss that is not finite ({[float(loss) for loss in losses]})")
    return losses


def _target(boxes: torch.Tensor, labels: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """One image's training target as torchvision's detectors take it, without the boxes of no area (torchvision
    refuses them), as torchvision's reference detection training drops them (``references/detection/coco_utils.py``,
    ``ConvertCocoPolysToMask``)."""
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[keep].float().to(device), "labels": labels[keep].to(device)}


def _targets(annotations: list[list[dict]], order: torch.Tensor, device) -> list[dict[str, torch.Tensor]]:
    """The training targets of the clean split's images at batch positions ``order``: their boxes but crowd regions
    (which torchvision's reference training drops too) and boxes of no area."""
    return [_target(*boxes_of([a for a in annotations[k] if not a.get("iscrowd", 0)]), device)
            for k in order.tolist()]


def distill_edge(model: nn.Module, cloud: nn.Module, data, epochs: int, annotations: list[list[dict]],
                 reported) -> dict:
    """ECC-I's (and ECC-D's ``distill``) distillation of a torchvision edge detector from the cloud detector on the
    clean split: every edge weight trains on two objectives, the edge detector's own training losses (computed by its
    own training-mode ``forward``) on the split's boxes, and the same losses on the cloud's reported detections
    (``reported``: per image, their boxes and categories), the teacher's response as targets. Every BatchNorm keeps
    its statistics (the module's docstring)."""
    net = getattr(model, "net", model)
    model.train().requires_grad_(True)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(epochs):
        for order, x, _ in data.batches():
            with torch.no_grad():
                taught = reported(cloud(x))
            images = list(x.unbind(0))
            truth = _targets(annotations, order, x.device)
            pseudo = [_target(boxes, labels, x.device) for boxes, labels in taught]
            losses = [sum(net(images, truth).values()), sum(net(images, pseudo).values())]
            optimise(optimizer, _finite(losses, "the edge's distillation"), None, False)
    return prefixed("edge", model.eval())


def train_adapter(cloud: nn.Module, data, edge: nn.Module, o, before: str, annotations: list[list[dict]]) -> dict:
    """Knowledge adaptation, then fine-tuning through the frozen cloud (the module's docstring), on ``data``'s
    batches of the clean split (``annotations``: each of its chosen images' boxes, by position)."""
    cloud = frozen(cloud)
    entry = Entry(cloud, before)
    check_cloud(cloud)
    edge_head = EdgeHead(frozen(edge), o.edge_stage)
    sample = data.clean.images(data.indices[:1]).to(data.device)
    with torch.no_grad():
        feature, own = edge_head(sample), entry.head(sample)
    adapter = MapsAdapter(feature.shape[1:], entry.names, [tuple(own[k].shape[1:]) for k in entry.names],
                          [bool((own[k] >= 0).all()) for k in entry.names], _frame(own), o.adapter_depth)
    adapter = adapter.to(data.device).train()
    params = list(adapter.parameters())
    optimizer = torch.optim.Adam(params, lr=LR)
    shift = training_shift(o.augment)
    adapt_knowledge(adapter, optimizer, data, o.ka_epochs, shift, edge_head, entry.head,
                    lambda adapted, own: sum(F.mse_loss(adapted[k], own[k]) for k in entry.names))
    for _ in range(o.ft_epochs):
        for order, x, _ in data.batches():
            x = shift(x)
            with torch.no_grad():
                source = edge_head(x)
                teacher, _, _ = entry.tail.features(entry.head(x))
            features, batch, original = entry.tail.features(adapter(source))
            losses = entry.tail.losses(features, batch, original, _targets(annotations, order, x.device))
            distill = sum(F.mse_loss(features[k], teacher[k]) for k in teacher)
            optimise(optimizer, _finite([sum(losses.values()), distill], "the adapter's fine-tuning"), params, o.pareto)
    return adapter.artefacts()

