"""The Pareto (min-norm gradient) step of ECCENTRIC's training: the multiple-gradient descent direction.

Given the gradients g_1..g_n of n objectives, the direction is the minimum-norm point of their convex hull,
d = sum_i a_i g_i with a on the simplex minimising |d|^2 (J.-A. Désidéri, "Multiple-gradient descent algorithm (MGDA)
for multiobjective optimization", C. R. Math. 350 (2012) 313-318). Stepping along -d decreases every objective
whose gradient has a positive inner product with d (all of them unless d = 0, a Pareto-stationary point). Two
objectives have a closed form; more are solved by Frank-Wolfe on the Gram matrix, the solver of O. Sener and
V. Koltun, "Multi-Task Learning as Multi-Objective Optimization" (NeurIPS 2018), here with away steps and a
corrective step on the current face of the simplex, so that it reaches the optimum in a few iterations rather than
zig-zagging towards it. To steer the step towards a chosen point of the trade-off, scale the losses before calling
:func:`min_norm_backward` (a loss times s has gradient s * g).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch


def _two(v11: float, v12: float, v22: float) -> float:
    """The weight a on x1 minimising |a x1 + (1 - a) x2|^2, from the inner products: ((x2 - x1).x2) / |x1 - x2|^2
    clamped to [0, 1]; 1/2 when x1 = x2 (every weight gives the same point)."""
    denominator = v11 - 2.0 * v12 + v22
    if denominator <= 0.0:
        return 0.5
    return min(1.0, max(0.0, (v22 - v12) / denominator))


def _on_face(gram: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The corrective step: the minimum of a^T M a over the affine hull of the current support (the KKT system
    M_S a + mu 1 = 0, 1^T a = 1), taken when it lies in the simplex and does not increase the objective."""
    support = np.flatnonzero(alpha > 0)
    k = len(support)
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k], kkt[:k, k], kkt[k, :k] = gram[np.ix_(support, support)], 1.0, 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    if (solution[:k] < 0).any() or not np.allclose(kkt @ solution, rhs, rtol=0, atol=1e-12):
        return alpha
    candidate = np.zeros_like(alpha)
    candidate[support] = solution[:k] / solution[:k].sum()
    return candidate if candidate @ gram @ candidate <= alpha @ gram @ alpha else alpha


def _frank_wolfe(gram: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
    """min over the simplex of a^T M a, by Frank-Wolfe with away steps, exact line search and a corrective step on
    the current face, stopped when the Frank-Wolfe gap (a bound on a^T M a minus its minimum) is below ``tol``
    times the largest |g_i|^2."""
    n = len(gram)
    alpha = np.full(n, 1.0 / n)
    threshold = tol * max(float(np.max(np.diag(gram))), np.finfo(np.float64).tiny)
    for _ in range(max_iter):
        grad = gram @ alpha  # half the objective's gradient
        value = float(alpha @ grad)
        toward = int(np.argmin(grad))
        active = np.flatnonzero(alpha > 0)
        away = int(active[np.argmax(grad[active])])
        fw_gap, away_gap = value - grad[toward], grad[away] - value
        if fw_gap <= threshold:
            break
        if fw_gap >= away_gap:
            direction, largest = -alpha, 1.0
            direction[toward] += 1.0
        else:
            direction, largest = alpha.copy(), alpha[away] / (1.0 - alpha[away])
            direction[away] -= 1.0
        curvature = float(direction @ gram @ direction)
        slope = float(direction @ grad)
        step = largest if curvature <= 0.0 else min(largest, -slope / curvature)
        alpha = alpha + step * direction
        if fw_gap < away_gap and step == largest:
            alpha[away] = 0.0  # the away vertex leaves the active set exactly
        alpha = np.clip(alpha, 0.0, None)
        alpha = _on_face(gram, alpha / alpha.sum())
    return alpha


def weights_from_gram(gram: torch.Tensor, tol: float = 1e-12, max_iter: int = 10_000) -> torch.Tensor:
    """The min-norm convex weights from the Gram matrix M_ij = g_i . g_j of the gradients (float64, CPU)."""
    gram = gram.detach().to("cpu", torch.float64)
    if not torch.isfinite(gram).all():
        raise ValueError("a gradient holds a NaN or an infinity")
    n = len(gram)
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    if n == 2:
        first = _two(float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1]))
        return torch.tensor([first, 1.0 - first], dtype=torch.float64)
    return torch.from_numpy(_frank_wolfe(gram.numpy(), tol, max_iter))


def min_norm_weights(grads: Sequence[torch.Tensor], tol: float = 1e-12, max_iter: int = 10_000) -> torch.Tensor:
    """The convex weights a (a >= 0, sum a = 1) minimising |sum_i a_i g_i|^2, as a float64 tensor on the CPU.

    Gradients of any shape are flattened; all must have the same number of elements. Inner products are taken in
    float64 on the gradients' device: the exact closed form for two objectives, Frank-Wolfe (tolerance ``tol``
    relative to the largest |g_i|^2) for more."""
    if len(grads) == 0:
        raise ValueError("min_norm_weights needs at least one gradient")
    if len({g.numel() for g in grads}) != 1:
        raise ValueError(f"gradients differ in size: {[g.numel() for g in grads]}")
    flat = torch.stack([g.detach().reshape(-1).to(torch.float64) for g in grads])
    return weights_from_gram(flat @ flat.T, tol, max_iter)


def min_norm_backward(losses: Sequence[torch.Tensor], parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """Accumulate into each parameter's ``.grad`` (as ``backward`` does) the min-norm combination of the losses'
    gradients, sum_i a_i grad(loss_i), and return a. An optimiser step then moves along the common descent
    direction. A loss that does not reach a parameter contributes zero to it."""
    if len(losses) == 0:
        raise ValueError("min_norm_backward needs at least one loss")
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("min_norm_backward needs parameters that require grad")
    per_loss = []
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
        per_loss.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    n = len(per_loss)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for j in range(len(params)):  # per parameter, so the gradients are never concatenated into one copy
        flat = torch.stack([per_loss[i][j].reshape(-1).to(torch.float64) for i in range(n)])
        gram += (flat @ flat.T).cpu()
    alpha = weights_from_gram(gram)
    for j, param in enumerate(params):
        combined = sum(float(alpha[i]) * per_loss[i][j] for i in range(len(per_loss)))
        if param.grad is None:
            param.grad = combined.detach()
        else:
            param.grad.add_(combined)
    return alpha
