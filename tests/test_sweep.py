"""Sweeps: a [sweep] table expanded into one method entry per grid point, run through the runner per severity."""
import json

import matplotlib.image
import pytest

from cemabench.cli import main
from cemabench.errors import UserError
from cemabench.report.sweep import sweep_means
from cemabench.tables.spec import available_sweeps
from cemabench.tables.sweep import expand, load_sweep

SWEEP = '''extends = "table2"
name = "mix"
title = "BN statistics mix"
[data]
domains = ["fog"]
[sweep]
method = "bn-adapt"
severities = [3, 5]
reference = true
axis = "weight of the test batch statistics"
[sweep.grid]
momentum = [0.1, 0.5]
'''


def test_expansion_makes_one_labelled_entry_per_grid_point_with_the_tables_options(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('extends = "table2"\nname = "grid"\n[sweep]\nmethod = "cema"\n[sweep.grid]\n'
                    'entropy_min = [0.01, 0.02]\ndynamic_coeff = [0.6, 1.0]\n[sweep.fixed]\ndynamic_warmup = 64\n')
    sweep = load_sweep(str(path))
    table = expand(sweep, 5)
    assert (table.name, table.severity, sweep.severities) == ("grid-s5", 5, (5,))
    assert [m.label for m in table.methods] == [
        "cema entropy_min=0.01, dynamic_coeff=0.6", "cema entropy_min=0.01, dynamic_coeff=1.0",
        "cema entropy_min=0.02, dynamic_coeff=0.6", "cema entropy_min=0.02, dynamic_coeff=1.0"]
    assert table.methods[1].options == {"dynamic_warmup": 64, "entropy_min": 0.01, "dynamic_coeff": 1.0}
    # the table's miniature options for the swept entry (redundancy margin 0.5) travel with every point
    assert table.miniature.method_options[table.methods[1].label] == {
        "redundancy_margin": 0.5, "dynamic_warmup": 64, "entropy_min": 0.01, "dynamic_coeff": 1.0}


@pytest.mark.parametrize("sweep, message", [
    ('method = "cema2"\n[sweep.grid]\nentropy_min = [0.1]', "method must be the label of one of the table's methods"),
    ('method = "random-upload"\n[sweep.grid]\nupload_ratio = [0.1]', "sweeping such an entry is not supported"),
    ('method = "cema"\n[sweep.grid]\nentropy_min = []', "grid must map option names to non-empty lists"),
    ('method = "cema"\nseverities = [3, 3]\n[sweep.grid]\nentropy_min = [0.1]', "severities must be a non-empty"),
    ('method = "cema"\nevery = 2\n[sweep.grid]\nentropy_min = [0.1]', "unknown key(s) every"),
])
def test_bad_sweeps_are_one_line_user_errors(tmp_path, capsys, sweep, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'extends = "table2"\nname = "bad"\n[sweep]\n{sweep}\n')
    with pytest.raises(UserError) as caught:
        load_sweep(str(path))
    assert message in str(caught.value)
    assert main(["sweep", str(path), "--out", str(tmp_path)]) == 2 and message in capsys.readouterr().err


def test_an_unknown_option_is_refused_before_any_compute(tmp_path, capsys):
    path = tmp_path / "typo.toml"
    path.write_text(SWEEP.replace("momentum = [", "momentun = ["))
    assert main(["sweep", str(path), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "has no option 'momentun'" in capsys.readouterr().err and not (tmp_path / "cells").exists()


def test_cli_sweep_writes_markdown_json_and_a_plot(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self) or save(self, *a, **k))
    path = tmp_path / "mix.toml"
    path.write_text(SWEEP)
    assert main(["sweep", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "## Severity 3: online top-1 accuracy (%)" in out
    assert "## Severity 5: uploads (% of samples sent to the cloud)" in out
    assert "| momentum = 0.1 " in out and "| (entry as in the table) " in out and "EMBEDDED MINIATURE" in out
    doc = json.loads((tmp_path / "mix.json").read_text())
    assert doc["severities"] == [3, 5] and [t["provenance"]["severity"] for t in doc["tables"].values()] == [3, 5]
    for table in doc["tables"].values():
        accuracy = sweep_means(table, "accuracy")
        # momentum 0.5 is the method's default: the same run as the reference row, so the same numbers
        assert accuracy["bn-adapt momentum=0.5"] == accuracy["bn-adapt"]
        assert accuracy["bn-adapt momentum=0.1"] != accuracy["bn-adapt momentum=0.5"]
        assert sweep_means(table, "upload_percent")["bn-adapt momentum=0.1"] == 0.0  # an edge-only method
    image = matplotlib.image.imread(tmp_path / "mix.png")
    assert image.shape[0] > 300 and image.shape[1] > 600
    # issue 23: every miniature output says so as the tables do, plots included (it said "embedded miniature")
    assert figures[0]._suptitle.get_text() == "mix: mean over 1 domain(s), EMBEDDED MINIATURE, NOT IMAGENET-C"


def test_shipped_sweeps_load_and_sweep_cema_at_severities_3_and_5():
    assert available_sweeps() == ["cema-emin", "cema-lambda"]
    emin, lam = load_sweep("cema-emin"), load_sweep("cema-lambda")
    assert emin.grid == {"entropy_min": (0.01, 0.02, 0.03, 0.04, 0.05, 0.06)} and emin.severities == (3, 5)
    assert lam.grid["dynamic_coeff"][0] == 0.6 and lam.grid["dynamic_coeff"][-1] == 1.3
    assert lam.fixed == {"dynamic_warmup": 256} and lam.severities == (3, 5)
    for sweep in (emin, lam):
        assert sweep.method == "cema" and sweep.reference and len(sweep.table.domains) == 2
