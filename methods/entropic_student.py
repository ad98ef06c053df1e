"""Entropic Student: supervised compression for split computing, with a learned entropy bottleneck.

Follows "Supervised Compression for Resource-Constrained Edge Computing Systems" (Matsubara, Yang, Levorato, Mandt,
WACV 2022) and its released configurations (yoshitomo-matsubara/supervised-compression,
``configs/ilsvrc2012/entropic_student/bottleneck_resnet50-b24ch_igdn-beta*_from_resnet50.yaml``):

- **The student.** The teacher's (the cloud's) early layers are replaced by a small encoder on the edge (from the
  image: 5x5 conv, GDN, 5x5 conv, GDN, 2x2 conv to ``bottleneck_channels``), an entropy bottleneck (Ballé et al.'s
  factorized prior, :mod:`.entropy_bottleneck`) and a decoder in the cloud (2x2 conv, IGDN, 2x2 conv, IGDN, 2x2
  conv) whose output stands in for the teacher's feature at the split; the teacher's later layers finish.
- **Stage 1, head distillation** (Adam, lr 1e-3, the learning rate x 0.1 at 50% and 80% of the epochs: the config's
  milestones 5 and 8 of 10): the encoder, bottleneck and decoder learn, the teacher's later layers frozen in the
  student, to minimise sum-reduced MSE between the student's and the teacher's feature at the split and after each
  later stage, plus ``beta`` times the rate in bits (-log2 of the factorized prior's likelihood of the noisy
  latents; the config's ``BppLoss`` with ``reduction: sum``).
- **Stage 2, fine-tuning** (SGD, lr 1e-3, momentum 0.9, weight decay 5e-4, lr x 0.1 at half the epochs): encoder and
  entropy model frozen, the decoder and the student's later layers learn from the quantised latents with the
  config's ``KDLoss``: 0.5 x Hinton distillation from the teacher at temperature 1 + 0.5 x cross-entropy.
- **Online.** Every sample goes up: the edge runs the encoder and sends the symbols round(y - m) (int32), which the
  harness entropy-codes with the bottleneck's tables (``payload_dtype = "entropy"``,
  :mod:`cemabench.protocol.bottleneck`), charging each bitstream's length; the cloud decodes what the bitstream
  decodes to (symbols + m), and the decoder and later layers answer. The edge model itself does not run (the
  deployed edge network is the encoder). The tables, the medians and the decoder are part of the deployed model,
  sent once, offline.

Where the miniature differs, or the paper is silent, we chose:

- The split: ``cloud_stage`` is the teacher stage the student's tail begins with; the decoder stands in for the
  output of the stage before it (ImageNet ResNet: ``layer2``, the decoder standing in for ``layer1``). The
  miniature's default is ``layer3`` (its stem does not downsample, so ``layer2``'s 16 x 16 output is where a 4x
  bottleneck's ``layer1`` sits in ResNet-50's geometry; it is also ECC-A's entry in the link tables). The encoder's
  two 5x5 convs have strides 2 and 2 in the paper; here their strides make the split feature's grid a downsampling
  of the input's by 1, 2 or 4 (the latent grid is one smaller, after the unpadded 2x2 conv, and the paper's decoder,
  2x2 convs with paddings 1, 0, 1, restores it: ResNet-50's 55 x 55 latents for its 56 x 56 ``layer1``).
- ``bottleneck_channels`` (the paper: 24 for ResNet-50's 256-channel ``layer1``) defaults to 8 for the miniature's
  32-channel split (the encoder's widths are 4x and 2x it, as in the paper).
- ``beta`` is the config's rate weight (0.01 to 2.56 in the released ImageNet configs, 0.16 the middle one); its
  default is that middle value, but what a beta means depends on the scale of the distillation term (a sum over
  ~1.5M feature values per ImageNet image, 12,288 on the miniature), so a sweep, not one value, gives the curve.
- Epochs: the configs train 10 + 10 epochs over 1.28M images; the miniature has a few hundred clean training
  images, so ``stage1_epochs`` and ``stage2_epochs`` default to more passes (batch 64) with the same schedules'
  shape. The entropy model's tail quantiles are found by bisection after stage 1 (CompressAI's
  ``_update_quantiles``) instead of its auxiliary loss; stage 2 then sees the latents rounded around their medians.
- ``prior_lr`` (1e-2; ours): the factorized prior's own parameters learn at 10x the config's rate. At 1e-3 the
  miniature's ~240 stage-1 steps (the configs run ~200k) leave the density at its initialisation: measured on the
  miniature, every channel's table stayed at ~5.1 bits per symbol and ~0.92 KiB per sample whatever beta (0.04 to
  2.56), so beta had no effect; at 1e-2 the density follows the latents and beta sets the rate.
- Training data: the clean training split the cloud keeps (at most ``train_samples`` images), as ECCENTRIC's here.
  ``augment`` (default false: the paper trains on clean images) trains both stages on ECCENTRIC's training
  perturbation of them (:func:`cemabench_methods.eccentric_blocks.perturb`: contrast reduction and Gaussian noise of
  random strength), the teacher seeing the same perturbed image; an option because it is ours, not the paper's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cemabench.errors import UserError
from cemabench.method import (
    CloudEdgeMapping,
    CloudLogic,
    CloudReply,
    EdgeDecision,
    EdgeLogic,
    EntropyTables,
    Method,
    TrainingResources,
    option,
)
from cemabench.models.split import Part, feature_shapes, split, stage_names, stages
from cemabench_methods.eccentric import Classification
from cemabench_methods.eccentric_blocks import (
    TrainingData,
    entry_before,
    frozen,
    kd_loss,
    perturb,
    prefixed,
    unprefixed,
)
from cemabench_methods.entropy_bottleneck import GDN, FactorizedPrior, bits

PAPER = "Matsubara et al., WACV 2022: Supervised Compression for Resource-Constrained Edge Computing Systems"
STRIDES = {1: (1, 1), 2: (2, 1), 4: (2, 2)}  # the encoder's two 5x5 convs, per downsampling to the split's grid


class Encoder(nn.Module):
    """The edge's encoder: 5x5 conv, GDN, 5x5 conv, GDN, 2x2 conv (no biases), as the paper's."""

    def __init__(self, channels: int, strides: tuple[int, int]):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, channels * 4, 5, strides[0], 2, bias=False), GDN(channels * 4),
            nn.Conv2d(channels * 4, channels * 2, 5, strides[1], 2, bias=False), GDN(channels * 2),
            nn.Conv2d(channels * 2, channels, 2, 1, 0, bias=False))

    def forward(self, x):
        return self.layers(x)


def decoder(channels: int, target: int) -> nn.Sequential:
    """The cloud's decoder to the split feature's ``target`` channels: 2x2 convs (paddings 1, 0, 1) with IGDN."""
    return nn.Sequential(
        nn.Conv2d(channels, target * 2, 2, 1, 1, bias=False), GDN(target * 2, inverse=True),
        nn.Conv2d(target * 2, target, 2, 1, 0, bias=False), GDN(target, inverse=True),
        nn.Conv2d(target, target, 2, 1, 1, bias=False))


class Student(nn.Module):
    """Encoder, entropy bottleneck and decoder: the student's head, standing in for the teacher's up to the split."""

    def __init__(self, channels: int, target: int, strides: tuple[int, int]):
        super().__init__()
        self.encoder = Encoder(channels, strides)
        self.bottleneck = FactorizedPrior(channels)
        self.decoder = decoder(channels, target)

    def forward(self, x):
        y_hat, likelihoods = self.bottleneck(self.encoder(x))
        return self.decoder(y_hat), likelihoods


def later_stages(cloud: nn.Module, before: str) -> list[Part]:
    """The cloud's stages after ``before``, each a :class:`Part` of its own modules, the classifier last."""
    steps = stages(cloud)
    start = [name for name, _ in steps].index(before) + 1
    return [Part([step], cloud.training) for step in steps[start:]]


