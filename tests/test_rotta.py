"""RoTTA (Yuan et al., CVPR 2023) against values derived by hand from the released algorithm (BIT-DA/RoTTA), float64:
robust BatchNorm, the CSTU memory bank's admission and eviction, the timeliness weights, the edge's payload, and one
update of the student and the EMA teacher, with its timing in the stream."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cemabench.method import Upload
from cemabench.registry import build_method
from cemabench_methods.common import tta_augment
from cemabench_methods.rotta import CSTUMemory, RobustBatchNorm, timeliness_weights
from conftest import cloud_resources

pytestmark = pytest.mark.usefixtures("float64")


def _bn(channels, kind=nn.BatchNorm2d):
    bn = kind(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def test_robust_batch_norm_mixes_the_global_and_the_batch_statistics_in_training_and_keeps_them_in_eval():
    bn = _bn(3)
    m0, v0, w, b = (t.detach().clone() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias))
    rbn = RobustBatchNorm(bn, alpha=0.3)
    x = torch.randn(5, 3, 4, 4) * 2 + 1
    mean_b = x.mean(dim=(0, 2, 3))
    var_b = ((x - mean_b[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))  # biased
    mean, var = 0.7 * m0 + 0.3 * mean_b, 0.7 * v0 + 0.3 * var_b
    expected = ((x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5) * w[None, :, None, None]
                + b[None, :, None, None])
    assert torch.allclose(rbn.train()(x), expected, rtol=1e-14, atol=1e-14)
    assert torch.allclose(rbn.running_mean, mean, rtol=1e-15, atol=1e-15)
    assert torch.allclose(rbn.running_var, var, rtol=1e-15, atol=1e-15)
    kept = rbn.running_mean.clone(), rbn.running_var.clone()
    # eval: the global statistics, unchanged
    expected = ((x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5) * w[None, :, None, None]
                + b[None, :, None, None])
    assert torch.allclose(rbn.eval()(x), expected, rtol=1e-14, atol=1e-14)
    assert torch.equal(rbn.running_mean, kept[0]) and torch.equal(rbn.running_var, kept[1])
    assert set(rbn.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


def test_robust_batch_norm_1d_and_gradients_through_the_batch_statistics():
    bn = _bn(4, nn.BatchNorm1d)
    m0, v0 = bn.running_mean.clone(), bn.running_var.clone()
    rbn = RobustBatchNorm(bn, alpha=0.5).train()
    x = torch.randn(6, 4, requires_grad=True)

    def by_hand(x):
        mean = 0.5 * m0 + 0.5 * x.mean(0)
        var = 0.5 * v0 + 0.5 * ((x - x.mean(0)) ** 2).mean(0)
        return (x - mean) / torch.sqrt(var + 1e-5) * bn.weight + bn.bias

    probe = torch.randn(6, 4)
    g = torch.autograd.grad((rbn(x) * probe).sum(), x)[0]
    expected = torch.autograd.grad((by_hand(x) * probe).sum(), x)[0]
    assert torch.allclose(g, expected, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(expected, torch.autograd.grad((((x - m0) / torch.sqrt(v0 + 1e-5)) * probe).sum(), x)[0])


def _score(age, u, capacity, classes, lambda_t=1.0, lambda_u=1.0):
    return lambda_t / (1 + math.exp(-age / capacity)) + lambda_u * u / math.log(classes)


def _state(memory):
    return [[(float(item.sample), item.uncertainty, item.age) for item in items] for items in memory.classes]


def test_cstu_admits_ages_and_evicts_within_a_full_class_by_timeliness_and_uncertainty():
    """Capacity 4, 2 classes (share 2). Ages count every offer; a full class's highest-scoring item makes way for a
    newcomer that scores lower, and a newcomer that scores higher than all is turned away."""
    memory = CSTUMemory(4, 2, 1.0, 1.0)
    assert memory.add(torch.tensor(1.0), 0, 0.5) and memory.add(torch.tensor(2.0), 0, 0.2)
    assert _state(memory) == [[(1.0, 0.5, 2), (2.0, 0.2, 1)], []]
    # class 0 holds its share: its worst item is the older, more uncertain one (score at age 2 with U 0.5)
    assert _score(2, 0.5, 4, 2) > _score(1, 0.2, 4, 2) and _score(2, 0.5, 4, 2) > _score(0, 0.1, 4, 2)
    assert memory.add(torch.tensor(3.0), 0, 0.1)
    assert _state(memory) == [[(2.0, 0.2, 2), (3.0, 0.1, 1)], []]
    # a very uncertain newcomer scores more than every item of its class: turned away, but every item still ages
    assert _score(0, 2.0, 4, 2) > max(_score(2, 0.2, 4, 2), _score(1, 0.1, 4, 2))
    assert not memory.add(torch.tensor(4.0), 0, 2.0)
    assert _state(memory) == [[(2.0, 0.2, 3), (3.0, 0.1, 2)], []]
    # the other class has room
    assert memory.add(torch.tensor(5.0), 1, 0.3)
    samples, ages = memory.contents()
    assert [float(s) for s in samples] == [2.0, 3.0, 5.0] and ages == [4 / 4, 3 / 4, 1 / 4]


def test_cstu_evicts_from_the_majority_classes_when_full_and_the_last_found_on_a_tie():
    """Capacity 4, 3 classes (share 4/3): classes 0 and 1 hold 2 each. A class-2 newcomer (below its share, bank full)
    displaces the highest-scoring item of the majority classes 0 and 1; with lambda_t = 0 the two items of uncertainty
    0.5 tie, and the released scan keeps the last one found (>=): class 1's."""
    memory = CSTUMemory(4, 3, 0.0, 1.0)
    for value, label, u in ((1.0, 0, 0.5), (2.0, 0, 0.2), (3.0, 1, 0.5), (4.0, 1, 0.2)):
        assert memory.add(torch.tensor(value), label, u)
    assert memory.add(torch.tensor(5.0), 2, 0.1)
    assert [[v for v, _, _ in items] for items in _state(memory)] == [[1.0, 2.0], [4.0], [5.0]]
    # a newcomer that scores more than the majority's worst is turned away (class 0 is now the only majority)
    assert not memory.add(torch.tensor(6.0), 1, 0.6)
    # nor does one that only ties with the worst item of its full class (the item must score strictly more)
    assert not memory.add(torch.tensor(7.0), 0, 0.5)
    assert [[v for v, _, _ in items] for items in _state(memory)] == [[1.0, 2.0], [4.0], [5.0]]


