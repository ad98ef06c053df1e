"""Pareto fronts of operating points (accuracy against communication and computation) and their plots.

A point is *dominated* when another point is at least as good in every objective and strictly better in one.
Points with identical objective values do not dominate each other, so ties are all kept on the front: the marking
depends only on the values, never on the order of the points.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

DIRECTIONS = ("max", "min")


def non_dominated(points: pd.DataFrame | Sequence[Mapping[str, float]], objectives: Mapping[str, str]) -> np.ndarray:
    """A boolean mask, in the order of ``points``, of the points no other point dominates. ``objectives`` maps a
    column to ``"max"`` (higher is better, e.g. accuracy) or ``"min"`` (lower is better, e.g. bytes, FLOPs)."""
    frame = pd.DataFrame(list(points)) if not isinstance(points, pd.DataFrame) else points
    if not objectives:
        raise ValueError("non_dominated needs at least one objective")
    bad = {column: way for column, way in objectives.items() if way not in DIRECTIONS}
    if bad:
        raise ValueError(f"objective directions must be 'max' or 'min', got {bad}")
    missing = [column for column in objectives if column not in frame.columns]
    if missing:
        raise ValueError(f"points lack the objective column(s) {missing}; they have {list(frame.columns)}")
    if frame.empty:
        return np.zeros(0, dtype=bool)
    values = np.stack([frame[c].to_numpy(dtype=np.float64) * (1.0 if way == "max" else -1.0)
                       for c, way in objectives.items()], axis=1)  # every objective as higher-is-better
    if not np.isfinite(values).all():
        rows = sorted(set(np.flatnonzero(~np.isfinite(values).all(axis=1)).tolist()))
        raise ValueError(f"points {rows} have a NaN or infinite objective value")
    at_least = (values[:, None, :] >= values[None, :, :]).all(axis=2)  # [i, j]: i is at least as good as j
    better = (values[:, None, :] > values[None, :, :]).any(axis=2)
    dominates = at_least & better
    return ~dominates.any(axis=0)


@dataclass(frozen=True)
class Axis:
    """A plotted metric: its column, the axis label (with the unit), a divisor into that unit, and the scale."""

    column: str
    label: str
    divide: float = 1.0
    scale: str = "linear"


ACCURACY = Axis("accuracy", "top-1 accuracy (%)")
COMMUNICATION = Axis("bytes_per_sample", "communication (KiB per sample, up + down)", divide=1024.0)
COMPUTATION = Axis("gflops_per_sample", "computation (GFLOPs per sample, edge + cloud)")
LABELS = Axis("labels_per_1000", "labels the cloud asked for (per 1,000 samples)")
UPLOADS = Axis("upload_percent", "samples uploaded (%)")
LATENCY = Axis("latency_p50", "modelled latency per sample, median over domains of each domain's median (s)")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "p", "8")
REFERENCE_MARKERS = ("*", "X", "d", "8")


def plot_frame(points: pd.DataFrame) -> pd.DataFrame:
    """The points as :func:`plot_tradeoffs` draws them: a fresh index, ``method`` defaulting to the family (also
    where it is missing), ``reference`` True only where it is True (a missing value is not a reference)."""
    frame = points.reset_index(drop=True).copy()
    if "family" not in frame.columns:
        raise ValueError("points need a 'family' column")
    method = frame["method"] if "method" in frame.columns else pd.Series(np.nan, index=frame.index)
    frame["method"] = method.where(method.notna(), frame["family"])
    reference = frame["reference"] if "reference" in frame.columns else pd.Series(False, index=frame.index)
    frame["reference"] = reference.eq(True)
    return frame


def _place_labels(ax, labels: list) -> None:
    """Small labels beside their points, each moved down until it clears the ones placed before it (in points on
    the page, so that nearby operating points do not print over each other)."""
    ax.autoscale_view()
    placed = []
    for x, y, text, colour in sorted(labels, key=lambda item: -item[1]):
        px, py = ax.transData.transform((x, y)) * 72 / ax.figure.dpi
        dy = -9
        while any(abs(px - qx) < 45 and abs(py + dy - qy) < 8 for qx, qy in placed):
            dy -= 8
        placed.append((px, py + dy))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, dy), fontsize=6.5, color=colour)


def _sweep_names(frame: pd.DataFrame) -> list[tuple[str, str, bool]]:
    """Per sweep (``method``): its name, its family, and whether its family has several sweeps (then the legend
    names the sweep, else the family)."""
    rows = frame[~frame["reference"]]
    count = rows.groupby("family", sort=False)["method"].nunique()
    pairs = rows[["method", "family"]].drop_duplicates()
    return [(m, f, bool(count[f] > 1)) for m, f in zip(pairs["method"], pairs["family"])]


def plot_tradeoffs(points: pd.DataFrame, path: str | Path, panels: Sequence[Axis] = (COMMUNICATION, COMPUTATION),
                   accuracy: Axis = ACCURACY, title: str | None = None) -> Path:
    """Draw accuracy against each panel's metric into one PNG at ``path``.

    ``points`` has one row per operating point with the metric columns and: ``family`` (the method family),
    optionally ``method`` (the points of one sweep, joined by a line in order of the x value, with one colour and
    marker per sweep, named in the legend by its family, or by itself where its family has several; defaults to the
    family), optionally ``label`` (a short text drawn beside the point, such as a sweep's knob
    value) and ``reference`` (True for reference points such as cloud-only and edge-only,
    drawn as black stars labelled with their family, with a dotted line at their accuracy). The non-dominated points
    of each panel (accuracy up, the panel's metric down, references included) are ringed."""
    import matplotlib
    from matplotlib.figure import Figure  # a Figure without pyplot renders with Agg and leaves the backend alone
    from matplotlib.lines import Line2D

    frame = plot_frame(points)
    # one colour and marker per sweep (a family's several sweeps, such as one per router, each get their own)
    families = list(dict.fromkeys(frame.loc[~frame["reference"], "method"]))
    tab20 = matplotlib.colormaps["tab20"].colors  # 10 hues dark, then the same 10 light: 20 colours before a repeat
    colours = tab20[0::2] + tab20[1::2]
    style = {family: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, family in enumerate(families)}
    name = {m: (m if several_sweeps else f) for m, f, several_sweeps in _sweep_names(frame)}
    references = list(dict.fromkeys(frame.loc[frame["reference"], "family"]))
    ref_marker = {family: REFERENCE_MARKERS[i % len(REFERENCE_MARKERS)] for i, family in enumerate(references)}

    fig = Figure(figsize=(6.4 * len(panels), 5.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        x = frame[panel.column].to_numpy(dtype=np.float64) / panel.divide
        y = frame[accuracy.column].to_numpy(dtype=np.float64) / accuracy.divide
        front = non_dominated(frame, {accuracy.column: "max", panel.column: "min"})
        labels = []
        for method, rows in frame[~frame["reference"]].groupby("method", sort=False):
            colour, marker = style[method]
            order = rows.index[np.argsort(x[rows.index], kind="stable")]
            ax.plot(x[order], y[order], color=colour, marker=marker, markersize=6, linewidth=1.2, alpha=0.9)
            if "label" in rows and len(rows) > 1:  # each point of a sweep: its knob value
                labels += [(x[i], y[i], rows.at[i, "label"], colour) for i in order
                           if isinstance(rows.at[i, "label"], str) and rows.at[i, "label"]]
        for i in np.flatnonzero(frame["reference"].to_numpy()):
            family = frame.loc[i, "family"]
            ax.axhline(y[i], color="0.4", linestyle=":", linewidth=0.9, zorder=0)
            ax.plot(x[i], y[i], marker=ref_marker[family], color="black", markersize=11, linestyle="none", zorder=4)
            ax.annotate(family, (x[i], y[i]), textcoords="offset points", xytext=(9, 5), fontsize=9)
        ax.scatter(x[front], y[front], s=190, facecolors="none", edgecolors="black", linewidths=1.4, zorder=5)
        ax.margins(x=0.08, y=0.08)
        ax.set_xscale(panel.scale)
        _place_labels(ax, labels)
        ax.set_xlabel(panel.label)
        ax.set_ylabel(accuracy.label)
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=style[f][0], marker=style[f][1], linewidth=1.2, label=name[f]) for f in families]
    handles += [Line2D([], [], color="black", marker=ref_marker[f], markersize=11, linestyle="none",
                       label=f"{f} (reference)") for f in references]
    handles.append(Line2D([], [], marker="o", markersize=13, markerfacecolor="none", markeredgecolor="black",
                          linestyle="none", label="non-dominated (per panel)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), frameon=False)
    if title:
        fig.suptitle(title)
    rows_of_legend = -(-len(handles) // 4)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * rows_of_legend, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
