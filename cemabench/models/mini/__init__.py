"""The miniature's edge and foundation networks (``mini:edge``, ``mini:foundation``) with their shipped weights,
trained on the miniature's clean training split by :mod:`.train`."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cemabench.errors import UserError
from cemabench.models.layouts import CLASSIFIER, Stages, register_layout
from cemabench.models.mini import nets

WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped(kind: str, architectures: dict, build, weights: Path, prefix: str) -> torch.nn.Module:
    """A network shipped with cemabench (``prefix:kind``), built by ``build(kind)`` and loaded from ``weights``."""
    if kind not in architectures:
        raise UserError(f"unknown model {prefix}:{kind}; valid: {', '.join(f'{prefix}:{k}' for k in architectures)}")
    model = build(kind)
    model.load_state_dict(torch.load(weights / f"{kind}.pt", weights_only=True))
    return model.eval()


def load_model(kind: str) -> torch.nn.Module:
    """A shipped miniature network (``edge`` or ``foundation``) with its trained weights."""
    return shipped(kind, nets.ARCHITECTURES, nets.build, WEIGHTS_DIR, "mini")


class SpatialMean(nn.Module):
    """Global average pooling written as the miniature nets write it, ``x.mean(dim=(2, 3))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _stages(net: nets.MiniResNet) -> Stages:
    layers = [(f"layer{i}", [getattr(net, f"layer{i}")]) for i in range(1, net.stages + 1)]
    return [("stem", [net.normalize, net.stem]), *layers, (CLASSIFIER, [SpatialMean(), net.fc])]


register_layout("cemabench.models.mini.nets", "MiniResNet", _stages)
