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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cemabench.errors import UserError
from cemabench.method import (
    PAYLOAD_DTYPES,
    CloudEdgeMapping,
    CloudLogic,
    CloudReply,
    EdgeDecision,
    EdgeLogic,
    Method,
    TrainingResources,
    option,
)
from cemabench.models.split import feature_shapes, head_to, split, stage_names
from cemabench_methods.offload import AnswerCloud, ConfidenceGateEdge
from cemabench_methods.pareto import min_norm_backward

PAPER = "ECCENTRIC: Edge-Cloud Collaboration Framework for Distributed Inference Using Knowledge Adaptation"
GATES = ("confidence", "learned")
BATCH = 64
LR = 1e-3


# ---- building blocks ------------------------------------------------------------------------------------------


class Adapter(nn.Module):
    """Maps an edge feature map (C_e, H_e, W_e) to the cloud's entry shape (C_c, H_c, W_c): resampling, then
    ``depth`` x (3x3 conv, BatchNorm, ReLU)."""

    def __init__(self, in_channels: int, shape: tuple[int, int, int], depth: int):
        super().__init__()
        self.size = tuple(shape[1:])
        layers, cin = [], in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(cin, shape[0], 3, 1, 1, bias=False), nn.BatchNorm2d(shape[0]), nn.ReLU()]
            cin = shape[0]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            down = x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]
            x = F.adaptive_avg_pool2d(x, self.size) if down else F.interpolate(x, self.size, mode="bilinear",
                                                                                 align_corners=False)
        return self.layers(x)


def gate_features(logits: torch.Tensor) -> torch.Tensor:
    """What a learned gate sees: the sorted softmax probabilities and the entropy divided by ln C."""
    probs = logits.float().softmax(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1, keepdim=True) / math.log(logits.shape[1])
    return torch.cat([probs.sort(1, descending=True).values, entropy], 1)


def make_gate(num_classes: int) -> nn.Module:
    """A small MLP whose output is the logit of "the edge's answer does not stand" (wrong / disagrees)."""
    return nn.Sequential(nn.Linear(num_classes + 1, 32), nn.ReLU(), nn.Linear(32, 1))


def perturb(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The gates' (and ``augment``'s) training perturbation: per sample, contrast scaled by U(0.2, 1), then Gaussian
    noise of std U(0, 0.3)."""
    n = len(x)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.2, 1.0, generator=generator).to(x)
    sigma = torch.empty(n, 1, 1, 1).uniform_(0.0, 0.3, generator=generator).to(x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    noise = torch.randn(x.shape, generator=generator).to(x)
    return ((x - mean) * contrast + mean + sigma * noise).clamp(0, 1)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton distillation: T^2 KL(softmax(teacher / T) || softmax(student / T))."""
    return F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def _unprefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


class _Data:
    """The clean training split the cloud keeps: at most ``limit`` images (a seeded choice), in shuffled batches."""

    def __init__(self, resources: TrainingResources, limit: int):
        if resources.clean is None:
            raise UserError("this method trains on the dataset's clean training split, and the dataset has none")
        clean = resources.clean
        chosen = torch.randperm(len(clean))[:limit].sort().values.numpy()
        self.clean, self.device = clean, resources.device
        self.indices = chosen
        self.labels = torch.from_numpy(clean.labels()[chosen]).long()

    def batches(self):
        for order in torch.randperm(len(self.indices)).split(BATCH):
            order = order.sort().values
            x = self.clean.images(self.indices[order.numpy()]).to(self.device)
            yield order, x, self.labels[order].to(self.device)


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def _step(optimizer, losses: list[torch.Tensor], params, pareto: bool) -> None:
    optimizer.zero_grad(set_to_none=True)
    if pareto and len(losses) > 1:
        min_norm_backward(losses, params)
    else:
        sum(losses).backward()
    optimizer.step()


# ---- training stages (each returns tensors for the artefacts) ---------------------------------------------------


def distill_edge(resources: TrainingResources, data: _Data, epochs: int, temperature: float) -> dict:
    """Knowledge distillation of the edge from the cloud: CE + T^2 KL on the clean split; every edge weight trains."""
    teacher = _frozen(resources.foundation())
    student = resources.edge().train().requires_grad_(True)
    optimizer = torch.optim.Adam(student.parameters(), lr=LR)
    for _ in range(epochs):
        for _, x, y in data.batches():
            with torch.no_grad():
                target = teacher(x)
            logits = student(x)
            _step(optimizer, [F.cross_entropy(logits, y), kd_loss(logits, target, temperature)], None, False)
    return _prefixed("edge", student.eval())