def _schedule(optimizer, epochs: int, fractions: tuple[float, ...]):
    milestones = sorted({max(1, round(epochs * f)) for f in fractions})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)


class EntropicStudent(Method):
    """Entropic Student: an encoder on the edge, a learned entropy bottleneck whose symbols cross as a bitstream the
    harness writes, and a decoder plus the teacher's later layers (fine-tuned) in the cloud, which answers."""

    name = "entropic-student"
    paper = PAPER
    cloud_replicas = "shared"  # one answering cloud serves every edge device
    mapping = CloudEdgeMapping(selection="none", uploads="every sample's entropy-coded bottleneck (offloaded)",
                               cloud="decoder + the foundation model's later stages (fine-tuned) answer",
                               download="logits")

    @dataclass
    class Options:
        beta: float = option(0.16, low=0)
        cloud_stage: str = "layer3"
        bottleneck_channels: int = option(8, low=1, high=256)
        stage1_epochs: int = option(20, low=0)
        stage2_epochs: int = option(10, low=0)
        train_samples: int = option(1024, low=1)
        augment: bool = False
        prior_lr: float = option(1e-2, low=0, above=True)

    def check_models(self, edge, foundation):
        entry_before(foundation, self.options.cloud_stage)

    # ---- offline training ----------------------------------------------------------------------------------------

    def needs_clean_split(self):
        return "it trains its encoder, bottleneck and decoder on it"

    def train(self, resources: TrainingResources) -> dict:
        o = self.options
        objectives = Classification()
        data = TrainingData(resources, o.train_samples, objectives)
        teacher = frozen(resources.foundation())
        before = entry_before(teacher, o.cloud_stage)
        sample = data.clean.images(data.indices[:1]).to(data.device)
        target = feature_shapes(teacher, tuple(sample.shape[-2:]))[before]
        factor = sample.shape[-1] // target[-1]
        if factor not in STRIDES or sample.shape[-1] != factor * target[-1] or \
                sample.shape[-2] != factor * target[-2]:
            raise UserError(f"entropic-student: the split before {o.cloud_stage!r} has a {target[-2]}x{target[-1]} "
                            f"grid, for {sample.shape[-2]}x{sample.shape[-1]} inputs: the encoder downsamples by 1, 2 "
                            f"or 4; valid cloud_stage: {', '.join(self._stages(teacher))}")
        student = Student(o.bottleneck_channels, target[0], STRIDES[factor]).to(data.device)
        teacher_head, _ = split(teacher, before)
        tail = copy.deepcopy(teacher)  # the student's later layers: the teacher's, frozen in stage 1
        tail_parts = later_stages(tail, before)
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
        shift = (lambda x: perturb(x, generator)) if o.augment else (lambda x: x)
        self._head_distillation(student, teacher_head, later_stages(teacher, before), tail_parts, data, shift)
        student.bottleneck.update_quantiles()
        self._fine_tune(student, tail, tail_parts, teacher, data, shift)
        state = {**prefixed("encoder", student.encoder), **prefixed("bottleneck", student.bottleneck),
                 **prefixed("decoder", student.decoder), **prefixed("cloud", tail)}
        tables = student.bottleneck.tables()
        state.update({"tables.frequencies": tables.frequencies, "tables.offsets": tables.offsets,
                      "tables.escape": tables.escape,
                      "shape": torch.tensor([o.bottleneck_channels, target[0], *STRIDES[factor]])})
        return state

    @staticmethod
    def _stages(teacher) -> list[str]:
        return stage_names(teacher)[1:]

    def _head_distillation(self, student: Student, teacher_head, teacher_parts, tail_parts, data, shift) -> None:
        """Stage 1: sum-reduced MSE to the teacher's feature at the split and after each later stage (the classifier
        excluded), plus beta x bits; the student's later layers frozen."""
        student.train()
        for part in tail_parts:
            part.requires_grad_(False).eval()
        prior = list(student.bottleneck.parameters())
        rest = [p for p in student.parameters() if all(p is not q for q in prior)]
        optimizer = torch.optim.Adam([{"params": rest}, {"params": prior, "lr": self.options.prior_lr}], lr=1e-3)
        epochs = self.options.stage1_epochs
        scheduler = _schedule(optimizer, epochs, (0.5, 0.8))
        for _ in range(epochs):
            for _, x, _ in data.batches():
                x = shift(x)
                with torch.no_grad():
                    targets = [teacher_head(x)]
                    for part in teacher_parts[:-1]:
                        targets.append(part(targets[-1]))
                feature, likelihoods = student(x)
                outputs = [feature]
                for part in tail_parts[:-1]:
                    outputs.append(part(outputs[-1]))
                distortion = sum(F.mse_loss(s, t, reduction="sum") for s, t in zip(outputs, targets))
                loss = distortion + self.options.beta * bits(likelihoods)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()

    def _fine_tune(self, student: Student, tail: nn.Module, tail_parts, teacher, data, shift) -> None:
        """Stage 2: encoder and entropy model frozen; decoder and later layers learn from the quantised latents,
        0.5 x KD (temperature 1) + 0.5 x cross-entropy."""
        student.encoder.requires_grad_(False).eval()
        student.bottleneck.requires_grad_(False).eval()
        student.decoder.train()
        params = list(student.decoder.parameters())
        for part in tail_parts:
            part.requires_grad_(True).train()
            params += list(part.parameters())
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4)
        epochs = self.options.stage2_epochs
        scheduler = _schedule(optimizer, epochs, (0.5,))
        for _ in range(epochs):
            for _, x, y in data.batches():
                x = shift(x)
                with torch.no_grad():
                    soft = teacher(x)
                    latent = student.bottleneck.dequantize(student.bottleneck.symbols(student.encoder(x)))
                out = student.decoder(latent)
                for part in tail_parts:
                    out = part(out)
                loss = 0.5 * kd_loss(out, soft, 1.0) + 0.5 * F.cross_entropy(out, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
        tail.eval()

    # ---- the deployed halves -------------------------------------------------------------------------------------

    def _student(self) -> Student:
        channels, target, *strides = (int(v) for v in self.artefacts["shape"])
        student = Student(channels, target, tuple(strides))
        for name in ("encoder", "bottleneck", "decoder"):
            getattr(student, name).load_state_dict(unprefixed(name, self.artefacts))
        return student.eval()

    def entropy_tables(self) -> EntropyTables:
        a = self.artefacts
        return EntropyTables(frequencies=a["tables.frequencies"].cpu(), offsets=a["tables.offsets"].cpu(),
                             escape=a["tables.escape"].cpu())

    def edge(self, num_classes):
        return EncoderEdge(self._student())

    def cloud(self, resources):
        cloud = resources.foundation()
        cloud.load_state_dict(unprefixed("cloud", self.artefacts))
        return DecoderCloud(self._student(), cloud.eval(), entry_before(cloud, self.options.cloud_stage),
                            resources.num_classes)


class EncoderEdge(EdgeLogic):
    """The edge: the encoder, then the symbols round(y - m) of every sample, which the harness entropy-codes."""

    def __init__(self, student: Student):
        self.encoder, self.bottleneck = student.encoder, student.bottleneck

    def configure(self, model):
        device = next(model.parameters()).device
        self.bottleneck.to(device)
        return self.encoder.to(device).eval()

    def step(self, encoder, x):
        symbols = self.bottleneck.symbols(encoder(x))
        return EdgeDecision(logits=None, upload=torch.arange(len(x), device=x.device), payload={"latent": symbols},
                            send_input=False, payload_dtype="entropy", await_answers=True)


class DecoderCloud(CloudLogic):
    """The cloud: the decoder on what the bitstreams decoded to, then the fine-tuned later stages; answers."""

    def __init__(self, student: Student, cloud: nn.Module, before: str, num_classes: int):
        device = next(cloud.parameters()).device
        self.bottleneck, self.decoder = student.bottleneck.to(device), student.decoder.to(device)
        self.cloud, self.tail = cloud, split(cloud, before)[1]
        self.num_classes = num_classes

    @torch.no_grad()
    def step(self, upload):
        symbols = upload.payload.get("latent")
        if symbols is None or len(symbols) == 0:
            return CloudReply(answers=torch.zeros(len(upload), self.num_classes))
        return CloudReply(answers=self.tail(self.decoder(self.bottleneck.dequantize(symbols))))
