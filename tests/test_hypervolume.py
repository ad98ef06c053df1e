"""The trade-off hypervolume (issue 19): the area a sweep dominates, by hand; the spec's reference point and its
one-line errors; the leaderboard's section from a committed document."""
import json
from pathlib import Path

import pytest

from cemabench.config.report import parse_report
from cemabench.errors import UserError
from cemabench.report.hypervolume import EVERY_ENTRY, hypervolume_2d, hypervolume_frame
from cemabench.report.leaderboard import efficiency_points, render, sweeps
from cemabench.tables.spec import load_table

LEADERBOARDS = Path(__file__).parent.parent / "leaderboards"


def test_two_points_by_hand():
    # box: costs 0..4, scores 50..100 (area 200). (1, 80) dominates [1, 4] x [50, 80] = 90; (2, 90) adds
    # [2, 4] x [80, 90] = 20: 110 / 200
    assert hypervolume_2d([1, 2], [80, 90], 4, 50) == pytest.approx(0.55, abs=1e-15)
    assert hypervolume_2d([2, 1], [90, 80], 4, 50) == pytest.approx(0.55, abs=1e-15)  # order does not matter


def test_dominated_and_outside_points_add_nothing():
    base = hypervolume_2d([1, 2], [80, 90], 4, 50)
    assert hypervolume_2d([1, 2, 3], [80, 90, 85], 4, 50) == base  # dominated by (2, 90)
    assert hypervolume_2d([1, 2, 5], [80, 90, 99], 4, 50) == base  # costlier than the reference
    assert hypervolume_2d([1, 2, 0.5], [80, 90, 40], 4, 50) == base  # worse than the reference score
    assert hypervolume_2d([1, 2, 1], [80, 90, 80], 4, 50) == base  # a repeat


def test_the_corners():
    assert hypervolume_2d([0], [100], 4, 50) == 1.0  # a perfect score at no cost covers the box
    assert hypervolume_2d([], [], 4, 50) == 0.0
    assert hypervolume_2d([4], [100], 4, 50) == 0.0  # at the reference cost: a line, no area
    assert hypervolume_2d([0], [75], 10, 50) == 0.5
    with pytest.raises(ValueError, match="finite"):
        hypervolume_2d([float("nan")], [80], 4, 50)


@pytest.mark.parametrize("table, message", [
    ({"hypervolume": {"score": 50}}, "needs at least one cost axis"),
    ({"hypervolume": {"bytes_per_sample": 10}}, "needs score"),
    ({"hypervolume": {"score": 100, "bytes_per_sample": 10}}, "below 100"),
    ({"hypervolume": {"score": 50, "bytes_per_sample": -1}}, "must be a finite number above 0"),
    ({"hypervolume": {"score": 50, "bytes_per_sample": float("inf")}}, "must be a finite number above 0"),
    ({"energy": {"edge_joules_per_flop": 1e308}}, "edge_joules_per_flop must be a number from 0 to 1"),
    ({"energy": {"cloud_joules_per_flop": float("inf")}}, "cloud_joules_per_flop must be a number from 0 to 1"),
    ({"hypervolume": {"score": 50, "bytes_per_sample": True}}, "must be a number"),
    ({"hypervolume": {"score": 50, "bytez": 1}}, "unknown key.*bytez.*valid: score, bytes_per_sample"),
    ({"hypervolume": 3}, "must be a table"),
    ({"pareto": {}}, "unknown key.*pareto.*valid: energy, hypervolume"),
])
def test_reference_errors_are_one_line(table, message):
    with pytest.raises(UserError, match=message) as error:
        parse_report(table, "spec x [report]")
    assert "\n" not in str(error.value)


def test_a_spec_declares_it_and_the_leaderboard_shows_it(tmp_path):
    spec = tmp_path / "t.toml"
    spec.write_text('extends = "link-codecs"\nname = "t"\n[report.hypervolume]\nscore = 50\nbytes_per_sample = 6144\n'
                    'cloud_gflops_per_sample = 0.02\nlatency_p50 = 2.0\n')
    report = load_table(str(spec)).report  # merged into the parent's reference point, axis by axis
    assert report == {"hypervolume": {"score": 50.0, "bytes_per_sample": 6144.0, "gflops_per_sample": 0.06,
                                      "cloud_gflops_per_sample": 0.02, "latency_p50": 2.0}}
    doc = json.loads((LEADERBOARDS / "link-codecs.miniature.json").read_text())
    assert doc["report"] == load_table("link-codecs").report
    assert "## Trade-off hypervolume" not in render({**doc, "report": {}})  # nothing declared, nothing shown
    doc["report"] = report
    text = render(doc)
    assert "## Trade-off hypervolume" in text
    points = efficiency_points(doc)
    series, _ = sweeps(list(points["method"]), list(points["family"]))
    frame = hypervolume_frame(points, series, report["hypervolume"], "accuracy")
    cloud = points[[s == "cloud-only" for s in series]]
    expected = hypervolume_2d(cloud["bytes_per_sample"], cloud["accuracy"], 6144, 50)
    assert frame.loc["cloud-only", "vs bytes / sample (up + down) (ref 6144)"] == f"{100 * expected:.1f}"
    assert frame.loc["cloud-only", "points"] == len(cloud) > 1  # the codec entries are one sweep
    every = hypervolume_2d(points["bytes_per_sample"], points["accuracy"], 6144, 50)
    assert frame.loc[EVERY_ENTRY, "vs bytes / sample (up + down) (ref 6144)"] == f"{100 * every:.1f}"
    assert every >= expected > 0


