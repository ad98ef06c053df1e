"""CIFAR-10/100 classifiers as the ``cifar:`` model prefix, each taking 32-pixel images in [0, 1].

    cifar:<ARCH>[@<WEIGHTS>]

ARCH is one of two kinds:

- ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``: He et al.'s CIFAR ResNets (a 3x3 16-channel stem, three
  stages ``layer1``..``layer3`` of 16, 32, 64 channels, (depth - 2) / 6 basic blocks each, a 1x1-conv + BatchNorm
  shortcut where the shape changes) exactly as chenyaofo/pytorch-cifar-models builds them, so its published
  CIFAR-10 and CIFAR-100 weights load by their own parameter names.
- ``resnet18``, ``resnet34``, ``resnet50``: torchvision's ResNets with the usual CIFAR stem (a 3x3 stride-1 conv
  instead of the 7x7 stride-2 one, no max-pool), four stages ``layer1``..``layer4``. No canonical CIFAR weights exist
  for them, so they take a checkpoint (torchvision parameter names) or ``none``.

WEIGHTS is ``DATASET`` (the published weights trained on it; ``cifar10`` is the default), ``[DATASET:]none`` (seeded
random initialisation) or ``[DATASET:]PATH`` (a state-dict checkpoint). DATASET, ``cifar10`` or ``cifar100``, fixes
the number of classes (10 or 100) and the input normalisation: the training set's mean and std that chenyaofo's
training recipe uses (chenyaofo/image-classification-codebase, conf/cifar10.conf and conf/cifar100.conf), for both
kinds, so a checkpoint of ``resnet18``..``resnet50`` must have been trained on inputs normalised that way. Examples:
``cifar:resnet20`` (= ``cifar:resnet20@cifar10``), ``cifar:resnet56@cifar100``, ``cifar:resnet18@/ckpt/r18.pth``
(CIFAR-10), ``cifar:resnet50@cifar100:/ckpt/r50.pth``, ``cifar:resnet32@cifar100:none``.

Published weights are looked for, in order, in the weights folder (``--weights DIR`` / ``CEMABENCH_WEIGHTS``) by
their published file name (``DIR/cifar10_resnet20-4118986f.pt``), in the torch hub cache, and then downloaded with
torch.hub (as upstream does, without a hash check: the release does not say its file-name suffixes are SHA-256
prefixes), unless ``CEMABENCH_OFFLINE=1``: then a missing file is an
error that says where to put it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import get_model
from torchvision.models.resnet import BasicBlock

from cemabench.errors import UserError
from cemabench.models.layers import Normalized
from cemabench.models.layouts import CLASSIFIER, Stages, register_layout
from cemabench.models.zoo import hub_checkpoint, is_path, load_checkpoint, load_state, published_file, seeded


@dataclass(frozen=True)
class Dataset:
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# The normalisation of chenyaofo/image-classification-codebase's conf/cifar10.conf and conf/cifar100.conf, which
# trained the published weights (ToTensor, then Normalize(mean, std)).
DATASETS = {
    "cifar10": Dataset(10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": Dataset(100, (0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761)),
}
DEFAULT_DATASET = "cifar10"

BLOCKS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}  # basic blocks per stage: (depth - 2) / 6
TORCHVISION_STYLE = ("resnet18", "resnet34", "resnet50")
RELEASES = "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet"
# The suffix of each published file's name (pytorch_cifar_models/resnet.py's URLs).
PUBLISHED = {
    ("cifar10", "resnet20"): "4118986f", ("cifar10", "resnet32"): "ef93fc4d",
    ("cifar10", "resnet44"): "2a3cabcb", ("cifar10", "resnet56"): "187c023a",
    ("cifar100", "resnet20"): "23dac2f1", ("cifar100", "resnet32"): "84213ce6",
    ("cifar100", "resnet44"): "ffe32858", ("cifar100", "resnet56"): "f2eff4c8",
}


def published_url(dataset: str, arch: str) -> str:
    """Where chenyaofo/pytorch-cifar-models publishes the weights of ``arch`` trained on ``dataset``."""
    return f"{RELEASES}/{dataset}_{arch}-{PUBLISHED[dataset, arch]}.pt"


class CifarResNet(nn.Module):
    """A CIFAR ResNet of 6n + 2 layers (n basic blocks per stage; stages of 16, 32, 64 channels at 32, 16, 8 px),
    with chenyaofo/pytorch-cifar-models' parameter names: ``conv1``, ``bn1``, ``layer1``..``layer3`` of torchvision
    basic blocks (shortcut ``downsample`` = 1x1 conv + BatchNorm where the shape changes), ``fc``."""

    def __init__(self, blocks: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        channels = 16
        for stage, width in enumerate((16, 32, 64)):
            stride = 1 if stage == 0 else 2
            shortcut = None
            if stride != 1 or channels != width:
                shortcut = nn.Sequential(nn.Conv2d(channels, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            layer = [BasicBlock(channels, width, stride, shortcut)]
            layer += [BasicBlock(width, width) for _ in range(1, blocks)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():  # the upstream initialisation (torchvision's, for He et al.'s nets)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torchvision_cifar_resnet(arch: str, num_classes: int) -> nn.Module:
    """torchvision's ``arch`` with the CIFAR stem: a 3x3 stride-1 64-channel ``conv1`` and no max-pool (an
    ``nn.Identity``), so its state-dict names are torchvision's."""
    net = get_model(arch, weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net


def _parse(name: str) -> tuple[str, str, str]:
    """(arch, dataset, source) of ``ARCH[@WEIGHTS]``; source is ``published``, ``none`` or a checkpoint path."""
    arch, _, weights = name.partition("@")
    if arch not in BLOCKS and arch not in TORCHVISION_STYLE:
        raise UserError(f"unknown cifar model {arch!r}; valid: {', '.join(BLOCKS)} (published CIFAR-10/100 weights), "
                        f"{', '.join(TORCHVISION_STYLE)} (torchvision-style, a checkpoint path or @none)")
    if not weights or weights in DATASETS:
        return arch, weights or DEFAULT_DATASET, "published"
    dataset, colon, source = weights.partition(":")
    if not (colon and dataset in DATASETS):
        dataset, source = DEFAULT_DATASET, weights
    if source != "none" and not is_path(source):
        raise UserError(f"cifar:{arch} has no weights {weights!r}; valid: cifar10, cifar100 (published weights), "
                        f"[cifar10:|cifar100:]none, or [cifar10:|cifar100:]/path/to/checkpoint.pt")
    return arch, dataset, source


def _published(net: nn.Module, arch: str, dataset: str, spec: str) -> None:
    """Loads the published weights: from the weights folder by file name, else the torch hub cache, else download."""
    url = published_url(dataset, arch)
    local, advice = published_file(url, spec, f"cifar:{arch}@{dataset}:/path/to/weights.pt")
    if local is not None:
        load_checkpoint(net, str(local), spec)
        return
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=False, weights_only=True)
    except (OSError, RuntimeError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"weights for {spec} could not be downloaded or read ({problem}): {advice}") from error
    load_state(net, state, str(hub_checkpoint(url)), spec)


