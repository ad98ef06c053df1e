"""The detection miniature's edge and cloud detectors: small anchor-free detectors in the CenterNet style on
64-pixel canvases. A backbone of BatchNorm stages down to a 16x16 grid (stride 4), and a head that predicts per cell a
heatmap of object centres per category, the box's width and height and its centre's offset inside the cell.

In eval mode a detector returns what torchvision's detectors return: one dict of ``boxes`` (x1, y1, x2, y2 in input
pixels), ``scores`` and ``labels`` (category ids 1..10) per image, the ``TOP_K`` highest peaks of the heatmap (a peak
is a cell that is the maximum of its 3x3 neighbourhood). In train mode it returns the raw maps (:meth:`maps`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cemabench.models.layers import Normalize

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
STRIDE = 4
CLASSES = 10  # the digits, category ids 1..10
TOP_K = 20


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class MiniDetector(nn.Module):
    def __init__(self, widths: tuple[int, int, int], depth: int):
        super().__init__()
        self.normalize = Normalize(MEAN, STD)
        self.stem = _conv(3, widths[0], 2)  # 32 x 32
        self.layer1 = nn.Sequential(_conv(widths[0], widths[1], 2), *[_conv(widths[1], widths[1])
                                                                       for _ in range(depth - 1)])  # 16 x 16
        self.layer2 = nn.Sequential(*[_conv(widths[1] if i == 0 else widths[2], widths[2]) for i in range(depth)])
        self.head = nn.Sequential(nn.Conv2d(widths[2], widths[2], 3, 1, 1), nn.ReLU(),
                                  nn.Conv2d(widths[2], CLASSES + 4, 1))
        with torch.no_grad():  # CenterNet's prior: every cell starts as background, p = 0.1
            self.head[-1].bias[:CLASSES].fill_(-2.19)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """Per cell: CLASSES heatmap logits, then width and height (in cells) and the centre's x and y offset."""
        return self.head(self.layer2(self.layer1(self.stem(self.normalize(x)))))

    def forward(self, x: torch.Tensor):
        out = self.maps(x)
        return out if self.training else decode(out)


def decode(maps: torch.Tensor, k: int = TOP_K) -> list[dict[str, torch.Tensor]]:
    """The ``k`` best peaks of each image's heatmap as boxes, scores and category ids."""
    n, _, h, w = maps.shape
    heat = maps[:, :CLASSES].sigmoid()
    peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
    scores, where = peaks.reshape(n, CLASSES * h * w).topk(min(k, CLASSES * h * w))
    labels, cell = where // (h * w), where % (h * w)
    rows, cols = cell // w, cell % w
    geometry = maps[:, CLASSES:].reshape(n, 4, h * w).gather(2, cell[:, None].expand(n, 4, -1))
    size, offset = geometry[:, :2].clamp(min=0), geometry[:, 2:]
    cx = (cols + 0.5 + offset[:, 0]) * STRIDE
    cy = (rows + 0.5 + offset[:, 1]) * STRIDE
    half_w, half_h = size[:, 0] * STRIDE / 2, size[:, 1] * STRIDE / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)
    return [{"boxes": boxes[i], "scores": scores[i], "labels": labels[i] + 1} for i in range(n)]


ARCHITECTURES = {
    "edge": dict(widths=(8, 16, 16), depth=1),
    "cloud": dict(widths=(16, 48, 64), depth=3),
}


def build(kind: str) -> MiniDetector:
    return MiniDetector(**ARCHITECTURES[kind])
