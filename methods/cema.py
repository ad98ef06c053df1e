"""CEMA (Chen et al., ICLR 2024): selective entropy distillation from a cloud foundation model into the edge.

Follows the released code (chenyaofo/CEMA, conf/cema.conf) by default:

* both models use test-time batch renormalisation (:class:`BatchRenorm2d`) and train only normalisation affine
  parameters; SGD momentum 0.9, edge lr 0.0025, foundation lr 0.00025;
* the edge keeps samples with H < 0.4 ln C, then applies EATA's redundancy filter (|cos| < 0.05); the paper's dynamic
  threshold and low-entropy exclusion are options (``dynamic_warmup``/``dynamic_coeff``, ``entropy_min``), off as
  released (the released config never ends the warm-up);
* on its first batch the edge initialises its renormalisation statistics from that batch and uploads them, since in
  the released simulation edge and cloud replica are one object that shares them;
* the cloud accumulates uploads into batches of 32; per batch it takes one entropy step on the foundation model
  (weights exp(-(H - E_max)), no filtering), then one distillation step on the edge replica: the 32 samples plus 96
  replayed from a FIFO buffer of the last 10,000 uploads once it holds at least 256; loss = 3 * weighted edge
  entropy + 3 * KL(foundation || edge) + 1 * CE(edge, argmax foundation), both weighted by the foundation's
  exp(-(H - E_max));
* an edge batch that completes no cloud batch triggers one distillation step on 128 replayed samples when the buffer
  holds more than 256;
* after any cloud step the replica's normalisation state (affine parameters and statistics) goes down, so the edge
  predicts batch t with what the cloud produced up to batch t - 1.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cemabench.errors import UserError
from cemabench.method import CloudEdgeMapping, CloudLogic, EdgeDecision, EdgeLogic, Method, option
from cemabench_methods.common import (
    ENTROPY_ON_CLASSES,
    RedundancyFilter,
    entropy,
    entropy_threshold,
    entropy_weights,
    norm_state,
    set_batch_norm_training,
    sgd,
    train_norm_affine_only,
    use_batch_renorm,
)


class _CEMAEdge(EdgeLogic):
    def __init__(self, options, num_classes: int):
        self.options = options
        self.entropy_max = entropy_threshold(options.entropy_max, num_classes)
        self.entropy_min = entropy_threshold(options.entropy_min, num_classes)
        self.redundancy = RedundancyFilter(options.redundancy_margin)
        self.entropy_sum, self.entropy_count, self.warmup_mean = 0.0, 0, None
        self.statistics_sent = False

    def configure(self, model):
        model = use_batch_renorm(model)
        model.eval()
        return model

    def threshold(self) -> float | None:
        """The fixed E_max, or the paper's dynamic threshold once its warm-up has ended."""
        if self.warmup_mean is None or self.entropy_max is None:
            return self.entropy_max
        return (self.entropy_max * (self.entropy_sum / self.entropy_count) / self.warmup_mean
                * self.options.dynamic_coeff)

    def _track(self, ent: torch.Tensor) -> None:
        self.entropy_sum += float(ent.sum())
        self.entropy_count += len(ent)
        warmup = self.options.dynamic_warmup
        if warmup is not None and self.warmup_mean is None and self.entropy_count >= warmup:
            self.warmup_mean = self.entropy_sum / self.entropy_count

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        ent = entropy(logits)
        self._track(ent)
        keep = torch.arange(len(logits), device=logits.device)
        threshold = self.threshold()
        if threshold is not None:
            keep = keep[ent[keep] < threshold]
        if self.entropy_min is not None:
            keep = keep[ent[keep] > self.entropy_min]
        return keep[self.redundancy(logits[keep])]

    def step(self, model, x):
        logits = model(x)
        tensors = {}
        if not self.statistics_sent:
            tensors = {k: v for k, v in norm_state(model).items() if not k.endswith(("weight", "bias"))}
            self.statistics_sent = True
        return EdgeDecision(logits=logits, upload=self.select(logits), tensors=tensors)


class _RandomUploadEdge(_CEMAEdge):
    """Uploads a uniform random subset, keeping the running upload count at round(ratio * samples seen)."""

    def __init__(self, options, num_classes: int):
        super().__init__(options, num_classes)
        self.seen = self.sent = 0

    def select(self, logits):
        self.seen += len(logits)
        count = min(len(logits), max(0, round(self.options.upload_ratio * self.seen) - self.sent))
        self.sent += count
        return torch.randperm(len(logits))[:count].sort().values.to(logits.device)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, entropy_max: float | None, o) -> torch.Tensor:
    """alpha * weighted student entropy + beta * KL(teacher || student) * T^2 + gamma * CE(student, argmax teacher),
    the entropy term weighted by the student's exp(-(H - E_max)), the other two by the teacher's."""
    student_ent = entropy(student)
    weights = entropy_weights(entropy(teacher), entropy_max)
    t = o.temperature
    kl = F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="none").sum(-1) * t * t
    ce = F.cross_entropy(student, teacher.argmax(-1), reduction="none")
    return (o.alpha * (student_ent * entropy_weights(student_ent, entropy_max)).mean()
            + o.beta * (kl * weights).mean() + o.gamma * (ce * weights).mean())


