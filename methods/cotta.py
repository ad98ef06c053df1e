"""CoTTA (Wang et al., CVPR 2022) on cloud-edge: a mean teacher on the edge, its student trained in the cloud."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from cemabench.method import CloudEdgeMapping, CloudLogic, EdgeDecision, EdgeLogic, Method, option
from cemabench_methods.common import sgd, tta_augment, use_batch_statistics

TEACHER_LOGITS = "teacher_logits"


def symmetric_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 * CE(teacher -> student) + 0.5 * CE(student -> teacher), CoTTA's ImageNet loss."""
    return (-0.5 * (teacher.softmax(1) * student.log_softmax(1)).sum(1)
            - 0.5 * (student.softmax(1) * teacher.log_softmax(1)).sum(1))


class _CoTTAEdge(EdgeLogic):
    """The edge runs the teacher. It keeps a frozen copy of the source model as the anchor whose mean confidence
    decides whether the prediction averages augmented teacher passes."""

    def __init__(self, options):
        self.options = options

    def configure(self, model):
        model = use_batch_statistics(model)
        self.anchor = copy.deepcopy(model).requires_grad_(False)
        return model

    def step(self, model, x):
        logits = model(x)
        if self.anchor(x).softmax(1).max(1).values.mean() < self.options.augment_below:
            logits = torch.stack([model(tta_augment(x)) for _ in range(self.options.augmentations)]).mean(0)
        return EdgeDecision(logits=logits, upload=torch.arange(len(x)), payload={TEACHER_LOGITS: logits})


class _CoTTACloud(CloudLogic):
    def __init__(self, options, resources):
        self.options = options
        self.student = use_batch_statistics(resources.edge_replica()).requires_grad_(True)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.source = {n: p.detach().clone() for n, p in self.student.named_parameters()}
        self.optimizer = sgd(list(self.student.parameters()), options.lr, options.momentum, options.nesterov)

    def step(self, upload):
        if len(upload.samples) == 0:
            return None
        loss = symmetric_cross_entropy(self.student(upload.samples), upload.payload[TEACHER_LOGITS]).mean(0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        a = self.options.teacher_momentum
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                t.mul_(a).add_(s, alpha=1 - a)
            for name, p in self.student.named_parameters():
                restore = (torch.rand(p.shape, device=p.device) < self.options.restore_probability).to(p.dtype)
                p.copy_(self.source[name] * restore + p * (1 - restore))
        return {n: p.detach() for n, p in self.teacher.named_parameters()}


class CoTTA(Method):
    """All parameters trainable, BatchNorm on batch statistics; a mean teacher (EMA 0.999) predicts, averaging 32
    augmented passes when the source anchor's mean confidence is below 0.1 (ImageNet; 0.92 for CIFAR-10); the
    student minimises the symmetric cross-entropy to the teacher's prediction (SGD lr 0.01, momentum 0.9,
    Nesterov, as in the official ImageNet config), then each weight is restored to its source value with
    probability 0.001.

    Cloud-edge mapping: the edge holds the teacher and sends every sample up with the teacher's logits (the
    student's target, so that prediction and target are the same tensor, as in the official code); the cloud
    trains the student and sends the whole teacher down after every batch, which is what CoTTA costs on a link.
    """

    name = "cotta"
    task_reason = (
        "it adapts a mean teacher by the cross-entropy between class probabilities, which a detector's boxes do "
        "not give (no detection version of it is built)")
    paper = "Wang et al., CVPR 2022"
    mapping = CloudEdgeMapping(selection="none", uploads="every sample and the teacher's logits",
                               cloud="trains the student, updates the EMA teacher, stochastic restore",
                               download="all teacher parameters")

    @dataclass
    class Options:
        lr: float = option(0.01, low=0, above=True, high=1)  # an SGD step size: 1e300 would only diverge
        momentum: float = option(0.9, low=0, high=1, below=True)
        nesterov: bool = True
        teacher_momentum: float = option(0.999, low=0, high=1)
        augment_below: float = option(0.1, low=0, high=1)
        augmentations: int = option(32, low=1)
        restore_probability: float = option(0.001, low=0, high=1)

    def edge(self, num_classes):
        return _CoTTAEdge(self.options)

    def cloud(self, resources):
        return _CoTTACloud(self.options, resources)
