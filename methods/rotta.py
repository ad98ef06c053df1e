"""RoTTA (Yuan et al., CVPR 2023) on cloud-edge: the edge predicts with the teacher and its robust BatchNorm
statistics; the cloud keeps the category-balanced memory bank, trains the student on it and sends the teacher down."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from cemabench.errors import UserError
from cemabench.method import CloudEdgeMapping, CloudLogic, EdgeDecision, EdgeLogic, Method, option
from cemabench_methods.common import tta_augment

PSEUDO_LABEL = "pseudo_label"  # per uploaded sample: the teacher's prediction (int32) ...
UNCERTAINTY = "uncertainty"  # ... and the entropy of its probabilities (float), what CSTU ranks by
ROBUST_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)  # the layers the released code replaces by robust BatchNorm
OTHER_NORMS = (nn.LayerNorm, nn.GroupNorm)


class RobustBatchNorm(nn.Module):
    """Robust batch normalisation (RBN): global statistics that move towards each batch's by ``alpha``.

    In training mode it normalises with mu = (1 - alpha) mu_g + alpha mu_b and var = (1 - alpha) var_g + alpha var_b
    (mu_b, var_b: the batch's mean and biased variance over every axis but the channels; gradients flow through
    them), and those become the global statistics. In eval mode it normalises with the global statistics and changes
    nothing. The global statistics start as the source BatchNorm's running statistics and keep its state-dict names
    (``running_mean``, ``running_var``). The arithmetic is the released layer's: (x - mu) / sqrt(var + eps) * w + b."""

    def __init__(self, bn: nn.BatchNorm1d | nn.BatchNorm2d, alpha: float):
        super().__init__()
        if bn.running_mean is None or bn.running_var is None or bn.weight is None or bn.bias is None:
            raise UserError("rotta: every BatchNorm layer of the edge model needs running statistics and affine "
                            "parameters (robust BatchNorm starts from them)")
        self.alpha, self.eps = alpha, bn.eps
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)
            mean = (1 - self.alpha) * self.running_mean + self.alpha * mean
            var = (1 - self.alpha) * self.running_var + self.alpha * var
            with torch.no_grad():
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
        else:
            mean, var = self.running_mean, self.running_var
        x = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return x * self.weight.view(shape) + self.bias.view(shape)


