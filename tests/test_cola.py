"""CoLA (Chen et al., NeurIPS 2024): the knowledge-vector fusion, Eq. (4)'s shift distance, Eq. (8)'s new alpha, the
epsilon offset, the followers' alpha, against values derived by hand in float64; its options; and, through the
harness, principal and follower devices on one shared cloud: what crosses is charged, the follower stays
forward-only, and the numbers repeat."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cemabench.data import ArrayDomain, DatasetSource
from cemabench.errors import UserError
from cemabench.protocol import Models, Protocol, run_unit
from cemabench.protocol.edge import ForwardOnlyEdge
from cemabench.protocol.stream import DeviceStreams, build_blocks
from cemabench.registry import build_method
from cemabench_methods.cola import (
    CoLAReplica,
    DomainStatistics,
    FollowerState,
    FuseNorm,
    _FollowerEdge,
    domain_shift,
    statistics,
)
from cemabench_methods.common import use_batch_statistics
from conftest import TinyNet


def _replica(**options) -> CoLAReplica:
    method = build_method("cola", options)
    return CoLAReplica(use_batch_statistics(TinyNet()), method.options, margin=math.log(4))


def test_domain_shift_is_the_symmetric_kl_of_diagonal_gaussians(float64):
    # channel 0: N(0, 1) and N(1, 4): (1 + 1) / 8 - 1/2 + (4 + 1) / 2 - 1/2 = 1.75; channel 1: identical, 0
    var1, mean1 = torch.tensor([1., 2.]), torch.tensor([0., 3.])
    var2, mean2 = torch.tensor([4., 2.]), torch.tensor([1., 3.])
    assert domain_shift(var1, mean1, var2, mean2).item() == pytest.approx(1.75 / 2, abs=1e-15)
    assert domain_shift(var2, mean2, var1, mean1).item() == pytest.approx(1.75 / 2, abs=1e-15)


def test_domain_statistics_start_then_move_by_0_8_and_skip_small_batches(float64):
    domain = DomainStatistics()
    first, second = torch.randn(64, 5, 3), torch.randn(64, 5, 3) + 1
    assert not domain.shifted(first, 0.1)  # nothing to compare with yet
    domain.update(first[:63])  # under 64 samples: ignored
    assert domain.var is None
    domain.update(first)
    domain.update(second)
    var, mean = statistics(second)
    assert torch.allclose(domain.mean, 0.8 * first.mean(dim=(0, 1)) + 0.2 * mean, atol=1e-14)
    assert torch.allclose(domain.var, 0.8 * first.var(dim=(0, 1)) + 0.2 * var, atol=1e-14)
    assert statistics(first)[0][0].item() == pytest.approx(np.var(first[:, :, 0].numpy(), ddof=1), abs=1e-13)
    assert domain.shifted(second + 5, 0.1) and not domain.shifted(second[:63] + 5, 0.1)


def test_fusion_is_the_origin_plus_the_softmax_weighted_vectors_plus_epsilon(float64):
    norm = nn.LayerNorm(2)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1., 2.]))
        norm.bias.copy_(torch.tensor([0., 1.]))
    holder = FollowerState(5.0)
    holder.alpha, holder.alpha_scale = torch.tensor([0., math.log(3) / 2]), torch.tensor([2.])  # softmax 1/4, 3/4
    layer = FuseNorm(norm, holder, offsets=True)
    layer.append(torch.tensor([[2., 1.]]), torch.tensor([[1., 0.]]))  # absolute: (+1, -1) from the origin
    with torch.no_grad():
        layer.epsilon_weight.copy_(torch.tensor([0.5, 0.]))
    weight, bias = layer.fused()
    assert weight.tolist() == pytest.approx([1 + 0.75 + 0.5, 2 - 0.75], abs=1e-15)
    assert bias.tolist() == pytest.approx([0.75, 0.25], abs=1e-15)
    x = torch.randn(3, 2)
    assert torch.equal(layer(x), F.layer_norm(x, (2,), weight, bias, norm.eps))


def test_eq8_gives_the_new_vector_a_share_of_s_minus_1_over_s(float64):
    replica = _replica(weight_margin=0.01)
    layer = replica.layers[0][1]
    with torch.no_grad():
        replica.fusion.alpha.fill_(0.5)
        layer.epsilon_weight.fill_(0.03)  # mean |epsilon| 0.03: scale factor s = 3
    before = layer.fused()
    replica.save()
    alpha = replica.fusion.alpha.detach()
    assert alpha.tolist() == pytest.approx([0.5, 0.5 + math.log(2)], abs=1e-14)  # log(e^0.5 (3 - 1))
    assert alpha.softmax(0)[1].item() == pytest.approx(2 / 3, abs=1e-14)
    assert replica.count == 2
    for old, new in zip(before, layer.fused()):  # epsilon moved so that the fused parameters stay
        assert torch.allclose(old, new, atol=1e-14)
    assert torch.allclose(layer.origin_weight + layer.weights[1], before[0], atol=1e-14)  # the saved vector


def test_eq8_without_a_margin_crossed_takes_the_largest_alpha_and_clips_at_10(float64):
    replica = _replica(weight_margin=0.01)
    with torch.no_grad():
        replica.fusion.alpha.fill_(0.7)
        replica.fusion.alpha_scale.fill_(2.)
    replica.save()  # epsilon 0: s = 0 <= 1, so the new alpha is max(alpha * scale) / scale
    assert replica.fusion.alpha.tolist() == pytest.approx([0.7, 0.7], abs=1e-15)
    with torch.no_grad():
        replica.fusion.alpha.fill_(9.9)
        replica.layers[0][1].epsilon_bias.fill_(1.)  # s = 100
    replica.save()
    assert replica.fusion.alpha.tolist() == pytest.approx([9.9, 9.9, 10.0], abs=1e-15)


def test_exchange_adds_the_others_vectors_keeps_the_fused_parameters_and_moves_the_share_index(float64):
    a, b = _replica(), _replica()
    with torch.no_grad():
        b.layers[0][1].epsilon_weight.fill_(0.2)
    shared = b.share()
    assert len(shared) == 1 and b.share_from == 1 + 2  # the released get_weights_for_share: count + 2
    before = a.layers[0][1].fused()
    a.add(shared)
    assert a.count == 1 + 1 + 1 and a.share_from == 1 + 1  # the shared vector, then a's own current parameters
    layer = a.layers[0][1]
    assert torch.allclose(layer.origin_weight + layer.weights[1], b.layers[0][1].fused()[0], atol=1e-14)
    for old, new in zip(before, layer.fused()):
        assert torch.allclose(old, new, atol=1e-14)


def test_a_follower_weighs_each_vector_by_its_inverse_distance_over_the_temperature(float64):
    edge = _FollowerEdge(5.0)
    model = edge.configure(TinyNet())
    ones = torch.ones(4)
    edge.state.domain.var, edge.state.domain.mean = ones, torch.zeros(4)
    # vector 0 at distance 0, vector 1 with its mean 1 away (equal variances): 2 * 1 / 2 = 1 per channel
    down = {"bn.knowledge_weight": torch.stack([ones, 2 * ones]), "bn.knowledge_bias": torch.zeros(2, 4),
            "conv.knowledge_var": torch.stack([ones, ones]), "conv.knowledge_mean": torch.stack([0 * ones, ones])}
    edge.receive(model, down)
    alpha = edge.state.alpha
    assert alpha.tolist() == pytest.approx([1 / 1e-4 / 5, 1 / (1 + 1e-4) / 5], rel=1e-14)
    weight, _ = model.bn.fused()
    share = torch.softmax(alpha, 0)[1]
    assert torch.allclose(weight, ones + share * ones, atol=1e-14)  # the origin is the first vector received
    with pytest.raises(KeyError, match="does not hold"):
        edge.receive(model, {"fc.knowledge_weight": ones})


def test_options_and_devices_are_checked_in_one_line():
    for bad, words in (({"principals": -1}, "principals"), ({"fp_temperature": 0}, "fp_temperature"),
                       ({"exchange_every": 0}, "exchange_every")):
        with pytest.raises(UserError, match=words) as error:
            build_method("cola", bad)
        assert "\n" not in str(error.value)
    method = build_method("cola", {"principals": 3})
    with pytest.raises(UserError, match="at most the protocol's devices \\(2\\), got 3"):
        method.check_protocol(Protocol(batch_size=64, setting="continual", devices=2))
    type(method).check_protocol(Protocol(batch_size=64, setting="continual", devices=2))  # the class: base checks
    with pytest.raises(UserError, match="has neither"):
        method.check_models(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), None)


def _shifting_streams(devices):
    """Two domains of 128 images (two batches of 64) whose pixels differ widely, so that the principal detects the
    shift between them; device i gets them rotated by i."""
    rng = np.random.default_rng(0)

    def domain(name, low, high):
        pixels = rng.integers(low, high, (128, 8, 8, 3), dtype=np.uint8)
        labels = rng.integers(0, 4, 128)
        return ArrayDomain(name, pixels, lambda: labels)

    made = [domain("a", 0, 60), domain("b", 120, 256)]
    dataset = DatasetSource("shifting", 4, made, domain("clean", 0, 256), is_miniature=False)
    orders = [made[i % 2:] + made[:i % 2] for i in range(devices)]
    return dataset, DeviceStreams([build_blocks("continual", order, seed=0) for order in orders])


def _run(devices=2, **options):
    torch.manual_seed(0)
    models = Models.copies_of(TinyNet().eval(), TinyNet().eval())
    dataset, streams = _shifting_streams(devices)
    method = build_method("cola", {"entropy_margin": 1.0, "redundancy_margin": None, **options})
    protocol = Protocol(batch_size=64, setting="continual", devices=devices)
    return run_unit(method, streams, models, 4, dataset.clean, protocol, seed=0)


def test_a_follower_receives_the_principals_vectors_charged_on_its_own_link_and_uploads_nothing():
    results = _run(principals=1)
    assert all(r.status == "ok" for r in results), [r.message for r in results]
    principal = [r for r in results if r.device == 0]
    follower = [r for r in results if r.device == 1]
    assert all(r.link.uploaded == r.seen == 128 for r in principal)
    assert sum(r.link.downloads for r in principal) > 0
    assert all(r.link.uploaded == 0 and r.link.upload_bytes == 0 for r in follower)
    # one vector: per norm layer weight and bias (4 + 4 floats), its domain's variance and mean (4 + 4), float32
    vectors = sum(r.link.download_bytes for r in follower) // 64
    assert vectors >= 1 and sum(r.link.download_bytes for r in follower) == 64 * vectors
    assert all(r.cloud_flops == 0 for r in follower)  # the follower's fusion runs on its edge
    again = _run(principals=1)
    assert [r.to_dict() | {"edge_seconds": 0, "cloud_seconds": 0, "peak_memory_bytes": 0} for r in results] == \
           [r.to_dict() | {"edge_seconds": 0, "cloud_seconds": 0, "peak_memory_bytes": 0} for r in again]


def test_a_follower_edge_is_forward_only_under_the_guard(float64):
    edge = ForwardOnlyEdge(TinyNet(), _FollowerEdge(5.0))
    sealed = {n: p.detach().clone() for n, p in edge.model.named_parameters()}
    ones = torch.ones(4)
    x = torch.rand(64, 3, 8, 8)
    edge.step(x, 4)
    edge.receive({"bn.knowledge_weight": torch.stack([ones, 2 * ones]), "bn.knowledge_bias": torch.zeros(2, 4),
                  "conv.knowledge_var": torch.stack([ones, ones]), "conv.knowledge_mean": torch.zeros(2, 4)})
    decision = edge.step(x, 4)
    assert decision.upload is None and not decision.tensors
    assert edge.meter.refusals == 0
    assert all(torch.equal(p, sealed[n]) for n, p in edge.model.named_parameters())
    assert edge.logic.state.alpha is not None and len(edge.logic.state.means) == 2
