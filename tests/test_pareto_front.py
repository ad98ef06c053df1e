"""Pareto fronts: dominance on hand-built cases, ties, directions, and the trade-off plot."""
import numpy as np
import pandas as pd
import pytest

from cemabench.report.plots import COMMUNICATION, COMPUTATION, Axis, non_dominated, plot_frame, plot_tradeoffs

ACC_BYTES = {"accuracy": "max", "bytes": "min"}


def mask(rows, objectives=ACC_BYTES):
    return non_dominated([dict(zip(objectives, row)) for row in rows], objectives).tolist()


def test_dominance_on_a_hand_built_front():
    rows = [(90, 100),   # front: the most accurate
            (80, 10),    # front: cheap and decent
            (85, 50),    # front: between the two
            (80, 60),    # dominated by (85, 50) and by (80, 10)
            (70, 10),    # dominated by (80, 10): same bytes, less accurate
            (60, 0)]     # front: the cheapest of all
    assert mask(rows) == [True, True, True, False, False, True]


def test_directions_matter():
    rows = [(1, 1), (2, 2)]
    assert mask(rows, {"a": "max", "b": "min"}) == [True, True]
    assert mask(rows, {"a": "max", "b": "max"}) == [False, True]
    assert mask(rows, {"a": "min", "b": "min"}) == [True, False]


def test_ties_are_all_kept_and_order_does_not_matter():
    rows = [(80, 10), (80, 10), (70, 10), (80, 20)]
    assert mask(rows) == [True, True, False, False]
    assert mask(rows[::-1]) == [False, False, True, True]


def test_three_objectives_and_a_single_point():
    objectives = {"accuracy": "max", "bytes": "min", "flops": "min"}
    rows = [(80, 10, 5), (80, 10, 6), (90, 20, 1), (70, 5, 9), (70, 20, 9)]
    assert mask(rows, objectives) == [True, False, True, True, False]
    assert mask([(1, 2)]) == [True]
    assert non_dominated(pd.DataFrame(columns=["accuracy", "bytes"]), ACC_BYTES).tolist() == []


def test_bad_objectives_and_values_are_rejected():
    frame = pd.DataFrame({"accuracy": [1.0, np.nan], "bytes": [1, 2]})
    with pytest.raises(ValueError, match=r"points \[1\] have a NaN"):
        non_dominated(frame, ACC_BYTES)
    with pytest.raises(ValueError, match="'max' or 'min'"):
        non_dominated(frame, {"accuracy": "higher"})
    with pytest.raises(ValueError, match="lack the objective column"):
        non_dominated(frame, {"flops": "min"})


def dummy_points() -> pd.DataFrame:
    """Made-up operating points shaped like a real sweep (not results)."""
    rows = [{"family": "cloud-only", "accuracy": 92.0, "bytes_per_sample": 3112, "gflops_per_sample": 0.56,
             "reference": True},
            {"family": "edge-only", "accuracy": 71.0, "bytes_per_sample": 0, "gflops_per_sample": 0.04,
             "reference": True}]
    for acc, up in ((76, 0.2), (82, 0.35), (88, 0.6), (90.5, 0.8)):
        rows.append({"family": "confidence-offload", "method": "confidence-offload", "accuracy": acc,
                     "bytes_per_sample": up * 3112, "gflops_per_sample": 0.04 + up * 0.56})
    for depth in (1, 2, 3):
        for acc, kib, gf in ((84, 8.0, 0.45), (86, 4.0, 0.30), (83, 2.0, 0.15)):
            rows.append({"family": "ecc-adaptive", "method": f"ecc-adaptive r{depth}", "accuracy": acc + depth,
                         "bytes_per_sample": kib * 1024 * 0.5, "gflops_per_sample": gf + 0.02 * depth})
    for budget, acc in ((0.1, 79.0), (0.3, 81.0), (1.0, 83.0)):
        rows.append({"family": "cema", "accuracy": acc, "bytes_per_sample": budget * 3072 + 2400,
                     "gflops_per_sample": 0.04 + budget * 1.7})
    return pd.DataFrame(rows)


