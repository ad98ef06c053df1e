"""Edge-only baselines that never use the link: the source model, and BatchNorm statistics adaptation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cemabench.method import CloudEdgeMapping, EdgeDecision, EdgeLogic, Method, option
from cemabench_methods.common import BATCH_NORM_TYPES

EDGE_ONLY = CloudEdgeMapping(selection="edge only", uploads="none", cloud="nothing", download="none")


class _PredictOnly(EdgeLogic):
    def step(self, model, x):
        return EdgeDecision(logits=model(x))


class _SourceEdge(_PredictOnly):
    def configure(self, model):
        return model.eval()

    def step(self, model, x):
        return EdgeDecision.predicting(model(x))  # logits, or a detector's boxes


class Source(Method):
    """The source edge model, unchanged: the lower bound."""

    name = "source"
    paper = "-"
    mapping = EDGE_ONLY
    reference = "edge"  # everything on the edge: a reference point of the trade-off plots
    tasks = ("classification", "detection")

    def edge(self, num_classes):
        return _SourceEdge()


class _MixedStatisticsEdge(_PredictOnly):
    def __init__(self, momentum: float):
        self.momentum = momentum

    def configure(self, model):
        model.eval()
        for module in model.modules():
            if isinstance(module, BATCH_NORM_TYPES):
                module.register_forward_pre_hook(self._hook(module.running_mean.clone(), module.running_var.clone()))
        return model

    def _hook(self, source_mean: torch.Tensor, source_var: torch.Tensor):
        m = self.momentum

        def mix(module: nn.Module, args):
            x = args[0]
            dims = [0] + list(range(2, x.dim()))
            module.running_mean.copy_((1 - m) * source_mean + m * x.mean(dims))
            module.running_var.copy_((1 - m) * source_var + m * x.var(dims, correction=0))

        return mix


class BNAdapt(Method):
    """Normalise each batch with (1 - m) * source statistics + m * batch statistics, recomputed every batch.

    m = 0.5 as in CEMA's released BN-adaptation baseline; m = 1 is pure test-batch statistics.
    """

    name = "bn-adapt"
    task_reason = (
        "it re-estimates a classifier's normalisation statistics on the test batch; on a detector that is not "
        "built")
    paper = "Schneider et al., NeurIPS 2020"
    mapping = EDGE_ONLY

    @dataclass
    class Options:
        momentum: float = option(0.5, low=0, high=1)

    def edge(self, num_classes):
        return _MixedStatisticsEdge(self.options.momentum)
