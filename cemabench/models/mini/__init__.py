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


def load_model(kind: str) -> torch.nn.Module:
    """A shipped miniature network (``edge`` or ``foundation``) with its trained weights."""
    if kind not in nets.ARCHITECTURES:
        valid = ", ".join("mini:" + k for k in nets.ARCHITECTURES)
        raise UserError(f"unknown miniature model {kind!r}; valid: {valid}")
    model = nets.build(kind)
    model.load_state_dict(torch.load(WEIGHTS_DIR / f"{kind}.pt", weights_only=True))
    return model.eval()


class SpatialMean(nn.Module):
    """Global average pooling written as the miniature nets write it, ``x.mean(dim=(2, 3))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _stages(net: nets.MiniResNet) -> Stages:
    layers = [(f"layer{i}", [getattr(net, f"layer{i}")]) for i in range(1, net.stages + 1)]
    return [("stem", [net.normalize, net.stem]), *layers, (CLASSIFIER, [SpatialMean(), net.fc])]


register_layout("cemabench.models.mini.nets", "MiniResNet", _stages)
