"""RDumb (Press et al., NeurIPS 2023) on cloud-edge: ETA, with the model, its optimiser and the redundancy filter reset
to their initial state every 1,000 batches."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from cemabench.method import CloudEdgeMapping, Method, option
from cemabench_methods.common import (
    ENTROPY_ON_CLASSES,
    BatchStatisticsEdge,
    RedundancyFilter,
    ReplicaCloud,
    entropy,
    entropy_threshold,
    norm_affine,
)
from cemabench_methods.eata import _EATAEdge


def released_weighted_entropy(ent: torch.Tensor, margin: float) -> torch.Tensor:
    """mean(H / exp(H - E0)), the weights detached, in the released arithmetic (a reciprocal of an exponential)."""
    return ent.mul(torch.exp(ent.detach() - margin).reciprocal()).mean(0)


class _RDumbEdge(_EATAEdge):
    """ETA's edge selection; the redundancy filter's running mean is forgotten at the start of every ``reset_every``-th
    batch, where the released code resets it with the model."""

    def __init__(self, margin: float, redundancy_margin: float | None, reset_every: int):
        super().__init__(margin, redundancy_margin)
        self.reset_every, self.batches = reset_every, 0

    def step(self, model, x):
        if self.batches and self.batches % self.reset_every == 0:
            self.redundancy.mean_probs = None
        self.batches += 1
        return super().step(model, x)


class _RDumbCloud(ReplicaCloud):
    """ETA's step on a replica of the edge, counting the edge's batches: after every ``reset_every``-th the replica and
    its optimiser return to their initial state, and that state goes down instead of the step's."""

    def __init__(self, replica, options, margin: float):
        super().__init__(replica, options.lr, options.momentum, options.nesterov)
        self.options, self.margin = options, margin
        self.redundancy = RedundancyFilter(options.redundancy_margin)  # used with select_on = "cloud" only
        self.batches = self.resets = 0
        self._initial = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))

    def loss(self, logits):
        return released_weighted_entropy(entropy(logits), self.margin)

    def _released_step(self, upload):
        """The released ETA step on the whole batch: forward, entropy filter, redundancy filter, the weighted entropy
        of the samples kept, from that same forward; no step when none is kept."""
        x = upload.samples
        if len(x) == 0:
            return None
        logits = self.model(x)
        ent = entropy(logits)
        reliable = torch.where(ent < self.margin)[0]
        keep = reliable[self.redundancy(logits[reliable].detach())]
        if len(keep) == 0:
            return None
        loss = released_weighted_entropy(ent[keep], self.margin)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return norm_affine(self.model)

    def step(self, upload):
        down = self._released_step(upload) if self.options.select_on == "cloud" else super().step(upload)
        self.batches += 1
        if self.batches % self.options.reset_every:
            return down
        self.model.load_state_dict(self._initial[0])
        self.optimizer.load_state_dict(self._initial[1])
        self.redundancy.mean_probs = None
        self.resets += 1
        return norm_affine(self.model)


class RDumb(Method):
    """RDumb, following the released code (oripress/CCC at 656dec36b8f5b4dbf64fe44c73a9a1326b9588ff,
    ``models/rdumb.py`` and ``models/functional.py``): ETA, reset every 1,000 steps.

    ETA as released there: BatchNorm on batch statistics, its affine parameters adapted; samples with entropy
    H < E0 = 0.4 ln 1000 pass, then those whose probabilities have |cos| >= 0.05 with a running mean of the kept
    probabilities (EMA 0.9 / 0.1, started from the first reliable set) are dropped as redundant; the loss is the mean
    of H / exp(H - E0) over what is kept, one SGD step (lr 0.00025, momentum 0.9), none when nothing is kept; no
    Fisher regulariser. A step is one batch, whether or not it updated: before steps 1,000, 2,000, ... the model and
    the optimiser (its momentum buffers) are restored to their initial state and the running mean is forgotten, so
    batch 1,000 is predicted by the source model. The scored prediction is the batch's forward before its update.

    Where this port differs: E0 is ``entropy_margin`` x ln C (the released code fixes ln 1000, ImageNet's C, which is
    the same there). As for this repository's ETA, every normalisation layer's affine parameters are adapted and
    BatchNorm (1d, 2d, 3d) uses batch statistics; the released code does both for BatchNorm2d only (the same on
    ResNet-50, the network of its experiments). mariodoebler/test-time-adaptation (at 8b2ed63) runs RDumb as its EATA
    with ``FISHER_ALPHA = 0``, ``D_MARGIN = 0.05`` and ``RESET_AFTER_NUM_UPDATES = 1000``, the same rule.

    Cloud-edge mapping (``select_on``). As for ETA, by default the edge selects: it predicts the batch, applies both
    filters and uploads the samples kept; the cloud forwards them on its replica of the edge (BatchNorm normalising
    them among themselves, where the released step normalises them within the whole batch) and takes the step; the
    normalisation layers' affine parameters come down. The reset lives with the state it resets: the cloud counts the
    edge's batches (it is called once per batch, upload or not) and, after the 999th, 1,999th, ... restores its
    replica and optimiser and sends the initial parameters down in place of that step's, so that they reach the edge
    before the batch the released code predicts with the source model (with a delivery delay, they arrive as late as
    any download); the edge forgets its filter's running mean at the start of that batch. ``select_on = "cloud"``
    uploads every sample and the cloud runs the released step as it stands, filters included.
    """

    name = "rdumb"
    task_reason = ENTROPY_ON_CLASSES
    paper = "Press et al., NeurIPS 2023"
    mapping = CloudEdgeMapping(selection="edge: entropy and redundancy (as ETA)", uploads="selected samples",
                               cloud="ETA step on an edge replica; reset to the source every 1,000 batches",
                               download="norm affine parameters (the source ones at a reset)")

    @dataclass
    class Options:
        select_on: str = option("edge", choices=("edge", "cloud"))
        reset_every: int = option(1000, low=1)  # batches (the released steps, updating or not)
        entropy_margin: float = option(0.4, low=0, high=1)  # E0, a fraction of ln C
        redundancy_margin: float | None = option(0.05, low=0)
        lr: float = option(0.00025, low=0, above=True, high=1)  # an SGD step size: 1e300 would only diverge
        momentum: float = option(0.9, low=0, high=1, below=True)
        nesterov: bool = False

    def edge(self, num_classes):
        o = self.options
        if o.select_on == "cloud":
            return BatchStatisticsEdge()
        return _RDumbEdge(entropy_threshold(o.entropy_margin, num_classes), o.redundancy_margin, o.reset_every)

    def cloud(self, resources):
        return _RDumbCloud(resources.edge_replica(), self.options,
                           entropy_threshold(self.options.entropy_margin, resources.num_classes))
