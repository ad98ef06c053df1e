"""RMT (Döbler et al., CVPR 2023) on cloud-edge: the edge predicts with the ensemble of a student and its mean teacher,
both sent down by the cloud, which trains the student by the symmetric cross-entropy to the teacher, a contrastive
loss towards the source prototypes and a replay of the labelled source data, after a warm-up on the source data."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cemabench.errors import UserError
from cemabench.method import CloudEdgeMapping, CloudLogic, EdgeDecision, EdgeLogic, Method, option
from cemabench_methods.common import FeatureTap, last_linear, tta_augment
from cemabench_methods.cotta import symmetric_cross_entropy
from cemabench_methods.roid import roid_normalisation

FEATURES_USE = "contrasts the features that enter the classifier with the source prototypes"
TEACHER = "teacher"  # the teacher's copy of ``layer1.0.bn1.weight`` is ``layer1.0.bn1.teacher.weight``
PROTOTYPE_LIMIT = 100000  # released: the prototypes' pass stops once it holds more features than this


def trained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The released ``collect_params``: every module's own ``weight`` and ``bias`` (all of them trainable)."""
    model.requires_grad_(False)
    params = [p for m in model.modules() for n, p in m.named_parameters(recurse=False) if n in ("weight", "bias")]
    for p in params:
        p.requires_grad_(True)
    return params


def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """The released ``ema_update_model(..., update_all=True)``: every teacher parameter moves to momentum x itself
    + (1 - momentum) x the student's (nothing at momentum 1)."""
    if momentum < 1.0:
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.copy_(momentum * t + (1 - momentum) * s)


