import json
import sys
from importlib import resources
from pathlib import Path

import pytest

from cemabench.cli import main
from cemabench.tables.spec import available_tables
from conftest import builtin_methods


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_methods_shows_the_cloud_edge_mapping(capsys):
    code, out, _ = run(capsys, "list", "methods")
    assert code == 0
    for name in builtin_methods():
        assert f"\n{name}\n" in f"\n{out}" or f"| {name} " in out  # a block per row, or a table row
    assert "Chen et al., ICLR 2024" in out and "entropy bounds and redundancy" in out


@pytest.mark.parametrize("what, expected", [("tables", "table2"), ("datasets", "miniature-digits-c"),
                                            ("models", "mini")])
def test_list_other_registries(capsys, what, expected):
    code, out, _ = run(capsys, "list", what)
    assert code == 0 and expected in out


@pytest.mark.parametrize("argv, message", [
    (["run", "--method", "tentt"], "unknown method 'tentt'; available: " + ", ".join(builtin_methods()[:5])),
    (["run", "--method", "tent", "--option", "lr2=0.1"], "method 'tent' has no option 'lr2'; valid options: lr"),
    (["run", "--method", "tent", "--option", "lr=fast"], "option 'lr' must be float, got 'fast'"),
    (["run", "--method", "tent", "--option", "lr"], "--option takes KEY=VALUE"),
    (["run", "--method", "tent", "--dataset", "imagenet-x"], "unknown dataset 'imagenet-x'"),
    (["run", "--method", "tent", "--domains", "rain"], "unknown domain(s) rain for the miniature"),
    (["run", "--method", "tent", "--edge", "resnet50"], "model names look like PREFIX:NAME"),
    (["run", "--method", "tent", "--edge", "hub:resnet50"], "unknown model 'hub'"),
    (["run", "--method", "tent", "--setting", "never"], "setting must be one of per-domain, continual, gradual"),
    (["run", "--method", "tent", "--rounds", "3"], "rounds > 1 repeats a stream without reset"),
    (["run", "--method", "tent", "--setting", "continual+correlated", "--concentration", "-1"],
     "concentration must be a number > 0"),
    (["run", "--method", "random-upload"], "random-upload needs upload_ratio"),
    (["run", "--method", "tent", "--input-codec", "jpeg:101"], "input codec 'jpeg:101': the quality must be"),
    (["run", "--method", "cloud-only", "--answer-deadline", "0.1"], "answer_deadline needs time to pass"),
    (["run", "--method", "tent", "--edge-flops-per-s", "abc"], "argument --edge-flops-per-s: invalid float value"),
    (["reproduce", "table2", "--input-codec", "gif"], "unknown input codec 'gif': one of raw, png, jpeg:Q, webp:Q"),
    (["reproduce", "table9"], f"unknown table 'table9'; available: {', '.join(available_tables())}"),
    (["reproduce", "table2", "--data-root", "/nonexistent/imagenet"],
     "--data-root /nonexistent/imagenet is not a directory"),
    (["reproduce", "missing.toml"], "table spec file missing.toml does not exist"),
    (["reproduce", "imagenet-r"], "table imagenet-r has no embedded-miniature version; pass --data-root"),
    (["check", "nope.json", "--against", "nope2.json"], "nope.json does not exist"),
])
def test_user_errors_are_one_clear_line_and_exit_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_a_data_root_without_the_dataset_names_the_expected_layout(capsys, tmp_path):
    code, _, err = run(capsys, "reproduce", "table2", "--data-root", str(tmp_path))
    assert code == 2 and "does not exist; expected ROOT/imagenet-c/<corruption>/<severity>/<wnid>/*.JPEG" in err


