"""The parts ECCENTRIC's architectures are made of, on every task and every detector family (:mod:`.eccentric_blocks`
assembles them into training stages and halves; :mod:`.eccentric_fpn` for torchvision's detectors): the adapter, the
gates, the training perturbation, the optimiser step (summed or min-norm objectives) and the artefacts' naming. See
:mod:`.eccentric` for what the paper says and what we chose."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cemabench_methods.pareto import min_norm_backward

BATCH = 64
LR = 1e-3


class Adapter(nn.Module):
    """Maps an edge feature map (C_e, H_e, W_e) to the cloud's entry shape (C_c, H_c, W_c): resampling, then
    ``depth`` x (3x3 conv, BatchNorm, ReLU); without the last ReLU unless ``relu`` (for an entry that can be
    negative)."""

    def __init__(self, in_channels: int, shape: tuple[int, int, int], depth: int, relu: bool = True):
        super().__init__()
        self.size = tuple(shape[1:])
        layers, cin = [], in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(cin, shape[0], 3, 1, 1, bias=False), nn.BatchNorm2d(shape[0]), nn.ReLU()]
            cin = shape[0]
        self.layers = nn.Sequential(*(layers if relu else layers[:-1]))  # (a ReLU holds no state: the same keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            down = x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]
            x = F.adaptive_avg_pool2d(x, self.size) if down else F.interpolate(x, self.size, mode="bilinear",
                                                                                 align_corners=False)
        return self.layers(x)


def gate_features(logits: torch.Tensor) -> torch.Tensor:
    """What a learned gate sees: the sorted softmax probabilities and the entropy divided by ln C."""
    probs = logits.float().softmax(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1, keepdim=True) / math.log(logits.shape[1])
    return torch.cat([probs.sort(1, descending=True).values, entropy], 1)


def make_gate(num_classes: int) -> nn.Module:
    """A small MLP whose output is the logit of "the edge's answer does not stand" (wrong / disagrees)."""
    return nn.Sequential(nn.Linear(num_classes + 1, 32), nn.ReLU(), nn.Linear(32, 1))


def perturb(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The gates' (and ``augment``'s) training perturbation: per sample, contrast scaled by U(0.2, 1), then Gaussian
    noise of std U(0, 0.3)."""
    n = len(x)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.2, 1.0, generator=generator).to(x)
    sigma = torch.empty(n, 1, 1, 1).uniform_(0.0, 0.3, generator=generator).to(x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    noise = torch.randn(x.shape, generator=generator).to(x)
    return ((x - mean) * contrast + mean + sigma * noise).clamp(0, 1)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton distillation: T^2 KL(softmax(teacher / T) || softmax(student / T))."""
    return F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def unprefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def optimise(optimizer, losses: list[torch.Tensor], params, pareto: bool) -> None:
    optimizer.zero_grad(set_to_none=True)
    if pareto and len(losses) > 1:
        min_norm_backward(losses, params)
    else:
        sum(losses).backward()
    optimizer.step()


def training_shift(augment: bool):
    """What the adapter's training does to the clean split's images: nothing, or with ``augment`` the gates'
    perturbation, from a generator seeded off torch's random stream."""
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    return (lambda x: perturb(x, generator)) if augment else (lambda x: x)


def adapt_knowledge(adapter: nn.Module, optimizer, data, epochs: int, shift, edge_head, cloud_head, distance) -> None:
    """Knowledge adaptation: ``epochs`` passes over ``data``'s batches, each step bringing the adapter's output on the
    edge's feature towards the cloud's own at the entry (``distance``: the MSE, or the sum of the maps' MSEs)."""
    for _ in range(epochs):
        for _, x, _ in data.batches():
            x = shift(x)
            with torch.no_grad():
                source, target = edge_head(x), cloud_head(x)
            optimise(optimizer, [distance(adapter(source), target)], None, False)
