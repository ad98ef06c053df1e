"""Hostile method plugins (the test distribution under tests/plugins) end in a clear error cell, never in a silent
success, a wrong diagnosis or a lost table."""
import json
import os

import pytest

from cemabench.cli import main
from conftest import write_spec


def _cells(tmp_path, method, *domains) -> tuple[int, list[dict]]:
    out = tmp_path / "run.json"
    code = main(["run", "--method", method, "--domains", *domains, "--out", str(out)])
    return code, json.loads(out.read_text())["cells"]


def test_sys_exit_in_the_edge_step_is_an_error_cell(plugins, tmp_path):
    code, cells = _cells(tmp_path, "exits-on-batch-3", "fog", "brightness")
    assert code == 3
    assert [c["status"] for c in cells] == ["error", "error"]  # every run unit exits on its third batch
    assert all("SystemExit" in c["message"] for c in cells)


def test_sys_exit_in_method_code_does_not_end_a_table(plugins, tmp_path, capsys):
    spec = write_spec(tmp_path / "small.toml", ["source", "exits-on-batch-3"])
    assert main(["reproduce", spec, "--out", str(tmp_path / "out"), "--no-progress"]) == 3
    doc = json.loads((tmp_path / "out" / "small.json").read_text())
    assert {c["method"]: c["status"] for c in doc["cells"]} == {"source": "ok", "exits-on-batch-3": "error"}
    assert "SystemExit" in (tmp_path / "out" / "small.md").read_text()


def test_a_runtime_error_that_mentions_grad_is_not_a_forward_only_violation(plugins, tmp_path):
    code, (cell,) = _cells(tmp_path, "grad-in-message", "fog")
    assert code == 3 and cell["status"] == "error"
    assert "the colour gradient table of this sensor is not calibrated" in cell["message"]
    assert "forward-only" not in cell["message"]


def test_a_download_key_the_edge_model_lacks_is_an_error_naming_it(plugins, tmp_path):
    code, (cell,) = _cells(tmp_path, "unknown-download-key", "fog")
    assert code == 3 and cell["status"] == "error"
    assert "no_such_layer.weight" in cell["message"]


def test_a_plugin_that_kills_its_worker_process_fails_only_its_cells(plugins, tmp_path):
    spec = write_spec(tmp_path / "small.toml", ["source", "kills-its-process"])
    assert main(["reproduce", spec, "--out", str(tmp_path / "out"), "--no-progress", "--jobs", "2"]) == 3
    doc = json.loads((tmp_path / "out" / "small.json").read_text())
    status = {c["method"]: (c["status"], c["message"]) for c in doc["cells"]}
    assert status["source"][0] == "ok"
    assert status["kills-its-process"][0] == "error" and "worker process died" in status["kills-its-process"][1]


@pytest.fixture
def plugins_for_workers(plugins, monkeypatch):
    """A local Ray's workers inherit the driver's environment: that is how they find the test plugins."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.xdist_group("ray")  # one local Ray at a time under pytest-xdist
def test_a_plugin_that_kills_its_ray_worker_fails_only_its_cells(plugins_for_workers, local_ray, tmp_path):
    spec = write_spec(tmp_path / "small.toml", ["source", "kills-its-process"])
    assert main(["reproduce", spec, "--out", str(tmp_path / "out"), "--no-progress", "--executor", "ray"]) == 3
    doc = json.loads((tmp_path / "out" / "small.json").read_text())
    status = {c["method"]: (c["status"], c["message"]) for c in doc["cells"]}
    assert status["source"][0] == "ok"
    assert status["kills-its-process"][0] == "error" and "Ray task failed" in status["kills-its-process"][1]
