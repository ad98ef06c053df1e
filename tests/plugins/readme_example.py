"""A complete cemabench method plugin: the edge uploads the samples it is unsure about; the cloud adapts a copy of
the edge model on them by entropy minimisation and sends the new normalisation parameters down.

Register it in your distribution's pyproject.toml (the entry-point name is the method's name):

    [project.entry-points."cemabench.methods"]
    unsure-entropy = "my_package.unsure:UnsureEntropy"
"""
from dataclasses import dataclass

import torch
from torch import nn

from cemabench.method import CloudEdgeMapping, CloudLogic, EdgeDecision, EdgeLogic, Method, option

NORM_LAYERS = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


class UnsureEdge(EdgeLogic):
    """Forward-only: predict, and upload the samples whose top probability is below the threshold."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def step(self, model, x):
        logits = model(x)
        confidence = logits.softmax(1).max(1).values
        return EdgeDecision(logits, upload=torch.where(confidence < self.threshold)[0])


class EntropyCloud(CloudLogic):
    """One SGD step of entropy minimisation on a replica of the edge per upload; its norm parameters go down."""

    def __init__(self, replica: nn.Module, lr: float):
        self.model = replica.eval().requires_grad_(False)
        self.params = {}
        for name, module in self.model.named_modules():
            if isinstance(module, NORM_LAYERS):
                for key, p in module.named_parameters(recurse=False):
                    self.params[f"{name}.{key}"] = p.requires_grad_(True)
        self.optimizer = torch.optim.SGD(self.params.values(), lr=lr, momentum=0.9)

    def step(self, upload):
        if len(upload.samples) == 0:
            return None  # nothing came up in this batch: nothing goes down
        logits = self.model(upload.samples)
        loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {name: p.detach() for name, p in self.params.items()}


class UnsureEntropy(Method):
    """Uploads unsure samples; the cloud minimises their entropy on an edge replica."""

    # optional, shown by `cemabench list methods` ("-" when left out); `name` defaults to the entry-point name
    paper = "-"
    mapping = CloudEdgeMapping(selection="edge: max softmax probability < threshold", uploads="unsure samples",
                               cloud="entropy minimisation on an edge replica", download="norm affine parameters")

    @dataclass
    class Options:  # each field is an option: `--option threshold=0.8`, or `options = {...}` in a table spec
        threshold: float = option(0.9, low=0, above=True, high=1)  # in (0, 1], checked before any compute
        lr: float = option(0.001, low=0, above=True)

    def edge(self, num_classes):
        return UnsureEdge(self.options.threshold)

    def cloud(self, resources):
        return EntropyCloud(resources.edge_replica(), self.options.lr)
