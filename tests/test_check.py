"""``cemabench check`` and the leaderboard with several seeds: means, sample standard deviations, user errors."""
import copy
import json
from pathlib import Path

import pandas as pd
import pytest

from cemabench.cli import main
from cemabench.report.check import compare
from cemabench.report.leaderboard import metric_frame, render

COMMITTED = Path(__file__).parent.parent / "leaderboards" / "table2.miniature.json"


def _cell(method, domain, seed, accuracy, status="ok"):
    return {"method": method, "domain": domain, "seed": seed, "status": status, "message": "", "note": "",
            "accuracy": accuracy, "upload_percent": 10.0}


def _doc(cells):
    return {"provenance": {"miniature": True, "domains": ["fog", "snow"]}, "methods": [{"label": "cema"}],
            "seeds": sorted({c["seed"] for c in cells}), "check": {"tolerance": 0.5, "metrics": ["accuracy"]},
            "cells": cells}


def _run(capsys, tmp_path, result, expected, *extra):
    (tmp_path / "r.json").write_text(json.dumps(result))
    (tmp_path / "e.json").write_text(json.dumps(expected))
    code = main(["check", str(tmp_path / "r.json"), "--against", str(tmp_path / "e.json"), *extra])
    return (code, *capsys.readouterr())


def test_check_compares_the_mean_over_seeds_and_shows_the_expected_spread(capsys, tmp_path):
    expected = _doc([_cell("cema", "fog", 0, 50.0), _cell("cema", "fog", 1, 52.0)])
    close = _doc([_cell("cema", "fog", 0, 51.3), _cell("cema", "fog", 1, 51.1)])  # each seed is off, the mean is not
    code, out, _ = _run(capsys, tmp_path, close, expected)
    assert code == 0 and "all 1 checked means over seeds 0, 1 within 0.5" in out
    far = _doc([_cell("cema", "fog", 0, 49.0), _cell("cema", "fog", 1, 50.0)])
    problems, checked = compare(far, expected)
    assert checked == 1 and problems == [{"cell": "cema / fog", "metric": "accuracy", "expected": 51.0, "got": 49.5,
                                          "difference": -1.5, "expected std (ddof=1)": 1.414}]
    code, out, _ = _run(capsys, tmp_path, far, expected)
    assert code == 1 and "expected std (ddof=1)" in out and "on the means over seeds 0, 1" in out


def test_check_names_seeds_statuses_and_cells_that_differ():
    expected = _doc([_cell("cema", "fog", 0, 50.0), _cell("cema", "fog", 1, 52.0), _cell("cema", "snow", 0, 40.0),
                     _cell("cema", "snow", 1, 41.0)])
    result = _doc([_cell("cema", "fog", 0, 50.0), _cell("cema", "fog", 1, None, "diverged"),
                   _cell("cema", "snow", 0, 40.0)])
    problems, checked = compare(result, expected)
    assert [(p["cell"], p["metric"], p["expected"], p["got"]) for p in problems] == [
        ("cema / fog / seed 1", "status", "ok", "diverged"),
        ("cema / snow / seed 1", "(cell)", "present", "missing")]
    assert checked == 0
    one_seed = _doc([_cell("cema", "fog", 0, 50.0), _cell("cema", "snow", 0, 40.0)])
    problems, _ = compare(one_seed, expected)
    assert problems[0] == {"cell": "(table)", "metric": "seeds", "expected": [0, 1], "got": [0],
                           "difference": "different seeds: means are not comparable", "expected std (ddof=1)": None}


@pytest.mark.parametrize("broken, message", [
    (lambda d: d.pop("provenance"), "is not a cemabench table document: it has no 'provenance' object"),
    (lambda d: d["cells"][0].update(accuracy="51.2"), "has accuracy = '51.2', not a number"),
    (lambda d: d["cells"][0].pop("seed"), "cell #1 has no integer 'seed'"),
    (lambda d: d.pop("cells"), "it has no 'cells' list"),
    (lambda d: d["check"].update(tolerance=-1), "check.tolerance must be a finite number of percentage points >= 0"),
])
def test_a_document_that_is_not_a_table_is_one_line_naming_the_file(capsys, tmp_path, broken, message):
    bad = _doc([_cell("cema", "fog", 0, 50.0)])
    broken(bad)
    code, _, err = _run(capsys, tmp_path, bad, _doc([_cell("cema", "fog", 0, 50.0)]))
    assert code == 2 and str(tmp_path / "r.json") in err and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("text", ["[1, 2]", "not json", "\"text\""])
def test_json_that_is_not_a_document_is_one_line(capsys, tmp_path, text):
    (tmp_path / "r.json").write_text(text)
    code = main(["check", str(tmp_path / "r.json"), "--against", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "r.json") in err and err.count("\n") == 1


@pytest.mark.parametrize("tol", ["nan", "-1", "inf"])
def test_a_tolerance_that_is_not_a_finite_non_negative_number_is_a_user_error(capsys, tmp_path, tol):
    doc = _doc([_cell("cema", "fog", 0, 50.0)])
    code, _, err = _run(capsys, tmp_path, doc, doc, "--tol", tol)
    assert code == 2 and "--tol must be a finite number of percentage points >= 0" in err and err.count("\n") == 1


def test_leaderboard_shows_mean_and_sample_std_across_seeds_and_keeps_every_seed():
    doc = json.loads(COMMITTED.read_text())
    first = {(c["method"], c["domain"]): c for c in doc["cells"]}
    second = copy.deepcopy(doc["cells"])
    for cell in second:
        cell.update(seed=1, accuracy=cell["accuracy"] + 2.0)
    doc["cells"] += second
    doc["seeds"] = [0, 1]
    frame = metric_frame(doc, "accuracy")
    fog = first[("cema", "fog")]["accuracy"]
    assert frame.loc["cema", "fog"] == f"{fog + 1:.1f} ± {pd.Series([fog, fog + 2]).std(ddof=1):.1f}"
    domains = doc["provenance"]["domains"]
    per_seed = [sum(first[("cema", d)]["accuracy"] + 2 * s for d in domains) / len(domains) for s in (0, 1)]
    assert frame.loc["cema", "mean"] == f"{sum(per_seed) / 2:.1f} ± {pd.Series(per_seed).std(ddof=1):.1f}"
    text = render(doc)
    assert "**Seeds**: 0, 1 (each cell: mean ± sample standard deviation, ddof=1, across seeds" in text
    one = metric_frame(json.loads(COMMITTED.read_text()), "accuracy")
    assert "±" not in one.to_markdown() and one.loc["cema", "fog"] == f"{fog:.1f}"


def test_tables_that_measure_different_things_are_named_first():
    """A severity-3 table against a severity-5 one: the severity comes before the numbers it moves."""
    def doc(severity, setting="per-domain", edge="mini:edge"):
        d = _doc([_cell("cema", "fog", 0, 50.0 + severity)])
        d["provenance"].update(severity=severity, protocol={"setting": setting}, models={"edge": {"name": edge}})
        return d

    problems, _ = compare(doc(3), doc(5))
    assert problems[0] == {"cell": "(table)", "metric": "severity", "expected": 5, "got": 3,
                           "difference": "the two tables measure different things"}
    assert [p["metric"] for p in compare(doc(5, "continual", "tiny:edge@10"), doc(5))[0]] == ["setting", "models"]
    assert compare(doc(5), doc(5))[0] == []