def use_robust_batch_norm(model: nn.Module, alpha: float) -> nn.Module:
    """Replace every BatchNorm1d and BatchNorm2d by :class:`RobustBatchNorm` (state-dict names of the affine
    parameters and statistics kept; ``num_batches_tracked`` dropped)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ROBUST_TYPES):
                setattr(module, child_name, RobustBatchNorm(child, alpha))
    return model


def teacher_entropy(probs: torch.Tensor) -> torch.Tensor:
    """The released uncertainty: sum_c -p_c log(p_c + 1e-6)."""
    return (-probs * torch.log(probs + 1e-6)).sum(1)


def timeliness_weights(ages: list[float]) -> torch.Tensor:
    """The time-aware reweighting exp(-a) / (1 + exp(-a)) of ages given as fractions of the capacity, in float32
    as released (the ages become a float32 tensor whatever the model's precision)."""
    a = torch.tensor(ages, dtype=torch.float32)
    return torch.exp(-a) / (1 + torch.exp(-a))


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per sample: -sum_c softmax(teacher)_c log softmax(student)_c."""
    return -(teacher.softmax(1) * student.log_softmax(1)).sum(1)


@dataclass
class MemoryItem:
    sample: torch.Tensor
    uncertainty: float
    age: int = 0


class CSTUMemory:
    """Category-balanced sampling with timeliness and uncertainty (CSTU): at most ``capacity`` samples, a share of
    capacity / C per predicted class, each scored lambda_t / (1 + exp(-age / capacity)) + lambda_u * U / ln C
    (higher: older, more uncertain, first to go).

    A new sample (age 0) of class c enters when the bank has room; otherwise it must displace the highest-scoring
    item (the last one found, class by class, on a tie) of class c, when c holds its share or more, or else of the
    classes that hold the most, and only when that item's score exceeds its own. Every item ages by one with every
    sample offered, admitted or not. ``contents`` lists the items class by class, each class in insertion order."""

    def __init__(self, capacity: int, num_classes: int, lambda_t: float, lambda_u: float):
        self.capacity, self.num_classes = capacity, num_classes
        self.share = capacity / num_classes
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.classes: list[list[MemoryItem]] = [[] for _ in range(num_classes)]

    def __len__(self) -> int:
        return sum(len(items) for items in self.classes)

    def score(self, age: int, uncertainty: float) -> float:
        return (self.lambda_t / (1 + math.exp(-age / self.capacity))
                + self.lambda_u * uncertainty / math.log(self.num_classes))

    def add(self, sample: torch.Tensor, label: int, uncertainty: float) -> bool:
        """Offer a sample; whether it was admitted."""
        admitted = self._make_room(label, self.score(0, uncertainty))
        if admitted:
            self.classes[label].append(MemoryItem(sample, uncertainty))
        for items in self.classes:
            for item in items:
                item.age += 1
        return admitted

    def _make_room(self, label: int, score: float) -> bool:
        if len(self.classes[label]) >= self.share:
            return self._evict([label], score)
        if len(self) < self.capacity:
            return True
        most = max(len(items) for items in self.classes)
        return self._evict([c for c, items in enumerate(self.classes) if len(items) == most], score)

    def _evict(self, classes: list[int], score: float) -> bool:
        worst = None  # (score, class, index)
        for c in classes:
            for i, item in enumerate(self.classes[c]):
                s = self.score(item.age, item.uncertainty)
                if worst is None or s >= worst[0]:
                    worst = (s, c, i)
        if worst is None:
            return True
        if worst[0] > score:
            del self.classes[worst[1]][worst[2]]
            return True
        return False

    def contents(self) -> tuple[list[torch.Tensor], list[float]]:
        """The samples and their ages as fractions of the capacity, class by class."""
        items = [item for items in self.classes for item in items]
        return [item.sample for item in items], [item.age / self.capacity for item in items]


class _RoTTAEdge(EdgeLogic):
    """The teacher on the edge: robust BatchNorm in eval mode (the global statistics, unchanged by a forward); every
    sample goes up with the teacher's pseudo-label and uncertainty."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def configure(self, model):
        return use_robust_batch_norm(model, self.alpha).eval()

    def step(self, model, x):
        logits = model(x)
        probs = logits.softmax(1)
        payload = {PSEUDO_LABEL: probs.argmax(1).to(torch.int32), UNCERTAINTY: teacher_entropy(probs)}
        return EdgeDecision(logits=logits, upload=torch.arange(len(x), device=x.device), payload=payload)


class _RoTTACloud(CloudLogic):
    """The memory bank, the student and the cloud's copy of the teacher."""

    def __init__(self, options, resources):
        o = self.options = options
        self.student = use_robust_batch_norm(resources.edge_replica(), o.alpha).requires_grad_(False)
        for module in self.student.modules():
            if isinstance(module, RobustBatchNorm) or (o.other_norms and isinstance(module, OTHER_NORMS)):
                module.requires_grad_(True)
        names = [n for n, p in self.student.named_parameters() if p.requires_grad]
        if not names:
            raise UserError("rotta: the edge model has no BatchNorm layer to adapt (the released code adapts "
                            "BatchNorm only; --option other_norms=true adds LayerNorm and GroupNorm)")
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        student, teacher = dict(self.student.named_parameters()), dict(self.teacher.named_parameters())
        params = [student[n] for n in names]
        if o.ema_all_parameters:  # as released; the frozen ones move only in their last bits, but they do move
            names = list(student)
        self.pairs = [(teacher[n], student[n]) for n in names]
        self.optimizer = (torch.optim.Adam(params, lr=o.lr, betas=(o.beta, 0.999), weight_decay=o.weight_decay)
                          if o.optimizer == "adam" else
                          torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                          nesterov=o.nesterov))
        statistics = [f"{n}.{b}" for n, m in self.teacher.named_modules() if isinstance(m, RobustBatchNorm)
                      for b in ("running_mean", "running_var")]
        self.download_names = names + statistics
        self.memory = CSTUMemory(o.memory_size, resources.num_classes, o.lambda_t, o.lambda_u)
        self.offered = 0

    def step(self, upload):
        if len(upload) == 0 or len(upload.samples) == 0:
            return None
        labels = upload.payload[PSEUDO_LABEL].tolist()
        uncertainties = upload.payload[UNCERTAINTY].tolist()
        updated = False
        for i, sample in enumerate(upload.samples):
            self.memory.add(sample, labels[i], uncertainties[i])
            self.offered += 1
            if self.offered % self.options.update_every == 0:
                self._update()
                updated = True
        if not updated:
            return None
        state = self.teacher.state_dict()
        return {n: state[n].detach() for n in self.download_names}

    def _update(self) -> None:
        """One step on the memory bank: the student sees a strong augmentation of each sample, the teacher (in
        training mode, so that its robust statistics move) the sample itself; the loss is the mean over the bank of
        the timeliness weight times the cross-entropy from the teacher's softmax to the student's. Then the teacher
        moves to (1 - nu) teacher + nu student."""
        self.student.train()
        self.teacher.train()
        samples, ages = self.memory.contents()
        if samples:
            x = torch.stack(samples)
            strong = tta_augment(x)
            teacher_logits = self.teacher(x)
            student_logits = self.student(strong)
            weights = timeliness_weights(ages).to(student_logits.device)
            loss = (soft_cross_entropy(student_logits, teacher_logits) * weights).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        nu = self.options.nu
        with torch.no_grad():
            for t, s in self.pairs:
                t.copy_((1 - nu) * t + nu * s)


