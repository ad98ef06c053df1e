"""Method mechanics checked against values derived by hand from the published algorithms (float64)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cemabench.method import Upload
from cemabench.protocol import SampleCounter
from cemabench_methods.cema import CEMA, RandomUpload, distillation_loss
from cemabench_methods.common import BatchRenorm2d, RedundancyFilter, entropy, use_batch_renorm
from cemabench_methods.eata import EATA, ETA
from cemabench_methods.source import BNAdapt
from cemabench_methods.tent import Tent
from conftest import TinyNet, cloud_resources

pytestmark = pytest.mark.usefixtures("float64")


def test_entropy_is_shannon_in_nats():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    assert torch.allclose(entropy(logits), torch.tensor([1.5 * math.log(2), math.log(3)]))


class TestBatchRenorm:
    def _layer(self):
        bn = nn.BatchNorm2d(3)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            bn.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
        return BatchRenorm2d(bn)

    def test_first_batch_initialises_unbiased_statistics(self):
        layer, x = self._layer().eval(), torch.randn(5, 3, 4, 4)
        layer(x)
        assert torch.allclose(layer.running_mean, x.mean((0, 2, 3)))
        assert torch.allclose(layer.running_var, x.var((0, 2, 3), unbiased=True))

    def test_forward_value_uses_running_statistics_and_gradient_flows_through_batch_statistics(self):
        layer = self._layer().train()
        layer(torch.randn(8, 3, 4, 4) * 3 + 1)  # initialises the running statistics
        mean, var = layer.running_mean.clone(), layer.running_var.clone()
        x = (torch.randn(6, 3, 4, 4) * 2 - 1).requires_grad_()
        y = layer(x)
        w, b = layer.weight.detach().view(1, 3, 1, 1), layer.bias.detach().view(1, 3, 1, 1)
        expected = (x.detach() - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + layer.eps) * w + b
        assert torch.allclose(y, expected)
        # d/dx of sum(g * y): the batch-normalisation gradient scaled by r * weight (r detached)
        g = torch.randn_like(y)
        (y * g).sum().backward()
        x2 = x.detach().clone().requires_grad_()
        bm, bv = x2.mean((0, 2, 3), keepdim=True), x2.var((0, 2, 3), unbiased=True, keepdim=True)
        r = (torch.sqrt(bv + layer.eps) / torch.sqrt(var.view(1, 3, 1, 1) + layer.eps)).detach()
        (((x2 - bm) / torch.sqrt(bv + layer.eps) * r * w) * g).sum().backward()
        assert torch.allclose(x.grad, x2.grad)

    def test_fused_call_equals_the_released_elementwise_formula_in_value_gradients_and_statistics(self):
        """The layer runs one fused batch-norm call; CEMA's released code writes the same map as elementwise ops:
        y = (x - mu_b) / sigma_b * r + d, then * weight + bias, unbiased variances, r and d detached."""
        layer = self._layer().train()
        layer(torch.randn(8, 3, 5, 5) * 3 + 1)
        mean, var = layer.running_mean.clone(), layer.running_var.clone()
        x = (torch.randn(6, 3, 5, 5) * 2 - 1).requires_grad_()
        g = torch.randn(6, 3, 5, 5)
        (layer(x) * g).sum().backward()
        x2 = x.detach().clone().requires_grad_()
        w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
        bm = x2.mean((0, 2, 3))
        centred = x2 - bm[None, :, None, None]
        bv = centred.square().sum((0, 2, 3)) / (x2.numel() // 3 - 1)
        bs, rs = torch.sqrt(bv + layer.eps), torch.sqrt(var + layer.eps)
        r, d = (bs / rs).detach(), ((bm - mean) / rs).detach()
        y = (centred / bs[None, :, None, None] * r[None, :, None, None] + d[None, :, None, None])
        ((y * w[None, :, None, None] + b[None, :, None, None]) * g).sum().backward()
        for got, want in ((x.grad, x2.grad), (layer.weight.grad, w.grad), (layer.bias.grad, b.grad),
                          (layer.running_mean, mean + 0.1 * (bm.detach() - mean)),
                          (layer.running_var, var + 0.1 * (bv.detach() - var))):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)

    def test_momentum_update_only_in_training_mode(self):
        layer = self._layer().eval()
        first, second = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2) + 5
        layer(first)
        before = layer.running_mean.clone()
        layer(second)
        assert torch.equal(layer.running_mean, before)
        layer.train()(second)
        assert torch.allclose(layer.running_mean, before + 0.1 * (second.mean((0, 2, 3)) - before))

    def test_replacement_keeps_state_dict_names(self):
        model = TinyNet()
        names = set(model.state_dict())
        assert {n for n in use_batch_renorm(model).state_dict() if not n.endswith("initialized")} == names - {
            "bn.num_batches_tracked"}


def test_redundancy_filter_keeps_dissimilar_samples_and_tracks_an_ema():
    f = RedundancyFilter(margin=0.5)
    first = torch.log(torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]]))
    assert f(first).tolist() == [0, 1]
    mean = torch.tensor([0.45, 0.45, 0.1])
    assert torch.allclose(f.mean_probs, mean)
    second = torch.log(torch.tensor([[0.05, 0.05, 0.9], [0.5, 0.4, 0.1]]))
    cos = [float(F.cosine_similarity(mean, p, dim=0)) for p in second.exp()]
    assert cos[0] < 0.5 < cos[1]
    assert f(second).tolist() == [0]
    assert torch.allclose(f.mean_probs, 0.9 * mean + 0.1 * torch.tensor([0.05, 0.05, 0.9]))
    expected = 0.9 * mean + 0.1 * torch.tensor([0.05, 0.05, 0.9])
    assert f(torch.empty(0, 3)).tolist() == [] and torch.allclose(f.mean_probs, expected)


class TestCEMAEdge:
    def test_entropy_bounds_and_redundancy(self):
        edge = CEMA(entropy_max=0.4, entropy_min=0.02, redundancy_margin=None).edge(num_classes=4)
        e_max, e_min = 0.4 * math.log(4), 0.02 * math.log(4)
        logits = torch.tensor([[6.0, 0, 0, 0], [2.0, 0, 0, 0], [3.0, 0, 0, 0], [30.0, 0, 0, 0]])
        ent = entropy(logits)  # 0.052, 0.917, 0.529, 0.000 against the bounds 0.028 and 0.555
        assert [i for i in range(4) if e_min < ent[i] < e_max] == [0, 2]
        assert edge.select(logits).tolist() == [0, 2]

    def test_dynamic_threshold_follows_the_paper(self):
        edge = CEMA(dynamic_warmup=4, dynamic_coeff=0.6, redundancy_margin=None).edge(num_classes=4)
        warm = torch.tensor([[2.0, 0, 0, 0]] * 4)
        edge.select(warm)
        assert edge.threshold() == pytest.approx(0.4 * math.log(4) * 0.6)
        later = torch.tensor([[0.5, 0, 0, 0]] * 4)
        edge.select(later)
        ratio = (entropy(warm).sum() + entropy(later).sum()) / 8 / entropy(warm).mean()
        assert edge.threshold() == pytest.approx(0.4 * math.log(4) * float(ratio) * 0.6)

    def test_released_default_threshold_is_fixed(self):
        edge = CEMA().edge(num_classes=1000)
        edge.select(torch.randn(64, 1000))
        assert edge.threshold() == pytest.approx(2.763, abs=1e-3)

    def test_random_upload_keeps_the_running_count_on_the_ratio(self):
        edge = RandomUpload(upload_ratio=0.3).edge(num_classes=4)
        sent = [len(edge.select(torch.randn(64, 4))) for _ in range(10)]
        assert np.cumsum(sent).tolist() == [round(0.3 * 64 * (i + 1)) for i in range(10)]


def test_distillation_loss_matches_a_hand_computation():
    o = SimpleNamespace(alpha=3.0, beta=3.0, gamma=1.0, temperature=2.0)
    student, teacher = torch.randn(5, 4), torch.randn(5, 4) * 3
    e_max = 0.4 * math.log(4)
    p_s, p_t = student.softmax(1), teacher.softmax(1)
    h_s, h_t = -(p_s * p_s.log()).sum(1), -(p_t * p_t.log()).sum(1)
    w_s, w_t = torch.exp(e_max - h_s), torch.exp(e_max - h_t)
    p_s2, p_t2 = (student / 2).softmax(1), (teacher / 2).softmax(1)
    kl = (p_t2 * (p_t2.log() - p_s2.log())).sum(1) * 4
    ce = -p_s.log()[torch.arange(5), teacher.argmax(1)]
    expected = 3 * (h_s * w_s).mean() + 3 * (kl * w_t).mean() + (ce * w_t).mean()
    assert torch.allclose(distillation_loss(student, teacher, e_max, o), expected)


class TestCEMACloud:
    def _upload(self, n, tensors=None):
        return Upload(samples=torch.rand(n, 3, 6, 6), tensors=tensors or {}, batch_index=0)

    def test_cloud_batches_replay_and_idle_steps(self):
        counter = SampleCounter()
        cloud = CEMA().cloud(cloud_resources(counter))
        assert cloud.step(self._upload(20)) is None  # fewer than 32 pending, nothing to replay
        assert counter.with_grad == counter.without_grad == 0
        down = cloud.step(self._upload(20))  # one cloud batch of 32; replay holds 40 < 256: no replay
        assert counter.with_grad == 32 + 32 and counter.without_grad == 32 and len(cloud.pending) == 8
        assert {k.rsplit(".", 1)[1] for k in down} == {"weight", "bias", "running_mean", "running_var", "initialized"}
        cloud.step(self._upload(248))  # 256 pending -> 8 batches; replay reaches 288 >= 256 before the first
        assert counter.with_grad == 64 + 8 * (32 + 128) and counter.without_grad == 32 + 8 * 128
        assert len(cloud.pending) == 0 and len(cloud.replay) == 288
        cloud.step(self._upload(0))  # no cloud batch, replay > 256: one distillation step on 128 replayed
        assert counter.with_grad == 64 + 8 * 160 + 128 and counter.without_grad == 32 + 8 * 128 + 128

    def test_replay_buffer_is_fifo_and_bounded(self):
        cloud = CEMA(replay_size=50).cloud(cloud_resources())
        uploads = [self._upload(40) for _ in range(3)]
        for u in uploads:
            cloud.step(u)
        assert len(cloud.replay) == 50 and torch.equal(cloud.replay[-1], uploads[-1].samples[-1])
        assert torch.equal(cloud.replay[0], uploads[1].samples[30])

    def test_foundation_step_is_one_sgd_step_on_weighted_entropy(self):
        resources = cloud_resources()
        cloud = CEMA(cloud_batch=8).cloud(resources)
        foundation = use_batch_renorm(resources.foundation()).train()
        x = torch.rand(8, 3, 6, 6)
        ent = entropy(foundation(x))
        e_max = 0.4 * math.log(4)
        (ent * torch.exp(e_max - ent.detach())).mean().backward()
        cloud.step(Upload(x, {}, 0))
        # first SGD step with momentum: theta - lr * grad
        assert torch.allclose(cloud.foundation.bn.weight, foundation.bn.weight - 0.00025 * foundation.bn.weight.grad)
        assert torch.equal(cloud.foundation.conv.weight, foundation.conv.weight)

    def test_edge_statistics_upload_seeds_the_replica(self):
        edge_logic = CEMA().edge(num_classes=4)
        model = edge_logic.configure(TinyNet())
        with torch.inference_mode():
            first = edge_logic.step(model, torch.rand(16, 3, 6, 6))
            second = edge_logic.step(model, torch.rand(16, 3, 6, 6))
        assert set(first.tensors) == {"bn.running_mean", "bn.running_var", "bn.initialized"} and not second.tensors
        cloud = CEMA().cloud(cloud_resources())
        cloud.step(Upload(torch.rand(0, 3, 6, 6), {k: v.double() if v.is_floating_point() else v
                                                    for k, v in first.tensors.items()}, 0))
        assert torch.allclose(cloud.replica.bn.running_mean, first.tensors["bn.running_mean"].double())


def test_tent_cloud_step_and_download():
    resources = cloud_resources()
    cloud = Tent().cloud(resources)
    reference = resources.edge_replica().train()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    x = torch.rand(8, 3, 6, 6)
    entropy(reference(x)).mean().backward()
    down = cloud.step(Upload(x, {}, 0))
    assert set(down) == {"bn.weight", "bn.bias"}
    assert torch.allclose(down["bn.weight"], reference.bn.weight - 0.00025 * reference.bn.weight.grad)
    assert cloud.step(Upload(x[:0], {}, 1)) is None


def test_eata_fisher_and_regulariser():
    resources = cloud_resources()
    cloud = EATA(fisher_size=40, fisher_batch=16).cloud(resources)
    reference = cloud.model
    images = resources.clean_images(40)
    expected = {}
    for start in range(0, 40, 16):
        reference.zero_grad()
        logits = reference(images[start:start + 16])
        F.cross_entropy(logits, logits.argmax(1)).backward()
        for name, p in reference.named_parameters():
            if p.grad is not None:
                expected[name] = expected.get(name, 0) + p.grad ** 2
    reference.zero_grad()
    got = {n: f for n, p in reference.named_parameters() for q, f, _ in cloud.fisher if q is p}
    assert set(got) == {"bn.weight", "bn.bias"}
    for name in got:
        assert torch.allclose(got[name], expected[name] / 3)
    with torch.no_grad():
        reference.bn.weight.add_(0.1)
    logits = torch.randn(3, 4)
    ent = entropy(logits)
    base = (ent * torch.exp(0.4 * math.log(4) - ent)).mean()
    assert torch.allclose(cloud.loss(logits), base + 2000 * (got["bn.weight"] * 0.01).sum())
    assert ETA().cloud(cloud_resources()).fisher is None


def test_bn_adapt_mixes_source_and_batch_statistics():
    model = TinyNet().eval().requires_grad_(False)
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)
        model.bn.running_var.fill_(2.0)
    x = torch.rand(8, 3, 6, 6)
    h = model.conv(x)
    mean = 0.5 * 0.3 + 0.5 * h.mean((0, 2, 3))
    var = 0.5 * 2.0 + 0.5 * h.var((0, 2, 3), unbiased=False)
    expected = model.fc(torch.relu(F.batch_norm(h, mean, var, model.bn.weight, model.bn.bias, eps=model.bn.eps))
                        .mean((2, 3)))
    edge = BNAdapt().edge(4)
    adapted = edge.configure(model)
    assert torch.allclose(edge.step(adapted, x).logits, expected)
