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
  statistics, as torchvision's detection training keeps them frozen.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cemabench.errors import UserError
from cemabench.models.detection_split import DetectorHead, DetectorTail, detector_stages, splits, trains
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


def cut_points(model: nn.Module) -> list[str]:
    """The stages a torchvision detector can be cut after, in order."""
    return detector_stages(model)


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


class EdgeHead(nn.Module):
    """Images to the edge detector's activation at ``stage`` (what ECC-A's edge sends)."""

    def __init__(self, model: nn.Module, stage: str):
        super().__init__()
        self.head = DetectorHead(getattr(model, "net", model), stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.activation(self.head(x))


class EdgeSplit(nn.Module):
    """Images to (the activation at ``stage``, the edge detector's detections), in one pass (ECC-D's edge)."""

    def __init__(self, model: nn.Module, stage: str):
        super().__init__()
        net = getattr(model, "net", model)
        self.head, self.tail = DetectorHead(net, stage), DetectorTail(net, stage)

    def forward(self, x: torch.Tensor):
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
    """The frame of a batch the cloud's head saw (:class:`MapsAdapter`); one line where its images differ in size."""
    if len({tuple(s) for s in own["image_sizes"].tolist()}) != 1:
        raise UserError("ecc: an adapter into a torchvision detector is trained in one frame, and the clean split's "
                        "images differ in size")
    return torch.stack([own["image_sizes"][0], own["original_sizes"][0], own["batch_shape"]]).to(torch.int64).cpu()


def load_adapter(state: dict, depth: int, cloud: nn.Module, before: str) -> MapsAdapter:
    entry = Entry(cloud, before)
    maps = state["adapter_fpn_maps"].tolist()
    if len(maps) != len(entry.names):
        raise UserError(f"ecc: the adapter was trained for {len(maps)} entry maps, and the cloud takes "
                        f"{len(entry.names)} after {before}")
    adapter = MapsAdapter(state["adapter_fpn_edge"].tolist(), entry.names, [tuple(m[:3]) for m in maps],
                          [bool(m[3]) for m in maps], state["adapter_fpn_frame"].clone(), depth)
    adapter.load_state_dict(unprefixed("adapter", state))
    return adapter.eval()


def tail(cloud: nn.Module, before: str) -> DetectorTail:
    """The cloud detector after ``before``: an adapter's maps (with their frame) to its detections."""
    return Entry(cloud, before).tail


def _targets(annotations: list[list[dict]], order: torch.Tensor, device) -> list[dict[str, torch.Tensor]]:
    """The training targets of the clean split's images at batch positions ``order``, as torchvision takes them."""
    targets = []
    for k in order.tolist():
        boxes, labels = boxes_of(annotations[k])
        targets.append({"boxes": boxes.float().to(device), "labels": labels.to(device)})
    return targets


def distill_edge(model: nn.Module, cloud: nn.Module, data, epochs: int, annotations: list[list[dict]],
                 reported) -> dict:
    """ECC-I's (and ECC-D's ``distill``) distillation of a torchvision edge detector from the cloud detector on the
    clean split: every edge weight trains on two objectives, the edge detector's own training losses (computed by its
    own training-mode ``forward``) on the split's boxes, and the same losses on the cloud's reported detections
    (``reported``: per image, their boxes and categories), the teacher's response as targets. Every BatchNorm keeps
    its statistics, as torchvision's detection training keeps them frozen."""
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
            pseudo = [{"boxes": boxes.float(), "labels": labels} for boxes, labels in taught]
            optimise(optimizer, [sum(net(images, truth).values()), sum(net(images, pseudo).values())], None, False)
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
            optimise(optimizer, [sum(losses.values()), distill], params, o.pareto)
    return adapter.artefacts()