def test_timeliness_weights_are_computed_in_float32_as_released():
    ages = [0.0, 0.25, 1.0, 3.5]
    got = timeliness_weights(ages)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), torch.tensor([math.exp(-a) / (1 + math.exp(-a)) for a in ages]), rtol=1e-7)


def test_the_edge_predicts_with_the_teachers_global_statistics_and_uploads_label_and_uncertainty():
    resources = cloud_resources()
    source = resources.edge_replica()
    edge = build_method("rotta").edge(4)
    model = edge.configure(resources.edge_replica().requires_grad_(False))
    x = torch.rand(6, 3, 6, 6)
    with torch.inference_mode():
        decision = edge.step(model, x)
        again = edge.step(model, x)
    assert torch.allclose(decision.logits, source.eval()(x), rtol=1e-14, atol=1e-14)  # the source statistics
    assert torch.equal(decision.logits, again.logits)  # an eval forward changes nothing
    p = decision.logits.softmax(1)
    assert decision.upload.tolist() == list(range(6))
    assert decision.payload["pseudo_label"].dtype == torch.int32
    assert decision.payload["pseudo_label"].tolist() == p.argmax(1).tolist()
    assert torch.allclose(decision.payload["uncertainty"], -(p * torch.log(p + 1e-6)).sum(1), rtol=1e-15, atol=0)


def _tiny_forward(net, x, mean, var, weight, bias):
    h = F.conv2d(x, net.conv.weight, net.conv.bias, padding=1)
    shape = (1, -1, 1, 1)
    h = (h - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5) * weight.view(shape) + bias.view(shape)
    return F.linear(torch.relu(h).mean(dim=(2, 3)), net.fc.weight, net.fc.bias)


def _batch_statistics(net, x):
    h = F.conv2d(x, net.conv.weight, net.conv.bias, padding=1).detach()
    mean = h.mean(dim=(0, 2, 3))
    return mean, ((h - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))