def test_malformed_spec_names_the_key(capsys, tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "bad"\ntitle = "t"\n[protocol]\nbatch_size = 64\nsetting = "sometimes"\n')
    code, _, err = run(capsys, "reproduce", str(spec))
    assert code == 2 and "setting must be one of per-domain" in err


def test_a_pair_without_a_foundation_names_the_key(capsys, tmp_path):
    spec = tmp_path / "pairs.toml"
    text = (resources.files("cemabench_tables") / "table2.toml").read_text()
    spec.write_text(text.replace('foundation = "timm:vit_base_patch16_224"', "", 1))
    code, _, err = run(capsys, "reproduce", str(spec))
    assert code == 2 and "[data.real] pairs.r18-vit: missing required key 'foundation'" in err


def test_run_prints_a_table_and_writes_json(capsys, tmp_path, monkeypatch):
    out = tmp_path / "cells.json"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # in a terminal, run shows its progress (issue 23)
    code, stdout, err = run(capsys, "run", "--method", "bn-adapt", "--domains", "fog", "contrast", "--out", str(out))
    assert code == 0 and "# EMBEDDED MINIATURE: numbers" in stdout and "| fog" in stdout  # outside a table: no "NOT"
    assert "run-bn-adapt (miniature): 100%" in err and "2/2" in err
    # what ran, before its numbers: method and options, data, severity, setting, protocol, models (issue 23)
    assert ("bn-adapt (defaults) on miniature-digits-c (EMBEDDED MINIATURE), severity 5; `per-domain`" in stdout
            and "edge batch 64, delivery delay 0" in stdout and "edge mini:edge, cloud mini:foundation" in stdout)
    doc = json.loads(out.read_text())
    assert (doc["dataset"], doc["stands_for"]) == ("miniature-digits-c", None)  # it stands in for no real table
    cells = doc["cells"]
    assert [c["domain"] for c in cells] == ["fog", "contrast"] and all(c["status"] == "ok" for c in cells)


def test_run_says_what_each_dagger_means():
    """Issue 23: a "†" in run's output had no legend."""
    from cemabench.report.leaderboard import run_summary

    doc = json.loads((Path(__file__).parents[1] / "leaderboards" / "multi-edge.miniature.json").read_text())
    doc.update(methods=[m for m in doc["methods"] if m["label"] == "tent"],
               cells=[c for c in doc["cells"] if c["method"] == "tent"])
    text = run_summary(doc)
    assert "| gaussian_noise | 96.5†" in text  # run prints a method's scores as a column
    assert "† gaussian_noise: cloud at capacity: 512 samples could not be uploaded" in text.splitlines()


def test_run_prints_what_each_domain_cost_on_the_link_and_in_flops():
    """run printed bytes up only; a collaborative method's bytes down and the FLOPs on each side are what it trades
    against accuracy, so they are printed too, per domain and on average."""
    from cemabench.report.leaderboard import run_summary

    doc = json.loads((Path(__file__).parents[1] / "leaderboards" / "table2.miniature.json").read_text())
    doc.update(methods=[m for m in doc["methods"] if m["label"] == "cema"],
               cells=[c for c in doc["cells"] if c["method"] == "cema"])
    lines = run_summary(doc).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Cost per sample"))
    assert [c.strip() for c in lines[header + 1].split("|")[1:-1]] == [
        "", "bytes up", "bytes down", "edge GFLOPs", "cloud GFLOPs"]
    fog = next(c for c in doc["cells"] if c["domain"] == "fog")
    row = next(line for line in lines[header:] if line.startswith("| fog "))
    assert [c.strip() for c in row.split("|")[1:-1]] == [
        "fog", f"{fog['bytes_up_per_sample']:,.1f}", f"{fog['bytes_down_per_sample']:,.1f}",
        f"{fog['edge_gflops_per_sample']:.4g}", f"{fog['cloud_gflops_per_sample']:.4g}"]
    assert fog["bytes_down_per_sample"] > 0 and fog["cloud_gflops_per_sample"] > 0  # a download; the cloud trains


def _doc(accuracy):
    return {"provenance": {"miniature": True}, "check": {"tolerance": 0.5, "metrics": ["accuracy"]},
            "cells": [{"method": "cema", "domain": "fog", "seed": 0, "status": "ok", "message": "",
                       "accuracy": accuracy}]}


def test_check_passes_within_tolerance_and_fails_with_a_readable_diff(capsys, tmp_path):
    expected, close, far = (tmp_path / f"{n}.json" for n in ("e", "c", "f"))
    expected.write_text(json.dumps(_doc(50.0)))
    close.write_text(json.dumps(_doc(50.4)))
    far.write_text(json.dumps(_doc(51.2)))
    code, out, _ = run(capsys, "check", str(close), "--against", str(expected))
    assert code == 0 and "within 0.5" in out
    code, out, _ = run(capsys, "check", str(far), "--against", str(expected))
    assert code == 1 and "cema / fog / seed 0" in out and "1.2" in out
    code, out, _ = run(capsys, "check", str(far), "--against", str(expected), "--tol", "2")
    assert code == 0


def test_the_clean_stream_is_shown_with_no_severity():
    """Issue 23: `run --domains clean` printed "severity 5" (the spec's), though the clean stream has none."""
    from cemabench.report.leaderboard import severity_text

    assert severity_text({"domains": ["clean"], "severity": 5}) == "none (the clean stream)"
    assert severity_text({"domains": ["clean", "fog"], "severity": 5}) == "5 (the clean domain: none)"
    assert severity_text({"domains": ["fog"], "severity": 3}) == "3"


def test_run_through_an_input_codec_reports_its_bytes_per_input(capsys, tmp_path):
    out = tmp_path / "jpeg.json"
    code, text, _ = run(capsys, "run", "--method", "cloud-only", "--domains", "fog", "--input-codec", "jpeg:75",
                        "--out", str(out))
    (cell,) = json.loads(out.read_text())["cells"]
    assert code == 0 and "inputs sent as jpeg:75 (Pillow; charged at their encoded length)" in text
    assert "Bytes per uploaded input as jpeg:75, mean:" in text and "95th percentile" in text
    assert cell["link"]["upload_bytes"] == round(cell["input_bytes_mean"] * cell["link"]["uploaded"])
    assert 0 < cell["input_bytes_mean"] < cell["input_bytes_p95"] < 3072  # a 32-px image's raw pixels: 3072 B
