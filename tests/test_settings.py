"""Stream settings (cemabench.protocol.stream): per-domain, continual with rounds, gradual, mixed-domains,
+correlated."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cemabench.cli import main
from cemabench.config.settings import GRADUAL_SEVERITIES, SETTINGS, parse_setting
from cemabench.data import ArrayDomain
from cemabench.errors import UserError
from cemabench.protocol import Protocol, run_unit
from cemabench.protocol.stream import build_blocks, dirichlet_chunks, domain_order
from cemabench.registry import build_method
from conftest import tiny_dataset, write_spec


def _estimated_concentration(labels: np.ndarray, concentration: float, seeds=range(5)) -> float:
    """Method of moments: for p ~ Dirichlet(delta * 1_K), E[sum p_i^2] = (delta + 1) / (K delta + 1); p is each
    class's split over the K chunks, pooled over classes and seeds."""
    classes = np.unique(labels)
    k, squares = len(classes), []
    for seed in seeds:
        chunks = dirichlet_chunks(labels, concentration, np.random.default_rng(seed))
        for j, c in enumerate(classes):
            split = np.array([len(chunk[j]) for chunk in chunks]) / np.sum(labels == c)
            squares.append(np.sum(split ** 2))
    s = float(np.mean(squares))
    return (1 - s) / (k * s - 1)


@pytest.mark.parametrize("concentration", [0.1, 1.0])
def test_the_dirichlet_order_has_the_requested_concentration(concentration):
    labels = np.repeat(np.arange(20), 1000)
    estimate = _estimated_concentration(labels, concentration)
    # capacity (a chunk stops at N/K) and whole-sample cuts pull the estimate a little low; 35% holds it
    assert abs(estimate - concentration) / concentration < 0.35, estimate


def test_smaller_concentration_gives_longer_runs_of_one_class_and_every_sample_once():
    labels = np.repeat(np.arange(10), 60)
    runs = []
    for concentration in (0.01, 0.1, 1.0, 100.0):
        domain = ArrayDomain("d", np.zeros((len(labels), 2, 2, 3), np.uint8), lambda: labels)
        (block,) = build_blocks("per-domain+correlated", [domain], seed=0, concentration=concentration)
        assert sorted(block.order) == list(range(len(labels)))
        ordered = labels[block.order]
        runs.append(float(np.mean(ordered[1:] == ordered[:-1])))
    # inside a chunk each class's samples follow each other (NOTE's order), so even a large concentration keeps
    # runs; it spreads every class over every chunk instead
    assert runs == sorted(runs, reverse=True) and runs[0] > 0.95 and runs[-1] > 0.5, runs
    iid = labels[domain_order(0, "d", len(labels))]
    assert abs(np.mean(iid[1:] == iid[:-1]) - 0.1) < 0.05


def _at_severity(names=("a", "b"), n=30):
    """Domains whose pixels record their severity, for any severity."""
    def domains(severity):
        return [ArrayDomain(name, np.full((n, 4, 4, 3), severity, np.uint8), lambda: np.zeros(n, np.int64))
                for name in names]
    return domains


def test_gradual_severities_follow_the_schedule_within_each_domain():
    at = _at_severity()
    blocks = build_blocks("gradual", at(5), seed=0, at_severity=at)
    assert [(b.result, b.severity) for b in blocks] == [(d, s) for d in "ab" for s in GRADUAL_SEVERITIES]
    assert GRADUAL_SEVERITIES == (1, 2, 3, 4, 5, 4, 3, 2, 1)
    for block in blocks:  # the images really come from that severity
        assert all(int(x[0, 0, 0, 0] * 255 + 0.5) == block.severity for x in block.batches(7))
    with pytest.raises(UserError, match="severities"):
        build_blocks("gradual", at(5), seed=0)


def _edge_only_run(dataset, models, protocol, blocks):
    return run_unit(build_method("bn-adapt", {}), blocks, models, dataset.num_classes, dataset.clean, protocol,
                    seed=0)


