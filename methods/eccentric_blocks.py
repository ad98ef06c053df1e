"""The training stages and halves ECCENTRIC's architectures share on every task (:mod:`.eccentric` for classification,
:mod:`.eccentric_detection` for detection), made of :mod:`.eccentric_parts`; on torchvision's detectors the adapted
path is :mod:`.eccentric_fpn`'s. See :mod:`.eccentric` for what the paper says and what we chose."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cemabench.errors import UserError
from cemabench.method import CloudLogic, CloudReply, EdgeDecision, EdgeLogic, TrainingResources
from cemabench.models.detection_split import detector_stages
from cemabench.models.split import feature_shapes, head_to, split, stage_names
from cemabench_methods import eccentric_fpn as fpn
from cemabench_methods.eccentric_parts import (  # noqa: F401 (gate_features, kd_loss: the methods' too)
    BATCH,
    LR,
    Adapter,
    adapt_knowledge,
    frozen,
    gate_features,
    kd_loss,
    make_gate,
    optimise,
    perturb,
    prefixed,
    training_shift,
    unprefixed,
)


def cut_points(model: nn.Module) -> list[str]:
    """The stages a model can be cut after: a torchvision detector's (:mod:`.eccentric_fpn`), or its family's."""
    return detector_stages(model) if fpn.fits(model) else stage_names(model)


def entry_before(cloud: nn.Module, cloud_stage: str) -> str:
    """The cut stage whose output the adapter stands in for: the stage just before ``cloud_stage``."""
    names = detector_stages(cloud, last=True) if fpn.fits(cloud) else stage_names(cloud)
    entries = names[1:]
    if cloud_stage not in entries:
        raise UserError(f"ecc: the cloud model has no entry stage {cloud_stage!r}; valid cloud_stage: "
                        f"{', '.join(entries)}")
    return names[names.index(cloud_stage) - 1]


def check_edge_stage(edge: nn.Module, edge_stage: str) -> None:
    names = cut_points(edge)
    if edge_stage not in names:
        raise UserError(f"ecc: the edge model has no stage {edge_stage!r}; valid edge_stage: {', '.join(names)}")


def load_gate(state: dict, num_classes: int) -> nn.Module:
    gate = make_gate(num_classes)
    gate.load_state_dict(unprefixed("gate", state))
    return gate.eval()


def load_adapter(state: dict, depth: int, cloud: nn.Module | None = None, before: str = "") -> nn.Module:
    """The trained adapter; into a torchvision detector (``cloud``, entered after ``before``), its maps' adapter."""
    if cloud is not None and fpn.fits(cloud):
        return fpn.load_adapter(state, depth, cloud, before)
    cin, *shape = (int(v) for v in state["adapter_shape"])
    adapter = Adapter(cin, tuple(shape), depth)
    adapter.load_state_dict(unprefixed("adapter", state))
    return adapter.eval()


def load_edge(model: nn.Module, artefacts: dict | None) -> nn.Module:
    """The deployed edge: the distilled weights when the training stage produced them, else the source model."""
    state = unprefixed("edge", artefacts or {})
    if state:
        model.load_state_dict(state)
    return model.eval()


class SplitEdge(nn.Module):
    """The edge model as head (through the sent stage) and the rest: one forward gives the feature and the logits."""

    def __init__(self, model: nn.Module, stage: str):
        super().__init__()
        self.head, self.rest = split(model, stage)

    def forward(self, x):
        feature = self.head(x)
        return feature, self.rest(feature)


# ---- what a task gives the training stages and the halves -------------------------------------------------------


class Objectives:
    """What ECCENTRIC's training stages and halves need of the dataset's task (classification in :mod:`.eccentric`,
    detection in :mod:`.eccentric_detection`). ``out`` is a model's raw output (logits, a detector's raw maps), a
    ``prediction`` what is scored (logits, one dict of boxes, scores and labels per image)."""

    def gate_width(self, num_classes: int) -> int:
        """The width of the learned gate's input, less one (:func:`make_gate`)."""
        raise NotImplementedError

    def targets(self, clean, chosen: np.ndarray):
        """The training targets of the clean split's images at ``chosen``, indexable by batch positions."""
        raise NotImplementedError

    def raw(self, model: nn.Module):
        """``model`` as a function from images to its raw output, whatever its mode."""
        return model

    def predict(self, model: nn.Module, out):
        """The prediction made from ``model``'s raw output."""
        return out

    def losses(self, out, target, teacher) -> list[torch.Tensor]:
        """The supervised and the distillation objective of a raw output against its targets and the teacher's."""
        raise NotImplementedError

    def confidence(self, prediction) -> torch.Tensor:
        """Per sample, how sure the prediction is, in [0, 1] (the confidence gate)."""
        raise NotImplementedError

    def gate_inputs(self, prediction) -> torch.Tensor:
        """What a learned gate sees of a prediction, (n, gate_width + 1)."""
        raise NotImplementedError

    def wrong(self, prediction, order: torch.Tensor, target, reference) -> torch.Tensor:
        """Per sample, whether the prediction does not stand: against the targets at batch positions ``order``, or
        against the ``reference`` prediction (the cloud's) when one is given."""
        raise NotImplementedError

    def no_answers(self, count: int, num_classes: int):
        """The answers to ``count`` uploaded samples that carried nothing to answer from."""
        raise NotImplementedError

    def stands(self, prediction, gate: nn.Module | None) -> torch.Tensor:
        """Per sample, the gate's confidence that the prediction stands: :meth:`confidence`, or the learned gate's
        probability that it is not wrong."""
        if gate is None:
            return self.confidence(prediction)
        return 1 - torch.sigmoid(gate(self.gate_inputs(prediction)))[:, 0]


