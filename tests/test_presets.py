"""Named presets of the time model (issue 19): link regimes and device profiles with cited numbers, as protocol
fields that stand for the numbers they set."""
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from cemabench.cli import main, variant
from cemabench.config import Protocol, with_link
from cemabench.config.presets import DEVICES, REGIMES
from cemabench.errors import UserError
from cemabench.report.leaderboard import render, sweeps
from cemabench.tables.spec import load_table

LEADERBOARDS = Path(__file__).parent.parent / "leaderboards"


def test_a_regime_sets_its_cited_numbers():
    p = Protocol(regime="mobile-2020")  # 11.22 Mbit/s up, 35.96 down, 40 ms round trip
    assert (p.bandwidth, p.bandwidth_down, p.latency) == (11.22e6 / 8, 35.96e6 / 8, 0.02)
    assert p.transfer_seconds(140250) == pytest.approx(0.02 + 0.1)  # 140,250 B up at 1,402,500 B/s
    assert Protocol(**asdict(p)) == p  # the numbers it set are its own
    d = Protocol(edge_device="jetson-nano", cloud_device="a100")
    assert (d.edge_flops_per_s, d.cloud_flops_per_s) == (128 * 2 * 921e6, 19.5e12)


def test_every_preset_names_its_source():
    for preset in [*REGIMES.values(), *DEVICES.values()]:
        assert "http" in preset.source or ".pdf" in preset.source


@pytest.mark.parametrize("values, message", [
    ({"regime": "lte"}, "regime must be one of mobile-2020, fixed-2020, 5g-2023"),
    ({"regime": "5g-2023", "latency": 0.5}, "regime 5g-2023 sets latency = 0.022; give either regime or latency"),
    ({"edge_device": "a100", "edge_flops_per_s": 1.0}, "give either edge_device or edge_flops_per_s"),
    ({"cloud_device": "tpu"}, "cloud_device must be one of jetson-nano, jetson-orin-nano-super, a100"),
])
def test_bad_presets_are_one_line(values, message):
    with pytest.raises(UserError, match=message) as error:
        Protocol(**values)
    assert "\n" not in str(error.value)


def test_an_entrys_link_and_the_tables_presets():
    table = Protocol(bandwidth=5.0, latency=0.3)
    entry = with_link(table, {"regime": "fixed-2020"})  # the regime replaces the table's numbers
    assert (entry.bandwidth, entry.bandwidth_down, entry.latency) == (45.74e6 / 8, 85.73e6 / 8, 0.0105)
    own = with_link(Protocol(regime="5g-2023"), {"bandwidth": 1000.0})  # a number replaces the regime that set it
    assert own.regime is None and own.bandwidth == 1000.0 and own.bandwidth_down == 207.42e6 / 8


def test_reproduce_under_a_regime_is_another_table():
    spec = variant(load_table("link-codecs"), {"regime": "5g-2023"})
    assert spec.name == "link-codecs.regime-5g-2023"
    assert spec.protocol.bandwidth == 19.90e6 / 8 and spec.protocol.edge_flops_per_s == 1e9  # the rest stays


def test_the_leaderboard_names_the_presets_and_their_sources():
    doc = json.loads((LEADERBOARDS / "link-codecs.miniature.json").read_text())
    assert "## Presets" not in render(doc)
    doc["provenance"]["protocol"].update(asdict(Protocol(**{**doc["provenance"]["protocol"], "bandwidth": None,
                                                            "latency": 0.0, "regime": "5g-2023"})))
    doc["methods"][0]["link"] = {"edge_device": "jetson-nano"}
    text = render(doc)
    assert "(regime `5g-2023`: named presets" in text
    assert "## Presets" in text and REGIMES["5g-2023"].source in text and DEVICES["jetson-nano"].source in text