class _CEMACloud(CloudLogic):
    def __init__(self, options, resources):
        self.options = options
        self.entropy_max = entropy_threshold(options.entropy_max, resources.num_classes)
        self.foundation = use_batch_renorm(resources.foundation())
        self.foundation.train()
        self.foundation_opt = sgd(train_norm_affine_only(self.foundation), options.foundation_lr, options.momentum,
                                  options.nesterov)
        self.replica = use_batch_renorm(resources.edge_replica())
        self.replica.train()
        self.replica_opt = sgd(train_norm_affine_only(self.replica), options.edge_lr, options.momentum,
                               options.nesterov)
        self.pending: list[torch.Tensor] = []
        self.replay: deque[torch.Tensor] = deque(maxlen=options.replay_size)

    def step(self, upload):
        if upload.tensors:
            self.replica.load_state_dict(upload.tensors, strict=False)
        samples = list(upload.samples.unbind(0))
        self.pending += samples
        if self.options.replay_size:
            self.replay.extend(samples)
        b = self.options.cloud_batch
        stepped = False
        while len(self.pending) >= b:
            batch, self.pending = torch.stack(self.pending[:b]), self.pending[b:]
            self._adapt_foundation(batch)
            if self.options.replay_size and len(self.replay) >= self.options.replay_min:
                batch = torch.cat([batch, self._replayed(b * self.options.replay_factor)])
            self._distill(batch)
            stepped = True
        if not stepped and self.options.replay_size and len(self.replay) > self.options.replay_min:
            self._distill(self._replayed(b * self.options.idle_replay_factor))
            stepped = True
        return norm_state(self.replica) if stepped else None

    def _replayed(self, count: int) -> torch.Tensor:
        index = torch.randperm(len(self.replay))[:count].tolist()
        return torch.stack([self.replay[i] for i in index])

    def _adapt_foundation(self, batch: torch.Tensor) -> None:
        set_batch_norm_training(self.foundation, True)
        ent = entropy(self.foundation(batch))
        loss = (ent * entropy_weights(ent, self.entropy_max)).mean()
        self.foundation_opt.zero_grad()
        loss.backward()
        self.foundation_opt.step()

    def _distill(self, batch: torch.Tensor) -> None:
        set_batch_norm_training(self.foundation, False)
        with torch.no_grad():
            teacher = self.foundation(batch)
        loss = distillation_loss(self.replica(batch), teacher, self.entropy_max, self.options)
        self.replica_opt.zero_grad()
        loss.backward()
        self.replica_opt.step()


class CEMA(Method):
    """Selective entropy distillation; the module docstring lists what follows the released code."""

    name = "cema"
    task_reason = ENTROPY_ON_CLASSES
    paper = "Chen et al., ICLR 2024"
    mapping = CloudEdgeMapping(selection="edge: entropy bounds and redundancy", uploads="selected samples",
                               cloud="adapts the foundation model, distils it into an edge replica with replay",
                               download="norm affine parameters and statistics")

    @dataclass
    class Options:
        entropy_max: float | None = option(0.4, low=0, high=1)  # fraction of ln C
        entropy_min: float | None = option(None, low=0, high=1)  # fraction of ln C; the authors' sweep used 0.02
        dynamic_warmup: int | None = option(None, low=1)  # samples; None = fixed threshold (released config)
        dynamic_coeff: float = option(0.6, low=0, above=True)
        redundancy_margin: float | None = option(0.05, low=0)
        edge_lr: float = option(0.0025, low=0, above=True, high=1)
        foundation_lr: float = option(0.00025, low=0, above=True, high=1)
        momentum: float = option(0.9, low=0, high=1, below=True)
        nesterov: bool = False
        cloud_batch: int = option(32, low=1)
        replay_size: int = option(10000, low=1)
        replay_min: int = option(256, low=0)
        replay_factor: int = option(3, low=0)
        idle_replay_factor: int = option(4, low=0)
        alpha: float = option(3.0, low=0)
        beta: float = option(3.0, low=0)
        gamma: float = option(1.0, low=0)
        temperature: float = option(1.0, low=0, above=True)

    def edge(self, num_classes):
        return _CEMAEdge(self.options, num_classes)

    def cloud(self, resources):
        return _CEMACloud(self.options, resources)


class RandomUpload(CEMA):
    """CEMA's cloud with uniform random uploads at a given rate, usually matched to a reference run's upload
    ratio (the table spec's ``match_uploads_of``). No entropy or redundancy filter at the edge."""

    name = "random-upload"
    paper = "Chen et al., ICLR 2024 (ablation)"
    mapping = CloudEdgeMapping(selection="edge: uniform at a matched rate", uploads="random samples",
                               cloud="as CEMA", download="as CEMA")

    @dataclass
    class Options(CEMA.Options):
        upload_ratio: float | None = option(None, low=0, high=1)  # fraction of samples to upload

    @classmethod
    def derive_options(cls, options, references):
        """``upload_ratio`` = the reference units' uploaded samples over seen samples (all their domains)."""
        if not references:
            return options
        seen = sum(r["seen"] for ref in references for r in ref["results"])
        uploaded = sum(r["link"]["uploaded"] for ref in references for r in ref["results"])
        return {**options, "upload_ratio": uploaded / seen if seen else 0.0}

    def validate(self):
        if self.options.upload_ratio is None:  # its bounds, [0, 1], are declared on the option
            raise UserError("random-upload needs upload_ratio, a number >= 0 and <= 1; in a table spec, "
                            "match_uploads_of = \"<method label>\" sets it from that method's run")

    def edge(self, num_classes):
        return _RandomUploadEdge(self.options, num_classes)


class DistillTent(CEMA):
    """CEMA's cloud without its selection: every sample goes up, the foundation model takes plain Tent steps
    (unweighted mean entropy) and is distilled into the edge replica with unweighted losses and the same replay."""

    name = "distill-tent"
    paper = "Chen et al., ICLR 2024 (baseline)"
    mapping = CloudEdgeMapping(selection="none", uploads="every sample",
                               cloud="Tent on the foundation model, distilled into an edge replica with replay",
                               download="norm affine parameters and statistics")

    @dataclass
    class Options(CEMA.Options):  # CEMA's options and their bounds, without the two filters
        entropy_max: float | None = None
        redundancy_margin: float | None = None
