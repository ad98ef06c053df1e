"""Input normalisation inside a model, so that every cemabench model takes images in [0, 1]."""
from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """Input normalisation inside the model, so every model takes images in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class Normalized(nn.Module):
    """A network behind its input normalisation; state-dict names get the prefix ``net.``."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x):
        return self.net(self.normalize(x))
