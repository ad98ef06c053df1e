"""How a unit's halves are built, in whichever process runs them (this one, or a half's own under ``--isolate``):
the training stage's resources, the forward-only edges, and the clouds under the cloud's meter. ``edge`` and
``foundation`` are builders of fresh source models."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from cemabench.method import CloudResources, Method, TrainingResources
from cemabench.protocol.edge import ForwardOnlyEdge
from cemabench.protocol.meter import ComputeMeter, SampleCounter

Builder = Callable[[], nn.Module]


def clean_images(clean, device: torch.device, memory_format=torch.preserve_format) -> Callable[[int], torch.Tensor]:
    """``CloudResources.clean_images``: up to n images of the clean split the cloud keeps, on the device."""

    def images(n: int) -> torch.Tensor:
        if clean is None:
            raise LookupError("this method needs clean in-distribution images, and the dataset has none "
                              "(for ImageNet: ROOT/imagenet/val/<wnid>/*.JPEG)")
        return clean.images(np.arange(min(n, len(clean)))).to(device, memory_format=memory_format)

    return images


def training_resources(edge: Builder, foundation: Builder, num_classes: int, clean, seed: int,
                       device: torch.device) -> TrainingResources:
    """What the offline training stage may use (run before the halves exist; its FLOPs are not counted)."""
    return TrainingResources(num_classes=num_classes, edge=lambda: edge().to(device), seed=seed,
                             foundation=lambda: foundation().to(device), clean=clean, device=device)


def build_edges(method: Method, edge: Builder, num_classes: int, count: int, device: torch.device,
                memory_format) -> list[ForwardOnlyEdge]:
    """``count`` forward-only edges, each on a fresh edge model with the method's edge logic for its device
    (``Method.edge_for``)."""
    return [ForwardOnlyEdge(edge().to(device, memory_format=memory_format), method.edge_for(num_classes, index))
            for index in range(count)]


def build_clouds(method: Method, edge: Builder, foundation: Builder, clean, num_classes: int, replicas: int,
                 device: torch.device, memory_format, passes: SampleCounter, meter: ComputeMeter) -> list:
    """``replicas`` clouds (None each where the method has none), their models' forward passes counted by
    ``passes``; building them (EATA's Fisher, say) is set-up, not per-sample compute, so ``meter`` drops it."""
    resources = CloudResources(
        num_classes=num_classes,
        edge_replica=lambda: passes.attach(edge().to(device, memory_format=memory_format)),
        foundation=lambda: passes.attach(foundation().to(device, memory_format=memory_format)),
        clean_images=clean_images(clean, device, memory_format), device=device)
    with meter:
        clouds = [method.cloud(resources) for _ in range(replicas)]
    meter.take()
    return clouds
