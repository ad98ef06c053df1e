"""DeYO (Lee et al., ICLR 2024) on cloud-edge: the edge selects by entropy and by PLPD, the difference its prediction
shows when the object in the image is destroyed (patches shuffled), and the cloud minimises the weighted entropy."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import functional as TF

from cemabench.method import CloudEdgeMapping, EdgeDecision, option
from cemabench_methods.common import (
    ENTROPY_ON_CLASSES,
    LAST_STAGES,
    BatchStatisticsEdge,
    FrozenPatternsMethod,
    ReplicaCloud,
    entropy,
    norm_affine,
)

WEIGHT = "weight"  # the payload of an uploaded sample in the edge mapping: its sample weight
UNFILTERED_ENTROPY = math.log(1000)  # the released code's bound with the entropy filter off: ln 1000, whatever C is
UNFILTERED_PLPD = -2.0  # and with the PLPD filter off: below any PLPD, which lies in [-1, 1]


def _square(x: torch.Tensor, side: int, antialias: bool) -> torch.Tensor:
    """Resize to side x side as torchvision's ``Resize((side, side))`` does (unchanged when already that size)."""
    return TF.resize(x, [side, side], antialias=antialias)


def patch_shuffle(x: torch.Tensor, patches: int, antialias: bool = False) -> torch.Tensor:
    """DeYO's object-destructive transformation: cut each image into ``patches`` x ``patches`` tiles and put them back
    in a random order of its own.

    As released: the image is first resized to the largest multiple of ``patches`` not above its width (square, also
    for a non-square image), and back to its width afterwards; the order of sample i is the argsort of row i of one
    ``torch.rand(n, patches ** 2)`` drawn on the CPU's default generator, tile k of the output being tile order[k] of
    the input, tiles numbered row by row."""
    side = x.shape[-1]
    inner = side // patches * patches
    if inner == 0:
        raise ValueError(f"deyo: patch_len {patches} is larger than the images ({side} px); use patch_len <= {side}")
    x = _square(x, inner, antialias)
    n, c, tile = x.shape[0], x.shape[1], inner // patches
    tiles = x.reshape(n, c, patches, tile, patches, tile).permute(0, 2, 4, 1, 3, 5)  # (n, row, column, c, h, w)
    tiles = tiles.reshape(n, patches ** 2, c, tile, tile)
    order = torch.argsort(torch.rand(n, patches ** 2), dim=-1).to(x.device)
    tiles = tiles[torch.arange(n, device=x.device)[:, None], order]
    x = tiles.reshape(n, patches, patches, c, tile, tile).permute(0, 3, 1, 4, 2, 5).reshape(n, c, inner, inner)
    return _square(x, side, antialias)


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """The released ``pixel`` transformation: one random permutation of the pixel positions (``torch.randperm`` on
    the CPU's default generator), the same for every image and channel of the batch."""
    n, c, side = x.shape[0], x.shape[1], x.shape[-1]
    order = torch.randperm(x.shape[-2] * side).to(x.device)
    return x.flatten(2)[:, :, order].reshape(n, c, side, side)


def occlude(x: torch.Tensor, size: int, row: int, column: int) -> torch.Tensor:
    """The released ``occ`` transformation: a size x size window from (row, column) filled with each image's
    per-channel mean. A window that leaves the image is cut at its border (the released code raises there)."""
    x = x.clone()
    x[:, :, row:row + size, column:column + size] = x.flatten(2).mean(2)[:, :, None, None]
    return x


