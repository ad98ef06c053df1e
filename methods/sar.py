"""SAR (Niu et al., ICLR 2023) on cloud-edge: sharpness-aware, reliable entropy minimisation with model recovery."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from cemabench.method import CloudEdgeMapping, option
from cemabench_methods.common import (
    ENTROPY_ON_CLASSES,
    LAST_STAGES,
    BatchStatisticsEdge,
    FrozenPatternsMethod,
    ReplicaCloud,
    entropy,
    entropy_threshold,
)


class _SARCloud(ReplicaCloud):
    def __init__(self, replica, options, margin: float):
        super().__init__(replica, options.lr, options.momentum, options.nesterov, tuple(options.frozen))
        self.options, self.margin = options, margin
        self.ema: float | None = None
        self.resets = 0
        self._initial = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))

    def _reliable_entropy(self, x: torch.Tensor, keep: torch.Tensor | None = None):
        ent = entropy(self.model(x))
        return ent if keep is None else ent[keep]

    def step(self, upload):
        x = upload.samples
        if len(x) == 0:
            return None
        self.optimizer.zero_grad()
        ent = self._reliable_entropy(x)
        keep = torch.where(ent < self.margin)[0]
        ent[keep].mean(0).backward()
        perturbation = self._ascend()
        second = self._reliable_entropy(x, keep)
        loss = second[torch.where(second < self.margin)[0]].mean(0)
        if not math.isnan(loss.item()):
            self.ema = loss.item() if self.ema is None else 0.9 * self.ema + 0.1 * loss.item()
        loss.backward()
        with torch.no_grad():
            for p, e in perturbation:
                p.sub_(e)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.ema is not None and self.ema < self.options.reset_threshold:
            self._recover()
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def _ascend(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """SAM's first step: move to w + rho * g / ||g|| and remember the move."""
        with_grad = [p for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in with_grad]), p=2)
        scale = self.options.rho / (norm + 1e-12)
        moves = []
        with torch.no_grad():
            for p in with_grad:
                e = p.grad * scale
                p.add_(e)
                moves.append((p, e))
        self.optimizer.zero_grad()
        return moves

    def _recover(self) -> None:
        self.model.load_state_dict(self._initial[0])
        if self.options.reset_clears_momentum:
            self.optimizer.load_state_dict(self._initial[1])
        self.resets += 1
        if self.options.reset_clears_ema:
            self.ema = None


class SAR(FrozenPatternsMethod):
    """Entropy filter H < 0.4 ln C, a sharpness-aware step (SAM, rho 0.05) whose second forward filters again, and
    model recovery: an EMA (0.9 / 0.1) of the second loss below 0.2 restores the source weights.

    The official code clears the EMA on recovery and then overwrites it with the low value that triggered it, so
    recovery repeats until the EMA climbs back above 0.2 (``reset_clears_ema = false``, the default); the paper's
    intent, a fresh EMA after each recovery, is ``reset_clears_ema = true``.

    Recovery in the official code restores the weights and reloads the state of its SAM wrapper, which holds none
    of the inner SGD's momentum buffers, so those survive and the first steps after a recovery still move along
    the old momentum (``reset_clears_momentum = false``, the default); the paper's intent, recovery to the initial
    state with a fresh optimiser, is ``reset_clears_momentum = true``. Norm affine parameters of the last stage stay
    frozen (``frozen``: module-name patterns, as in the official code; ResNet ``layer4``, ViT blocks 9-11).
    """

    name = "sar"
    task_reason = ENTROPY_ON_CLASSES
    paper = "Niu et al., ICLR 2023"
    mapping = CloudEdgeMapping(selection="none (the cloud filters)", uploads="every sample",
                               cloud="sharpness-aware step on an edge replica, with recovery",
                               download="norm affine parameters")

    @dataclass
    class Options:
        entropy_margin: float = option(0.4, low=0, high=1)  # fraction of ln C
        rho: float = option(0.05, low=0)
        reset_threshold: float = option(0.2, low=0)
        reset_clears_ema: bool = False
        reset_clears_momentum: bool = False
        lr: float = option(0.00025, low=0, above=True, high=1)  # an SGD step size: 1e300 would only diverge
        momentum: float = option(0.9, low=0, high=1, below=True)
        nesterov: bool = False
        frozen: tuple[str, ...] = LAST_STAGES

    def edge(self, num_classes):
        return BatchStatisticsEdge()

    def cloud(self, resources):
        return _SARCloud(resources.edge_replica(), self.options,
                         entropy_threshold(self.options.entropy_margin, resources.num_classes))