def test_per_domain_gives_the_numbers_of_plain_domains_exactly(tiny):
    dataset, models = tiny
    for setting in ("per-domain", "continual"):
        protocol = Protocol(batch_size=16, setting=setting)
        plain = _edge_only_run(dataset, models, protocol, dataset.domains)
        blocks = build_blocks(setting, dataset.domains, seed=0)
        built = _edge_only_run(dataset, models, protocol, blocks)
        assert [r.to_dict() | {"edge_seconds": 0, "cloud_seconds": 0, "peak_memory_bytes": 0} for r in plain] == \
            [r.to_dict() | {"edge_seconds": 0, "cloud_seconds": 0, "peak_memory_bytes": 0} for r in built]


def test_rounds_repeat_the_stream_and_score_every_round(tiny):
    dataset, models = tiny
    protocol = Protocol(batch_size=16, setting="continual", rounds=3)
    blocks = build_blocks("continual", dataset.domains, seed=0, rounds=3)
    assert [b.segment for b in blocks[:4]] == ["a", "b", "c", "a (round 2)"]
    results = run_unit(build_method("tent", {}), blocks, models, 4, dataset.clean, protocol, seed=0)
    assert [r.domain for r in results] == ["a", "b", "c"]
    for r in results:
        assert r.status == "ok" and r.seen == 300 and [s["round"] for s in r.segments] == [1, 2, 3]
        assert sum(s["seen"] for s in r.segments) == r.seen and sum(s["correct"] for s in r.segments) == r.correct
        assert r.link.uploaded == 300  # tent uploads everything, in every round


def test_mixed_domains_is_one_stream_scored_once_per_sample_and_per_domain(tiny):
    dataset, models = tiny
    (block,) = build_blocks("mixed-domains", dataset.domains, seed=0)
    assert len(block) == 300 and len(set(zip(block.which.tolist(), block.order.tolist()))) == 300
    first = block.which[:16]
    assert len(set(first.tolist())) > 1  # batches mix domains
    x = next(block.batches(16))
    for i in range(16):  # each row is the image of its (domain, index)
        expected = dataset.domains[first[i]].images(block.order[i:i + 1])[0]
        assert torch.equal(x[i], expected)
    protocol = Protocol(batch_size=16, setting="mixed-domains")
    (result,) = run_unit(build_method("bn-adapt", {}), [block], models, 4, dataset.clean, protocol, seed=0)
    assert result.domain == "mixed-domains" and result.seen == 300
    assert {d: v[0] for d, v in result.by_domain.items()} == {"a": 100, "b": 100, "c": 100}
    assert sum(v[1] for v in result.by_domain.values()) == result.correct
    labels = block.labels()
    assert all((labels[block.which == s] == np.asarray(d.labels())[block.order[block.which == s]]).all()
               for s, d in enumerate(dataset.domains))


@pytest.mark.parametrize("setting", [s for s in SETTINGS if not s.startswith("gradual")])
def test_every_setting_is_deterministic_from_the_seed(setting):
    dataset = tiny_dataset(n=40)
    orders = [np.concatenate([b.order for b in build_blocks(setting, dataset.domains, seed=s)]) for s in (0, 0, 1)]
    assert np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], orders[2])


@pytest.mark.parametrize("bad", ["sometimes", "continual+", "gradual+correlated+correlated", "correlated", ""])
def test_an_unknown_setting_is_one_line_naming_the_valid_ones(bad):
    with pytest.raises(UserError, match="setting must be one of per-domain, continual, gradual, mixed-domains"):
        parse_setting(bad)


def test_a_spec_with_the_old_reset_field_says_what_replaced_it(tmp_path, capsys):
    path = write_spec(tmp_path / "t.toml", ["source"])
    text = Path(path).read_text().replace('setting = "per-domain"', 'reset = "continual"')
    Path(path).write_text(text)
    assert main(["reproduce", path, "--out", str(tmp_path / "o")]) == 2
    assert "reset was replaced by setting" in capsys.readouterr().err


