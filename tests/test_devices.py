"""Many edges on one cloud: devices in lockstep, each with its own stream and link, a per-device or shared cloud, and
a cloud capacity per step."""
import dataclasses
from pathlib import Path

import pytest
import torch

from cemabench.cli import main
from cemabench.config.settings import device_domains
from cemabench.errors import UserError
from cemabench.method import CloudLogic, EdgeDecision, EdgeLogic, Method
from cemabench.protocol import Protocol, run_unit
from cemabench.protocol.stream import DeviceStreams, build_blocks
from cemabench.registry import build_method
from cemabench.report.check import compare
from cemabench.report.leaderboard import _reference_sections, device_frame, metric_frame
from conftest import write_spec


def _devices(dataset, names_per_device, setting="continual"):
    by_name = {d.name: d for d in dataset.domains}
    return DeviceStreams([build_blocks(setting, [by_name[n] for n in names], seed=0) for names in names_per_device])


def _comparable(result) -> dict:
    out = result.to_dict()
    for volatile in ("edge_seconds", "cloud_seconds", "peak_memory_bytes", "device"):
        out.pop(volatile)
    return out


def test_device_streams_partition_or_rotate_the_domains():
    assert device_domains(["a", "b", "c", "d"], 2, "partition") == [["a", "c"], ["b", "d"]]
    assert device_domains(["a", "b", "c"], 3, "rotate") == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    with pytest.raises(UserError, match="at most 3 devices"):
        device_domains(["a", "b", "c"], 4, "partition")


def test_every_devices_stream_is_scored_exactly_once(tiny):
    dataset, models = tiny
    protocol = Protocol(batch_size=16, setting="continual", devices=3, device_streams="rotate")
    streams = _devices(dataset, device_domains(["a", "b", "c"], 3, "rotate"))
    results = run_unit(build_method("tent", {}), streams, models, 4, dataset.clean, protocol, seed=0)
    assert sorted((r.device, r.domain) for r in results) == [(d, n) for d in range(3) for n in "abc"]
    assert all(r.status == "ok" and r.seen == 100 and r.link.uploaded == 100 for r in results)


def test_per_device_clouds_keep_devices_apart(tiny):
    """With one cloud replica per device and no capacity limit, each device's numbers are those of that device
    alone: nothing leaks between devices."""
    dataset, models = tiny
    together = run_unit(build_method("tent", {}), _devices(dataset, [["a", "b"], ["c"]]), models, 4, dataset.clean,
                        Protocol(batch_size=16, setting="continual", devices=2), seed=0)
    for device, names in enumerate([["a", "b"], ["c"]]):
        alone = run_unit(build_method("tent", {}), _devices(dataset, [names]), models, 4, dataset.clean,
                         Protocol(batch_size=16, setting="continual"), seed=0)
        mine = [r for r in together if r.device == device]
        assert [_comparable(r) for r in mine] == [_comparable(r) for r in alone]


class _Tagged(Method):
    """A shared cloud that records which device each upload came from, and answers nothing."""

    name = "tagged"
    cloud_replicas = "shared"

    def edge(self, num_classes):
        class Edge(EdgeLogic):
            def step(self, model, x):
                return EdgeDecision(model(x), upload=torch.arange(len(x)))
        return Edge()

    def cloud(self, resources):
        seen = self.seen = []
        built = getattr(self, "built", 0)
        self.built = built + 1

        class Cloud(CloudLogic):
            def step(self, upload):
                seen.append((upload.device, len(upload)))
                return None
        return Cloud()


def test_a_shared_cloud_sees_every_devices_uploads_tagged_and_the_capacity_holds(tiny):
    dataset, models = tiny
    method = _Tagged()
    protocol = Protocol(batch_size=16, setting="continual", devices=2, cloud_capacity=20)
    results = run_unit(method, _devices(dataset, [["a"], ["b"]]), models, 4, dataset.clean, protocol, seed=0)
    assert method.built == 1  # one shared cloud
    steps = [method.seen[i:i + 2] for i in range(0, len(method.seen), 2)]
    assert len(steps) == 7  # 100 samples in batches of 16
    for t, step in enumerate(steps):
        assert [d for d, _ in step] == ([0, 1] if t % 2 == 0 else [1, 0])  # the order rotates every step
        assert sum(n for _, n in step) <= 20 and step[0][1] == min(16 if t < 6 else 4, 20)
    for r in results:
        assert r.link.uploaded + r.link.busy == 100 and r.link.busy > 0
        assert "cloud at capacity" in r.note


def test_per_device_replicas_build_one_cloud_per_device(tiny):
    dataset, models = tiny
    method = _Tagged()
    type(method).cloud_replicas = "per-device"
    try:
        run_unit(method, _devices(dataset, [["a"], ["b"], ["c"]]), models, 4, dataset.clean,
                 Protocol(batch_size=50, setting="continual", devices=3), seed=0)
    finally:
        type(method).cloud_replicas = "shared"
    assert method.built == 3


