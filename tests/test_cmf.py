"""CMF (Lee et al., ICLR 2024) against values derived by hand from the official algorithm (j-pong/CMF), float64: the
Kalman filter's variance and gain with the released clipping, one filter step on the parameters (predict towards the
source, update towards the trained parameters, ensemble), both ensembling targets, and the process noise's scale."""
import pytest
import torch

from cemabench.method import Upload
from cemabench.registry import build_method
from cemabench_methods.cmf import kalman_beta
from conftest import cloud_resources

pytestmark = pytest.mark.usefixtures("float64")


def test_the_filter_variance_and_gain_as_released():
    """v' = alpha^2 v + q, beta = (1 - q) / (v' + 1 - q), then v <- beta v'; beta clipped below at 0.89, and 1 from
    0.9999 up."""
    q, alpha = 0.01, 0.9
    predicted = 0.81 * 0.05 + 0.01
    beta = 0.99 / (predicted + 0.99)
    assert kalman_beta(0.05, q, alpha) == pytest.approx((beta, beta * predicted), rel=1e-15)
    assert 0.89 < beta < 0.9999
    assert kalman_beta(0.0, 1e-5, 0.99) == (1.0, 1e-5)  # gain complement 0.99999 -> 1
    assert kalman_beta(0.5, 0.2, 0.99) == (0.89, 0.89 * (0.9801 * 0.5 + 0.2))  # 0.8 / 1.49 -> 0.89


@pytest.mark.parametrize("ensemble_with", ["posterior", "prior"])
def test_one_filter_step_on_the_parameters(ensemble_with):
    """After the step's trained value theta: h <- alpha h + (1 - alpha) source; h <- beta h + (1 - beta) theta;
    theta <- gamma theta + (1 - gamma) h (the updated h: "posterior", the official default; the predicted one:
    "prior")."""
    resources = cloud_resources()
    cloud = build_method("cmf", {"q": 0.5, "alpha": 0.9, "gamma": 0.8, "ensemble_with": ensemble_with}).cloud(
        resources)
    assert cloud.q == 0.5 * (8 / 38400)  # 8 trained parameters: bn.weight and bn.bias, 4 each
    source = {n: v.clone() for n, v in cloud.source.items()}
    hidden = {n: source[n] + 0.3 for n in source}
    cloud.hidden = {n: v.clone() for n, v in hidden.items()}
    cloud.variance = 0.05
    theta = {}
    with torch.no_grad():
        for n, p in cloud.trained:
            p.add_(torch.linspace(-1, 1, p.numel()))
            theta[n] = p.detach().clone()
        cloud.merge()
    predicted_var = 0.81 * 0.05 + cloud.q
    beta = (1 - cloud.q) / (predicted_var + 1 - cloud.q)
    assert 0.89 < beta < 0.9999 and cloud.beta == pytest.approx(beta, rel=1e-15)
    assert cloud.variance == pytest.approx(beta * predicted_var, rel=1e-15)
    for n, p in cloud.trained:
        h_pred = 0.9 * hidden[n] + 0.1 * source[n]
        h = beta * h_pred + (1 - beta) * theta[n]
        target = h if ensemble_with == "posterior" else h_pred
        assert torch.allclose(cloud.hidden[n], h, rtol=0, atol=1e-15)
        assert torch.allclose(p.detach(), 0.8 * theta[n] + 0.2 * target, rtol=0, atol=1e-15)


def test_a_step_filters_instead_of_ensembling_with_the_source():
    """The first steps with the defaults: q = 0.005 x 8 / 38,400 keeps beta at 1 (clipped), so the hidden
    parameters stay the source's and theta <- 0.99 theta + 0.01 source, as ROID's ensembling; once the variance
    grows past it the gain opens. Both methods run the same step before the filter."""
    resources = cloud_resources()
    x = torch.rand(6, 3, 6, 6)
    plain = {"use_consistency": False}  # the augmentation plays no part in the filter
    cmf, roid = build_method("cmf", plain).cloud(resources), build_method("roid", plain).cloud(resources)
    for t in range(2):
        down = cmf.step(Upload(x, {}, t, index=torch.arange(6)))
        same = roid.step(Upload(x, {}, t, index=torch.arange(6)))
        assert all(torch.equal(down[n], same[n]) for n in same)
        assert cmf.beta == 1.0
    cmf.variance = 0.01
    before = {n: p.detach().clone() for n, p in cmf.trained}
    with torch.no_grad():
        cmf.merge()
    assert 0.89 < cmf.beta < 0.9999
    for n, p in cmf.trained:
        assert not torch.allclose(p, 0.99 * before[n] + 0.01 * cmf.source[n], rtol=0, atol=1e-12)