class DeYOSelection:
    """Both filters and the sample weights, from the logits of the batch's forward and one more forward pass of the
    samples that pass the entropy filter, object destroyed; what decides what the cloud learns from."""

    def __init__(self, options, num_classes: int):
        self.options = options
        log_c = math.log(num_classes)
        self.entropy_bound = options.entropy_margin * log_c if options.filter_entropy else UNFILTERED_ENTROPY
        self.plpd_bound = options.plpd_threshold if options.filter_plpd else UNFILTERED_PLPD
        self.reweight_margin = options.reweight_margin * log_c

    def destroy(self, x: torch.Tensor) -> torch.Tensor:
        o = self.options
        if o.augmentation == "patch":
            return patch_shuffle(x, o.patch_len, o.antialias)
        if o.augmentation == "pixel":
            return pixel_shuffle(x)
        return occlude(x, o.occlusion_size, o.row_start, o.column_start)

    def __call__(self, model, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices (into the batch) of the samples that pass both filters, and their weights (None when neither
        reweighting is on). The filters are strict where the released code's are: entropy < tau_Ent, PLPD > tau_PLPD;
        switched off, they keep entropy <= ln 1000 and PLPD >= -2."""
        logits = logits.detach()
        ent = entropy(logits)
        first = torch.where(ent <= self.entropy_bound if not self.options.filter_entropy
                            else ent < self.entropy_bound)[0]
        if len(first) == 0:
            return first, None
        with torch.no_grad():  # in batch-statistics mode: the destroyed samples are normalised among themselves
            destroyed = model(self.destroy(x[first].detach())).softmax(1)
        probs = logits[first].softmax(1)
        label = probs.argmax(1, keepdim=True)
        plpd = (probs.gather(1, label) - destroyed.gather(1, label)).reshape(-1)
        second = torch.where(plpd >= self.plpd_bound if not self.options.filter_plpd else plpd > self.plpd_bound)[0]
        keep = first[second]
        return keep, self.weights(ent[keep], plpd[second])

    def weights(self, ent: torch.Tensor, plpd: torch.Tensor) -> torch.Tensor | None:
        """alpha = 1 / exp(Ent - Ent_0) + 1 / exp(-PLPD), either term switched off by its flag (the released code's
        arithmetic, reciprocals of exponentials)."""
        o = self.options
        terms = ([torch.exp(ent - self.reweight_margin).reciprocal()] if o.reweight_entropy else []) + (
            [torch.exp(-plpd).reciprocal()] if o.reweight_plpd else [])
        return sum(terms[1:], terms[0]) if terms else None


class _DeYOEdge(BatchStatisticsEdge):
    """Edge selection: predicts the batch, applies both filters (one more forward pass, of the samples that pass the
    entropy filter) and uploads the selected samples with their weights."""

    def __init__(self, selection: DeYOSelection):
        self.selection = selection

    def step(self, model, x):
        logits = model(x)
        keep, weights = self.selection(model, x, logits)
        return EdgeDecision(logits=logits, upload=keep, payload={} if weights is None else {WEIGHT: weights})


class _WeightedEntropyCloud(ReplicaCloud):
    """Behind edge selection: one SGD step on the mean weighted entropy of the uploaded samples (forwarded on their
    own, so BatchNorm normalises them with their own statistics)."""

    def _update(self, ent: torch.Tensor, weights: torch.Tensor | None):
        loss = (ent if weights is None else ent.mul(weights)).mean(0)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return norm_affine(self.model)

    def step(self, upload):
        if len(upload.samples) == 0:
            return None
        return self._update(entropy(self.model(upload.samples)), upload.payload.get(WEIGHT))


class _DeYOCloud(_WeightedEntropyCloud):
    """Cloud selection: every sample comes up and the cloud runs the released update as it stands: the batch's forward
    with autograd, both filters, the weighted entropy of the selected samples from that same forward."""

    def __init__(self, replica, options, selection: DeYOSelection):
        super().__init__(replica, options.lr, options.momentum, options.nesterov, tuple(options.frozen))
        self.selection = selection

    def step(self, upload):
        x = upload.samples
        if len(x) == 0:
            return None
        logits = self.model(x)
        keep, weights = self.selection(self.model, x, logits)
        if len(keep) == 0:
            return None  # nothing passed: no step, as released; the edge keeps what it has
        return self._update(entropy(logits)[keep], weights)


class DeYO(FrozenPatternsMethod):
    """DeYO, following the released code (Jhyun17/DeYO at 3d7d2897d864907571ef75edf31f0028d53f1432, ``methods/deyo.py``
    and the defaults of ``config.py``).

    Each batch is forwarded with BatchNorm on batch statistics; samples with entropy < tau_Ent = 0.5 ln C pass the
    first filter; those are forwarded again (without autograd, as a batch of their own) with the object destroyed:
    ``patch`` (the default) cuts each image into 4 x 4 tiles and shuffles them, ``pixel`` permutes its pixels,
    ``occ`` fills a 112 px window at (56, 56) with its mean. PLPD, the probability of the original prediction's
    class minus its probability after destruction, must exceed tau_PLPD = 0.2. The loss is the mean over the
    selected samples of alpha * entropy, alpha = 1 / exp(Ent - Ent_0) + 1 / exp(-PLPD) with Ent_0 = 0.4 ln C
    (detached); one SGD step (lr 0.00025, momentum 0.9) on the affine parameters of the normalisation layers outside
    the last stage (``frozen``: ResNet ``layer4``, ViT blocks 9-11 and the final norm, as released), and no step when
    no sample passes. The scored prediction is the batch's forward before the update, as released.

    The released experiment script runs the mild ImageNet-C setting (ResNet-50-BN, batch 64) with tau_PLPD = 0.3 and
    the wild settings with 0.2 (``config.py``'s default, also mariodoebler/test-time-adaptation's); the table specs
    say which they use. The flags ``filter_entropy``, ``filter_plpd``, ``reweight_entropy`` and ``reweight_plpd`` are
    the released ablation switches. Where the released code depends on the torchvision it runs with: a width that is
    not a multiple of ``patch_len`` is resized bilinearly, without antialiasing in the released environment
    (torchvision 0.11), with it by default from torchvision 0.17 on (``antialias = true``).
    As for this repository's Tent and SAR, every BatchNorm (1d, 2d, 3d) normalises with batch statistics and is
    adapted, and dropout is off; the released code does both for BatchNorm2d only and leaves the model in train
    mode (the same on the networks of its experiments). mariodoebler/test-time-adaptation (at 8b2ed63) differs from
    the released code in: the model in eval mode, BatchNorm1d adapted, no filter switches, and SGD with Nesterov
    momentum in its ImageNet-C config.

    Cloud-edge mapping (``select_on``). The destroyed forward is a forward pass, so by default the edge selects:
    it predicts the batch, applies both filters and uploads only the selected samples, each with its weight alpha
    (one float, computed from the edge's forward of the whole batch, as released); the cloud forwards the uploaded
    samples on its replica of the edge and takes one SGD step on the mean of alpha times their entropy; the
    normalisation layers' affine parameters come down. As for ETA/EATA, the cloud's forward normalises the uploaded
    samples among themselves, where the released single-device step normalises them within the whole batch, so the
    step differs from the released one by those statistics; from the same parameters, predictions, selection and
    weights are the released ones (the weight crossing the link as float32, as any floating payload).
    ``select_on = "cloud"`` uploads every sample and the cloud runs the released step as it stands (selection on the
    cloud's replica, which equals the edge's model when downloads arrive without delay).
    """

    name = "deyo"
    task_reason = ENTROPY_ON_CLASSES
    paper = "Lee et al., ICLR 2024"
    mapping = CloudEdgeMapping(selection="edge: entropy, then PLPD of a patch-shuffled forward",
                               uploads="selected samples and their weights",
                               cloud="weighted entropy minimisation on an edge replica",
                               download="norm affine parameters")

    @dataclass
    class Options:
        select_on: str = option("edge", choices=("edge", "cloud"))
        entropy_margin: float = option(0.5, low=0, high=1)  # tau_Ent, a fraction of ln C (released: deyo_margin)
        reweight_margin: float = option(0.4, low=0)  # Ent_0, a fraction of ln C (released: deyo_margin_e0)
        plpd_threshold: float = option(0.2, low=-1, high=1)  # tau_PLPD; PLPD lies in [-1, 1]
        augmentation: str = option("patch", choices=("patch", "pixel", "occ"))  # released: aug_type
        patch_len: int = option(4, low=1)  # tiles per row and per column
        antialias: bool = False  # resizing to a multiple of patch_len, as torchvision 0.11 did (see the docstring)
        occlusion_size: int = option(112, low=1)
        row_start: int = option(56, low=0)
        column_start: int = option(56, low=0)
        filter_entropy: bool = True
        filter_plpd: bool = True
        reweight_entropy: bool = True
        reweight_plpd: bool = True
        lr: float = option(0.00025, low=0, above=True, high=1)  # an SGD step size: 1e300 would only diverge
        momentum: float = option(0.9, low=0, high=1, below=True)
        nesterov: bool = False
        frozen: tuple[str, ...] = LAST_STAGES

    def edge(self, num_classes):
        if self.options.select_on == "cloud":
            return BatchStatisticsEdge()
        return _DeYOEdge(DeYOSelection(self.options, num_classes))

    def cloud(self, resources):
        o = self.options
        if o.select_on == "cloud":
            return _DeYOCloud(resources.edge_replica(), o, DeYOSelection(o, resources.num_classes))
        return _WeightedEntropyCloud(resources.edge_replica(), o.lr, o.momentum, o.nesterov, tuple(o.frozen))