def cifar_model(name: str) -> nn.Module:
    """A CIFAR ResNet: resnet20/32/44/56[@cifar10 or @cifar100] (published weights), resnet18/34/50@[DATASET:]PATH.

    Every ARCH also takes ``@[DATASET:]none`` (seeded random weights) or ``@[DATASET:]PATH`` (DATASET: cifar10, the
    default, or cifar100); the model is in eval mode and takes images in [0, 1]. The module docstring has it all."""
    arch, dataset, source = _parse(name)
    spec = f"cifar:{name}"
    if arch in TORCHVISION_STYLE and source == "published":
        raise UserError(f"{spec}: there are no published CIFAR weights for {arch}; name a checkpoint as "
                        f"cifar:{arch}@{dataset}:/path/to/weights.pth (torchvision parameter names), or "
                        f"cifar:{arch}@{dataset}:none for random weights")
    data = DATASETS[dataset]
    net = seeded(lambda: CifarResNet(BLOCKS[arch], data.num_classes) if arch in BLOCKS
                 else torchvision_cifar_resnet(arch, data.num_classes))
    if source == "published":
        _published(net, arch, dataset, spec)
    elif source != "none":
        load_checkpoint(net, source, spec)
    return Normalized(net, data.mean, data.std).eval()


def _cifar_resnet(net: nn.Module) -> Stages:
    layers = [(f"layer{i}", [getattr(net, f"layer{i}")]) for i in range(1, 4)]
    return [("stem", [net.conv1, net.bn1, net.relu]), *layers, (CLASSIFIER, [net.avgpool, nn.Flatten(1), net.fc])]


register_layout("cemabench.models.cifar", "CifarResNet", _cifar_resnet)
