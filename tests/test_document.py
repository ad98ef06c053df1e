"""Table documents of an earlier schema are read as today's (issue 23), and a metric is named by its one name.

``documents/eccentric-clean.schema-2.json`` is ``leaderboards/eccentric-clean.miniature.json`` as cemabench wrote it
at schema 2: its cells hold ``upload_ratio`` (a percentage) and it names ``real_dataset`` (CIFAR-10-C) although it
ran on the miniature."""
import copy
import json
from pathlib import Path

import pytest

from cemabench.cli import main
from cemabench.errors import UserError
from cemabench.report.check import compare
from cemabench.report.leaderboard import render, terminal_summary
from cemabench.run.document import DOC_SCHEMA, current
from cemabench.tables.spec import load_table
from conftest import write_spec

ROOT = Path(__file__).parent.parent
OLD = Path(__file__).parent / "documents" / "eccentric-clean.schema-2.json"
COMMITTED = ROOT / "leaderboards" / "eccentric-clean.miniature.json"


def _old() -> dict:
    return json.loads(OLD.read_text())


def _check(capsys, result: Path, expected: Path) -> tuple[int, str, str]:
    code = main(["check", str(result), "--against", str(expected)])
    return (code, *capsys.readouterr())


def test_a_schema_2_document_reads_as_todays_and_is_left_as_it_was():
    old = _old()
    before = copy.deepcopy(old)
    doc = current(old)
    assert old == before and doc["schema"] == DOC_SCHEMA == 3
    assert "real_dataset" not in doc and (doc["dataset"], doc["stands_for"]) == ("miniature-digits-c", "cifar10-c")
    assert doc["check"]["metrics"] == ["accuracy", "upload_percent"]
    for was, now in zip(old["cells"], doc["cells"], strict=True):
        assert "upload_ratio" not in now and now["upload_percent"] == was["upload_ratio"]
        assert {k: v for k, v in now.items() if k != "upload_percent"} == {
            k: v for k, v in was.items() if k != "upload_ratio"}
    assert current(doc) is doc  # today's documents pass as they are


def test_a_real_run_and_a_run_outside_any_table_stand_in_for_nothing():
    real = _old()
    real["provenance"]["miniature"] = False
    assert (current(real)["dataset"], current(real)["stands_for"]) == ("cifar10-c", None)
    alone = _old()  # `cemabench run` on the miniature without --table: its spec's real dataset was the miniature
    alone["real_dataset"] = "miniature-digits-c"
    assert (current(alone)["dataset"], current(alone)["stands_for"]) == ("miniature-digits-c", None)
    assert "> **EMBEDDED MINIATURE.** These numbers" in render(alone)


def test_an_old_document_renders_as_its_upgrade_says_which_data_ran_and_what_it_stands_for():
    text = render(_old())
    assert text == render(current(_old()))
    assert "> **EMBEDDED MINIATURE, NOT CIFAR10-C.**" in text and "## Uploads (% of samples sent to the cloud)" in text
    (data,) = [line for line in text.splitlines() if line.startswith("- **Data**")]
    assert data.startswith("- **Data**: miniature-digits-c (EMBEDDED MINIATURE), standing in for cifar10-c;")
    assert "imagenet" not in data.lower()  # the miniature's data line once said "not ImageNet-C" on a CIFAR table
    assert "EMBEDDED MINIATURE, NOT CIFAR10-C: never compare" in terminal_summary(_old())


def test_every_committed_leaderboard_is_of_todays_schema_and_names_what_it_stands_for():
    for path in sorted((ROOT / "leaderboards").glob("*.miniature.json")):
        doc = json.loads(path.read_text())
        spec = load_table(doc["table"])
        assert doc["schema"] == DOC_SCHEMA and "real_dataset" not in doc, path.name
        assert (doc["dataset"], doc["stands_for"]) == (spec.miniature.dataset, spec.real.dataset), path.name
        assert all("upload_ratio" not in c and "upload_percent" in c for c in doc["cells"]), path.name


def test_check_reads_an_old_document_on_either_side_and_still_compares_the_upload_percentage(capsys, tmp_path):
    code, out, _ = _check(capsys, OLD, COMMITTED)
    assert code == 0 and "all 34 checked values within 0.5" in out  # 17 cells x (accuracy, upload_percent)
    code, out, _ = _check(capsys, COMMITTED, OLD)
    assert code == 0 and "all 34 checked values within 0.5" in out
    moved = _old()
    moved["cells"][0]["upload_ratio"] += 5.0
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    code, out, _ = _check(capsys, tmp_path / "moved.json", COMMITTED)
    (problem,) = compare(moved, json.loads(COMMITTED.read_text()))[0]
    assert code == 1 and problem["metric"] == "upload_percent" and problem["difference"] == 5.0


@pytest.mark.parametrize("schema, message", [
    (4, "is a table document of schema 4, written by a newer cemabench; this one reads schemas up to 3"),
    ("3", "is not a cemabench table document: its schema is '3', not a version number"),
])
def test_a_schema_this_cemabench_cannot_read_is_one_line(capsys, tmp_path, schema, message):
    doc = {**json.loads(COMMITTED.read_text()), "schema": schema}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    code, _, err = _check(capsys, tmp_path / "r.json", COMMITTED)
    assert code == 2 and message in err and str(tmp_path / "r.json") in err and err.count("\n") == 1


def test_an_old_document_with_both_names_is_refused_not_guessed(capsys, tmp_path):
    both = _old()
    both["cells"][0]["upload_percent"] = 1.0
    (tmp_path / "r.json").write_text(json.dumps(both))
    code, _, err = _check(capsys, tmp_path / "r.json", COMMITTED)
    assert code == 2 and "cell #1 has both 'upload_ratio' and 'upload_percent'" in err and err.count("\n") == 1


RENAMED = "the metric 'upload_ratio' is now called 'upload_percent'"


def test_a_spec_that_checks_the_old_metric_name_is_one_line_naming_the_new_one(capsys, tmp_path):
    path = write_spec(tmp_path / "t.toml", ["source"])
    with open(path, "a") as spec:
        spec.write('[check]\nmetrics = ["accuracy", "upload_ratio"]\n')
    code = main(["status", path, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"[check]: {RENAMED}" in err and "write 'upload_percent'" in err and err.count("\n") == 1


@pytest.mark.parametrize("metrics, message", [
    (["accuracy", "upload_ratio"], RENAMED),
    (["acuracy"], "unknown metric 'acuracy'; check compares percentages: accuracy, upload_percent, map, map50, ar100"),
])
def test_a_document_that_checks_a_metric_no_cell_holds_is_one_line(capsys, tmp_path, metrics, message):
    """A name no cell holds used to compare nothing and pass (every value null on both sides is skipped)."""
    doc = current(json.loads(COMMITTED.read_text()))  # today's schema, naming a metric its cells do not hold
    doc["check"]["metrics"] = metrics
    (tmp_path / "e.json").write_text(json.dumps(doc))
    code, _, err = _check(capsys, COMMITTED, tmp_path / "e.json")
    assert code == 2 and message in err and err.count("\n") == 1
    with pytest.raises(UserError, match=message.split(";")[0]):
        compare(json.loads(COMMITTED.read_text()), json.loads(COMMITTED.read_text()), metrics=metrics)