def test_the_plot_is_a_png(tmp_path):
    path = plot_tradeoffs(dummy_points(), tmp_path / "plots" / "tradeoffs.png", title="dummy sweep (not results)")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1408, 572)


def test_the_plot_takes_custom_panels_and_needs_a_family(tmp_path):
    points = dummy_points()
    path = plot_tradeoffs(points, tmp_path / "one.png", panels=[Axis("gflops_per_sample", "GFLOPs", scale="log")])
    assert path.is_file()
    with pytest.raises(ValueError, match="'family' column"):
        plot_tradeoffs(points.drop(columns="family"), tmp_path / "x.png", panels=[COMMUNICATION, COMPUTATION])


def test_missing_method_and_reference_values_default_to_the_family_and_not_a_reference():
    frame = plot_frame(dummy_points())
    assert frame["reference"].tolist() == [True, True] + [False] * (len(frame) - 2)
    assert frame.loc[frame["family"] == "cema", "method"].tolist() == ["cema"] * 3
    assert frame.loc[frame["family"] == "ecc-adaptive", "method"].nunique() == 3


def test_labels_of_nearby_sweep_points_do_not_print_over_each_other():
    """Issue 23: seven operating points near one another had no labels; labelled, none may overlap another."""
    from matplotlib.figure import Figure

    from cemabench.report.plots import _place_labels

    ax = Figure(figsize=(6, 4)).subplots()
    ax.plot([0, 10], [0, 10])
    labels = [(1.0 + 0.01 * k, 5.0 - 0.01 * k, f"@0.{k}", "black") for k in range(7)]
    _place_labels(ax, labels)
    spots = [(a.xy, a.xyann) for a in ax.texts]
    assert sorted(a.get_text() for a in ax.texts) == sorted(t for *_, t, _ in labels)
    pts = [ax.transData.transform(xy) * 72 / ax.figure.dpi + xyann for xy, xyann in spots]
    assert all(abs(p[0] - q[0]) >= 45 or abs(p[1] - q[1]) >= 8 for i, p in enumerate(pts) for q in pts[:i])


def test_each_knob_sweep_is_its_own_line_and_its_points_say_their_value():
    """A plugin entered with two routers is two sweeps, not one line through both; plain entries of a plugin stay
    one sweep (ECC-A's stage layouts)."""
    from cemabench.report.leaderboard import sweeps

    labels = ["hard-example-offload:ibt@0.5", "hard-example-offload:ibt@0.8", "hard-example-offload:threshold@0.5",
              "confidence-offload@0.7", "ecc-a:l1>l2,r1", "ecc-a:l2>l3,r2"]
    families = ["hard-example-offload"] * 3 + ["confidence-offload", "ecc-adaptive", "ecc-adaptive"]
    series, points = sweeps(labels, families)
    assert series == ["hard-example-offload:ibt", "hard-example-offload:ibt", "hard-example-offload:threshold",
                      "confidence-offload", "ecc-adaptive", "ecc-adaptive"]
    assert points == ["@0.5", "@0.8", "@0.5", "@0.7", "ecc-a:l1>l2,r1", "ecc-a:l2>l3,r2"]


def test_the_tradeoff_plot_gives_each_sweep_its_own_colour_and_says_it_is_the_miniature(tmp_path, monkeypatch):
    """Issue 23: bn-adapt and random-upload were both blue, lame and confidence-offload both orange, and the title
    said "table2: ImageNet-C, severity 5" over miniature numbers."""
    import json
    from pathlib import Path

    from matplotlib.figure import Figure

    from cemabench.report.leaderboard import write_tradeoff_plot

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self) or save(self, *a, **k))
    doc = json.loads((Path(__file__).parents[1] / "leaderboards" / "table2.miniature.json").read_text())
    assert write_tradeoff_plot(doc, tmp_path / "t.png")
    (figure,) = figures
    sweeps = [h for h in figure.legends[0].legend_handles if h.get_linestyle() != "None"]  # stars, ring: markers only
    colours = [tuple(h.get_color()) for h in sweeps]
    assert len(sweeps) >= 12 and len(set(colours)) == len(colours)
    assert figure._suptitle.get_text().startswith("EMBEDDED MINIATURE, NOT IMAGENET-C\ntable2: ")
