"""Collaborative inference: the edge offloads inputs and the cloud's foundation model answers for them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cemabench.method import CloudEdgeMapping, CloudLogic, CloudReply, EdgeDecision, EdgeLogic, Method, option


class _OffloadAllEdge(EdgeLogic):
    """Runs no model: every input goes up, and the cloud's answers are the prediction."""

    def step(self, model, x):
        return EdgeDecision(logits=None, upload=torch.arange(len(x), device=x.device), await_answers=True)


class AnswerCloud(CloudLogic):
    def __init__(self, foundation):
        self.foundation = foundation.eval()

    @torch.no_grad()
    def step(self, upload):
        return CloudReply(answers=self.foundation(upload.samples))


class CloudOnly(Method):
    """Every sample goes up and the unadapted foundation model (eval mode, source statistics) answers: the accuracy
    of the foundation model on the stream, at 100% upload. The edge model never runs."""

    name = "cloud-only"
    cloud_replicas = "shared"  # one answering cloud serves every edge device
    reference = "cloud"  # everything in the cloud: what the efficiency columns compare with
    tasks = ("classification", "detection")  # the foundation model's output is the answer: logits, or boxes
    paper = "-"
    mapping = CloudEdgeMapping(selection="none", uploads="every sample (offloaded)",
                               cloud="answers with the foundation model", download="logits")

    def edge(self, num_classes):
        return _OffloadAllEdge()

    def cloud(self, resources):
        return AnswerCloud(resources.foundation())


class ConfidenceGateEdge(EdgeLogic):
    def __init__(self, threshold: float):
        self.threshold = threshold

    def configure(self, model):
        return model.eval()

    def step(self, model, x):
        logits = model(x)
        unsure = torch.where(logits.softmax(1).max(1).values < self.threshold)[0]
        return EdgeDecision(logits=logits, upload=unsure, await_answers=True)


class ConfidenceOffload(Method):
    """Collaborative inference in the style of ECCENTRIC-like edge-cloud cascades: the source edge model answers
    what it is confident about (max softmax probability >= ``threshold``) and offloads the rest to the unadapted
    foundation model, whose answers replace the edge's. No model adapts; the upload ratio is the offload rate."""

    name = "confidence-offload"
    cloud_replicas = "shared"  # one answering cloud serves every edge device
    paper = "edge-cloud cascade baseline"
    mapping = CloudEdgeMapping(selection="edge: max softmax probability below a threshold",
                               uploads="unsure samples (offloaded)", cloud="answers with the foundation model",
                               download="logits")

    @dataclass
    class Options:
        threshold: float = option(0.9, low=0, high=1)

    def edge(self, num_classes):
        return ConfidenceGateEdge(self.options.threshold)

    def cloud(self, resources):
        return AnswerCloud(resources.foundation())