def test_one_update_student_adam_step_teacher_ema_and_both_robust_statistics():
    """Memory 8 = update_every 8, 4 classes (share 2): 8 samples, two per class, all enter; the update follows the
    8th, on the bank in class order with ages (8 - i) / 8. Student: one Adam step on
    mean_i w_i CE(softmax(teacher(x_i)), student(aug(x_i))), aug drawn as the cloud draws it, both in training mode
    (robust statistics mixed with alpha); teacher <- (1 - nu) teacher + nu student. What comes down: the teacher's
    affine parameters and statistics."""
    alpha, nu, lr = 0.3, 0.25, 0.01
    resources = cloud_resources()
    net = resources.edge_replica()
    m0, v0 = net.bn.running_mean.clone(), net.bn.running_var.clone()
    w0, b0 = net.bn.weight.detach().clone(), net.bn.bias.detach().clone()
    cloud = build_method("rotta", {"memory_size": 8, "update_every": 8, "alpha": alpha, "nu": nu, "lr": lr}
                         ).cloud(resources)
    x = torch.rand(8, 3, 6, 6)
    labels = torch.tensor([1, 0, 3, 2, 0, 1, 2, 3], dtype=torch.int32)
    uncertainty = torch.rand(8)
    order = [1, 4, 0, 5, 3, 6, 2, 7]  # class by class, each in arrival order
    ages = [(8 - i) / 8 for i in order]

    torch.manual_seed(3)
    strong = tta_augment(x[order])
    t_mean_b, t_var_b = _batch_statistics(net, x[order])
    t_mean, t_var = (1 - alpha) * m0 + alpha * t_mean_b, (1 - alpha) * v0 + alpha * t_var_b
    teacher_logits = _tiny_forward(net, x[order], t_mean, t_var, w0, b0)
    s_mean_b, s_var_b = _batch_statistics(net, strong)
    s_mean, s_var = (1 - alpha) * m0 + alpha * s_mean_b, (1 - alpha) * v0 + alpha * s_var_b
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    student_logits = _tiny_forward(net, strong, s_mean, s_var, w, b)
    weights = torch.tensor([math.exp(-a) / (1 + math.exp(-a)) for a in ages]).float()
    loss = (-(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1) * weights).mean()
    gw, gb = torch.autograd.grad(loss, [w, b])
    w1, b1 = w0 - lr * gw / (gw.abs() + 1e-8), b0 - lr * gb / (gb.abs() + 1e-8)  # Adam's first step

    torch.manual_seed(3)
    down = cloud.step(Upload(x, {}, 0, index=torch.arange(8), payload={"pseudo_label": labels,
                                                                        "uncertainty": uncertainty}))
    assert set(down) == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    assert torch.allclose(cloud.student.bn.weight, w1, rtol=0, atol=1e-12)
    assert torch.allclose(cloud.student.bn.bias, b1, rtol=0, atol=1e-12)
    assert torch.allclose(cloud.student.bn.running_mean, s_mean, rtol=0, atol=1e-14)
    assert torch.allclose(cloud.student.bn.running_var, s_var, rtol=0, atol=1e-14)
    assert torch.allclose(down["bn.weight"], (1 - nu) * w0 + nu * w1, rtol=0, atol=1e-12)
    assert torch.allclose(down["bn.bias"], (1 - nu) * b0 + nu * b1, rtol=0, atol=1e-12)
    assert torch.allclose(down["bn.running_mean"], t_mean, rtol=0, atol=1e-14)
    assert torch.allclose(down["bn.running_var"], t_var, rtol=0, atol=1e-14)
    assert torch.equal(cloud.teacher.conv.weight, net.conv.weight)  # frozen: not averaged by default


def test_updates_follow_every_update_every_samples_offered_across_and_within_batches(monkeypatch):
    """update_every 5, batches of 3: updates after the 5th and 10th sample offered, i.e. within batches 2 and 4
    (1-based), on the bank as it stood then (5 and 10 samples in a bank of 16); a download only after a batch that
    updated."""
    cloud = build_method("rotta", {"memory_size": 16, "update_every": 5}).cloud(cloud_resources())
    seen = []
    monkeypatch.setattr(cloud, "_update", lambda: seen.append((cloud.offered, len(cloud.memory))))
    downloads = []
    for t in range(4):
        x = torch.rand(3, 3, 6, 6)
        downloads.append(cloud.step(Upload(x, {}, t, index=torch.arange(3), payload={
            "pseudo_label": torch.tensor([0, 1, 2], dtype=torch.int32), "uncertainty": torch.zeros(3)})))
    assert seen == [(5, 5), (10, 10)]
    assert [d is not None for d in downloads] == [False, True, False, True]


def test_the_released_ema_over_every_parameter_is_an_option_and_sends_the_whole_teacher():
    resources = cloud_resources()
    net = resources.edge_replica()
    cloud = build_method("rotta", {"memory_size": 4, "update_every": 4, "nu": 0.5,
                                   "ema_all_parameters": True}).cloud(resources)
    with torch.no_grad():
        cloud.student.conv.weight.add_(1.0)  # a frozen parameter the student holds differently: averaged too
    down = cloud.step(Upload(torch.rand(4, 3, 6, 6), {}, 0, index=torch.arange(4), payload={
        "pseudo_label": torch.tensor([0, 1, 2, 3], dtype=torch.int32), "uncertainty": torch.zeros(4)}))
    assert set(down) >= {"conv.weight", "conv.bias", "fc.weight", "fc.bias", "bn.weight", "bn.running_mean"}
    assert torch.allclose(down["conv.weight"], net.conv.weight + 0.5, rtol=0, atol=1e-15)