def nearest_prototypes(prototypes: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per feature row, the index of the source prototype of highest cosine similarity (released: ``topk(1)``)."""
    with torch.no_grad():
        c, (b, d) = len(prototypes), features.shape
        similarity = F.cosine_similarity(prototypes.view(c, 1, d).expand(c, b, d),
                                         features.view(1, b, d).expand(c, b, d), dim=-1)
        return similarity.topk(1, largest=True, dim=0).indices.squeeze(0)


def contrastive_loss(views: torch.Tensor, projector: nn.Module, temperature: float) -> torch.Tensor:
    """The released supervised-contrastive loss without labels (SupContrast, ``contrast_mode = "all"``): ``views``
    (B, V, D) are projected and L2-normalised view by view; each of the V B rows is an anchor whose positives are the
    other V - 1 views of its sample, against all other rows, at ``temperature`` (its base temperature equal to it)."""
    b, v = views.shape[:2]
    rows = F.normalize(projector(torch.cat(torch.unbind(views, dim=1), dim=0)), p=2, dim=1)
    logits = torch.div(rows @ rows.T, temperature)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    others = 1 - torch.eye(b * v, dtype=logits.dtype, device=logits.device)
    positives = torch.eye(b, dtype=logits.dtype, device=logits.device).repeat(v, v) * others
    log_prob = logits - torch.log((torch.exp(logits) * others).sum(1, keepdim=True))
    return -((positives * log_prob).sum(1) / positives.sum(1)).view(v, b).mean()


class SourceBatches:
    """The released source loader's batches (shuffled, the last batch of an epoch smaller), continued where the
    warm-up left off: ``order`` is the current epoch's permutation and ``position`` the next sample in it; a new epoch
    draws its permutation from torch's global generator."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 order: torch.Tensor | None = None, position: int = 0):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.order = torch.zeros(0, dtype=torch.int64) if order is None else order.cpu()
        self.position = position

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= len(self.order):
            self.order, self.position = torch.randperm(len(self.images)), 0
        chosen = self.order[self.position:self.position + self.batch_size]
        self.position += len(chosen)
        chosen = chosen.to(self.images.device)
        return self.images[chosen], self.labels[chosen]


def make_optimizer(params, o) -> torch.optim.Optimizer:
    """The released ``setup_optimizer`` (OPTIM.METHOD SGD or Adam)."""
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=(o.beta, 0.999), weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, dampening=0.0, weight_decay=o.weight_decay,
                           nesterov=o.nesterov)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state as named tensors (``optimizer.<index>.<key>``), for the artefacts."""
    return {f"optimizer.{i}.{k}": torch.as_tensor(v) for i, state in optimizer.state_dict()["state"].items()
            for k, v in state.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, artefacts: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in artefacts.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value.clone()
    if state:
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def load_parameters(model: nn.Module, artefacts: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(artefacts[f"{prefix}.{name}"])
    return model


def warm_up(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, batches: SourceBatches,
            steps: int, momentum: float) -> None:
    """The released warm-up: ``steps`` steps of the symmetric cross-entropy between the student's and the teacher's
    outputs on source batches (no labels), the learning rate rising linearly to its value, an EMA update after each."""
    final = [group["lr"] for group in optimizer.param_groups]
    for i in range(steps):
        for group, lr in zip(optimizer.param_groups, final):
            group["lr"] = lr * (i + 1) / steps
        x, _ = next(batches)
        loss = symmetric_cross_entropy(student(x), teacher(x)).mean(0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema_update(teacher, student, momentum)
    for group, lr in zip(optimizer.param_groups, final):
        group["lr"] = lr


def source_prototypes(tap: FeatureTap, batches: SourceBatches, num_classes: int) -> torch.Tensor:
    """The released class-wise source prototypes: one shuffled pass over the source data (until more than 100,000
    features), the mean feature of each class under the source model (batch statistics, as it adapts)."""
    features, labels = [], []
    with torch.no_grad():
        for _ in range(-(-len(batches.images) // batches.batch_size)):
            x, y = next(batches)
            features.append(tap(x)[0].detach().flatten(1))
            labels.append(y)
            if sum(len(f) for f in features) > PROTOTYPE_LIMIT:
                break
    features, labels = torch.cat(features), torch.cat(labels)
    missing = [c for c in range(num_classes) if not bool((labels == c).any())]
    if missing:
        raise UserError(f"rmt: the clean split holds no sample of class(es) {', '.join(map(str, missing[:10]))}"
                        f"{' ...' if len(missing) > 10 else ''}; its source prototypes need every class (give more "
                        f"source_samples, or a dataset whose clean split covers its classes)")
    return torch.stack([features[labels == c].mean(0) for c in range(num_classes)])


def hold_teacher(model: nn.Module) -> dict[str, nn.Parameter]:
    """Give every module that has parameters of its own a child ``teacher`` holding copies of them, so that the
    teacher's copy of ``layer1.0.bn1.weight`` is the edge model's ``layer1.0.bn1.teacher.weight``, a parameter the
    harness seals and a download names; returns, by the student's names, the teacher's parameters."""
    teacher = {}
    for path, module in list(model.named_modules()):
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if hasattr(module, TEACHER):
            raise UserError(f"rmt: module {path or type(model).__name__} of the edge model already has an attribute "
                            f"{TEACHER!r}, where rmt keeps the teacher's copy of its parameters")
        holder = nn.Module()
        for name, p in own:
            holder.register_parameter(name, nn.Parameter(p.detach().clone(), requires_grad=False))
            teacher[f"{path}.{name}" if path else name] = getattr(holder, name)
        module.add_module(TEACHER, holder)
    return teacher


def teacher_name(name: str) -> str:
    """The edge model's name of the teacher's copy of a parameter (``fc.weight`` -> ``fc.teacher.weight``)."""
    path, _, leaf = name.rpartition(".")
    return f"{path}.{TEACHER}.{leaf}" if path else f"{TEACHER}.{leaf}"


class _RMTEdge(EdgeLogic):
    """The student, with batch statistics, holding the teacher's parameters beside its own (:func:`hold_teacher`);
    the scored prediction is the sum of the student's logits and the teacher's (the same network run with the
    teacher's parameters); every sample goes up."""

    def __init__(self, artefacts: dict[str, torch.Tensor]):
        self.artefacts = artefacts

    def configure(self, model):
        model = load_parameters(roid_normalisation(model), self.artefacts, "student")
        self.teacher = hold_teacher(model)
        with torch.no_grad():
            for name, p in self.teacher.items():
                p.copy_(self.artefacts[f"{TEACHER}.{name}"])
        return model

    def step(self, model, x):
        logits = model(x) + torch.func.functional_call(model, self.teacher, (x,))
        return EdgeDecision(logits=logits, upload=torch.arange(len(x), device=x.device))


class _RMTCloud(CloudLogic):
    """The student (a replica of the edge), its mean teacher, the projector, the source prototypes and the labelled
    source data from the training stage."""

    def __init__(self, options, resources, artefacts: dict[str, torch.Tensor]):
        o = self.options = options
        self.student = load_parameters(roid_normalisation(resources.edge_replica()), artefacts, "student")
        self.tap = FeatureTap(self.student, "rmt", FEATURES_USE)
        self.teacher = load_parameters(copy.deepcopy(self.student), artefacts, TEACHER).requires_grad_(False)
        self.params = trained_parameters(self.student)
        self.optimizer = make_optimizer(self.params, o)
        load_optimizer_tensors(self.optimizer, artefacts)
        self.prototypes = artefacts["prototypes"]
        width = self.prototypes.shape[-1]
        self.projector = (nn.Identity() if o.projection_dim is None else
                          nn.Sequential(nn.Linear(width, o.projection_dim), nn.ReLU(),
                                        nn.Linear(o.projection_dim, o.projection_dim)).to(resources.device))
        if o.projection_dim is not None:
            self.optimizer.add_param_group({"params": list(self.projector.parameters()),
                                            "lr": self.optimizer.param_groups[0]["lr"]})
        self.source = SourceBatches(artefacts["source.images"], artefacts["source.labels"], o.source_batch_size,
                                    artefacts["source.order"], int(artefacts["source.position"]))

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The released ``loss_calculation``: the loss and the ensemble prediction (student + teacher logits)."""
        o = self.options
        features, logits = self.tap(x)
        features_aug, logits_aug = self.tap(tta_augment(x))
        teacher = self.teacher(x)
        nearest = nearest_prototypes(self.prototypes, features)
        views = torch.stack([self.prototypes[nearest], features, features_aug], dim=1)
        contrastive = contrastive_loss(views, self.projector, o.temperature)
        self_training = (0.5 * symmetric_cross_entropy(logits, teacher)
                         + 0.5 * symmetric_cross_entropy(logits_aug, teacher)).mean(0)
        loss = o.lambda_ce_trg * self_training + o.lambda_cont * contrastive
        if o.lambda_ce_src > 0:
            x_src, y_src = next(self.source)
            loss = loss + o.lambda_ce_src * F.cross_entropy(self.student(x_src), y_src)
        return loss, logits + teacher

    def step(self, upload):
        if len(upload.samples) == 0:
            return None
        loss, _ = self.loss(upload.samples)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        ema_update(self.teacher, self.student, self.options.teacher_momentum)
        down = {n: p.detach() for n, p in self.student.named_parameters()}
        down.update({teacher_name(n): p.detach() for n, p in self.teacher.named_parameters()})
        return down


class RMT(Method):
    """RMT, following the released code (mariodoebler/test-time-adaptation at
    8b2ed63255d906b6b0afaefc6ae630b9ec4bdaa1: ``classification/methods/rmt.py``, ``methods/base.py``,
    ``utils/losses.py``, ``utils/misc.py``, ``augmentations/transforms_cotta.py``, ``datasets/data_loading.py``,
    the defaults of ``conf.py`` and ``cfgs/imagenet_c/rmt.yaml``).

    The model is in eval mode with every BatchNorm on the current batch's statistics; every module's weight and bias
    is trained. A mean teacher (EMA 0.999 of all parameters) starts as a copy. Before the stream, the source data
    gives class-wise prototypes (the mean feature entering the classifier, per class, under the source model) and a
    warm-up of 50,000 // 64 steps: the symmetric cross-entropy (0.5 / 0.5) between student and teacher on source
    batches, the learning rate rising linearly to its value, an EMA update after each step. Per test batch: the
    student's features and logits on the batch and on one CoTTA augmentation of it (``get_tta_transforms``:
    :func:`cemabench_methods.common.tta_augment`, torchvision's v1 colour adjustments as released), the
    teacher's logits on the batch; each sample's nearest source prototype (cosine similarity of the features); the
    loss is lambda_ce_trg x the mean over samples of 0.5 SCE(student, teacher) + 0.5 SCE(augmented student, teacher)
    + lambda_cont x the supervised-contrastive loss (:func:`contrastive_loss`, temperature 0.1) on the three views
    (nearest prototype, features, augmented features) through a projector (linear 128, ReLU, linear 128, trained
    with the student at the same learning rate) + lambda_ce_src x the cross-entropy on a labelled source batch of 64
    (source replay); all lambdas 1. One SGD step (ImageNet-C configuration: lr 0.01, momentum 0.9, Nesterov, no
    weight decay; the CIFAR configurations use Adam, lr 0.001: ``optimizer = "adam"``, ``lr = 0.001``), then the EMA
    update of the teacher. The scored output is the sum of the student's and the teacher's logits, before the step.

    Where the source data comes from. The released code reads the source training set (ImageNet's training split)
    for the prototypes, the warm-up and the replay. Here the cloud's source data is the dataset's labelled clean
    split (the miniature's training split; on ImageNet the validation images, ROOT/imagenet/val), which only the
    offline training stage (``train``) reaches with its labels. So ``train`` computes the prototypes and the warm-up
    and hands the cloud the replay set: the clean split's images and labels (all of them, or a seeded random
    ``source_samples`` of them), with the warm-up's place in its shuffled epoch, so that the replay continues the
    released loader's sequence of epochs. No label of the test stream becomes reachable. The warm-up length and the
    replay batch are ``warm_up_samples`` // ``source_batch_size`` and ``source_batch_size`` (64, the released
    ImageNet-C batch size; the released code takes the test batch size: set it to a table's batch size to match).

    Where this port differs: the augmentation's side is the input's (the released code reads it from the model's
    preprocessing, 224 on ImageNet-C, the inputs' side there); the warm-up, the prototypes and the replay draw their
    own shuffles (the released prototype pass and the warm-up share the loader's random stream with the worker
    seeds); a class missing from the source data is refused (the released prototype is NaN); the released
    ``contrast_mode = "one"`` (whose anchors are the unprojected prototypes, which the released code can multiply
    only when the feature width equals ``projection_dim``), mixed precision, single-sample sliding windows and the
    reset (``RESET_AFTER_NUM_UPDATES``, 0 in the configurations) are not built; BatchNorm3d is adapted as the other
    layers (the released code leaves its statistics on). On ImageNet the replay set is held in memory: give
    ``source_samples``.
    Side by side with the released code in float64 (the miniature, mini:edge, its clean training split as the source
    data, a warm-up of 1,280 samples, then 6 batches of 64 of gaussian_noise, the replay crossing into a new epoch;
    the released loader replaying this port's shuffles, the projector's initial weights copied): 0 difference in the
    prototypes, the warmed-up student, teacher and SGD momentum, and at every step in the ensemble prediction (the
    cloud's and the edge's after its downloads), the loss, and the student, teacher, projector and momentum after it.

    Cloud-edge mapping. The edge holds both halves of the ensemble, the student and the teacher: its scored
    prediction is the sum of their logits with batch statistics (forward only), as released. The step needs the
    whole batch (batch statistics), the source data, the prototypes and the projector, so every sample goes up (its
    raw input only: the cloud recomputes the teacher's logits with its own, identical teacher) and the cloud takes
    the step and the EMA update; every parameter of the student and of the teacher comes down after every batch
    (the teacher's copy of ``fc.weight`` named ``fc.teacher.weight``, a parameter the edge
    model holds beside the student's), which is what RMT's ensemble costs on a link.
    """

    name = "rmt"
    paper = "Döbler et al., CVPR 2023"
    task_reason = ("it trains a mean teacher by the cross-entropy between class probabilities and replays labelled "
                   "source classes, which a detector's boxes do not give (no detection version of it is built)")
    mapping = CloudEdgeMapping(selection="none", uploads="every sample",
                               cloud="student step (SCE to the teacher + contrastive to source prototypes + source "
                                     "replay), EMA teacher; warm-up and prototypes offline on the labelled clean split",
                               download="all student and teacher parameters (edge: their ensemble's logits)")
    # what the training stage never reads (the warm-up needs neither the loss weights nor the projector)
    online_options = ("lambda_ce_src", "lambda_ce_trg", "lambda_cont", "temperature", "projection_dim")

    @dataclass
    class Options:
        lambda_ce_src: float = option(1.0, low=0)  # RMT.LAMBDA_CE_SRC (0: the source-free variant)
        lambda_ce_trg: float = option(1.0, low=0)  # RMT.LAMBDA_CE_TRG
        lambda_cont: float = option(1.0, low=0)  # RMT.LAMBDA_CONT
        warm_up_samples: int = option(50000, low=0)  # RMT.NUM_SAMPLES_WARM_UP (steps: // source_batch_size)
        source_batch_size: int = option(64, low=1)  # released: TEST.BATCH_SIZE (imagenet_c 64)
        source_samples: int | None = option(None, low=1)  # SOURCE.NUM_SAMPLES (None: all of the clean split)
        temperature: float = option(0.1, low=0, above=True)  # CONTRAST.TEMPERATURE
        projection_dim: int | None = option(128, low=1)  # CONTRAST.PROJECTION_DIM (None: no projector)
        teacher_momentum: float = option(0.999, low=0, high=1)  # M_TEACHER.MOMENTUM
        optimizer: str = option("sgd", choices=("sgd", "adam"))  # OPTIM.METHOD (imagenet_c: SGD; cifar*_c: Adam)
        lr: float = option(0.01, low=0, above=True, high=1)  # imagenet_c: 0.01 (cifar*_c: 0.001)
        momentum: float = option(0.9, low=0, high=1, below=True)  # OPTIM.MOMENTUM (SGD; dampening 0)
        nesterov: bool = True  # OPTIM.NESTEROV
        beta: float = option(0.9, low=0, high=1, below=True)  # OPTIM.BETA (Adam's first beta; the second 0.999)
        weight_decay: float = option(0.0, low=0)  # OPTIM.WD

    def check_models(self, edge, foundation):
        last_linear(edge, "rmt", FEATURES_USE)

    def needs_clean_split(self):
        return "its prototypes, warm-up and replay set come from it"

    def train(self, resources):
        """The prototypes and the warm-up on the labelled clean split, and the replay set for the cloud."""
        o, clean = self.options, resources.clean
        chosen = np.arange(len(clean))
        if o.source_samples is not None and o.source_samples < len(clean):
            chosen = torch.randperm(len(clean))[:o.source_samples].sort().values.numpy()
        images = clean.images(chosen).to(resources.device, torch.get_default_dtype())
        labels = torch.as_tensor(clean.labels()[chosen], dtype=torch.int64, device=resources.device)
        student = roid_normalisation(resources.edge())
        prototypes = source_prototypes(FeatureTap(student, "rmt", FEATURES_USE),
                                       SourceBatches(images, labels, o.source_batch_size), resources.num_classes)
        teacher = copy.deepcopy(student).requires_grad_(False)
        optimizer = make_optimizer(trained_parameters(student), o)
        batches = SourceBatches(images, labels, o.source_batch_size)
        warm_up(student, teacher, optimizer, batches, o.warm_up_samples // o.source_batch_size, o.teacher_momentum)
        return {**{f"student.{n}": p.detach() for n, p in student.named_parameters()},
                **{f"{TEACHER}.{n}": p.detach() for n, p in teacher.named_parameters()},
                **optimizer_tensors(optimizer), "prototypes": prototypes,
                "source.images": images, "source.labels": labels, "source.order": batches.order,
                "source.position": torch.tensor(batches.position)}

    def edge(self, num_classes):
        return _RMTEdge(self.artefacts)

    def cloud(self, resources):
        return _RMTCloud(self.options, resources, self.artefacts)