@pytest.mark.slow
def test_gradual_and_mixed_tables_on_the_miniature_render_their_breakdowns(tmp_path, one_torch_thread):
    spec = write_spec(tmp_path / "t.toml", ["bn-adapt", "tent"], domains=("fog", "snow"))
    for setting, section in (("gradual", "Accuracy per severity"), ("mixed-domains", "inside the mixed stream"),
                             ("continual+correlated", "label-correlated order")):
        out = tmp_path / setting
        args = ["reproduce", spec, "--out", str(out), "--no-progress", "--jobs", "1", "--setting", setting]
        assert main(args) == 0
        name = f"small.setting-{setting}"
        assert section in (out / f"{name}.md").read_text()
        cells = json.loads((out / f"{name}.json").read_text())["cells"]
        assert all(c["status"] == "ok" for c in cells) and cells


def test_a_failure_in_a_later_round_leaves_no_result_looking_complete(tiny):
    dataset, models = tiny
    from cemabench.method import EdgeDecision, EdgeLogic, Method

    class FailsLate(Method):
        name = "fails-late"

        def edge(self, num_classes):
            class Edge(EdgeLogic):
                batches = 0

                def step(self, model, x):
                    Edge.batches += 1
                    if Edge.batches == 25:  # round 2 of domain a (7 batches per domain, 21 per round)
                        raise RuntimeError("late")
                    return EdgeDecision(model(x))
            return Edge()

    blocks = build_blocks("continual", dataset.domains, seed=0, rounds=2)
    results = run_unit(FailsLate(), blocks, models, 4, dataset.clean,
                       Protocol(batch_size=16, setting="continual", rounds=2), seed=0)
    assert [(r.domain, r.status) for r in results] == [("a", "error"), ("b", "skipped"), ("c", "skipped")]


def test_concentration_is_one_number_and_the_two_ramps_of_gradual_differ():
    labels = np.repeat(np.arange(4), 30)
    domain = ArrayDomain("d", np.zeros((120, 2, 2, 3), np.uint8), lambda: labels)
    one, one_float = (build_blocks("continual+correlated", [domain], 0, concentration=c)[0].order for c in (1, 1.0))
    assert np.array_equal(one, one_float) and Protocol(setting="continual+correlated", concentration=1).concentration \
        == 1.0
    at = _at_severity(names=("d",), n=120)
    gradual = build_blocks("gradual+correlated", [domain], 0, at_severity=lambda s: [
        ArrayDomain("d", np.full((120, 2, 2, 3), s, np.uint8), lambda: labels)])
    up, down = (b for b in gradual if b.segment == "d@3")
    assert not np.array_equal(up.order, down.order)
    assert at  # the helper builds any severity


@pytest.mark.parametrize("fields, message", [
    ({"concentration": 0.5}, r"concentration applies to the \+correlated settings"),
    ({"setting": "continual", "devices": 2, "cloud_capacity": 0}, "cloud_capacity must be an integer >= 1"),
])
def test_meaningless_protocol_combinations_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        Protocol(**fields)


@pytest.mark.slow  # 10 s; kept out of the default tier's 5 minutes
def test_mixed_domain_and_multi_device_records_are_reused_from_the_store(tmp_path, capsys):
    spec = write_spec(tmp_path / "t.toml", ["source"], domains=("fog", "snow", "contrast"))
    for flags in (["--setting", "mixed-domains"], ["--setting", "continual", "--devices", "2"],
                  ["--setting", "mixed-domains", "--devices", "3", "--device-streams", "rotate"]):
        args = ["reproduce", spec, "--out", str(tmp_path / "o"), "--no-progress", "--jobs", "1", *flags]
        assert main(args) == 0
        capsys.readouterr()
        assert main(["status", spec, "--out", str(tmp_path / "o"), *flags]) == 0
        assert "1 done" in capsys.readouterr().out
        assert main(args) == 0
        assert "recomputing" not in capsys.readouterr().err
