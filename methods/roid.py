"""ROID (Marsden et al., WACV 2024) on cloud-edge: the edge predicts with batch statistics and corrects the prediction
by the batch's smoothed class prior; the cloud takes the certainty- and diversity-weighted soft-likelihood-ratio step on
a replica of the edge and ensembles the result with the source weights, which come down."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from cemabench.config import Protocol
from cemabench.errors import UserError
from cemabench.method import CloudEdgeMapping, CloudLogic, EdgeDecision, EdgeLogic, Method, option
from cemabench_methods.common import (
    BATCH_NORM_TYPES,
    colour_jitter,
    entropy,
    norm_affine,
    train_norm_affine_only,
    use_batch_statistics,
)
from cemabench_methods.cotta import symmetric_cross_entropy


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """Per sample, the released soft-likelihood-ratio loss: -sum_c p_c log(p_c / (1 - p_c) + eps), p = softmax(logits)
    clipped to at most ``clip``."""
    p = logits.softmax(1).clamp(min=0.0, max=clip)
    return -(p * torch.log(p / (torch.ones_like(p) - p) + eps)).sum(1)


def _min_max(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min()) / (v.max() - v.min())


def certainty_diversity_weights(logits: torch.Tensor, class_probs: torch.Tensor,
                                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ROID's sample weights and the mask of the samples they drop, from one batch's logits (detached).

    Diversity: 1 - cos(running class probabilities, p_i), min-max normalised over the batch; a sample below the
    batch's mean diversity is dropped (its weight 0). Certainty: the negative entropy, min-max normalised. The weight
    of a kept sample is exp(diversity x certainty / temperature)."""
    with torch.no_grad():
        diversity = _min_max(1 - F.cosine_similarity(class_probs.unsqueeze(0), logits.softmax(1), dim=1))
        dropped = diversity < diversity.mean()
        weights = torch.exp(diversity * _min_max(-entropy(logits)) / temperature)
        weights[dropped] = 0.0
    return weights, dropped


def prior_correction(logits: torch.Tensor) -> torch.Tensor:
    """The released prior correction of the scored output: the logits times the batch's smoothed prior
    (pi + s) / (1 + s C), pi the mean softmax over the batch, s = max(1 / N, 1 / C) / max(pi)."""
    with torch.no_grad():
        n, c = logits.shape
        prior = logits.softmax(1).mean(0)
        smooth = max(1 / n, 1 / c) / torch.max(prior)
        return logits * ((prior + smooth) / (1 + smooth * c))


