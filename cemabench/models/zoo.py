"""Pretrained models by name, each wrapped to take images in [0, 1] and normalise them itself.

    torchvision:<arch>[@WEIGHTS]   WEIGHTS: a torchvision weights name (default IMAGENET1K_V1, the weights CEMA's
                                   released code loads), ``none`` for random initialisation, or a checkpoint path
    timm:<arch>[@WEIGHTS]          WEIGHTS: ``pretrained`` (default), ``none``, or a checkpoint path
    tiny:<edge|foundation>[@C]     the miniature architectures with C (default 1000) random-weight outputs, for smoke
                                   runs (``@10`` for CIFAR-10, ``@100`` for CIFAR-100)

A weights folder (``--weights DIR``, or ``CEMABENCH_WEIGHTS``) is looked in before the torch and Hugging Face caches:
torchvision weights by their published file name (``DIR/resnet50-0676ba61.pth``), timm weights as
``DIR/<arch>.safetensors`` or ``DIR/<arch>.pth``. Nothing is downloaded when ``CEMABENCH_OFFLINE=1``: a missing file is
an error that says where to put it.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cemabench.errors import UserError
from cemabench.models.layers import Normalized
from cemabench.models.layouts import CLASSIFIER, Stages, register_layout
from cemabench.models.mini.nets import ARCHITECTURES, MiniResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _offline() -> bool:
    return os.environ.get("CEMABENCH_OFFLINE") == "1"


_WEIGHTS: contextvars.ContextVar[str | None] = contextvars.ContextVar("cemabench_weights", default=None)


@contextlib.contextmanager
def weights_folder(folder: str | os.PathLike | None):
    """Within this block, model loaders look in ``folder`` first (the ``--weights`` parameter; the runner enters it
    in every worker that builds models). ``None`` keeps the ``CEMABENCH_WEIGHTS`` fallback."""
    token = _WEIGHTS.set(None if folder is None else str(folder))
    try:
        yield
    finally:
        _WEIGHTS.reset(token)


def weights_dir() -> Path | None:
    """The folder of :func:`weights_folder` (``--weights``), else ``CEMABENCH_WEIGHTS`` (documented fallback)."""
    folder = _WEIGHTS.get() or os.environ.get("CEMABENCH_WEIGHTS")
    if folder and not Path(folder).is_dir():
        raise UserError(f"the weights folder {folder} (--weights / CEMABENCH_WEIGHTS) is not a directory")
    return Path(folder) if folder else None


def hub_checkpoint(url: str) -> Path:
    """Where torch.hub caches the file at ``url`` (torchvision weights, timm's non-Hugging-Face weights)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def published_file(url: str, spec: str, alternative: str) -> tuple[Path | None, str]:
    """A published weights file before any download: ``(path, "")`` when the weights folder holds it by its published
    name, else ``(None, advice)`` for torch.hub's cache or download, the advice saying where to put the file (or to
    name ``alternative``) should the download fail. Offline with the file in neither place: that advice, as an error."""
    file = os.path.basename(url)
    folder = weights_dir()
    if folder is not None and (folder / file).is_file():
        return folder / file, ""
    cached = hub_checkpoint(url)
    advice = (f"put {file} (from {url}) at {cached}" + (f" or in {folder}" if folder else "")
              + f", or name a local checkpoint as {alternative}")
    if not cached.is_file() and _offline():
        raise UserError(f"weights for {spec} are not cached and CEMABENCH_OFFLINE=1: {advice}")
    return None, advice


def is_path(weights: str) -> bool:
    return "/" in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))


def load_checkpoint(net: nn.Module, path: str, spec: str) -> None:
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} for {spec} does not exist")
    load_state(net, torch.load(path, map_location="cpu", weights_only=True), path, spec)


def load_state(net: nn.Module, state, source: str, spec: str) -> None:
    """Loads a state dict (or a checkpoint dict holding one under ``state_dict``) read from ``source`` into ``net``;
    a mismatch is a one-line error naming the first problem torch reports."""
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        first = " ".join(line.strip() for line in str(error).splitlines()[:2])
        raise UserError(f"checkpoint {source} does not fit {spec}: {first}") from error


# torchvision's COCO detectors offered for the detection task: they take images in [0, 1], normalise and resize them
# with their own fixed transform, and return boxes in the input's pixels (torchvision's detection references)
DETECTORS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2",
             "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large")


