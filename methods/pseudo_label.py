"""Pseudo-labelling (Lee, ICML-W 2013) on cloud-edge: the cloud trains an edge replica on its own hard labels."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from cemabench.method import CloudEdgeMapping
from cemabench_methods.common import ReplicaCloud
from cemabench_methods.tent import Tent


class _PLCloud(ReplicaCloud):
    def loss(self, logits):
        return F.cross_entropy(logits, logits.argmax(1).detach())


class PseudoLabel(Tent):
    """Cross-entropy against the argmax of the model's own prediction; BatchNorm affine parameters, batch
    statistics, SGD lr 0.001, momentum 0.9; every sample goes up."""

    name = "pseudo-label"
    task_reason = (
        "it trains on each sample's predicted class, and a detector gives boxes, not one class per image")
    paper = "Lee, ICML Workshops 2013"
    mapping = CloudEdgeMapping(selection="none", uploads="every sample", cloud="adapts a replica of the edge",
                               download="norm affine parameters")
    cloud_logic = _PLCloud

    @dataclass
    class Options(Tent.Options):
        lr: float = 0.001
