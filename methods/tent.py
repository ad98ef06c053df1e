"""Tent (Wang et al., ICLR 2021) on cloud-edge: every sample goes up, the cloud adapts a replica of the edge."""
from __future__ import annotations

from dataclasses import dataclass

from cemabench.method import CloudEdgeMapping, Method, option
from cemabench_methods.common import ENTROPY_ON_CLASSES, BatchStatisticsEdge, ReplicaCloud, entropy


class _TentCloud(ReplicaCloud):
    def loss(self, logits):
        return entropy(logits).mean()


class Tent(Method):
    """Entropy minimisation of BatchNorm affine parameters, BatchNorm always on batch statistics.

    The scored prediction is the edge's forward of the batch, which equals the official Tent prediction (the outputs
    of the forward that computes the loss, before the update). Official ImageNet setting: SGD lr 0.00025, momentum 0.9.
    """

    name = "tent"
    task_reason = ENTROPY_ON_CLASSES
    paper = "Wang et al., ICLR 2021"
    mapping = CloudEdgeMapping(selection="none", uploads="every sample", cloud="adapts a replica of the edge",
                               download="norm affine parameters")

    cloud_logic = _TentCloud

    @dataclass
    class Options:
        lr: float = option(0.00025, low=0, above=True, high=1)  # an SGD step size: 1e300 would only diverge
        momentum: float = option(0.9, low=0, high=1, below=True)
        nesterov: bool = False

    def edge(self, num_classes):
        return BatchStatisticsEdge()

    def cloud(self, resources):
        o = self.options
        return self.cloud_logic(resources.edge_replica(), o.lr, o.momentum, o.nesterov)
