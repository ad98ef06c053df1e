"""ROID (Marsden et al., WACV 2024) against values derived by hand from the released algorithm
(mariodoebler/test-time-adaptation), float64: the soft likelihood ratio, the certainty and diversity weights, the
prior correction, one cloud step (weighted loss, consistency term, the configured batch size as divisor, Nesterov SGD)
followed by the weight ensembling, the running class probabilities, and the edge's decision."""
import math

import pytest
import torch

from cemabench.errors import UserError
from cemabench.method import Upload
from cemabench.registry import build_method
from cemabench_methods.roid import (
    certainty_diversity_weights,
    prior_correction,
    roid_augment,
    roid_normalisation,
    soft_likelihood_ratio,
)
from conftest import cloud_resources

pytestmark = pytest.mark.usefixtures("float64")

LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [10.0, 0.0, 0.0]]


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_the_soft_likelihood_ratio_clips_probabilities_at_0_99():
    """-sum_c p log(p / (1 - p) + 1e-5), p clipped to 0.99 (the last row's top class has p = 0.99991)."""
    expected = []
    for row in LOGITS:
        p = [min(v, 0.99) for v in _softmax(row)]
        expected.append(-sum(v * math.log(v / (1 - v) + 1e-5) for v in p))
    assert _softmax(LOGITS[3])[0] > 0.999
    got = soft_likelihood_ratio(torch.tensor(LOGITS))
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-14, atol=1e-14)


def test_certainty_and_diversity_weights_and_the_samples_they_drop():
    """Diversity 1 - cos(class probabilities, p_i) and certainty -H(p_i), each min-max normalised over the batch; a
    sample below the mean diversity gets weight 0, the others exp(diversity x certainty / T)."""
    ema = [0.5, 0.3, 0.2]
    probs = [_softmax(r) for r in LOGITS]
    norm = math.sqrt(sum(v * v for v in ema))
    div = [1 - sum(a * b for a, b in zip(ema, p)) / (norm * math.sqrt(sum(b * b for b in p))) for p in probs]
    div = [(d - min(div)) / (max(div) - min(div)) for d in div]
    cert = [sum(v * math.log(v) for v in p) for p in probs]  # -H
    cert = [(c - min(cert)) / (max(cert) - min(cert)) for c in cert]
    mean = sum(div) / len(div)
    expected = [0.0 if d < mean else math.exp(d * c * 3) for d, c in zip(div, cert)]
    weights, dropped = certainty_diversity_weights(torch.tensor(LOGITS), torch.tensor(ema), 1 / 3)
    assert dropped.tolist() == [d < mean for d in div] and 0 < sum(dropped.tolist()) < 4
    assert torch.allclose(weights, torch.tensor(expected), rtol=1e-13, atol=1e-14)


def test_the_prior_correction_multiplies_the_logits_by_the_smoothed_batch_prior():
    """pi = mean softmax, s = max(1/N, 1/C) / max(pi), logits x (pi + s) / (1 + s C) (the logits, as released)."""
    probs = [_softmax(r) for r in LOGITS]
    prior = [sum(p[c] for p in probs) / 4 for c in range(3)]
    s = max(1 / 4, 1 / 3) / max(prior)
    smoothed = [(v + s) / (1 + s * 3) for v in prior]
    expected = [[v * smoothed[c] for c, v in enumerate(row)] for row in LOGITS]
    assert torch.allclose(prior_correction(torch.tensor(LOGITS)), torch.tensor(expected), rtol=1e-14, atol=1e-14)


def _by_hand_loss(model, x, ema, divisor, seed):
    """The released loss written out: weighted SLR over the kept samples + weighted symmetric cross-entropy between
    the augmented kept samples' output and theirs, each summed over samples and divided by the batch size."""
    logits = model(x)
    weights, dropped = certainty_diversity_weights(logits, ema, 1 / 3)
    keep = ~dropped
    p = logits.softmax(1).clamp(max=0.99)
    slr = -(p * torch.log(p / (1 - p) + 1e-5)).sum(1)
    torch.manual_seed(seed)
    aug = model(roid_augment(x[keep]))
    t, a = logits[keep], aug
    sce = -0.5 * (t.softmax(1) * a.log_softmax(1)).sum(1) - 0.5 * (a.softmax(1) * t.log_softmax(1)).sum(1)
    return (slr * weights)[keep].sum() / divisor + (sce * weights[keep]).sum() / divisor, logits


def test_one_cloud_step_is_the_weighted_step_then_the_weight_ensembling():
    """Nesterov SGD's first step moves by lr (1 + momentum) g; then p <- 0.99 p + 0.01 p_source. The divisor is the
    configured batch size (the protocol's 64, not the 6 uploaded). The running class probabilities move to
    0.9 uniform + 0.1 mean softmax."""
    resources = cloud_resources()
    ref = roid_normalisation(resources.edge_replica())
    source = {n: p.detach().clone() for n, p in ref.named_parameters()}
    x = torch.rand(6, 3, 6, 6)
    params = [ref.bn.weight, ref.bn.bias]
    uniform = torch.full((4,), 0.25)
    loss, logits = _by_hand_loss(ref, x, uniform, 64, seed=7)
    g = torch.autograd.grad(loss, params)
    cloud = build_method("roid", {"lr": 0.05}).cloud(resources)
    torch.manual_seed(7)
    down = cloud.step(Upload(x, {}, 0, index=torch.arange(6)))
    assert set(down) == {"bn.weight", "bn.bias"}
    for name, p, gp in zip(("bn.weight", "bn.bias"), params, g):
        stepped = p.detach() - 0.05 * 1.9 * gp
        expected = 0.99 * stepped + (1 - 0.99) * source[name]
        assert torch.allclose(down[name], expected, rtol=0, atol=1e-15)
        assert (down[name] - source[name]).abs().max() > 1e-4  # the step moved it
    assert torch.allclose(cloud.class_probs, 0.9 * uniform + 0.1 * logits.softmax(1).mean(0).detach(), atol=1e-16)


def test_the_edge_predicts_with_batch_statistics_corrects_the_prior_and_uploads_every_sample():
    resources = cloud_resources()
    model = resources.edge_replica()
    edge = build_method("roid").edge(4)
    configured = edge.configure(model)
    assert not configured.training and configured.bn.running_mean is None  # eval mode, batch statistics
    x = torch.rand(5, 3, 6, 6)
    with torch.inference_mode():
        decision = edge.step(configured, x)
        plain = configured(x)
    assert torch.equal(decision.upload, torch.arange(5))
    assert torch.allclose(decision.logits, prior_correction(plain), rtol=0, atol=0)
    off = build_method("roid", {"use_prior_correction": False}).edge(4)
    with torch.inference_mode():
        assert torch.equal(off.step(off.configure(resources.edge_replica()), x).logits, plain)


def test_the_augmentation_is_one_seeded_draw_that_keeps_the_side_and_the_range():
    x = torch.rand(3, 3, 8, 8)
    torch.manual_seed(3)
    a = roid_augment(x)
    torch.manual_seed(3)
    assert torch.equal(a, roid_augment(x))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)


def test_consistency_without_weighting_is_refused_before_any_compute():
    with pytest.raises(UserError, match="use_consistency = true needs use_weighting = true"):
        build_method("roid", {"use_weighting": False})
    build_method("roid", {"use_weighting": False, "use_consistency": False})