def test_an_unknown_regime_on_the_command_line_is_exit_2(capsys):
    assert main(["run", "--method", "source", "--regime", "lte"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "mobile-2020, fixed-2020, 5g-2023" in err


def test_a_table_with_regimes_runs_each_entry_under_each(tmp_path):
    spec = load_table("link-regimes")
    assert len(spec.methods) == 13 * 3 and spec.methods[0].label == "source [mobile-2020]"
    assert [m.link.get("regime") for m in spec.methods[::13]] == ["mobile-2020", "5g-2023", "fixed-2020"]
    assert spec.methods[15].link == {"input_codec": "png", "regime": "5g-2023"}
    # the table has no link model of its own; its device presets replaced the parent's throughputs (extends)
    assert (spec.protocol.bandwidth, spec.protocol.latency, spec.protocol.regime) == (None, 0.0, None)
    assert spec.protocol.edge_flops_per_s == DEVICES["jetson-nano"].flops_per_s
    path = tmp_path / "t.toml"
    path.write_text('extends = "link-regimes"\nname = "t"\n[[methods]]\nname = "cloud-only"\n'
                    'link = { bandwidth = 10.0 }\n')
    with pytest.raises(UserError, match=r"#1 sets bandwidth in its link: a table with regimes sets the link model"):
        load_table(str(path))
    path.write_text('extends = "link-regimes"\nname = "t"\nregimes = ["lte"]\n')
    with pytest.raises(UserError, match="regimes must be distinct names of link regimes; valid: mobile-2020"):
        load_table(str(path))
    path.write_text('extends = "link-regimes"\nname = "t"\nregimes = ["5g-2023"]\n[[methods]]\nname = "source"\n'
                    '[[methods]]\nname = "cema"\nlabel = "c"\nmatch_uploads_of = "source"\n')
    assert load_table(str(path)).methods[1].match_uploads_of == "source [5g-2023]"


def test_a_regime_is_its_own_sweep_in_the_leaderboard():
    labels = ["a@1 [5g-2023]", "a@2 [5g-2023]", "a@1 [fixed-2020]", "b [fixed-2020]", "c@3"]
    series, points = sweeps(labels, ["fa", "fa", "fa", "fb", "fc"])
    assert series == ["a [5g-2023]", "a [5g-2023]", "a [fixed-2020]", "fb [fixed-2020]", "c"]
    assert points == ["@1", "@2", "@1", "b", "@3"]
    # brackets that name no regime are part of the label: one cloud-only sweep (they split it before)
    series, _ = sweeps(["cloud-only [raw]", "cloud-only [png]"], ["cloud-only", "cloud-only"])
    assert series == ["cloud-only", "cloud-only"]


def _spec(tmp_path, text: str, name: str = "t.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ('regimes = ["5g-2023"]\n[[methods]]\nname = "source"\nlink = "fast"\n', r"#1: 'link' must be a table"),
    ('regimes = [["5g-2023"]]\n', r"regimes must be distinct names of link regimes; valid: mobile-2020"),
    ('regimes = ["5g-2023"]\n[[methods]]\nname = "source"\nlabel = "s [5g-2023]"\n',  # was "s [5g-2023] [5g-2023]"
     r"#1: label 's \[5g-2023\]' ends in a regime's name; a table with regimes adds"),
    ('regimes = ["5g-2023"]\n[protocol]\nbandwidth = 1e3\n',
     r"\[protocol\] sets bandwidth, but the table has regimes = \['5g-2023'\], which set the link model per regime"),
])
def test_bad_regimes_are_one_line(tmp_path, text, message):  # a TypeError, or a bandwidth silently dropped, before
    with pytest.raises(UserError, match=message) as error:
        load_table(_spec(tmp_path, f'extends = "link-codecs"\nname = "t"\n{text}'))
    assert "\n" not in str(error.value)


def test_a_child_of_a_regimes_table_may_not_set_a_link_model(tmp_path):
    for own in ("regime = \"5g-2023\"", "latency = 0.1"):  # both were dropped without a word
        with pytest.raises(UserError, match="which set the link model per regime"):
            load_table(_spec(tmp_path, f'extends = "link-regimes"\nname = "t"\n[protocol]\n{own}\n'))
    own = load_table(_spec(tmp_path, 'extends = "link-regimes"\nname = "t"\nregimes = []\n'))
    assert len(own.methods) == 13 and own.protocol.bandwidth == 1.25e6  # no regimes: the inherited link model


def test_a_childs_number_keeps_the_rest_of_its_parents_preset(tmp_path):
    _spec(tmp_path, 'extends = "link-codecs"\nname = "a"\n[protocol]\nregime = "mobile-2020"\n', "a.toml")
    child = load_table(_spec(tmp_path, 'extends = "a.toml"\nname = "b"\n[protocol]\nlatency = 0.5\n')).protocol
    # as an entry's own number does: latency replaces the regime's, its bandwidths stay (before: no bandwidth at all)
    assert (child.regime, child.bandwidth, child.bandwidth_down, child.latency) == (None, 11.22e6 / 8, 35.96e6 / 8,
                                                                                    0.5)


def test_a_parents_method_options_follow_its_labels_into_each_regime(tmp_path):
    spec = load_table(_spec(tmp_path, 'extends = "table2"\nname = "t"\nregimes = ["5g-2023", "mobile-2020"]\n'
                                      '[[methods]]\nname = "cema"\n'))  # was: "no method labelled cema"
    options = spec.miniature.method_options
    assert set(options) == {"cema [5g-2023]", "cema [mobile-2020]"}
    assert options["cema [5g-2023]"] == load_table("table2").miniature.method_options["cema"]


def test_a_flag_that_no_entry_takes_is_an_error():
    with pytest.raises(UserError, match="--regime 5g-2023 changes no entry of link-regimes: every entry's own link"):
        variant(load_table("link-regimes"), {"regime": "5g-2023"})  # before: all three regimes, renamed
    spec = variant(load_table("link-regimes"), {"edge_device": "a100"})  # split-point's own 1 GFLOP/s edge stays
    assert spec.methods[0].link == {"regime": "mobile-2020"} and spec.protocol.edge_flops_per_s == 19.5e12
    # flags valid only together are checked together (--devices 2 alone is refused under per-domain)
    assert variant(load_table("table2"), {"devices": 2, "setting": "continual"}).protocol.devices == 2


def test_a_sweep_may_not_contradict_its_entrys_regime(tmp_path):
    from cemabench.tables.sweep import load_sweep

    head = 'extends = "link-regimes"\nname = "s"\n[sweep]\nmethod = "cloud-only [5g-2023]"\n[sweep.grid]\n'
    with pytest.raises(UserError, match="grid link.regime: 'cloud-only \\[5g-2023\\]' runs under regime '5g-2023'"):
        load_sweep(_spec(tmp_path, head + '"link.regime" = ["mobile-2020"]\n'))
    with pytest.raises(UserError, match="grid link.bandwidth: protocol regime 5g-2023 sets bandwidth"):
        load_sweep(_spec(tmp_path, head + '"link.bandwidth" = [1e5]\n'))


def test_the_hints_name_the_command_with_its_flags():
    from argparse import Namespace

    from cemabench.cli import _same_table

    # before: `cemabench reproduce link-codecs --out ...` (another table than the one under --regime)
    args = Namespace(argv=["cemabench", "status", "link-codecs", "--regime", "5g-2023", "--out", "o"], out="o")
    assert _same_table(args, "reproduce") == "cemabench reproduce link-codecs --regime 5g-2023 --out o"
    args = Namespace(argv=["cemabench", "reproduce", "my table.toml", "--no-progress", "--input-codec", "png"],
                     out="out")
    assert _same_table(args, "status") == "cemabench status 'my table.toml' --input-codec png --out out"


def test_run_prints_the_presets_sources_its_protocol_line_points_to():
    from cemabench.report.leaderboard import run_summary

    doc = json.loads((LEADERBOARDS / "link-codecs.miniature.json").read_text())
    doc["methods"] = doc["methods"][:1]
    doc["cells"] = [c for c in doc["cells"] if c["method"] == doc["methods"][0]["label"]]
    doc["provenance"]["protocol"].update(asdict(Protocol(**{**doc["provenance"]["protocol"], "bandwidth": None,
                                                            "latency": 0.0, "regime": "5g-2023"})))
    text = run_summary(doc)  # before: "their sources under Presets", and no such section
    assert "their sources under Presets" in text and REGIMES["5g-2023"].source in text
    doc["methods"][0]["link"] = {"regime": "fixed-2020"}  # run --table T --method LABEL: the entry's own link
    text = run_summary(doc)  # before: only the table's protocol, as if the entry ran under it
    assert "(defaults; its own link: regime=fixed-2020) on " in text and REGIMES["fixed-2020"].source in text


def test_the_protocol_line_of_a_regimes_table_names_its_regimes():
    text = render(json.loads((LEADERBOARDS / "link-regimes.miniature.json").read_text()))
    # before: the line gave the time model only, as if no link model were on
    assert "; link: each entry under its own regime, mobile-2020, 5g-2023, fixed-2020 (its label ends in" in text
    assert "link: each entry" not in render(json.loads((LEADERBOARDS / "link-codecs.miniature.json").read_text()))


def test_a_number_at_its_default_beside_a_preset_is_not_taken_as_unset(tmp_path, capsys):
    # latency = 0 beside regime 5g-2023 ran at the regime's 22 ms without a word (0 is latency's default)
    message = "regime 5g-2023 sets latency = 0.022; give either regime or latency, not both (got latency = 0"
    for text in ('[protocol]\nregime = "5g-2023"\nlatency = 0.0\n',
                 '[[methods]]\nname = "source"\nlink = { regime = "5g-2023", latency = 0 }\n'):
        with pytest.raises(UserError, match=re.escape(message)):
            load_table(_spec(tmp_path, f'extends = "link-codecs"\nname = "t"\n{text}'))
    assert main(["run", "--method", "source", "--regime", "5g-2023", "--latency", "0"]) == 2
    assert message in capsys.readouterr().err


def test_a_sweeps_report_prints_the_presets_sources_its_protocol_line_points_to():
    from cemabench.report.sweep import render_sweep

    table = json.loads((LEADERBOARDS / "link-regimes.miniature.json").read_text())
    label = "cloud-only [5g-2023]"
    table["methods"] = [m for m in table["methods"] if m["label"] == label]
    table["cells"] = [c for c in table["cells"] if c["method"] == label]
    doc = {"axis": "a", "fixed": {}, "grid": {"link.input_codec": ["png"]}, "method": label, "severities": [3],
           "points": [{"label": label, "options": None}], "sweep": "s", "title": "t", "tables": {"3": table},
           "written": {}}
    text = render_sweep(doc)  # before: "their sources under Presets", and no such section
    assert "their sources under Presets" in text and "## Presets" in text and REGIMES["5g-2023"].source in text


def test_run_refuses_a_flag_that_its_entrys_own_link_overrides(capsys):
    # before: the protocol line printed "link 1000 bytes/s", and the entry ran at its regime's 5g numbers
    assert main(["run", "--table", "link-regimes", "--method", "cloud-only [5g-2023]", "--bandwidth", "1e3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--bandwidth 1000.0 changes no entry 'cloud-only [5g-2023]' of link-regimes: its own link overrides" in err
