"""RDumb (Press et al., NeurIPS 2023) against values derived by hand from the released algorithm (oripress/CCC),
float64: the ETA step with the released weights, both filters as the released step applies them, and the reset every N
batches, which restores the source state exactly."""
import math

import pytest
import torch
import torch.nn.functional as F

from cemabench.method import Upload
from cemabench.registry import build_method
from cemabench_methods.common import entropy, use_batch_statistics
from conftest import cloud_resources

pytestmark = pytest.mark.usefixtures("float64")

LR, MOMENTUM = 0.00025, 0.9


def _weighted(ent, margin):
    return (ent * torch.exp(-(ent.detach() - margin))).mean()


def _upload(x, t=0):
    return Upload(x, {}, t, index=torch.arange(len(x)))


def test_the_edge_mapping_steps_on_the_uploaded_samples_with_the_released_weights():
    """mean(H / exp(H - E0)), E0 = 0.4 ln C, over the uploaded samples forwarded on their own; one SGD step."""
    resources = cloud_resources()
    ref = use_batch_statistics(resources.edge_replica())
    x = torch.rand(6, 3, 6, 6)
    params = [ref.bn.weight, ref.bn.bias]
    g = torch.autograd.grad(_weighted(entropy(ref(x)), 0.4 * math.log(4)), params)
    down = build_method("rdumb").cloud(resources).step(_upload(x))
    for name, p, gp in zip(("bn.weight", "bn.bias"), params, g):
        assert torch.allclose(down[name], p - LR * gp, rtol=0, atol=1e-15)


def test_the_reset_every_n_batches_restores_the_source_state_exactly():
    """reset_every 3: after the third batch (uploads or not) the initial parameters come down, the momentum is gone,
    and the fourth batch's step is exactly a fresh cloud's first step."""
    resources = cloud_resources()
    source = resources.edge_replica()
    x = torch.rand(8, 3, 6, 6)
    cloud = build_method("rdumb", {"reset_every": 3, "lr": 0.05}).cloud(resources)
    first = cloud.step(_upload(x, 0))
    assert not torch.equal(first["bn.weight"], source.bn.weight)
    assert cloud.step(_upload(x[:0], 1)) is None  # an empty upload still counts as a batch
    down = cloud.step(_upload(x[1:], 2))
    assert cloud.resets == 1 and not cloud.optimizer.state
    assert set(down) == {"bn.weight", "bn.bias"}
    assert torch.equal(down["bn.weight"], source.bn.weight) and torch.equal(down["bn.bias"], source.bn.bias)
    after = cloud.step(_upload(x, 3))
    fresh = build_method("rdumb", {"reset_every": 3, "lr": 0.05}).cloud(resources).step(_upload(x, 0))
    assert all(torch.equal(after[k], fresh[k]) for k in fresh)
    for t in (4, 5):
        cloud.step(_upload(x, t))
    assert cloud.resets == 2


def test_the_edge_forgets_the_redundancy_filter_at_each_reset():
    """reset_every 2, entropy filter open: the first batch's reliable samples all go up and start the running mean;
    later batches of similar probabilities are redundant (|cos| >= 0.05) and stay down, except at batches 2, 4, ...,
    where the released code forgets the running mean with the model, so that they all go up again."""
    resources = cloud_resources()
    edge = build_method("rdumb", {"reset_every": 2, "entropy_margin": 1.0}).edge(4)
    model = edge.configure(resources.edge_replica().requires_grad_(False))
    x = torch.rand(8, 3, 6, 6)
    with torch.inference_mode():
        reliable = torch.where(entropy(model(x)) < math.log(4))[0].tolist()
        uploads = [edge.step(model, x).upload.tolist() for _ in range(5)]
    assert len(reliable) == 8
    assert uploads == [reliable, [], reliable, [], reliable]


def test_the_cloud_mapping_is_the_released_step_on_the_whole_batch():
    """select_on = "cloud": the whole batch is forwarded (BatchNorm on its statistics); entropy filter H < E0; the first
    batch keeps every reliable sample and starts the running mean at their mean probability; the next keeps those with
    |cos| < 0.05 against it and moves it to 0.9 m + 0.1 mean(kept); the loss is mean(H / exp(H - E0)) over what is
    kept, from that same forward."""
    resources = cloud_resources()
    ref = use_batch_statistics(resources.edge_replica())
    params = [ref.bn.weight, ref.bn.bias]
    x1, x2 = torch.rand(8, 3, 6, 6), torch.rand(8, 3, 6, 6)
    ent1 = entropy(ref(x1)).detach()
    e0 = ent1.sort().values[5].item()  # a margin that keeps five of the eight
    reliable1 = torch.where(ent1 < e0)[0]
    assert len(reliable1) == 5
    out1 = ref(x1)
    g1 = torch.autograd.grad(_weighted(entropy(out1)[reliable1], e0), params)
    mean_probs = out1.detach()[reliable1].softmax(1).mean(0)
    cloud = build_method("rdumb", {"select_on": "cloud", "entropy_margin": e0 / math.log(4),
                                   "redundancy_margin": 0.999}).cloud(resources)
    down = cloud.step(_upload(x1))
    for name, p, g in zip(("bn.weight", "bn.bias"), params, g1):
        assert torch.allclose(down[name], p - LR * g, rtol=0, atol=1e-15)
    assert torch.allclose(cloud.redundancy.mean_probs, mean_probs, rtol=1e-14, atol=0)

    with torch.no_grad():
        for p, g in zip(params, g1):
            p.sub_(LR * g)
    out2 = ref(x2)
    ent2 = entropy(out2)
    reliable2 = torch.where(ent2.detach() < e0)[0]
    cosine = F.cosine_similarity(mean_probs[None], out2.detach()[reliable2].softmax(1), dim=1)
    kept = reliable2[cosine.abs() < 0.999]
    assert 0 < len(kept) < len(reliable2), "the margin must drop some reliable samples for this test"
    g2 = torch.autograd.grad(_weighted(ent2[kept], e0), params)
    down = cloud.step(_upload(x2, 1))
    for name, p, a, b in zip(("bn.weight", "bn.bias"), params, g1, g2):
        assert torch.allclose(down[name], p - LR * (MOMENTUM * a + b), rtol=0, atol=1e-15)
    expected = 0.9 * mean_probs + 0.1 * out2.detach()[kept].softmax(1).mean(0)
    assert torch.allclose(cloud.redundancy.mean_probs, expected, rtol=1e-14, atol=0)
