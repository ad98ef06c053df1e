"""The trade-off hypervolume: one number per sweep and cost axis that summarises how much of the trade-off a method
covers (issue 19), against the reference point a spec declares in ``[report.hypervolume]``
(:mod:`cemabench.config.report`).

For one cost axis, a point (cost c, score s) dominates every (c', s') with c <= c' <= C and R <= s' <= s, where
(C, R) is the reference point: the highest cost and the worst score that count. A sweep's hypervolume is the area
of the union of what its points dominate, as a share (%) of the box [0, C] x [R, 100]: 100 % would be a point scoring
100 at no cost, 0 % a sweep with no point inside the box. It is the two-objective hypervolume indicator (the S
metric) for each cost separately; a point outside the box on one axis adds nothing on that axis.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cemabench.config.report import HYPERVOLUME_AXES

EVERY_ENTRY = "(every entry)"


def hypervolume_2d(costs: Sequence[float], scores: Sequence[float], cost_ref: float, score_ref: float,
                   score_top: float = 100.0) -> float:
    """The share (0..1) of the box [0, cost_ref] x [score_ref, score_top] that the points dominate (lower cost and
    higher score are better)."""
    c, s = np.asarray(costs, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if c.shape != s.shape or c.ndim != 1:
        raise ValueError("costs and scores must be two sequences of the same length")
    if not (np.isfinite(c).all() and np.isfinite(s).all()):
        raise ValueError("costs and scores must be finite")
    if not (cost_ref > 0 and score_top > score_ref):
        raise ValueError("the reference box is empty")
    inside = (c <= cost_ref) & (s > score_ref)
    c, s = np.maximum(c[inside], 0.0), np.minimum(s[inside], score_top)
    share, best = 0.0, score_ref
    edges = np.append(np.unique(c), cost_ref)
    for left, right in zip(edges[:-1], edges[1:], strict=True):  # a step function: the best score at cost <= left
        best = max(best, s[c == left].max())
        # each strip's share of the box, widths and heights as fractions first (a huge cost_ref cannot overflow)
        share += (right / cost_ref - left / cost_ref) * ((best - score_ref) / (score_top - score_ref))
    return share


def hypervolume_frame(points: pd.DataFrame, series: list[str], reference: dict, score_key: str) -> pd.DataFrame:
    """Per sweep (``series``: one name per point, in the points' order) and for every entry together, the
    hypervolume (%) against each cost axis the reference declares; ``-`` where an axis has no value (the latency of
    a table without the time model)."""
    axes = [a for a in HYPERVOLUME_AXES if a in reference]
    frame = points.assign(series=series)
    groups = [(name, frame[frame["series"] == name]) for name in dict.fromkeys(series)] + [(EVERY_ENTRY, frame)]
    rows = {}
    for name, group in groups:
        row = {"points": len(group)}
        for axis in axes:
            label = f"vs {HYPERVOLUME_AXES[axis]} (ref {reference[axis]:g})"
            if axis not in group or group[axis].isna().any():
                row[label] = "-"
                continue
            share = hypervolume_2d(group[axis], group[score_key], reference[axis], reference["score"])
            row[label] = f"{100 * share:.1f}"
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")
