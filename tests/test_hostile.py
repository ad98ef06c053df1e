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


# What crosses the link is plain data (cemabench/protocol/plain.py): issue 22, findings 2-5 and 10.

def test_a_cloud_cannot_rebuild_the_batch_from_the_empty_input_tensor_it_receives(plugins, tmp_path):
    """send_input=False used to hand the cloud x[:0], a view whose storage is the whole batch: cloud-only accuracy
    for 0 bytes up. Now the cloud answers blind (class 0), and the cell says what crossed."""
    code, (cell,) = _cells(tmp_path, "view-smuggler", "fog")
    assert code == 0 and cell["link"]["upload_bytes"] == 0 and cell["link"]["upload_payload_bytes"] == 0
    assert cell["accuracy"] < 30  # class 0 everywhere; the stolen batch gave about 61


def test_a_one_float_payload_row_carries_one_float_not_its_storage(plugins, tmp_path):
    code, (cell,) = _cells(tmp_path, "payload-alias", "fog")
    assert code == 0 and cell["link"]["upload_payload_bytes"] == 4 * cell["seen"]
    assert cell["accuracy"] < 30


@pytest.mark.parametrize("method, words", [
    ("empty-claimer", "EdgeDecision.upload must be a plain torch.Tensor, got smuggler.ClaimsToBeEmpty"),
    ("sparse-tensors", "EdgeDecision.tensors['stats'] must be a dense strided tensor, got a sparse_coo one"),
    ("two-faced", "EdgeLogic.step must return an EdgeDecision (not a subclass), got smuggler._TwoFacedDecision"),
    ("leaves-a-mode-entered", "the edge step returned with 0 torch dispatch and 1 function mode(s) still entered"),
    ("long-keys", "EdgeDecision.tensors keys must be str of at most 200 characters, got str of length 100000"),
])
def test_what_is_not_plain_data_is_refused_by_name(plugins, tmp_path, method, words):
    code, (cell,) = _cells(tmp_path, method, "fog")
    assert code == 3 and cell["status"] == "error" and words in cell["message"]


@pytest.mark.parametrize("polluter, words", [("leaves-a-hook", "global module hooks left registered: 1 forward hooks"),
                                             ("leaves-grad-off", "grad mode False (was True)")])
def test_a_unit_that_leaves_torch_changed_fails_and_the_next_unit_in_the_process_is_clean(plugins, tmp_path, polluter,
                                                                                        words):
    """Issue 22, finding 8: both units in one process (--jobs 1), the polluter first; tent after it trains and
    scores as it does alone."""
    spec = write_spec(tmp_path / "small.toml", [polluter, "tent"])
    assert main(["reproduce", spec, "--out", str(tmp_path / "out"), "--no-progress", "--jobs", "1"]) == 3
    cells = {c["method"]: c for c in json.loads((tmp_path / "out" / "small.json").read_text())["cells"]}
    assert cells[polluter]["status"] == "error" and words in cells[polluter]["message"]
    alone = write_spec(tmp_path / "alone.toml", ["tent"])
    assert main(["reproduce", alone, "--out", str(tmp_path / "alone"), "--no-progress", "--jobs", "1"]) == 0
    (clean,) = json.loads((tmp_path / "alone" / "small.json").read_text())["cells"]
    assert cells["tent"]["status"] == "ok" and cells["tent"]["correct"] == clean["correct"]


def test_rewritten_label_files_change_no_score(plugins, tmp_path):
    """Issue 22, finding 1: the miniature's labels are derived from scikit-learn's digits when the harness scores,
    not read from the writable cache. A plugin that writes its predictions there as labels scores what class 0
    everywhere scores, and so does every cell after it."""
    spec = write_spec(tmp_path / "small.toml", ["rewrites-labels", "source"])
    assert main(["reproduce", spec, "--out", str(tmp_path / "out"), "--no-progress", "--jobs", "1"]) == 0
    cells = {c["method"]: c for c in json.loads((tmp_path / "out" / "small.json").read_text())["cells"]}
    from cemabench.datasets.miniature import stream_labels

    assert cells["rewrites-labels"]["correct"] == int((stream_labels() == 0).sum()) < cells["rewrites-labels"]["seen"]
    alone = write_spec(tmp_path / "alone.toml", ["source"])
    assert main(["reproduce", alone, "--out", str(tmp_path / "alone"), "--no-progress", "--jobs", "1"]) == 0
    (clean,) = json.loads((tmp_path / "alone" / "small.json").read_text())["cells"]
    assert cells["source"]["correct"] == clean["correct"]


def test_a_plugin_that_replaces_the_guard_at_import_runs_no_unit(tmp_path, monkeypatch):
    """Issue 22, finding 9: the harness's code as imported is recorded before any plugin runs; a unit finds it
    replaced and fails, naming what was replaced (and so does every later unit in that process). The plugin is its
    own distribution (tests/plugins_patching), so that listing the other test plugins never imports it."""
    import sys
    from pathlib import Path

    from cemabench.protocol.edge import ForwardOnlyEdge
    from cemabench.protocol.meter import ComputeMeter

    monkeypatch.setattr(ComputeMeter, "protect", ComputeMeter.protect)  # put back after the plugin's patch
    monkeypatch.setattr(ForwardOnlyEdge, "_changed", ForwardOnlyEdge._changed)
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugins_patching"))
    monkeypatch.delitem(sys.modules, "patcher", raising=False)
    code, (cell,) = _cells(tmp_path, "patches-the-guard", "fog")
    assert code == 3 and cell["status"] == "error"
    assert "cemabench's own code was replaced" in cell["message"]
    assert "ComputeMeter.protect" in cell["message"] and "ForwardOnlyEdge._changed" in cell["message"]


def test_swapping_a_guards_code_in_place_is_found(monkeypatch):
    """Reviewer's finding: replacing ``f.__code__`` keeps the function object; the seal compares the code too."""
    from cemabench.protocol import hygiene
    from cemabench.protocol.meter import ComputeMeter

    assert hygiene.replaced_harness_code() == []
    monkeypatch.setattr(ComputeMeter.take, "__code__", (lambda self: 0).__code__)
    assert hygiene.replaced_harness_code() == ["cemabench.protocol.meter.ComputeMeter.take"]
