"""Pseudo-labelling (Lee, ICML-W 2013) on cloud-edge: the cloud trains an edge replica on its own hard labels."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from cemabench.method import CloudEdgeMapping, Method
from cemabench_methods.common import BatchStatisticsEdge, ReplicaCloud


class _PLCloud(ReplicaCloud):
    def loss(self, logits):
        return F.cross_entropy(logits, logits.argmax(1).detach())


class PseudoLabel(Method):
    """Cross-entropy against the argmax of the model's own prediction; BatchNorm affine parameters, batch
    statistics, SGD lr 0.001, momentum 0.9; every sample goes up."""

    name = "pseudo-label"
    paper = "Lee, ICML Workshops 2013"
    mapping = CloudEdgeMapping(selection="none", uploads="every sample", cloud="adapts a replica of the edge",
                               download="norm affine parameters")

    @dataclass
    class Options:
        lr: float = 0.001
        momentum: float = 0.9
        nesterov: bool = False

    def edge(self, num_classes):
        return BatchStatisticsEdge()

    def cloud(self, resources):
        o = self.options
        return _PLCloud(resources.edge_replica(), o.lr, o.momentum, o.nesterov)