class TrainingData:
    """The clean training split the cloud keeps: at most ``limit`` images (a seeded choice), in shuffled batches of
    (positions, images, targets)."""

    def __init__(self, resources: TrainingResources, limit: int, objectives: Objectives):
        if resources.clean is None:
            raise UserError("this method trains on the dataset's clean training split, and the dataset has none")
        clean = resources.clean
        chosen = torch.randperm(len(clean))[:limit].sort().values.numpy()
        self.clean, self.device = clean, resources.device
        self.indices = chosen
        self.targets = objectives.targets(clean, chosen)

    def batches(self):
        for order in torch.randperm(len(self.indices)).split(BATCH):
            order = order.sort().values
            x = self.clean.images(self.indices[order.numpy()]).to(self.device)
            yield order, x, self.targets[order].to(self.device)


# ---- training stages (each returns tensors for the artefacts) ---------------------------------------------------


def distill_edge(resources: TrainingResources, data: TrainingData, epochs: int, objectives: Objectives) -> dict:
    """Knowledge distillation of the edge from the cloud on the clean split (the task's supervised and distillation
    objectives); every edge weight trains. Between torchvision detectors, :func:`.eccentric_fpn.distill_edge`."""
    cloud = frozen(resources.foundation())
    model = resources.edge()
    if fpn.fits(model) and fpn.fits(cloud):
        return fpn.distill_edge(model, cloud, data, epochs, objectives.annotations, objectives.reported)
    teacher = objectives.raw(cloud)
    model = model.train().requires_grad_(True)
    student = objectives.raw(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(epochs):
        for _, x, y in data.batches():
            with torch.no_grad():
                target = teacher(x)
            out = student(x)
            optimise(optimizer, objectives.losses(out, y, target), None, False)
    return prefixed("edge", model.eval())


def train_adapter(resources: TrainingResources, data: TrainingData, edge: nn.Module, o,
                  objectives: Objectives) -> dict:
    """Knowledge adaptation (MSE to the cloud's own entry feature), then fine-tuning through the frozen cloud tail
    (the task's supervised and distillation objectives, the cloud's own output the teacher); into a torchvision
    detector, :func:`.eccentric_fpn.train_adapter`."""
    check_edge_stage(edge, o.edge_stage)
    cloud = frozen(resources.foundation())
    before = entry_before(cloud, o.cloud_stage)
    if fpn.fits(cloud):
        return fpn.train_adapter(cloud, data, edge, o, before, objectives.annotations)
    edge_head = head_to(frozen(edge), o.edge_stage)
    cloud_head, cloud_tail = split(cloud, before)
    sample = data.clean.images(data.indices[:1]).to(data.device)
    edge_shape = tuple(edge_head(sample).shape[1:])
    entry = feature_shapes(cloud, tuple(sample.shape[-2:]))[before]
    adapter = Adapter(edge_shape[0], entry, o.adapter_depth).to(data.device).train()
    optimizer = torch.optim.Adam(adapter.parameters(), lr=LR)
    shift = training_shift(o.augment)
    adapt_knowledge(adapter, optimizer, data, o.ka_epochs, shift, edge_head, cloud_head, F.mse_loss)
    for _ in range(o.ft_epochs):
        for _, x, y in data.batches():
            x = shift(x)
            with torch.no_grad():
                source, teacher = edge_head(x), cloud_tail(cloud_head(x))
            out = cloud_tail(adapter(source))
            optimise(optimizer, objectives.losses(out, y, teacher), list(adapter.parameters()), o.pareto)
    state = prefixed("adapter", adapter.eval())
    state["adapter_shape"] = torch.tensor([edge_shape[0], *entry])
    return state


def train_gate(resources: TrainingResources, data: TrainingData, edge: nn.Module, o, target: str,
               objectives: Objectives) -> dict:
    """A gate on the edge's prediction, trained on the perturbed clean split to predict that the edge's answer does
    not stand: ``target`` "wrong" (against the targets; recall-rate boosting weights that class by
    ``recall_weight``, and the communication cost is the mean offload probability times ``comm_weight``) or
    "disagree" (against the cloud's prediction)."""
    edge = frozen(edge)
    cloud = frozen(resources.foundation()) if target == "disagree" else None
    gate = make_gate(objectives.gate_width(resources.num_classes)).to(data.device).train()
    optimizer = torch.optim.Adam(gate.parameters(), lr=LR * 10)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    weight = torch.tensor(float(getattr(o, "recall_weight", 1.0)), device=data.device)
    for _ in range(o.gate_epochs):
        for order, x, y in data.batches():
            x = perturb(x, generator)
            with torch.no_grad():
                prediction = edge(x)
                label = objectives.wrong(prediction, order, y, None if cloud is None else cloud(x))
            out = gate(objectives.gate_inputs(prediction)).squeeze(1)
            losses = [F.binary_cross_entropy_with_logits(out, label.float(), pos_weight=weight)]
            comm = getattr(o, "comm_weight", 0.0)
            if comm > 0:
                losses.append(comm * torch.sigmoid(out).mean())
            optimise(optimizer, losses, list(gate.parameters()), getattr(o, "pareto", False))
    return prefixed("gate", gate.eval())


# ---- edge and cloud halves --------------------------------------------------------------------------------------


class GatedEdge(EdgeLogic):
    """ECC-I's and the learned switcher's edge: the (distilled) edge model predicts; the samples whose prediction
    does not stand (confidence, or the learned gate, below ``threshold``) go up raw, and the cloud's answers
    replace the edge's."""

    def __init__(self, objectives: Objectives, threshold: float, gate: nn.Module | None = None,
                 artefacts: dict | None = None):
        self.objectives, self.threshold, self.gate, self.artefacts = objectives, threshold, gate, artefacts

    def configure(self, model):
        if self.gate is not None:
            self.gate.to(next(model.parameters()).device)
        return load_edge(model, self.artefacts)

    def step(self, model, x):
        prediction = model(x)
        unsure = torch.where(self.objectives.stands(prediction, self.gate) < self.threshold)[0]
        return EdgeDecision.predicting(prediction, upload=unsure, await_answers=True)


class FeatureEdge(EdgeLogic):
    """ECC-A's edge: only the head up to ``stage`` runs; every sample's feature map goes up, nothing else."""

    def __init__(self, stage: str, dtype: str, artefacts: dict | None = None):
        self.stage, self.dtype, self.artefacts = stage, dtype, artefacts

    def configure(self, model):
        check_edge_stage(model, self.stage)
        if fpn.fits(model):
            return fpn.EdgeHead(model.eval(), self.stage, fpn.input_frame(self.artefacts))
        return head_to(model.eval(), self.stage)

    def step(self, head, x):
        return EdgeDecision(logits=None, upload=torch.arange(len(x), device=x.device), payload={"feature": head(x)},
                            send_input=False, payload_dtype=self.dtype, await_answers=True)


class DynamicEdge(EdgeLogic):
    """ECC-D's edge: the full edge model runs; the gate picks which samples' feature maps go up for the cloud's
    answer; the others keep the edge's prediction."""

    def __init__(self, o, objectives: Objectives, gate: nn.Module | None, artefacts: dict | None):
        self.o, self.objectives, self.gate, self.artefacts = o, objectives, gate, artefacts

    def configure(self, model):
        check_edge_stage(model, self.o.edge_stage)
        if self.gate is not None:
            self.gate.to(next(model.parameters()).device)
        model = load_edge(model, self.artefacts)
        self.family = model
        if fpn.fits(model):
            return fpn.EdgeSplit(model, self.o.edge_stage, fpn.input_frame(self.artefacts))
        return SplitEdge(model, self.o.edge_stage)

    def step(self, model, x):
        feature, out = model(x)
        prediction = self.objectives.predict(self.family, out)
        upload = torch.where(self.objectives.stands(prediction, self.gate) < self.o.threshold)[0]
        payload = {"feature": feature[upload]} if len(upload) else {}  # the link's int8 encoder needs >= 1 row
        return EdgeDecision.predicting(prediction, upload=upload, payload=payload, send_input=False,
                                       payload_dtype=self.o.payload_dtype, await_answers=True)


class AdaptedCloud(CloudLogic):
    """The cloud of ECC-A/D: the adapter, then the foundation model from ``cloud_stage`` on; answers with its
    prediction."""

    def __init__(self, foundation: nn.Module, cloud_stage: str, artefacts: dict, depth: int, num_classes: int,
                 objectives: Objectives):
        self.foundation = foundation.eval()
        before = entry_before(foundation, cloud_stage)
        self.tail = fpn.tail(foundation, before) if fpn.fits(foundation) else split(foundation, before)[1]
        adapter = load_adapter(artefacts, depth, foundation, before)
        self.adapter = adapter.to(next(foundation.parameters()).device)
        self.num_classes, self.objectives = num_classes, objectives

    @torch.no_grad()
    def step(self, upload):
        feature = upload.payload.get("feature")
        if feature is None or len(feature) == 0:
            return CloudReply(answers=self.objectives.no_answers(len(upload), self.num_classes))
        return CloudReply(answers=self.objectives.predict(self.foundation, self.tail(self.adapter(feature))))
