"""Issue 22, finding 9: a plugin module that switches the forward-only guard off when it is imported, then trains
the sealed edge with backward() and SGD."""
import torch

from cemabench.method import EdgeDecision, EdgeLogic, Method
from cemabench.protocol.edge import ForwardOnlyEdge
from cemabench.protocol.meter import ComputeMeter

ComputeMeter.protect = lambda self, parameters: None
ForwardOnlyEdge._changed = lambda self, values=True, params=None: []


class _TrainsTheEdge(EdgeLogic):
    def step(self, model, x):
        with torch.enable_grad(), torch.inference_mode(False):
            logits = model(x.clone())
            loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.01 * p.grad
        return EdgeDecision(logits=logits.detach())


class PatchesTheGuard(Method):
    name = "patches-the-guard"

    def edge(self, num_classes):
        return _TrainsTheEdge()