def test_one_failing_device_ends_the_unit_and_says_which(tiny):
    dataset, models = tiny

    class Breaks(_Tagged):
        def edge(self, num_classes):
            class Edge(EdgeLogic):
                calls = 0

                def step(self, model, x):
                    Edge.calls += 1
                    if Edge.calls == 3:
                        raise RuntimeError("boom")
                    return EdgeDecision(model(x))
            return Edge()

    results = run_unit(Breaks(), _devices(dataset, [["a"], ["b"]]), models, 4, dataset.clean,
                       Protocol(batch_size=16, setting="continual", devices=2), seed=0)
    status = {r.device: (r.status, r.message.splitlines()[0]) for r in results}
    assert status[0][0] == "error" and "boom" in status[0][1]
    assert status[1] == ("skipped", "device 0 failed, which ended the run unit")


@pytest.mark.parametrize("flags, message", [
    (["--devices", "0"], "devices must be an integer >= 1"),
    (["--devices", "2"], "devices > 1 share one cloud over a stream without reset"),
    (["--devices", "3", "--setting", "continual"], "3 devices cannot each have their own domain out of 2"),
    (["--devices", "2", "--setting", "continual", "--device-streams", "scatter"],
     "device_streams must be one of partition, rotate"),
    (["--devices", "2", "--setting", "continual", "--cloud-capacity", "-1"], "cloud_capacity must be an integer"),
])
def test_bad_device_flags_are_one_line_before_compute(flags, message, capsys):
    code = main(["run", "--method", "tent", "--table", "table2", "--domains", "fog", "snow", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_multi_edge_table_on_the_miniature_renders_per_device(tmp_path, one_torch_thread):
    spec = write_spec(tmp_path / "t.toml", ["source", "tent", "cloud-only"], domains=("fog", "snow"))
    text = Path(spec).read_text().replace('setting = "per-domain"',
                                          'setting = "continual"\ndevices = 2\ncloud_capacity = 64')
    Path(spec).write_text(text)
    assert main(["reproduce", spec, "--out", str(tmp_path / "o"), "--no-progress", "--jobs", "1"]) == 0
    md = (tmp_path / "o" / "small.md").read_text()
    assert "2 edge devices on one cloud" in md and "## Per edge device" in md and "tent / device 1" in md


def test_a_method_declaring_an_unknown_cloud_sharing_is_refused(tiny):
    dataset, models = tiny
    method = _Tagged()
    method.cloud_replicas = "some"
    with pytest.raises(UserError, match="cloud_replicas = 'some'; it must be 'per-device' or 'shared'"):
        run_unit(method, _devices(dataset, [["a"], ["b"]]), models, 4, dataset.clean,
                 Protocol(batch_size=50, setting="continual", devices=2), seed=0)


def _doc(cells, devices=2, setting="continual"):
    protocol = {**dataclasses.asdict(Protocol(setting=setting, devices=devices, device_streams="rotate"))}
    return {"table": "t", "title": "t", "seeds": [0], "methods": [{"label": "m", "name": "tent"}],
            "check": {"tolerance": 0.5, "metrics": ["accuracy"]}, "cells": cells,
            "provenance": {"miniature": True, "domains": ["a"], "protocol": protocol},
            "reference": {"published_uploads": [{"method": "m", "domain": "a", "uploaded": 1, "total": 2}]}}


def _cell(device, status="ok", correct=5):
    return {"method": "m", "seed": 0, "domain": "a", "device": device, "status": status, "note": "", "seen": 10,
            "correct": correct, "accuracy": 10.0 * correct if status == "ok" else None, "message": "",
            "upload_percent": 0.0, "link": {"uploaded": 0, "busy": 0, "downloads": 0, "download_delay_batches": 0,
                                          "bytes_up": 0, "bytes_down": 0}}


def test_check_compares_every_devices_cell():
    expected = _doc([_cell(0, correct=8), _cell(1, correct=4)])
    result = _doc([_cell(0, correct=1), _cell(1, correct=4)])
    problems, checked = compare(result, expected)
    assert checked == 2 and [p["cell"] for p in problems] == ["m / a / seed 0"]  # device 0's cell (80 -> 10)


def test_pooled_cells_show_the_worst_status_and_failed_devices_keep_their_row():
    doc = _doc([_cell(0, status="skipped"), _cell(1, status="error")])
    assert metric_frame(doc, "accuracy").loc["m", "a"] == "error"
    rows = device_frame(doc)
    assert list(rows.index) == ["m / device 0", "m / device 1"] and list(rows["accuracy %"]) == ["skipped", "error"]
    pooled = metric_frame(_doc([_cell(0, correct=8), _cell(1, correct=4)]), "accuracy")
    assert pooled.loc["m", "a"] == "60.0"  # 12 of 20, the devices' samples pooled


def test_published_per_domain_numbers_are_not_set_beside_another_setting():
    doc = _doc([_cell(0)], devices=1)
    doc["provenance"]["miniature"] = False
    assert "Not shown: they were measured per domain on one edge" in "\n".join(_reference_sections(doc))
