"""ECCENTRIC's three edge-cloud collaboration architectures, and a learned-switcher baseline.

Follows "ECCENTRIC: Edge-Cloud Collaboration Framework for Distributed Inference Using Knowledge Adaptation"
(Kamani, Cheng, Chen, arXiv 2511.11719, 2025) where the paper says what to do:

- **Independent ECC** (``ecc-independent``): edge and cloud models trained separately; the edge (optionally distilled
  from the cloud: KL at temperature T plus cross-entropy) sends the inputs it is unsure of up raw, and the cloud's
  prediction replaces its own.
- **Adaptive ECC** (``ecc-adaptive``): the edge runs its head up to ``edge_stage`` (the paper: its first residual
  stage) and sends that feature map; a small trained adaptation module (``adapter_depth`` = r1/r2/r3 layers) maps it
  into the cloud model where ``cloud_stage`` begins (stages 2, 3 or 4), and the cloud runs only its remaining layers.
  Training is knowledge adaptation (MSE between the adapter's output and the cloud's own feature at the entry), then
  fine-tuning of the adapter through the cloud's remaining layers (cross-entropy plus distillation from the cloud).
- **Dynamic ECC** (``ecc-dynamic``): ECC-A plus a per-sample offload decision on the edge; a learned gate is trained
  with recall-rate boosting (the "edge is wrong" class weighted by ``recall_weight``); with ``pareto`` the training
  combines its objectives by the min-norm (multiple-gradient descent) weights instead of fixed ones.

Where the paper is silent we chose, and say so here:

- Training data: the labelled clean training split the cloud keeps (the shipped models were trained on it), at most
  ``train_samples`` images of it, Adam (lr 1e-3), batch 64, a few epochs, so that the miniature trains in seconds.
- The adapter: parameter-free resampling of the edge feature to the entry's height and width (adaptive average pooling
  down, bilinear up), then ``adapter_depth`` x (3x3 conv, BatchNorm, ReLU), the first mapping the edge's channels to
  the entry's; the final ReLU because a ResNet stage's output is non-negative. The cloud's layers stay frozen.
- ``augment`` (default false: the paper's clean training) trains the adapter on the gates' perturbation of the clean
  split (below), the cloud's own feature of the perturbed image as the target, so that the adapted path meets
  shifted edge features in training; an option because it is ours, not the paper's.
- The gates see the edge's logits only: sorted softmax probabilities and normalised entropy, a 2-layer MLP (32 hidden).
  On its own training split the edge is almost never wrong, so gates are trained on the clean split under a generic
  photometric perturbation (per-sample contrast reduction and additive Gaussian noise of random strength); this
  overlaps with some test corruptions (noise, contrast), which is why the confidence gate is the default.
- ``threshold`` means the same for every gate: offload when the gate's confidence that the edge's answer stands (max
  softmax probability, or the learned probability that the edge is right / agrees with the cloud) is below it.
- The Pareto step (``pareto = true``): the adapter's fine-tuning objectives (cross-entropy, distillation) and the
  learned gate's objectives (recall-boosted BCE, the communication cost = mean offload probability times
  ``comm_weight``) are each combined with :func:`cemabench_methods.pareto.min_norm_backward` instead of summed.
- Payload: the feature map of every offloaded sample, encoded as ``payload_dtype`` (float32, float16, or int8 with a
  per-sample scale); the raw input does not cross. The cloud answers with logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cemabench.errors import UserError
from cemabench.method import PAYLOAD_DTYPES, CloudEdgeMapping, Method, TrainingResources, option
from cemabench_methods.eccentric_blocks import (
    AdaptedCloud,
    DynamicEdge,
    FeatureEdge,
    GatedEdge,
    Objectives,
    TrainingData,
    check_edge_stage,
    distill_edge,
    entry_before,
    gate_features,
    kd_loss,
    load_edge,
    load_gate,
    train_adapter,
    train_gate,
)
from cemabench_methods.eccentric_detection import Detection, family, torchvision_pair
from cemabench_methods.eccentric_fpn import check_cloud
from cemabench_methods.offload import AnswerCloud

PAPER = "ECCENTRIC: Edge-Cloud Collaboration Framework for Distributed Inference Using Knowledge Adaptation"
GATES = ("confidence", "learned")


class Classification(Objectives):
    """ECCENTRIC's objectives on classification: cross-entropy to the label plus Hinton distillation at
    ``temperature``; a sample's confidence is its max softmax probability; the gates see :func:`gate_features`; the
    edge is wrong where its top-1 differs from the label (or from the cloud's top-1)."""

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def gate_width(self, num_classes):
        return num_classes

    def targets(self, clean, chosen):
        return torch.from_numpy(clean.labels()[chosen]).long()

    def losses(self, out, target, teacher):
        return [F.cross_entropy(out, target), kd_loss(out, teacher, self.temperature)]

    def confidence(self, prediction):
        return prediction.softmax(1).amax(1)

    def gate_inputs(self, prediction):
        return gate_features(prediction)

    def wrong(self, prediction, order, target, reference):
        return prediction.argmax(1) != (target if reference is None else reference.argmax(1))

    def no_answers(self, count, num_classes):
        return torch.zeros(count, num_classes)


# ---- the methods ------------------------------------------------------------------------------------------------


class _ECC(Method):
    """What the four methods share: one answering cloud, the paper, and the task's objectives."""

    cloud_replicas = "shared"  # one answering cloud serves every edge device
    paper = PAPER
    tasks = ("classification", "detection")  # detection: cemabench_methods.eccentric_detection

    def objectives(self, resources: TrainingResources | None = None) -> Objectives:
        """The task's objectives; on detection, ``resources`` give the detectors' family for training."""
        if self.task == "detection":
            return Detection(resources)
        return Classification(getattr(self.options, "temperature", 1.0))

    def check_task_options(self, task):
        temperature = getattr(self.options, "temperature", None)
        default = type(self.options).__dataclass_fields__.get("temperature")
        if task == "detection" and temperature is not None and temperature != default.default:
            raise UserError(f"{self.name}: temperature is the classification distillation's; on detection the edge "
                            f"is distilled without one (leave temperature at {default.default})")

    def check_models(self, edge, foundation):
        if self.task != "detection":
            return
        if not (self._distils() or self._adapts()):
            return
        if not torchvision_pair(edge, foundation):
            family(edge, foundation)
        elif self._adapts():
            check_cloud(foundation)

    def _distils(self) -> bool:
        """Whether the training stage distils the edge from the cloud model."""
        return False

    def _adapts(self) -> bool:
        """Whether the training stage trains an adapter from the edge into the cloud model."""
        return False

    def _data(self, resources: TrainingResources, objectives: Objectives) -> TrainingData:
        return TrainingData(resources, self.options.train_samples, objectives)


class ECCIndependent(_ECC):
    """ECC-I: a (distilled) edge offloads the raw inputs it is unsure of (confidence below ``threshold``: the max
    softmax probability, or on detection the mean reported box score); the cloud's unadapted model answers for
    them."""

    name = "ecc-independent"
    online_options = ("threshold",)
    mapping = CloudEdgeMapping(selection="edge: confidence (max softmax; detection: mean box score) below a threshold",
                               uploads="unsure samples, raw (offloaded)", cloud="answers with the foundation model",
                               download="logits or boxes")

    @dataclass
    class Options:
        threshold: float = option(0.9, low=0, high=1)
        distill: bool = True
        epochs: int = option(2, low=0)
        temperature: float = option(2.0, low=0, above=True)
        train_samples: int = option(1024, low=1)

    def _distils(self):
        return self.options.distill and self.options.epochs > 0

    def needs_clean_split(self):
        return "it distils the edge from the cloud on it" if self._distils() else ""

    def train(self, resources):
        if not self._distils():
            return None
        objectives = self.objectives(resources)
        return distill_edge(resources, self._data(resources, objectives), self.options.epochs, objectives)

    def edge(self, num_classes):
        return GatedEdge(self.objectives(), self.options.threshold, artefacts=self.artefacts)

    def cloud(self, resources):
        return AnswerCloud(resources.foundation())


class ECCAdaptive(_ECC):
    """ECC-A: every sample's edge feature map at ``edge_stage`` goes up; the trained adapter maps it into the cloud
    model at ``cloud_stage``, whose remaining layers answer. The edge produces no prediction of its own."""

    name = "ecc-adaptive"
    online_options = ("payload_dtype",)
    mapping = CloudEdgeMapping(selection="none", uploads="every sample's intermediate feature map (offloaded)",
                               cloud="adapter + the foundation model's later stages answer",
                               download="logits or boxes")

    @dataclass
    class Options:
        edge_stage: str = "layer1"
        cloud_stage: str = "layer2"
        adapter_depth: int = option(1, choices=(1, 2, 3))
        payload_dtype: str = option("float32", choices=PAYLOAD_DTYPES)
        ka_epochs: int = option(6, low=0)
        ft_epochs: int = option(2, low=0)
        augment: bool = False
        temperature: float = option(4.0, low=0, above=True)
        pareto: bool = False
        train_samples: int = option(1024, low=1)

    def _adapts(self):
        return True

    def needs_clean_split(self):
        return "it trains its adapter on it"

    def check_models(self, edge, foundation):
        super().check_models(edge, foundation)  # on detection, a described family first: its reason is the real one
        check_edge_stage(edge, self.options.edge_stage)
        entry_before(foundation, self.options.cloud_stage)

    def train(self, resources):
        objectives = self.objectives(resources)
        return train_adapter(resources, self._data(resources, objectives), resources.edge(), self.options,
                             objectives)

    def edge(self, num_classes):
        return FeatureEdge(self.options.edge_stage, self.options.payload_dtype, self.artefacts)

    def cloud(self, resources):
        return AdaptedCloud(resources.foundation(), self.options.cloud_stage, self.artefacts,
                            self.options.adapter_depth, resources.num_classes, self.objectives())


class ECCDynamic(ECCAdaptive):
    """ECC-D: ECC-A plus a per-sample decision on the edge (``gate``: ``confidence`` = max softmax, or on detection
    the mean reported box score; or ``learned`` = a gate trained with recall-rate boosting); only the offloaded
    samples' feature maps go up."""

    name = "ecc-dynamic"
    online_options = ("threshold", "payload_dtype")
    mapping = CloudEdgeMapping(selection="edge: confidence or learned gate (recall-rate boosting)",
                               uploads="gated samples' intermediate feature maps (offloaded)",
                               cloud="adapter + the foundation model's later stages answer",
                               download="logits or boxes")

    @dataclass
    class Options(ECCAdaptive.Options):  # ECC-A's options, plus the gate's
        gate: str = option("confidence", choices=GATES)
        threshold: float = option(0.9, low=0, high=1)
        recall_weight: float = option(4.0, low=0, above=True)
        comm_weight: float = option(0.1, low=0)
        distill: bool = False
        epochs: int = option(2, low=0)
        gate_epochs: int = option(3, low=0)

    def _distils(self):
        return self.options.distill and self.options.epochs > 0

    def validate(self):
        if self.options.pareto and self.options.gate == "learned" and self.options.comm_weight == 0:
            raise UserError(f"{self.name}: pareto with the learned gate needs comm_weight > 0 (a zero objective's "
                            f"gradient is the min-norm point, and nothing would train); or set pareto = false")

    def train(self, resources):
        o = self.options
        objectives = self.objectives(resources)
        data = self._data(resources, objectives)
        state = distill_edge(resources, data, o.epochs, objectives) if self._distils() else {}
        edge = load_edge(resources.edge(), state)
        state.update(train_adapter(resources, data, edge, o, objectives))
        if o.gate == "learned":
            state.update(train_gate(resources, data, edge, o, "wrong", objectives))
        return state

    def edge(self, num_classes):
        objectives = self.objectives()
        gate = (load_gate(self.artefacts, objectives.gate_width(num_classes)) if self.options.gate == "learned"
                else None)
        return DynamicEdge(self.options, objectives, gate, self.artefacts)


class LearnedSwitcher(_ECC):
    """Baseline: a small gate on the edge's prediction, trained (on the perturbed clean split) to predict where edge
    and cloud disagree; those raw inputs are offloaded and the cloud's answer replaces the edge's."""

    name = "learned-switcher"
    paper = "learned edge/cloud switcher baseline"
    online_options = ("threshold",)
    mapping = CloudEdgeMapping(selection="edge: learned gate predicting edge/cloud disagreement",
                               uploads="samples predicted to disagree, raw (offloaded)",
                               cloud="answers with the foundation model", download="logits or boxes")

    @dataclass
    class Options:
        threshold: float = option(0.5, low=0, high=1)
        gate_epochs: int = option(3, low=0)
        train_samples: int = option(1024, low=1)

    def needs_clean_split(self):
        return "it trains its gate on it"

    def train(self, resources):
        objectives = self.objectives()
        return train_gate(resources, self._data(resources, objectives), resources.edge(), self.options, "disagree",
                          objectives)

    def edge(self, num_classes):
        objectives = self.objectives()
        gate = load_gate(self.artefacts, objectives.gate_width(num_classes))
        return GatedEdge(objectives, self.options.threshold, gate)

    def cloud(self, resources):
        return AnswerCloud(resources.foundation())