def roid_augment(x: torch.Tensor) -> torch.Tensor:
    """The released consistency augmentation (``get_tta_transforms(..., padding_mode="reflect", cotta_augs=False)``):
    clip to [0, 1], CoTTA's colour jitter, reflection padding by half the side, a random affine map (rotation up to 15
    degrees, translation up to 1/16, scale 0.9 to 1.1, bilinear, fill 0), the centre crop back to the side, a horizontal
    flip with probability 0.5 and a clip; one draw per call, for the whole batch. The side is the input's height, where
    the released code takes it from the model's preprocessing (224 on ImageNet, which the inputs have)."""
    side = x.shape[-2]
    pipeline = T.Compose([T.Pad(side // 2, padding_mode="reflect"),
                          T.RandomAffine(degrees=(-15, 15), translate=(1 / 16, 1 / 16), scale=(0.9, 1.1),
                                         interpolation=T.InterpolationMode.BILINEAR, fill=0),
                          T.CenterCrop(side), T.RandomHorizontalFlip(0.5)])
    return pipeline(colour_jitter(x.clamp(0.0, 1.0))).clamp(0.0, 1.0)


def roid_normalisation(model: nn.Module) -> nn.Module:
    """The released configuration: the model in eval mode (stochastic depth and dropout off), every BatchNorm on the
    current batch's statistics (BatchNorm1d in train mode there, which normalises the same way)."""
    model = use_batch_statistics(model)
    for module in model.modules():
        if not isinstance(module, BATCH_NORM_TYPES):
            module.training = False
    return model


class _ROIDEdge(EdgeLogic):
    """The adapted model on the edge: predicts with batch statistics; the scored output is prior-corrected (forward
    only); every sample goes up."""

    def __init__(self, correct_prior: bool):
        self.correct_prior = correct_prior

    def configure(self, model):
        return roid_normalisation(model)

    def step(self, model, x):
        logits = model(x)
        if self.correct_prior:
            logits = prior_correction(logits)
        return EdgeDecision(logits=logits, upload=torch.arange(len(x), device=x.device))


class _ROIDCloud(CloudLogic):
    """A replica of the edge, trained by ROID's weighted loss, then merged (``merge``) with what it must not forget."""

    def __init__(self, options, resources, loss_batch_size: int):
        o = self.options = options
        self.model = roid_normalisation(resources.edge_replica())
        self.params = train_norm_affine_only(self.model)
        if not self.params:
            raise UserError(f"{type(self).__name__.strip('_').removesuffix('Cloud').lower()}: the edge model has no "
                            f"normalisation layer to adapt (BatchNorm, LayerNorm or GroupNorm)")
        self.trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.source = {n: p.detach().clone() for n, p in self.trained}
        self.optimizer = (torch.optim.Adam(self.params, lr=o.lr, betas=(o.beta, 0.999), weight_decay=o.weight_decay)
                          if o.optimizer == "adam" else
                          torch.optim.SGD(self.params, lr=o.lr, momentum=o.momentum, dampening=0.0,
                                          weight_decay=o.weight_decay, nesterov=o.nesterov))
        self.class_probs = torch.full((resources.num_classes,), 1 / resources.num_classes,
                                      device=self.params[0].device)
        self.loss_batch_size = loss_batch_size

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """The released loss on one batch: the weighted soft likelihood ratio of the kept samples, plus the weighted
        symmetric cross-entropy between an augmentation's output and the batch's (gradients through both), each
        summed and divided by the configured batch size."""
        o = self.options
        logits = self.model(x)
        if o.use_weighting:
            weights, dropped = certainty_diversity_weights(logits, self.class_probs, o.temperature)
            with torch.no_grad():
                self.class_probs = (o.momentum_probs * self.class_probs
                                    + (1 - o.momentum_probs) * logits.softmax(1).mean(0))
            kept = ~dropped
            loss = (soft_likelihood_ratio(logits) * weights)[kept].sum() / self.loss_batch_size
        else:
            loss = soft_likelihood_ratio(logits).sum() / self.loss_batch_size
        if o.use_consistency:
            augmented = self.model(roid_augment(x[kept]))
            consistency = symmetric_cross_entropy(augmented, logits[kept]) * weights[kept]
            loss = loss + consistency.sum() / self.loss_batch_size
        return loss

    @staticmethod
    def blend(into: torch.Tensor, other: torch.Tensor, momentum: float) -> None:
        """into <- momentum into + (1 - momentum) other, as the released ``ema_update_model`` (nothing at 1)."""
        if momentum < 1.0:
            into.copy_(momentum * into + (1 - momentum) * other)

    def merge(self) -> None:
        """ROID's weight ensembling: every trained parameter moves to momentum_src x itself + (1 - momentum_src) x
        its source value."""
        for name, p in self.trained:
            self.blend(p, self.source[name], self.options.momentum_src)

    def step(self, upload):
        if len(upload.samples) == 0:
            return None
        loss = self.loss(upload.samples)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            self.merge()
        return norm_affine(self.model)


@dataclass
class WeightedLossOptions:
    """The options ROID and CMF share: the released loss and optimiser (ImageNet-C configuration)."""

    use_weighting: bool = True  # released: ROID.USE_WEIGHTING
    use_prior_correction: bool = True  # ROID.USE_PRIOR_CORRECTION
    use_consistency: bool = True  # ROID.USE_CONSISTENCY
    momentum_probs: float = option(0.9, low=0, high=1)  # ROID.MOMENTUM_PROBS: the running class probabilities
    temperature: float = option(1 / 3, low=0, above=True)  # ROID.TEMPERATURE
    loss_batch_size: int | None = option(None, low=1)  # the loss's divisor (TEST.BATCH_SIZE); None: the edge batch
    optimizer: str = option("sgd", choices=("sgd", "adam"))  # OPTIM.METHOD (imagenet_c: SGD; cifar*_c: Adam)
    lr: float = option(0.00025, low=0, above=True, high=1)  # imagenet_c: 0.00025 (cifar*_c: 0.001)
    momentum: float = option(0.9, low=0, high=1, below=True)  # OPTIM.MOMENTUM (SGD; dampening 0)
    nesterov: bool = True  # OPTIM.NESTEROV
    beta: float = option(0.9, low=0, high=1, below=True)  # OPTIM.BETA (Adam's first beta; the second is 0.999)
    weight_decay: float = option(0.0, low=0)  # OPTIM.WD


class WeightedLossMethod(Method):
    """What ROID and CMF share: the options' check, the edge and the cloud's divisor."""

    task_reason = ("it adapts by a weighted soft likelihood ratio of each sample's class probabilities, which a "
                   "detector's boxes do not give (no detection version of it is built)")
    cloud_logic: type[_ROIDCloud] = _ROIDCloud
    min_batch_size = 2
    min_batch_reason = ("its certainty and diversity weights are min-max normalised over the batch, which one sample "
                        "makes 0 / 0 (the released code, whose single-sample mode adapts on a window of one sample by "
                        "default, turns every trained parameter into NaN at the first step)")

    def validate(self):
        if self.options.use_consistency and not self.options.use_weighting:
            raise UserError(f"{self.name}: use_consistency = true needs use_weighting = true (the released consistency "
                            f"term is weighted by, and taken over the samples kept by, the certainty and diversity "
                            f"weights; the released code fails without them); set use_consistency = false too")

    def edge(self, num_classes):
        return _ROIDEdge(self.options.use_prior_correction)

    def cloud(self, resources):
        divisor = self.options.loss_batch_size or (self.protocol or Protocol()).batch_size
        return self.cloud_logic(self.options, resources, divisor)


class ROID(WeightedLossMethod):
    """ROID, following the released code (mariodoebler/test-time-adaptation at
    8b2ed63255d906b6b0afaefc6ae630b9ec4bdaa1: ``classification/methods/roid.py``, ``methods/base.py``,
    ``utils/losses.py``, ``utils/misc.py``, ``augmentations/transforms_cotta.py``, the defaults of ``conf.py`` and
    ``cfgs/imagenet_c/roid.yaml``).

    The model is in eval mode with every BatchNorm on the current batch's statistics; the affine parameters of the
    BatchNorm, LayerNorm and GroupNorm layers are trained. Per batch: the forward's softmax gives each sample a
    diversity weight (1 - cosine similarity to a running mean of the batches' mean probabilities, which starts
    uniform and moves with momentum 0.9 after the weights are taken) and a certainty weight (negative entropy), each
    min-max normalised over the batch; samples below the mean diversity are dropped, the others weighted by
    exp(diversity x certainty / (1/3)). The loss is the weighted soft likelihood ratio (probabilities clipped at
    0.99, eps 1e-5) plus the weighted symmetric cross-entropy (0.5 / 0.5, gradients through both sides) between the
    output of an augmented copy of the kept samples (:func:`roid_augment`) and their own output, each summed and
    divided by the configured batch size (the protocol's, 64). One SGD step (ImageNet-C configuration: lr 0.00025,
    momentum 0.9, Nesterov, no weight decay; the CIFAR configurations use Adam, lr 0.001, ``optimizer = "adam"``,
    ``lr = 0.001``), then weight ensembling: every trained parameter moves to 0.99 x itself + 0.01 x its source
    value. The scored output is the forward's logits times the batch's smoothed prior (:func:`prior_correction`:
    the released code multiplies the logits, not the probabilities), from the parameters before the batch's step.

    Where this port differs: BatchNorm3d layers are adapted too (the released code leaves them frozen; no table's
    model has one); the augmentation's side is the input's (the released code reads it from the model's
    preprocessing, 224 on ImageNet-C, the inputs' side there); a batch of one sample is refused (``min_batch_size``:
    the min-max normalisation of the weights is 0 / 0 there, and the released code's parameters become NaN); the
    released reset
    (``RESET_AFTER_NUM_UPDATES``, 0 in the configurations) is not built. The released code cannot run
    ``use_consistency`` without ``use_weighting`` (it reads the mask the weighting makes); that pair is refused.
    Side by side with the released code in float64 (the miniature, mini:edge, batch 64, 12 batches on each of three
    corruptions, the same seeds for the augmentation): 0 difference in the scored output, the trained parameters (in
    the cloud and on the edge after the download), the SGD momentum buffers and the running class probabilities.

    Cloud-edge mapping. The edge holds the adapted model: its forward is the released one (batch statistics; the
    parameters of the last download), and the prior correction needs only that forward, so the scored prediction is
    made on the edge. The weights need the running class probabilities and BatchNorm normalises the kept samples
    within the whole batch, so every sample goes up and the cloud, which holds the replica, the optimiser, the
    running probabilities and the source parameters, computes the weights, takes the step and ensembles; the
    ensembled normalisation affine parameters come down after every batch.
    """

    name = "roid"
    paper = "Marsden et al., WACV 2024"
    mapping = CloudEdgeMapping(selection="none (the cloud weights and drops samples)", uploads="every sample",
                               cloud="certainty/diversity-weighted SLR + consistency step on an edge replica; "
                                     "weight ensembling with the source",
                               download="ensembled norm affine parameters (edge: prior correction of the output)")

    @dataclass
    class Options(WeightedLossOptions):
        momentum_src: float = option(0.99, low=0, high=1)  # ROID.MOMENTUM_SRC: the weight ensembling's