def test_energy_per_sample_from_the_counts_by_hand(tmp_path):
    """[report.energy]: the edge's joules per sample are its counted FLOPs and bytes sent and received times their
    rates, the cloud's its FLOPs; computed from the cells, so the committed cells give them without a rerun."""
    doc = json.loads((LEADERBOARDS / "link-codecs.miniature.json").read_text())
    energy = {"edge_joules_per_flop": 2e-10, "cloud_joules_per_flop": 5e-11, "edge_joules_per_byte_up": 1e-6,
              "edge_joules_per_byte_down": 2e-7}
    doc["report"] = {"energy": energy, "hypervolume": {"score": 50.0, "edge_joules_per_sample": 0.01}}
    points = efficiency_points(doc).set_index("method")
    cells = [c for c in doc["cells"] if c["method"] == "cloud-only jpeg:75"]
    seen = sum(c["seen"] for c in cells)
    up = sum(c["link"]["bytes_up"] for c in cells)
    down = sum(c["link"]["bytes_down"] for c in cells)
    edge = (sum(c["edge_flops"] for c in cells) * 2e-10 + up * 1e-6 + down * 2e-7) / seen
    cloud = sum(c["cloud_flops"] for c in cells) * 5e-11 / seen
    assert points.loc["cloud-only jpeg:75", "edge_joules_per_sample"] == pytest.approx(edge, rel=1e-12)
    assert points.loc["cloud-only jpeg:75", "cloud_joules_per_sample"] == pytest.approx(cloud, rel=1e-12)
    text = render(doc)
    assert "edge mJ / sample" in text and "not a measurement" in text and "vs edge J / sample (ref 0.01)" in text
    assert "mJ / sample" not in render({**doc, "report": {}})
    with pytest.raises(UserError, match="an energy axis needs"):
        parse_report({"hypervolume": {"score": 1, "edge_joules_per_sample": 1}}, "spec x [report]")
    with pytest.raises(UserError, match="edge_joules_per_flop must be a number from 0 to 1"):
        parse_report({"energy": {"edge_joules_per_flop": -1}}, "spec x [report]")
    with pytest.raises(UserError, match="unknown key.*joules_per_bit.*valid: edge_joules_per_flop"):
        parse_report({"energy": {"joules_per_bit": 1}}, "spec x [report]")


def test_a_huge_reference_cost_does_not_overflow():
    # box [0, 1e308] x [50, 100]: the point (2, 90) dominates (1e308 - 2) x 40 of 1e308 x 50 (the product overflowed
    # to inf before, and the share came out nan)
    assert hypervolume_2d([2], [90], 1e308, 50) == pytest.approx(0.8, rel=1e-15)


def test_a_latency_axis_needs_an_entry_under_the_time_model(tmp_path, capsys):
    from cemabench.cli import main

    path = tmp_path / "t.toml"
    path.write_text('extends = "eccentric"\nname = "t"\n[report.hypervolume]\nscore = 50\nlatency_p50 = 1\n')
    assert main(["status", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "latency_p50: no entry runs under the time model" in err
    from cemabench.cli import variant
    from cemabench.tables.spec import check_report_axes

    check_report_axes(variant(load_table(str(path)), {"edge_device": "jetson-nano"}), "t")  # the command line's


def test_a_sweep_that_lost_an_entry_to_a_failed_cell_says_so():
    doc = json.loads((LEADERBOARDS / "link-regimes.miniature.json").read_text())
    for c in doc["cells"]:  # one of the 5g cloud-only sweep's five points, and the whole of one source sweep
        if c["method"] in ("cloud-only webp:75 [5g-2023]", "source [mobile-2020]"):
            c["status"], c["message"] = "failed", "RuntimeError: boom"
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in render(doc).split(
        "## Trade-off hypervolume")[1].split("\n## ")[0].splitlines() if line.startswith("| ")}
    # before: "4" beside the other regimes' "5", and no source [mobile-2020] row at all
    assert rows["cloud-only [5g-2023]"] == "4 (1 failed, left out)" and rows["cloud-only [fixed-2020]"] == "5"
    assert rows["source [mobile-2020]"] == "0 (1 failed, left out)"
    assert rows[EVERY_ENTRY] == f"{len(doc['methods']) - 2} (2 failed, left out)"