def entry_before(cloud: nn.Module, cloud_stage: str) -> str:
    """The cut stage whose output the adapter stands in for: the stage just before ``cloud_stage``."""
    names = stage_names(cloud)
    entries = names[1:]
    if cloud_stage not in entries:
        raise UserError(f"ecc: the cloud model has no entry stage {cloud_stage!r}; valid cloud_stage: "
                        f"{', '.join(entries)}")
    return names[names.index(cloud_stage) - 1]


def check_edge_stage(edge: nn.Module, edge_stage: str) -> None:
    names = stage_names(edge)
    if edge_stage not in names:
        raise UserError(f"ecc: the edge model has no stage {edge_stage!r}; valid edge_stage: {', '.join(names)}")


def train_adapter(resources: TrainingResources, data: _Data, edge: nn.Module, o) -> dict:
    """Knowledge adaptation (MSE to the cloud's own entry feature), then fine-tuning through the frozen cloud tail."""
    check_edge_stage(edge, o.edge_stage)
    cloud = _frozen(resources.foundation())
    before = entry_before(cloud, o.cloud_stage)
    edge_head = head_to(_frozen(edge), o.edge_stage)
    cloud_head, cloud_tail = split(cloud, before)
    sample = data.clean.images(data.indices[:1]).to(data.device)
    edge_shape = tuple(edge_head(sample).shape[1:])
    entry = feature_shapes(cloud, tuple(sample.shape[-2:]))[before]
    adapter = Adapter(edge_shape[0], entry, o.adapter_depth).to(data.device).train()
    optimizer = torch.optim.Adam(adapter.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    shift = (lambda x: perturb(x, generator)) if o.augment else (lambda x: x)
    for _ in range(o.ka_epochs):
        for _, x, _ in data.batches():
            x = shift(x)
            with torch.no_grad():
                source, target = edge_head(x), cloud_head(x)
            _step(optimizer, [F.mse_loss(adapter(source), target)], None, False)
    for _ in range(o.ft_epochs):
        for _, x, y in data.batches():
            x = shift(x)
            with torch.no_grad():
                source, teacher = edge_head(x), cloud_tail(cloud_head(x))
            logits = cloud_tail(adapter(source))
            losses = [F.cross_entropy(logits, y), kd_loss(logits, teacher, o.temperature)]
            _step(optimizer, losses, list(adapter.parameters()), o.pareto)
    state = _prefixed("adapter", adapter.eval())
    state["adapter_shape"] = torch.tensor([edge_shape[0], *entry])
    return state


def train_gate(resources: TrainingResources, data: _Data, edge: nn.Module, o, target: str) -> dict:
    """A gate on the edge's logits, trained on the perturbed clean split to predict that the edge's answer does not
    stand: ``target`` "wrong" (edge != label; recall-rate boosting weights that class by ``recall_weight``, and the
    communication cost is the mean offload probability times ``comm_weight``) or "disagree" (edge != cloud)."""
    edge = _frozen(edge)
    cloud = _frozen(resources.foundation()) if target == "disagree" else None
    gate = make_gate(resources.num_classes).to(data.device).train()
    optimizer = torch.optim.Adam(gate.parameters(), lr=LR * 10)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    weight = torch.tensor(float(getattr(o, "recall_weight", 1.0)), device=data.device)
    for _ in range(o.gate_epochs):
        for _, x, y in data.batches():
            x = perturb(x, generator)
            with torch.no_grad():
                logits = edge(x)
                label = logits.argmax(1) != (y if cloud is None else cloud(x).argmax(1))
            out = gate(gate_features(logits)).squeeze(1)
            losses = [F.binary_cross_entropy_with_logits(out, label.float(), pos_weight=weight)]
            comm = getattr(o, "comm_weight", 0.0)
            if comm > 0:
                losses.append(comm * torch.sigmoid(out).mean())
            _step(optimizer, losses, list(gate.parameters()), getattr(o, "pareto", False))
    return _prefixed("gate", gate.eval())


def load_gate(state: dict, num_classes: int) -> nn.Module:
    gate = make_gate(num_classes)
    gate.load_state_dict(_unprefixed("gate", state))
    return gate.eval()


def load_adapter(state: dict, depth: int) -> Adapter:
    cin, *shape = (int(v) for v in state["adapter_shape"])
    adapter = Adapter(cin, tuple(shape), depth)
    adapter.load_state_dict(_unprefixed("adapter", state))
    return adapter.eval()


# ---- edge and cloud halves --------------------------------------------------------------------------------------


def _load_edge(model: nn.Module, artefacts: dict | None) -> nn.Module:
    """The deployed edge: the distilled weights when the training stage produced them, else the source model."""
    state = _unprefixed("edge", artefacts or {})
    if state:
        model.load_state_dict(state)
    return model.eval()


class _DistilledGateEdge(ConfidenceGateEdge):
    def __init__(self, threshold: float, artefacts: dict | None):
        super().__init__(threshold)
        self.artefacts = artefacts

    def configure(self, model):
        return _load_edge(model, self.artefacts)


class _FeatureEdge(EdgeLogic):
    """ECC-A's edge: only the head up to ``stage`` runs; every sample's feature map goes up, nothing else."""

    def __init__(self, stage: str, dtype: str):
        self.stage, self.dtype = stage, dtype

    def configure(self, model):
        check_edge_stage(model, self.stage)
        return head_to(model.eval(), self.stage)

    def step(self, head, x):
        return EdgeDecision(logits=None, upload=torch.arange(len(x), device=x.device), payload={"feature": head(x)},
                            send_input=False, payload_dtype=self.dtype, await_answers=True)


class SplitEdge(nn.Module):
    """The edge model as head (through the sent stage) and the rest: one forward gives the feature and the logits."""

    def __init__(self, model: nn.Module, stage: str):
        super().__init__()
        self.head, self.rest = split(model, stage)

    def forward(self, x):
        feature = self.head(x)
        return feature, self.rest(feature)


class _DynamicEdge(EdgeLogic):
    """ECC-D's edge: the full edge model runs; the gate picks which samples' feature maps go up for the cloud's
    answer; the others keep the edge's prediction."""

    def __init__(self, o, gate: nn.Module | None, artefacts: dict | None):
        self.o, self.gate, self.artefacts = o, gate, artefacts

    def configure(self, model):
        check_edge_stage(model, self.o.edge_stage)
        if self.gate is not None:
            self.gate.to(next(model.parameters()).device)
        return SplitEdge(_load_edge(model, self.artefacts), self.o.edge_stage)

    def step(self, model, x):
        feature, logits = model(x)
        if self.gate is None:
            stands = logits.softmax(1).amax(1)
        else:
            stands = 1 - torch.sigmoid(self.gate(gate_features(logits)))[:, 0]
        upload = torch.where(stands < self.o.threshold)[0]
        payload = {"feature": feature[upload]} if len(upload) else {}  # the link's int8 encoder needs >= 1 row
        return EdgeDecision(logits=logits, upload=upload, payload=payload, send_input=False,
                            payload_dtype=self.o.payload_dtype, await_answers=True)


class _SwitchEdge(EdgeLogic):
    """The learned switcher's edge: the edge model and a gate predicting disagreement; raw inputs go up."""

    def __init__(self, threshold: float, gate: nn.Module):
        self.threshold, self.gate = threshold, gate

    def configure(self, model):
        self.gate.to(next(model.parameters()).device)
        return model.eval()

    def step(self, model, x):
        logits = model(x)
        agrees = 1 - torch.sigmoid(self.gate(gate_features(logits)))[:, 0]
        return EdgeDecision(logits=logits, upload=torch.where(agrees < self.threshold)[0], await_answers=True)


class _AdaptedCloud(CloudLogic):
    """The cloud of ECC-A/D: the adapter, then the foundation model from ``cloud_stage`` on; answers with logits."""

    def __init__(self, foundation: nn.Module, cloud_stage: str, adapter: Adapter, num_classes: int):
        foundation = foundation.eval()
        self.tail = split(foundation, entry_before(foundation, cloud_stage))[1]
        self.adapter = adapter.to(next(foundation.parameters()).device)
        self.num_classes = num_classes

    @torch.no_grad()
    def step(self, upload):
        feature = upload.payload.get("feature")
        if feature is None or len(feature) == 0:
            return CloudReply(answers=torch.zeros(len(upload), self.num_classes))
        return CloudReply(answers=self.tail(self.adapter(feature)))


# ---- the methods ------------------------------------------------------------------------------------------------


class ECCIndependent(Method):
    """ECC-I: a (distilled) edge offloads the raw inputs it is unsure of (max softmax < ``threshold``); the cloud's
    unadapted model answers for them."""

    name = "ecc-independent"
    cloud_replicas = "shared"  # one answering cloud serves every edge device
    paper = PAPER
    online_options = ("threshold",)
    mapping = CloudEdgeMapping(selection="edge: max softmax probability below a threshold",
                               uploads="unsure samples, raw (offloaded)", cloud="answers with the foundation model",
                               download="logits")

    @dataclass
    class Options:
        threshold: float = option(0.9, low=0, high=1)
        distill: bool = True
        epochs: int = option(2, low=0)
        temperature: float = option(2.0, low=0, above=True)
        train_samples: int = option(1024, low=1)

    def train(self, resources):
        if not self.options.distill or self.options.epochs == 0:
            return None
        data = _Data(resources, self.options.train_samples)
        return distill_edge(resources, data, self.options.epochs, self.options.temperature)

    def edge(self, num_classes):
        return _DistilledGateEdge(self.options.threshold, self.artefacts)

    def cloud(self, resources):
        return AnswerCloud(resources.foundation())


class ECCAdaptive(Method):
    """ECC-A: every sample's edge feature map at ``edge_stage`` goes up; the trained adapter maps it into the cloud
    model at ``cloud_stage``, whose remaining layers answer. The edge produces no prediction of its own."""

    name = "ecc-adaptive"
    cloud_replicas = "shared"  # one answering cloud serves every edge device
    paper = PAPER
    online_options = ("payload_dtype",)
    mapping = CloudEdgeMapping(selection="none", uploads="every sample's intermediate feature map (offloaded)",
                               cloud="adapter + the foundation model's later stages answer", download="logits")

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

    def check_models(self, edge, foundation):
        check_edge_stage(edge, self.options.edge_stage)
        entry_before(foundation, self.options.cloud_stage)

    def train(self, resources):
        data = _Data(resources, self.options.train_samples)
        return train_adapter(resources, data, resources.edge(), self.options)

    def edge(self, num_classes):
        return _FeatureEdge(self.options.edge_stage, self.options.payload_dtype)

    def cloud(self, resources):
        return _AdaptedCloud(resources.foundation(), self.options.cloud_stage,
                             load_adapter(self.artefacts, self.options.adapter_depth), resources.num_classes)


class ECCDynamic(Method):
    """ECC-D: ECC-A plus a per-sample decision on the edge (``gate``: ``confidence`` = max softmax, or ``learned`` =
    a gate trained with recall-rate boosting); only the offloaded samples' feature maps go up."""

    name = "ecc-dynamic"
    cloud_replicas = "shared"  # one answering cloud serves every edge device
    paper = PAPER
    online_options = ("threshold", "payload_dtype")
    mapping = CloudEdgeMapping(selection="edge: confidence or learned gate (recall-rate boosting)",
                               uploads="gated samples' intermediate feature maps (offloaded)",
                               cloud="adapter + the foundation model's later stages answer", download="logits")

    @dataclass
    class Options(ECCAdaptive.Options):  # ECC-A's options, plus the gate's
        gate: str = option("confidence", choices=GATES)
        threshold: float = option(0.9, low=0, high=1)
        recall_weight: float = option(4.0, low=0, above=True)
        comm_weight: float = option(0.1, low=0)
        distill: bool = False
        epochs: int = option(2, low=0)
        gate_epochs: int = option(3, low=0)

    check_models = ECCAdaptive.check_models  # the same stages, cut the same way

    def validate(self):
        if self.options.pareto and self.options.gate == "learned" and self.options.comm_weight == 0:
            raise UserError(f"{self.name}: pareto with the learned gate needs comm_weight > 0 (a zero objective's "
                            f"gradient is the min-norm point, and nothing would train); or set pareto = false")

    def train(self, resources):
        o = self.options
        data = _Data(resources, o.train_samples)
        state = distill_edge(resources, data, o.epochs, o.temperature) if o.distill and o.epochs else {}
        edge = _load_edge(resources.edge(), state)
        state.update(train_adapter(resources, data, edge, o))
        if o.gate == "learned":
            state.update(train_gate(resources, data, edge, o, "wrong"))
        return state

    def edge(self, num_classes):
        gate = load_gate(self.artefacts, num_classes) if self.options.gate == "learned" else None
        return _DynamicEdge(self.options, gate, self.artefacts)

    def cloud(self, resources):
        return _AdaptedCloud(resources.foundation(), self.options.cloud_stage,
                             load_adapter(self.artefacts, self.options.adapter_depth), resources.num_classes)


class LearnedSwitcher(Method):
    """Baseline: a small gate on the edge's logits, trained (on the perturbed clean split) to predict where edge and
    cloud disagree; those raw inputs are offloaded and the cloud's answer replaces the edge's."""

    name = "learned-switcher"
    cloud_replicas = "shared"  # one answering cloud serves every edge device
    paper = "learned edge/cloud switcher baseline"
    online_options = ("threshold",)
    mapping = CloudEdgeMapping(selection="edge: learned gate predicting edge/cloud disagreement",
                               uploads="samples predicted to disagree, raw (offloaded)",
                               cloud="answers with the foundation model", download="logits")

    @dataclass
    class Options:
        threshold: float = option(0.5, low=0, high=1)
        gate_epochs: int = option(3, low=0)
        train_samples: int = option(1024, low=1)

    def train(self, resources):
        data = _Data(resources, self.options.train_samples)
        return train_gate(resources, data, resources.edge(), self.options, "disagree")

    def edge(self, num_classes):
        return _SwitchEdge(self.options.threshold, load_gate(self.artefacts, num_classes))

    def cloud(self, resources):
        return AnswerCloud(resources.foundation())
