"""Active test-time adaptation's annotation budget (issue 20): the cloud asks the harness's oracle annotator for the
labels of uploaded samples it chooses; only those arrive, only within the budget, and cells count them. The methods
are tests/plugins/annotated.py's: the cloud answers each labelled sample with its label and every other with class 0,
so a cell's number of correct predictions says exactly which labels arrived."""
import re

import numpy as np
import pytest
import torch
from test_guards import _integer_arrays_in_memory

from cemabench.datasets import miniature
from cemabench.errors import UserError
from cemabench.method import CloudLogic, EdgeDecision, EdgeLogic, Method
from cemabench.models.mini import load_model
from cemabench.protocol import Models, Protocol, run_unit
from cemabench.protocol.stream import DeviceStreams, build_blocks, domain_order
from cemabench.registry import build_method


def _expected_correct(domain, batch_size: int, labelled: int) -> int:
    """Correct predictions when the first ``labelled`` rows of every batch are answered with their labels and the
    rest with class 0 (the labels read here, after the run)."""
    labels = domain.labels()[domain_order(0, domain.name, len(domain))]
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = labels[start:start + batch_size]
        correct += min(labelled, len(batch)) + int((batch[labelled:] == 0).sum())
    return correct


def _run(tiny, protocol, isolate=False, **options):
    dataset, models = tiny
    return run_unit(build_method("asks-for-labels", options), dataset.domains[:1], models, 4, dataset.clean,
                    protocol, seed=0, isolate=isolate)


@pytest.mark.parametrize("budget", [{"label_budget": 3}, {"label_budget_total": 21}, {"label_budget": 3,
                                                                                      "label_budget_total": 21}])
def test_the_cloud_gets_exactly_the_labels_it_asked_for_and_the_cell_counts_them(plugins, tiny, budget):
    (result,) = _run(tiny, Protocol(batch_size=16, **budget), count=3)
    assert result.status == "ok", result.message
    assert result.labels_used == 3 * 7  # 100 samples: 7 batches
    assert result.correct == _expected_correct(tiny[0].domains[0], 16, 3)
    assert result.to_dict()["labels_used"] == 21


