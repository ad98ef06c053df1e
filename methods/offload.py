"""Collaborative inference: the edge offloads inputs and the cloud's foundation model answers for them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cemabench.errors import UserError
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
    task_reason = (
        "its gate is a sample's max softmax probability, which a detector's boxes do not give; on detection use "
        "hard-example-offload or ecc-independent")
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


ROUTERS = ("auto", "threshold", "ibt", "cross-entropy")  # auto: threshold on detection, cross-entropy on classification


class HardExampleEdge(EdgeLogic):
    """Sedna's hard example mining (KubeEdge Sedna, ``sedna.algorithms.hard_example_mining``) as the edge's router:
    the images it calls hard go up, and the cloud's answers replace the edge's prediction for them."""

    def __init__(self, options):
        self.o = options

    def configure(self, model):
        return model.eval()

    def _hard_image(self, scores: torch.Tensor) -> bool:
        """Sedna's ``Threshold`` and ``IBT`` filters on one image's box scores (those the deployment reports: at
        least ``box_score_min``). An image with no such box is not hard, as in Sedna (its filters return False
        on an empty result)."""
        scores = scores[scores >= self.o.box_score_min]
        if not len(scores):
            return False
        if self.o.router in ("threshold", "auto"):  # the image's mean box score below the threshold
            return bool(scores.mean() < self.o.threshold)
        low = (scores <= self.o.threshold_box).float().mean()  # IBT: the share of low-score boxes
        return bool(low >= 1 - self.o.threshold)

    def step(self, model, x):
        output = model(x)
        if isinstance(output, list):
            hard = [i for i, d in enumerate(output) if self._hard_image(d["scores"])]
            upload = torch.tensor(hard, dtype=torch.long, device=x.device)
        else:  # Sedna's CrossEntropy filter: 1 + sum(p log p) / log(classes), a confidence in [0, 1]
            p = output.softmax(1)
            confidence = 1 + torch.special.xlogy(p, p).sum(1) / math.log(p.shape[1])
            upload = torch.where(confidence < self.o.threshold)[0]
        return EdgeDecision.predicting(output, upload=upload, await_answers=True)


class HardExampleOffload(Method):
    """KubeEdge Sedna's joint inference: the edge model answers, its hard example mining router sends the images it
    calls hard to the cloud's foundation model, whose answers replace the edge's. Routers (``auto``: the task's
    first): ``threshold`` (an image's mean box score below ``threshold``), ``ibt`` (image-box thresholds: the
    share of boxes scoring at most ``threshold_box`` is at least 1 - ``threshold``), both on detection, and
    ``cross-entropy`` (normalised entropy confidence below ``threshold``) on classification. Boxes below
    ``box_score_min`` are not results (the deployment's detection threshold). No model adapts."""

    name = "hard-example-offload"
    cloud_replicas = "shared"
    tasks = ("classification", "detection")
    paper = "KubeEdge Sedna joint inference"
    mapping = CloudEdgeMapping(selection="edge: Sedna's hard example mining router", uploads="hard images (offloaded)",
                               cloud="answers with the foundation model", download="logits or boxes")

    @dataclass
    class Options:
        router: str = option("auto", choices=ROUTERS)
        threshold: float = option(0.5, low=0, high=1)
        threshold_box: float = option(0.5, low=0, high=1)
        box_score_min: float = option(0.3, low=0, high=1)

    def check_task_options(self, task):
        classification = self.options.router == "cross-entropy"
        if self.options.router != "auto" and classification != (task == "classification"):
            fits = "cross-entropy" if task == "classification" else "threshold or ibt"
            why = ("Sedna's cross-entropy filter reads one vector of class probabilities per image, which a "
                   "detector's boxes do not give" if task == "detection" else "it reads box scores")
            raise UserError(f"hard-example-offload's router {self.options.router} does not fit a {task} dataset "
                            f"({why}): use router={fits}")

    def edge(self, num_classes):
        return HardExampleEdge(self.options)

    def cloud(self, resources):
        return AnswerCloud(resources.foundation())