class RoTTA(Method):
    """RoTTA, following the released code (BIT-DA/RoTTA at 67e34c900cdd355fc07e55edd4c577ea7b8ebcc9:
    ``core/adapter/rotta.py``, ``core/utils/memory.py``, ``core/utils/bn_layers.py``, the defaults of
    ``core/configs/defaults.py`` and ``configs/adapter/rotta.yaml``).

    Every BatchNorm1d/2d becomes robust BatchNorm (global statistics that move towards each training batch's by
    alpha = 0.05); only their affine parameters are trained. A mean teacher predicts in eval mode (its global
    statistics, no update); its softmax gives each sample a pseudo-label and an uncertainty sum -p log(p + 1e-6),
    under which the sample is offered to the CSTU memory bank (64 samples, a share of 64 / C per predicted class,
    eviction by lambda_t timeliness + lambda_u uncertainty, both 1). After every 64 samples offered (counted over
    the stream, so within a batch when the batch is not a multiple of 64) the student takes one Adam step (lr 0.001,
    betas (0.9, 0.999), no weight decay) on the bank: strong augmentation (CoTTA's, as released:
    :func:`~cemabench_methods.common.tta_augment`)
    for the student, the plain samples for the teacher, both in training mode, so both
    models' robust statistics move; the loss weights each sample's cross-entropy to the teacher by
    exp(-a) / (1 + exp(-a)), a = age / 64 (computed in float32, as released). Then the teacher moves to
    0.999 teacher + 0.001 student. The scored prediction is the teacher's forward before the batch's updates, as
    released.

    Where the released code differs from this port by default: its EMA runs over every parameter, the frozen ones
    too, where student and teacher are equal and 0.999 w + 0.001 w changes only the last bits; here it runs over
    the trained parameters, so that only they (and the statistics) need to come down. Those last bits reach the
    teacher's targets and, where Adam divides a tiny gradient by its own size, the student: side by side in float64
    (the miniature, mini:edge, 12 updates on each of two corruptions) the default differs from the released code by
    at most 4e-15 in logits and 5e-16 in parameters and statistics, but it can grow (8e-8 in the student after 4
    updates with the augmentation switched off). ``ema_all_parameters = true`` is the released EMA, every teacher
    parameter downloaded after an update (as for CoTTA), and matches the released code exactly (0 in every
    quantity). Dropout follows the model's train/eval mode, as released. The paper and the released code agree on
    the defaults above. mariodoebler/test-time-adaptation (at 8b2ed63) also trains LayerNorm and GroupNorm affine
    parameters (``other_norms = true``) and reads the augmentation's size from the model's preprocessing.

    Cloud-edge mapping. The edge holds the teacher with its robust statistics: in eval mode a forward changes
    nothing, so prediction, pseudo-label and uncertainty are forward-only. Every sample goes up with its pseudo-label
    (int32) and uncertainty (one float) because the memory bank, which the update reads, holds images: the bank, the
    student (with its own robust statistics), the optimiser and the cloud's copy of the teacher live in the cloud,
    which offers the uploaded samples to the bank in their order and updates after every 64 (a sample the budget
    refused is not counted). After a batch with at least one update, the teacher's trained affine parameters and the
    global statistics of every robust BatchNorm come down; the edge predicts the next batch with them, as released.
    The edge could upload only the samples CSTU admits (a sample not admitted is never trained on); that is not
    built, so the bank's decisions stay with the cloud.
    """

    name = "rotta"
    task_reason = (
        "it adapts a mean teacher by the cross-entropy between class probabilities and keeps a "
        "class-balanced memory of pseudo-labels, which a detector's boxes do not give (no detection "
        "version of it is built)")
    paper = "Yuan et al., CVPR 2023"
    mapping = CloudEdgeMapping(selection="none (the cloud's memory bank chooses)",
                               uploads="every sample, its pseudo-label and uncertainty",
                               cloud="CSTU memory bank; student step on it, EMA teacher, robust BN statistics",
                               download="teacher norm affine parameters and robust BN statistics")

    @dataclass
    class Options:
        memory_size: int = option(64, low=1)  # released: MEMORY_SIZE
        update_every: int = option(64, low=1)  # samples offered between updates; released: UPDATE_FREQUENCY
        nu: float = option(0.001, low=0, high=1)  # teacher EMA: teacher <- (1 - nu) teacher + nu student
        alpha: float = option(0.05, low=0, high=1)  # robust BatchNorm's step towards each batch's statistics
        lambda_t: float = option(1.0, low=0)
        lambda_u: float = option(1.0, low=0)
        optimizer: str = option("adam", choices=("adam", "sgd"))  # released: OPTIM.METHOD
        lr: float = option(0.001, low=0, above=True, high=1)
        beta: float = option(0.9, low=0, high=1, below=True)  # Adam's first beta (the second is 0.999)
        weight_decay: float = option(0.0, low=0)  # released: OPTIM.WD
        momentum: float = option(0.9, low=0, high=1, below=True)  # optimizer = "sgd" (released: OPTIM.MOMENTUM,
        nesterov: bool = True  # OPTIM.NESTEROV; dampening 0)
        ema_all_parameters: bool = False  # the released EMA over frozen parameters too (all of them come down)
        other_norms: bool = False  # also train LayerNorm/GroupNorm affine (mariodoebler/test-time-adaptation)

    def edge(self, num_classes):
        return _RoTTAEdge(self.options.alpha)

    def cloud(self, resources):
        if resources.num_classes < 2:
            raise UserError("rotta: CSTU scores uncertainty as a fraction of ln C, which needs at least 2 classes")
        return _RoTTACloud(self.options, resources)