@pytest.mark.slow  # 6 s on a quiet machine; kept out of the default tier's 5 minutes
def test_isolated_halves_get_the_same_labels(plugins):
    source = miniature.dataset(domains=["fog"])
    models = Models(edge=lambda: load_model("edge"), foundation=lambda: load_model("foundation"))
    inline, isolated = (run_unit(build_method("asks-for-labels", {"count": 5}), source.domains, models, 10,
                                 source.clean, Protocol(batch_size=64, label_budget=5), seed=0, isolate=isolate)[0]
                        for isolate in (False, True))
    assert inline.status == isolated.status == "ok", (inline.message, isolated.message)
    assert inline.correct == isolated.correct == _expected_correct(source.domains[0], 64, 5)
    assert inline.labels_used == isolated.labels_used == 5 * -(-len(source.domains[0]) // 64)


@pytest.mark.parametrize("protocol, options, words", [
    (Protocol(batch_size=16, label_budget=2), {"ask": "beyond", "count": 3}, "beyond its budget of label_budget = 2"),
    (Protocol(batch_size=16, label_budget_total=5), {"count": 3}, "2 left of its budget of label_budget_total = 5"),
    (Protocol(batch_size=16, label_budget=4), {"ask": "outside"}, "row 16 of an upload of 16 samples"),
    (Protocol(batch_size=16, label_budget=4), {"ask": "repeat"}, "not strictly increasing"),
    (Protocol(batch_size=16, label_budget=4), {"ask": "floats"}, "torch.float64 tensor"),
])
def test_a_request_beyond_the_budget_or_the_upload_fails_the_cell_naming_the_method(plugins, tiny, protocol, options,
                                                                                    words):
    (result,) = _run(tiny, protocol, **options)
    assert result.status == "error"
    assert "method asks-for-labels asked the annotator" in result.message and words in result.message


def test_a_method_that_uses_labels_is_refused_without_a_budget_before_any_compute(plugins, tiny):
    with pytest.raises(UserError, match="asks-for-labels asks the annotator for labels.*label_budget"):
        _run(tiny, Protocol(batch_size=16))


class _Hunting(CloudLogic):
    """Asks for the labels of the first 5 uploads of each batch, and at batch 3 searches memory for label arrays."""

    def __init__(self, found: list, n: int):
        self.found, self.n, self.calls, self.seen = found, n, 0, []

    def labels_wanted(self, upload):
        self.calls += 1
        return torch.arange(5)

    def step(self, upload):
        self.seen.append((upload.labels, upload.labelled))
        if upload.batch_index == 3:
            self.found.extend(_integer_arrays_in_memory(self.n))


def _hunter(found: list, n: int, clouds: list):
    class Edge(EdgeLogic):
        def step(self, model, x):
            return EdgeDecision(model(x), upload=torch.arange(len(x)))

    class Hunter(Method):
        name = "hunter"

        def edge(self, num_classes):
            return Edge()

        def cloud(self, resources):
            clouds.append(_Hunting(found, n))
            return clouds[-1]

    return Hunter()


def test_under_a_budget_no_label_but_those_asked_for_is_in_memory_while_method_code_runs():
    source = miniature.dataset(domains=["fog"])
    domain, found, clouds = source.domains[0], [], []
    models = Models(edge=lambda: load_model("edge"), foundation=lambda: load_model("foundation"))
    (result,) = run_unit(_hunter(found, len(domain), clouds), [domain], models, 10, source.clean,
                         Protocol(batch_size=64, label_budget=5), seed=0)
    assert result.status == "ok" and result.labels_used == 5 * len(clouds[0].seen)
    assert found, "the search saw no integer array of the stream's length at all (the order is one)"
    labels = miniature.stream_labels()  # read only now, after the run
    stream = labels[domain_order(0, "fog", len(labels))]
    assert not any(np.array_equal(a, labels) or np.array_equal(a, stream) for a in found)
    for batch, (got, rows) in enumerate(clouds[0].seen):  # and the five asked for are the right ones
        assert rows.tolist() == list(range(5)) and got.tolist() == stream[64 * batch:64 * batch + 5].tolist()


def test_without_a_budget_the_cloud_is_not_asked_and_no_label_arrives():
    source = miniature.dataset(domains=["fog"])
    clouds = []
    models = Models(edge=lambda: load_model("edge"), foundation=lambda: load_model("foundation"))
    (result,) = run_unit(_hunter([], 1, clouds), source.domains, models, 10, source.clean, Protocol(batch_size=64),
                         seed=0)
    assert result.status == "ok" and result.labels_used == 0 and clouds[0].calls == 0
    assert clouds[0].seen and all(labels is None and rows is None for labels, rows in clouds[0].seen)


def test_the_command_line_refuses_a_labelling_method_without_a_budget_in_one_line(plugins, capsys):
    from cemabench.cli import main

    assert main(["run", "--method", "asks-for-labels", "--domains", "fog"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--label-budget" in err[0] and "asks-for-labels" in err[0]


@pytest.mark.slow  # 5-12 s; kept out of the default tier's 5 minutes
def test_a_table_that_grants_labels_shows_them_in_its_leaderboard_and_plots_accuracy_against_them(plugins, tmp_path):
    from cemabench.report.leaderboard import efficiency_points, render, write_tradeoff_plot
    from cemabench.run import runner
    from cemabench.tables.spec import load_table

    spec = tmp_path / "act.toml"
    spec.write_text("\n".join([
        'name = "act"', 'title = "labels"', "[protocol]", "batch_size = 64", "[data]", "severity = 5",
        'domains = ["fog"]', "[data.miniature]", 'dataset = "miniature-digits-c"', 'edge = "mini:edge"',
        'foundation = "mini:foundation"', "[data.real]", 'dataset = "imagenet-c"', 'edge = "mini:edge"',
        'foundation = "mini:foundation"', "[[methods]]", 'name = "source"', "[[methods]]", 'label = "asks@3"',
        'name = "asks-for-labels"', "options = {count = 3}", "link = {label_budget = 3}"]) + "\n")
    doc = runner.reproduce(load_table(str(spec)), None, tmp_path / "out", jobs=1, progress=False)
    batches = -(-len(miniature.dataset(domains=["fog"]).domains[0]) // 64)
    assert [c["labels_used"] for c in doc["cells"]] == [0, 3 * batches]
    text = render(doc)
    assert "## Labels the cloud asked the oracle annotator for" in text
    assert re.search(rf"\| asks@3 +\| +{3 * batches} +\| +{3 * batches} +\|", text)
    points = efficiency_points(doc).set_index("method")
    assert points.loc["asks@3", "labels_per_1000"] == pytest.approx(1000 * 3 * batches / doc["cells"][1]["seen"])
    assert write_tradeoff_plot(doc, tmp_path / "act.png") and (tmp_path / "act.png").stat().st_size > 0


# A hostile review of the annotation budget (the plugins' ``ask`` and ``index`` options, tests/plugins/annotated.py).

def test_moving_the_upload_index_in_labels_wanted_does_not_label_other_samples(plugins, tiny):
    # at batch 0 the cloud shifts the harness's upload index onto the next batch's samples before its rows are read,
    # and shifts it back in its step: the labels that arrive are still those of the rows it was sent
    (result,) = _run(tiny, Protocol(batch_size=16, label_budget=3), ask="moves-index", count=3)
    assert result.status == "ok", result.message
    assert result.labels_used == 21 and result.correct == _expected_correct(tiny[0].domains[0], 16, 3)


def test_the_labels_of_rows_asked_for_are_those_of_the_samples_the_upload_index_names(plugins, tiny):
    # the edge uploads the odd rows of each batch and the cloud asks for the odd rows of that upload: row r of the
    # upload is the batch's sample 2r + 1, so the labelled samples are 3, 7, 11 of each batch (not 1, 3, 5)
    (result,) = _run(tiny, Protocol(batch_size=16, label_budget=3), ask="odd", index="odd", count=3)
    assert result.status == "ok", result.message
    domain = tiny[0].domains[0]
    labels = domain.labels()[domain_order(0, domain.name, len(domain))]
    correct, used = 0, 0
    for start in range(0, len(labels), 16):
        batch = labels[start:start + 16]
        uploaded = np.arange(1, len(batch), 2)
        labelled = uploaded[np.arange(1, len(uploaded), 2)[:3]]
        rest = np.setdiff1d(np.arange(len(batch)), labelled)
        correct, used = correct + len(labelled) + int((batch[rest] == 0).sum()), used + len(labelled)
    assert result.labels_used == used == 3 * 6 + 1 and result.correct == correct


@pytest.mark.parametrize("index", ["outside", "repeat"])
def test_an_invalid_upload_index_fails_the_cell_before_any_label_of_it_is_read(plugins, tiny, index):
    # the index is checked lazily (with the next batch) where no label is asked for; labels wait for its check
    (result,) = _run(tiny, Protocol(batch_size=16, label_budget=16), index=index, count=16)
    assert result.status == "error" and "EdgeDecision.upload must hold distinct indices" in result.message
    assert result.labels_used == 0


@pytest.mark.parametrize("setting, domains, fields", [
    ("continual", [["a", "b"], ["c"]], {"devices": 2}),
    ("continual", [["a", "b"]], {"rounds": 2}),
    ("mixed-domains+correlated", [["a", "b"], ["c"]], {"devices": 2, "cloud_capacity": 20}),
    ("continual+correlated", [["a", "b"]], {"upload_budget": 150}),
])
def test_every_label_is_the_right_one_and_counts_toward_its_own_result(plugins, tiny, setting, domains, fields):
    # the cloud asks for every uploaded row and answers it with its label: each result's correct predictions are
    # exactly its labels, across devices, rounds, mixed and correlated orders, and uploads cut by capacity or budget
    dataset, models = tiny
    by_name = {d.name: d for d in dataset.domains}
    stream = DeviceStreams([build_blocks(setting, [by_name[n] for n in names], seed=0, rounds=fields.get("rounds", 1))
                            for names in domains])
    results = run_unit(build_method("asks-for-labels", {"count": 16}), stream, models, 4, dataset.clean,
                       Protocol(batch_size=16, label_budget=16, setting=setting, **fields), seed=0)
    assert all(r.status == "ok" for r in results), [r.message for r in results]
    assert [r.labels_used for r in results] == [r.correct for r in results] == [r.link.uploaded for r in results]
    if {"cloud_capacity", "upload_budget"} & set(fields):  # the cut left samples unlabelled
        assert sum(r.labels_used for r in results) < sum(r.seen for r in results)


def test_a_labels_wanted_that_exits_or_returns_a_tensor_subclass_fails_its_cell(plugins, tiny):
    for ask, words in (("exits", "sys.exit(3)"), ("subclass", "labels_wanted's rows must be a plain torch.Tensor")):
        (result,) = _run(tiny, Protocol(batch_size=16, label_budget=5), ask=ask)
        assert result.status == "error" and words in result.message and result.labels_used == 0


def test_in_process_a_cloud_that_walks_the_stack_can_zero_its_label_count_and_budget(plugins, tiny):
    # the hole, in-process (README: what a plugin can still do in-process): under a budget of 3 labels per unit the
    # cloud's step finds the loop's devices in a stack frame and zeroes the count, so every batch gets its 3 labels
    (result,) = _run(tiny, Protocol(batch_size=16, label_budget_total=3), ask="forges-count", count=3)
    assert result.status == "ok" and result.labels_used == 0
    assert result.correct == _expected_correct(tiny[0].domains[0], 16, 3)


@pytest.mark.slow  # 15 s; kept out of the default tier's 5 minutes
def test_isolated_a_cloud_that_exits_moves_the_index_forges_its_count_or_returns_a_subclass_is_held(plugins):
    source = miniature.dataset(domains=["fog"])
    models = Models(edge=lambda: load_model("edge"), foundation=lambda: load_model("foundation"))
    for options, budget, words, used in (
            ({"ask": "exits"}, {"label_budget": 5}, "sys.exit(3)", 0),
            ({"ask": "subclass"}, {"label_budget": 5}, "labels_wanted's rows must be a plain torch.Tensor", 0),
            ({"index": "outside"}, {"label_budget": 5}, "EdgeDecision.upload must hold distinct indices", 0),
            # not sent across whole: its first 65 rows say it asks for a row the upload lacks
            ({"ask": "huge"}, {"label_budget": 5}, "for row 64 of an upload of 64 samples", 0),
            # its half holds no loop: the count and the budget stand, and the request at batch 1 is refused
            ({"ask": "forges-count", "count": 5}, {"label_budget_total": 5}, "0 left of its budget", 5)):
        (result,) = run_unit(build_method("asks-for-labels", options), source.domains, models, 10, source.clean,
                             Protocol(batch_size=64, **budget), seed=0, isolate=True)
        assert result.status == "error" and words in result.message and result.labels_used == used, result.message
    (result,) = run_unit(build_method("asks-for-labels", {"ask": "moves-index", "count": 5}), source.domains, models,
                         10, source.clean, Protocol(batch_size=64, label_budget=5), seed=0, isolate=True)
    assert result.status == "ok" and result.correct == _expected_correct(source.domains[0], 64, 5)


@pytest.mark.slow  # 15 s; kept out of the default tier's 5 minutes
def test_a_labels_wanted_that_runs_a_model_counts_the_same_in_process_and_isolated(plugins):
    source = miniature.dataset(domains=["fog"])
    models = Models(edge=lambda: load_model("edge"), foundation=lambda: load_model("foundation"))
    cells = [run_unit(build_method("asks-for-labels", {"ask": "least-sure", "count": 5}), source.domains, models, 10,
                      source.clean, Protocol(batch_size=64, label_budget=5), seed=0, isolate=isolate)[0].to_dict()
             for isolate in (False, True)]
    keys = ("status", "correct", "labels_used", "cloud_flops", "cloud_forward_samples_nograd")
    assert [cells[0][k] for k in keys] == [cells[1][k] for k in keys]
    assert cells[0]["status"] == "ok" and cells[0]["cloud_flops"] > 0 and cells[0]["cloud_forward_samples_nograd"] > 0


def test_a_request_for_labels_on_a_detection_dataset_is_refused_naming_the_method(plugins, capsys):
    from cemabench.cli import main

    assert main(["run", "--method", "asks-for-box-labels", "--dataset", "miniature-digits-det-c", "--edge",
                 "minidet:edge", "--foundation", "minidet:cloud", "--domains", "fog", "--label-budget", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "asks-for-box-labels" in err[0] and "detection" in err[0]


def test_a_method_that_asks_on_detection_without_declaring_uses_labels_is_refused_by_name():
    from cemabench.protocol.annotation import Annotator, LabelRequestRefused

    annotator = Annotator(Protocol(batch_size=4, label_budget=2), "quiet-asker", "detection")
    assert len(annotator.rows(torch.empty(0, dtype=torch.int64), 4, 0)) == 0  # asking for none is no request
    with pytest.raises(LabelRequestRefused, match="method quiet-asker asked the annotator at batch 1 .* detection"):
        annotator.rows(torch.tensor([0]), 4, 1)


def test_a_request_longer_than_the_upload_is_cut_before_it_is_copied():
    from cemabench.protocol.annotation import asked_rows

    huge = torch.arange(1_000_000)
    rows = asked_rows(huge, 16)
    assert rows.tolist() == list(range(17)) and rows.untyped_storage().nbytes() == 17 * 8
    assert asked_rows(torch.arange(3), 16).tolist() == [0, 1, 2]
