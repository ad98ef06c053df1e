"""The miniature's edge and foundation networks: small ResNets with BatchNorm on 32-pixel RGB images, their stages
named layer1..layer3 as in torchvision's ResNets."""
from __future__ import annotations

import torch
from torch import nn

from cemabench.models.layers import Normalize

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class MiniResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize(MEAN, STD)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stages, cin = len(widths), widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            layer = []
            for i in range(count):
                layer.append(BasicBlock(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(self.normalize(x))
        for stage in range(self.stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(x.mean(dim=(2, 3)))


ARCHITECTURES = {
    "edge": dict(widths=(8, 16, 32), blocks=(1, 1, 1)),
    "foundation": dict(widths=(16, 32, 64), blocks=(2, 2, 2)),
}


def build(kind: str) -> MiniResNet:
    return MiniResNet(**ARCHITECTURES[kind])
