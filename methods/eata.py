"""ETA and EATA (Niu et al., ICML 2022) on cloud-edge: the edge uploads only reliable, non-redundant samples."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cemabench.method import CloudEdgeMapping, Method, option
from cemabench_methods.common import (
    ENTROPY_ON_CLASSES,
    BatchStatisticsEdge,
    RedundancyFilter,
    ReplicaCloud,
    entropy,
    entropy_threshold,
    entropy_weights,
)


class _EATAEdge(BatchStatisticsEdge):
    def __init__(self, margin: float, redundancy_margin: float | None):
        self.margin = margin
        self.redundancy = RedundancyFilter(redundancy_margin)

    def select(self, logits):
        reliable = torch.where(entropy(logits) < self.margin)[0]
        return reliable[self.redundancy(logits[reliable])]


class _EATACloud(ReplicaCloud):
    def __init__(self, replica, options, margin: float, clean_images):
        super().__init__(replica, options.lr, options.momentum, options.nesterov)
        self.margin = margin
        self.fisher_alpha = options.fisher_alpha
        self.fisher = (self._fisher(clean_images(options.fisher_size), options.fisher_batch)
                       if self.fisher_alpha else None)

    def _fisher(self, images: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Diagonal Fisher from the squared gradients of the pseudo-label cross-entropy, averaged over batches."""
        sums = [torch.zeros_like(p) for p in self.params]
        batches = int(np.ceil(len(images) / batch))
        for start in range(0, len(images), batch):
            logits = self.model(images[start:start + batch])
            loss = F.cross_entropy(logits, logits.argmax(1))
            grads = torch.autograd.grad(loss, self.params)
            for total, g in zip(sums, grads):
                total += g.detach() ** 2
        return [(p, total / batches, p.detach().clone()) for p, total in zip(self.params, sums)]

    def loss(self, logits):
        ent = entropy(logits)
        loss = (ent * entropy_weights(ent, self.margin)).mean()
        if self.fisher is not None:
            loss = loss + self.fisher_alpha * sum((f * (p - p0) ** 2).sum() for p, f, p0 in self.fisher)
        return loss


class ETA(Method):
    """EATA without the Fisher regulariser: entropy filter H < 0.4 ln C, redundancy filter |cos| < 0.05, sample
    weights exp(-(H - E0)); the cloud steps once per edge batch on what was uploaded, and skips empty uploads.

    Cloud-edge mapping: the cloud forwards only the uploaded samples, so BatchNorm statistics come from that
    subset (as in CEMA's released EATA baseline); the original single-device EATA normalises with the whole batch.
    """

    name = "eta"
    task_reason = ENTROPY_ON_CLASSES
    paper = "Niu et al., ICML 2022"
    mapping = CloudEdgeMapping(selection="edge: entropy and redundancy", uploads="selected samples",
                               cloud="adapts a replica of the edge", download="norm affine parameters")

    @dataclass
    class Options:
        entropy_margin: float = option(0.4, low=0, high=1)  # fraction of ln C
        redundancy_margin: float | None = option(0.05, low=0)
        lr: float = option(0.00025, low=0, above=True, high=1)  # an SGD step size: 1e300 would only diverge
        momentum: float = option(0.9, low=0, high=1, below=True)
        nesterov: bool = False
        fisher_alpha: float = option(0.0, low=0)
        fisher_size: int = option(2000, low=1)
        fisher_batch: int = option(64, low=1)

    def edge(self, num_classes):
        return _EATAEdge(entropy_threshold(self.options.entropy_margin, num_classes), self.options.redundancy_margin)

    def needs_clean_split(self):
        return "its Fisher regulariser is estimated on clean images" if self.options.fisher_alpha else ""

    def cloud(self, resources):
        margin = entropy_threshold(self.options.entropy_margin, resources.num_classes)
        return _EATACloud(resources.edge_replica(), self.options, margin, resources.clean_images)


class EATA(ETA):
    """ETA plus the Fisher regulariser alpha * sum F (theta - theta0)^2 (alpha = 2000), with F computed at the cloud
    from up to 2,000 clean in-distribution images, as in the official code. The miniature has fewer clean images
    than that; all of them are used."""

    name = "eata"

    @dataclass
    class Options(ETA.Options):
        fisher_alpha: float = 2000.0