class Detector(nn.Module):
    """A torchvision detector that takes a batch tensor (N, 3, H, W) in [0, 1] and returns one dict of boxes, scores
    and labels (COCO category ids) per image."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        if len(x) == 0:  # a cloud step with no upload: torchvision's transform cannot batch no image
            return []
        return self.net(list(x.unbind(0)))


def seeded(build):
    """``build()`` with torch's random state seeded to 0, the caller's left untouched: ``@none`` gives the same random
    weights on every build, so that a run on them is reproducible (the cifar zoo's ``@none`` does the same)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def torchvision_detector(arch: str, weights: str, spec: str) -> nn.Module:
    """ARCH[@COCO_V1 (default) | other weights name | none | checkpoint path]; ``none`` builds no backbone weights
    either, so nothing is downloaded."""
    from torchvision import models

    weights = weights or "COCO_V1"
    if weights == "none" or is_path(weights):
        net = seeded(lambda: models.get_model(arch, weights=None, weights_backbone=None))
        if weights != "none":
            load_checkpoint(net, weights, spec)
        return Detector(net).eval()
    enum = models.get_model_weights(arch)
    if weights not in enum.__members__:
        raise UserError(f"{arch} has no weights {weights!r}; valid: {', '.join(enum.__members__)}, none, or a path")
    chosen = enum[weights]
    local, advice = published_file(chosen.url, f"{spec}@{weights}", f"torchvision:{arch}@/path/to/weights.pth")
    if local is not None:
        net = models.get_model(arch, weights=None, weights_backbone=None)
        load_checkpoint(net, str(local), spec)
        return Detector(net).eval()
    try:
        return Detector(models.get_model(arch, weights=chosen)).eval()
    except OSError as error:
        raise UserError(f"weights for {spec} could not be downloaded ({error}): {advice}") from error


def torchvision_model(name: str) -> nn.Module:
    """A torchvision classifier: ARCH[@IMAGENET1K_V1 (default) | other weights name | none | checkpoint path]; or
    one of the COCO detectors in :data:`DETECTORS` (default weights COCO_V1)."""
    from torchvision import models

    arch, _, weights = name.partition("@")
    if arch in DETECTORS:
        return torchvision_detector(arch, weights, f"torchvision:{name}")
    weights = weights or "IMAGENET1K_V1"
    spec = f"torchvision:{name}"
    if arch not in models.list_models():
        raise UserError(f"torchvision has no model {arch!r} (see torchvision.models.list_models())")
    if weights == "none" or is_path(weights):
        net = seeded(lambda: models.get_model(arch, weights=None))
        if weights != "none":
            load_checkpoint(net, weights, spec)
        return Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval()
    enum = models.get_model_weights(arch)
    if weights not in enum.__members__:
        raise UserError(f"{arch} has no weights {weights!r}; valid: {', '.join(enum.__members__)}, none, or a path")
    chosen = enum[weights]
    mean, std = list(chosen.transforms().mean), list(chosen.transforms().std)
    local, advice = published_file(chosen.url, f"{spec}@{weights}", f"torchvision:{arch}@/path/to/weights.pth")
    if local is not None:
        net = models.get_model(arch, weights=None)
        load_checkpoint(net, str(local), spec)
        return Normalized(net, mean, std).eval()
    try:
        net = models.get_model(arch, weights=chosen)
    except OSError as error:
        raise UserError(f"weights for {spec} could not be downloaded ({error}): {advice}") from error
    return Normalized(net, mean, std).eval()


def timm_model(name: str) -> nn.Module:
    """A timm classifier: ARCH[@pretrained (default) | none | checkpoint path], normalised with its own mean/std."""
    import timm

    arch, _, weights = name.partition("@")
    weights = weights or "pretrained"
    spec = f"timm:{name}"
    if not timm.list_models(arch):
        raise UserError(f"timm has no model {arch!r} (see timm.list_models())")
    pretrained = weights == "pretrained"
    folder = weights_dir()
    local = [folder / f"{arch}{suffix}" for suffix in (".safetensors", ".pth")] if folder and pretrained else []
    overlay = next(({"file": str(path)} for path in local if path.is_file()), None)
    if pretrained and _offline():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        net = timm.create_model(arch, pretrained=pretrained, pretrained_cfg_overlay=overlay)
    except Exception as error:
        where = f"at {local[0]}, " if local else ""
        raise UserError(f"timm could not build {spec} ({type(error).__name__}: {error}); offline, put the weights "
                        f"{where}in the Hugging Face cache (HF_HOME), or name a local checkpoint as "
                        f"timm:{arch}@/path.pth") from error
    if is_path(weights):
        load_checkpoint(net, weights, spec)
    cfg = net.pretrained_cfg
    return Normalized(net, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)).eval()


def tiny_model(name: str) -> nn.Module:
    """A miniature architecture with a C-way head (``KIND[@C]``, default 1000) and seeded random weights: fast
    end-to-end runs on real layouts, meaningless accuracy."""
    kind, _, classes = name.partition("@")
    if kind not in ARCHITECTURES:
        raise UserError(f"unknown tiny model {kind!r}; valid: {', '.join('tiny:' + k for k in ARCHITECTURES)} "
                        f"(optionally @CLASSES, e.g. tiny:edge@10)")
    if classes and not (classes.isdigit() and int(classes) >= 2):
        raise UserError(f"tiny:{name}: the number of classes after @ must be an integer >= 2, got {classes!r}")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MiniResNet(**ARCHITECTURES[kind], num_classes=int(classes or 1000)).eval()


class TimmResNetHead(nn.Module):
    """timm ResNet's ``forward_head``: its global pool, dropout at its ``drop_rate`` while training, its classifier."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.global_pool, self.fc, self.drop_rate = net.global_pool, net.fc, float(net.drop_rate)
        self.training = net.training  # its own flag only: the net's modules keep their modes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)


def _torchvision_resnet(net: nn.Module) -> Stages:
    layers = [(f"layer{i}", [getattr(net, f"layer{i}")]) for i in range(1, 5)]
    return [("stem", [net.conv1, net.bn1, net.relu, net.maxpool]), *layers,
            (CLASSIFIER, [net.avgpool, nn.Flatten(1), net.fc])]


def _timm_resnet(net: nn.Module) -> Stages:
    if getattr(net, "grad_checkpointing", False):
        raise UserError("a timm ResNet with gradient checkpointing on cannot be split; "
                        "call set_grad_checkpointing(False)")
    layers = [(f"layer{i}", [getattr(net, f"layer{i}")]) for i in range(1, 5)]
    return [("stem", [net.conv1, net.bn1, net.act1, net.maxpool]), *layers, (CLASSIFIER, [TimmResNetHead(net)])]


register_layout("torchvision.models.resnet", "ResNet", _torchvision_resnet)  # also the cifar: zoo's ResNet-18/34/50
register_layout("timm.models.resnet", "ResNet", _timm_resnet)
