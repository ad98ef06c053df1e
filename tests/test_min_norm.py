"""The min-norm (MGDA) solver: closed form for two objectives, Frank-Wolfe for more, and the parameter step."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cemabench_methods.pareto import min_norm_backward, min_norm_weights


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("g1, g2, expected", [
    # orthogonal, equal length: ((g2-g1).g2)/|g1-g2|^2 = 1/2
    ((1.0, 0.0), (0.0, 1.0), 0.5),
    # orthogonal, unequal: (g2-g1).g2 = 1, |g1-g2|^2 = 5 -> 0.2, the point (0.4, 0.8) orthogonal to g1 - g2
    ((2.0, 0.0), (0.0, 1.0), 0.2),
    # g1 dominated-side: (g2-g1).g2 = 7, |g1-g2|^2 = 5 -> 1.4, clamped to 1 (g1 is the min-norm point: g1.g2 >= |g1|^2)
    ((1.0, 0.0), (3.0, 1.0), 1.0),
    # the other way round: (g2-g1).g2 = -2 -> clamped to 0
    ((3.0, 1.0), (1.0, 0.0), 0.0),
    # parallel, same direction: (1,1).(2,2) = 4, |g1-g2|^2 = 2 -> 2, clamped to 1: the shorter gradient
    ((1.0, 1.0), (2.0, 2.0), 1.0),
    # anti-parallel: (-4)(-3) = 12, 16 -> 0.75; 0.75 * 1 + 0.25 * (-3) = 0, a Pareto-stationary point
    ((1.0, 0.0), (-3.0, 0.0), 0.75),
    # identical: every weight gives the same point; the solver answers 1/2
    ((0.3, -0.7), (0.3, -0.7), 0.5),
])
def test_two_objectives_closed_form(g1, g2, expected):
    alpha = min_norm_weights([t(*g1), t(*g2)])
    assert alpha.dtype == torch.float64
    assert alpha.tolist() == pytest.approx([expected, 1.0 - expected], abs=1e-15)


def test_two_objectives_any_shape_and_dtype_and_the_optimality_condition():
    torch.manual_seed(0)
    g1, g2 = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    alpha = min_norm_weights([g1, g2])
    d = alpha[0] * g1.double() + alpha[1] * g2.double()
    assert 0 < alpha[0] < 1
    assert float((d * (g1.double() - g2.double())).sum()) == pytest.approx(0.0, abs=1e-12)  # interior: d _|_ g1-g2


def _qp(grads: torch.Tensor) -> tuple[np.ndarray, float]:
    """The same QP solved by scipy's SLSQP from several starts, as an independent reference."""
    gram = (grads @ grads.T).numpy()
    n = len(gram)
    best = None
    for start in [np.full(n, 1 / n), *np.eye(n)]:
        found = minimize(lambda a: a @ gram @ a, start, jac=lambda a: 2 * gram @ a, method="SLSQP",
                         bounds=[(0, 1)] * n, constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}],
                         options={"ftol": 1e-16, "maxiter": 1000})
        if best is None or found.fun < best.fun:
            best = found
    return best.x, float(best.fun)


def _value(alpha, grads):
    return float((alpha @ grads).pow(2).sum())


@pytest.mark.parametrize("seed", range(5))
def test_three_objectives_match_scipy_in_general_position(seed):
    grads = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    alpha = min_norm_weights(list(grads))
    reference, best = _qp(grads)
    assert alpha.min() >= 0 and float(alpha.sum()) == pytest.approx(1.0, abs=1e-15)
    assert _value(alpha, grads) == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert alpha.numpy() == pytest.approx(reference, abs=1e-6)  # unique: the Gram matrix is positive definite


def test_three_objectives_with_the_optimum_on_an_edge_and_at_a_vertex():
    # g3 far beyond the segment g1-g2 on its far side: the min-norm point is on the edge (g1, g2) and a3 = 0.
    edge = t(1.0, 0.0, 0.0), t(0.0, 1.0, 0.0), t(4.0, 4.0, 1.0)
    alpha = min_norm_weights(list(edge))
    assert alpha.tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-9)
    # one short gradient that every other gradient sees at >= its own length: it alone is the answer.
    vertex = t(1.0, 0.0), t(2.0, 1.0), t(2.0, -1.0)
    assert min_norm_weights(list(vertex)).tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-9)


def test_zero_in_the_hull_gives_a_stationary_combination():
    grads = torch.stack([t(1.0, 0.0), t(-1.0, 1.0), t(-1.0, -1.0), t(0.5, 0.5)])  # 4 objectives in R^2
    alpha = min_norm_weights(list(grads))
    assert _value(alpha, grads) == pytest.approx(0.0, abs=1e-12)
    assert _qp(grads)[1] == pytest.approx(0.0, abs=1e-12)


def test_kkt_conditions_hold_for_many_objectives():
    grads = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(11)) + 0.5
    alpha = min_norm_weights(list(grads))
    d = alpha @ grads
    inner = grads @ d  # optimality: g_i . d >= |d|^2 for all i, with equality where a_i > 0
    assert (inner >= d @ d - 1e-9).all()
    assert inner[alpha > 1e-6].numpy() == pytest.approx(float(d @ d), abs=1e-9)
    assert _value(alpha, grads) == pytest.approx(_qp(grads)[1], rel=1e-8, abs=1e-12)


def test_bad_gradients_are_rejected():
    with pytest.raises(ValueError, match="at least one"):
        min_norm_weights([])
    with pytest.raises(ValueError, match="differ in size"):
        min_norm_weights([torch.zeros(2), torch.zeros(3)])
    with pytest.raises(ValueError, match="NaN"):
        min_norm_weights([torch.zeros(2), torch.tensor([float("nan"), 0.0])])


def test_min_norm_backward_sets_the_combined_gradient_and_descends_on_both_losses():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    target = torch.randn(16, 2, dtype=torch.float64)

    def losses():
        out = model(x)
        return [(out[:, 0] - target[:, 0]).pow(2).mean(), (out[:, 1] - 2 * target[:, 1]).abs().mean()]

    separate = [torch.autograd.grad(loss, list(model.parameters()), retain_graph=True) for loss in losses()]
    flat = [torch.cat([g.reshape(-1) for g in grads]) for grads in separate]
    expected_alpha = min_norm_weights(flat)
    with torch.no_grad():
        before = [float(loss) for loss in losses()]
    alpha = min_norm_backward(losses(), model.parameters())
    assert torch.equal(alpha, expected_alpha) and 0 < alpha[0] < 1
    for param, g1, g2 in zip(model.parameters(), *separate):
        assert torch.allclose(param.grad, alpha[0] * g1 + alpha[1] * g2, atol=1e-15, rtol=0)
    with torch.no_grad():
        for param in model.parameters():
            param -= 1e-3 * param.grad
        after = [float(loss) for loss in losses()]
    assert after[0] < before[0] and after[1] < before[1]


def test_min_norm_backward_accumulates_and_handles_a_loss_that_misses_a_parameter():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    a.grad = torch.ones(2, dtype=torch.float64)
    alpha = min_norm_backward([a.sum(), 2 * b.sum()], [a, b])  # grads (1, 1, 0) and (0, 0, 2): a = 4/6
    assert alpha.tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-15)
    assert a.grad.tolist() == pytest.approx([1 + 2 / 3, 1 + 2 / 3], abs=1e-15)
    assert b.grad.tolist() == pytest.approx([2 / 3], abs=1e-15)
