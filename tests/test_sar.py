"""SAR's model recovery against the released code (mr-eggplant/SAR), derived by hand (float64).

The released recovery reloads the weights and the state of its SAM wrapper; the inner SGD keeps its momentum
buffers, so the first step after a recovery still carries the momentum of the steps before it."""
import math

import pytest
import torch

from cemabench.method import Upload
from cemabench.registry import build_method
from cemabench_methods.common import entropy, use_batch_statistics
from conftest import cloud_resources

pytestmark = pytest.mark.usefixtures("float64")

LR, RHO, MOMENTUM = 0.00025, 0.05, 0.9


def sam_gradient(model, params, x, margin) -> tuple[list[torch.Tensor], float]:
    """SAR's update direction at the current weights w: the gradient, at w + rho g / ||g||, of the mean entropy of
    the samples that pass the entropy filter twice; and that second loss (what the recovery EMA averages)."""
    ent = entropy(model(x))
    keep = ent < margin
    g = torch.autograd.grad(ent[keep].mean(), params)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    weights = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(RHO * gi / (norm + 1e-12))
    second = entropy(model(x))[keep]
    loss = second[second < margin].mean()
    g2 = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    return list(g2), loss.item()


@pytest.mark.parametrize("clears", [False, True], ids=["released-keeps-momentum", "paper-clears-momentum"])
def test_the_step_after_a_recovery_keeps_or_clears_the_sgd_momentum(clears):
    resources = cloud_resources()
    source = use_batch_statistics(resources.edge_replica())
    params = [source.bn.weight, source.bn.bias]
    margin = math.log(4)
    batches = [torch.rand(8, 3, 6, 6) for _ in range(2)]
    # recovery restores the source weights, so both steps start from them: derive each at the source
    (g_low, low, x_low), (g_high, high, x_high) = sorted(
        [(*sam_gradient(source, params, x, margin), x) for x in batches], key=lambda d: d[1])
    assert low < high
    cloud = build_method("sar", {"entropy_margin": 1.0, "reset_threshold": (low + high) / 2,
                                 "reset_clears_ema": True, "reset_clears_momentum": clears}).cloud(resources)

    first = cloud.step(Upload(x_low, {}, 0))  # EMA = low < threshold: recovery
    assert cloud.resets == 1 and cloud.ema is None
    assert torch.equal(first["bn.weight"], source.bn.weight) and torch.equal(first["bn.bias"], source.bn.bias)
    buffers = [cloud.optimizer.state[p].get("momentum_buffer") for p in cloud.params]
    if clears:
        assert buffers == [None, None]
    else:
        assert all(torch.allclose(b, g) for b, g in zip(buffers, g_low))

    second = cloud.step(Upload(x_high, {}, 1))  # EMA = high > threshold: no recovery
    assert cloud.resets == 1
    for name, p, g1, g2 in zip(("bn.weight", "bn.bias"), params, g_low, g_high):
        velocity = g2 if clears else MOMENTUM * g1 + g2
        assert torch.allclose(second[name], p - LR * velocity)


def test_the_released_behaviour_is_the_default():
    options = build_method("sar").options
    assert options.reset_clears_momentum is False and options.reset_clears_ema is False
