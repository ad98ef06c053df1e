import numpy as np
import pytest
import torch

from cemabench.method import CloudLogic, EdgeDecision, EdgeLogic, Method
from cemabench.protocol import Protocol, run_unit
from cemabench.protocol.stream import derive_seed, domain_order


class Recorder(Method):
    """Uploads every sample; the cloud sends down fc.bias = (batch index + 1); the edge logs what it holds."""

    name = "recorder"

    def __init__(self, log):
        self.log = log

    def edge(self, num_classes):
        log = self.log

        class Edge(EdgeLogic):
            def step(self, model, x):
                log.append(("edge", float(model.fc.bias[0]), x[0].sum().item()))
                return EdgeDecision(model(x), upload=torch.arange(len(x)))

        return Edge()

    def cloud(self, resources):
        class Cloud(CloudLogic):
            def step(self, upload):
                return {"fc.bias": torch.full((resources.num_classes,), float(upload.batch_index + 1))}

        return Cloud()


def _edge_only(step_fn):
    class Bad(Method):
        name = "bad"

        def edge(self, num_classes):
            class Edge(EdgeLogic):
                def step(self, model, x):
                    return step_fn(model, x)

            return Edge()

    return Bad()


def test_domain_order_is_a_seeded_permutation():
    a = domain_order(0, "fog", 50)
    assert sorted(a) == list(range(50))
    assert np.array_equal(a, domain_order(0, "fog", 50))
    assert not np.array_equal(a, domain_order(1, "fog", 50))
    assert not np.array_equal(a, domain_order(0, "snow", 50))
    assert derive_seed(1, "x") == derive_seed(1, "x") != derive_seed(2, "x")


def test_every_method_sees_the_same_stream(tiny):
    dataset, models = tiny
    logs = [[], []]
    for log in logs:
        run_unit(Recorder(log), dataset.domains[:1], models, 4, dataset.clean, Protocol(batch_size=16), seed=3)
    assert [e[2] for e in logs[0]] == [e[2] for e in logs[1]]


@pytest.mark.parametrize("delay", [0, 2])
def test_downloads_arrive_before_batch_t_plus_1_plus_delay(tiny, delay):
    dataset, models = tiny
    log = []
    (result,) = run_unit(Recorder(log), dataset.domains[:1], models, 4, dataset.clean,
                         Protocol(batch_size=10, delivery_delay=delay), seed=0)
    initial = float(models.edge().fc.bias[0].detach())
    held = [e[1] for e in log]
    for t, bias in enumerate(held):
        source_batch = t - 1 - delay
        assert bias == (source_batch + 1 if source_batch >= 0 else initial)
    assert result.link.downloads == 10 and result.link.download_bytes == 10 * 4 * 4


def test_link_counts_bytes_and_enforces_the_budget(tiny):
    dataset, models = tiny
    results = run_unit(Recorder([]), dataset.domains, models, 4, dataset.clean,
                       Protocol(batch_size=32, setting="continual", upload_budget=150), seed=0)
    assert [r.link.uploaded for r in results] == [100, 50, 0]
    assert [r.link.refused for r in results] == [0, 50, 100]
    assert [r.link.upload_bytes for r in results] == [100 * 192, 50 * 192, 0]
    assert all(r.seen == 100 and r.status == "ok" for r in results)


def test_backpropagating_through_the_edge_is_a_clear_error(tiny):
    dataset, models = tiny

    def backprop(model, x):
        out = model(x)
        out.sum().backward()
        return EdgeDecision(out)

    (result,) = run_unit(_edge_only(backprop), dataset.domains[:1], models, 4, dataset.clean, Protocol(), seed=0)
    assert result.status == "error"
    assert "forward-only" in result.message and "CloudLogic" in result.message


@pytest.mark.parametrize("cheat", ["edit", "enable_grad"])
def test_changing_edge_parameters_outside_a_download_is_caught(tiny, cheat):
    dataset, models = tiny

    def edit(model, x):
        if cheat == "edit":
            model.fc.weight.add_(1.0)
        else:
            with torch.inference_mode(False):
                model.fc.weight.requires_grad_(True)
        return EdgeDecision(model(x))

    (result,) = run_unit(_edge_only(edit), dataset.domains[:1], models, 4, dataset.clean, Protocol(), seed=0)
    assert result.status == "error" and "fc.weight" in result.message


def test_buffers_may_change_in_a_forward_pass(tiny):
    dataset, models = tiny

    def train_mode_bn(model, x):
        model.train()
        return EdgeDecision(model(x))

    (result,) = run_unit(_edge_only(train_mode_bn), dataset.domains[:1], models, 4, dataset.clean, Protocol(), 0)
    assert result.status == "ok"


def test_divergence_is_reported_and_the_rest_of_the_unit_is_skipped(tiny):
    dataset, models = tiny

    def nan(model, x):
        return EdgeDecision(model(x) * float("nan"))

    results = run_unit(_edge_only(nan), dataset.domains, models, 4, dataset.clean,
                       Protocol(setting="continual"), seed=0)
    assert [r.status for r in results] == ["diverged", "skipped", "skipped"]
    assert results[0].accuracy is None and "non-finite" in results[0].message


@pytest.mark.parametrize("decision, message", [
    (lambda m, x: EdgeDecision(m(x)[:, :2]), "shape"),
    (lambda m, x: EdgeDecision(m(x), upload=torch.tensor([0, 0])), "distinct"),
    (lambda m, x: EdgeDecision(m(x), upload=torch.tensor([1, 0])), "in increasing order (their order would cross "
                                                                   "uncharged): sort them"),
    (lambda m, x: EdgeDecision(m(x), upload=torch.tensor([0.0])), "int64"),
])
def test_malformed_edge_decisions_are_named(tiny, decision, message):
    dataset, models = tiny
    (result,) = run_unit(_edge_only(decision), dataset.domains[:1], models, 4, dataset.clean, Protocol(), seed=0)
    assert result.status == "error" and message in result.message


def test_online_accuracy_scores_the_prediction_made_at_arrival(tiny):
    dataset, models = tiny
    domain = dataset.domains[0]

    def oracle_free(model, x):
        return EdgeDecision(model(x))

    (result,) = run_unit(_edge_only(oracle_free), [domain], models, 4, dataset.clean, Protocol(batch_size=7), seed=0)
    x, y = domain.images(np.arange(len(domain))), torch.from_numpy(domain.labels())
    with torch.no_grad():
        expected = (models.edge()(x).argmax(1) == y).sum().item()
    assert result.correct == expected and result.seen == len(domain)


@pytest.mark.parametrize("name", ["tent", "cema", "cotta"])
def test_channels_last_and_bf16_autocast_paths_run(tiny, name):
    from cemabench.protocol import Execution
    from cemabench.registry import build_method

    dataset, models = tiny
    options = {"cloud_batch": 8, "replay_min": 16} if name == "cema" else {}
    results = run_unit(build_method(name, options), dataset.domains[:1], models, 4, dataset.clean,
                       Protocol(batch_size=16), seed=0, execution=Execution("cpu", channels_last=True, amp=True))
    assert results[0].status == "ok", results[0].message


def test_a_unit_runs_with_one_intra_op_thread_on_cpu_and_restores_the_callers(tiny):
    """torch's CPU reductions split work by thread count (the same training gave other weights with 1 and 2
    threads), so a unit's numbers would depend on the machine's cores and on --jobs."""
    from cemabench.method import EdgeDecision, EdgeLogic, Method

    seen = []

    class Records(Method):
        name = "records-threads"

        def edge(self, num_classes):
            class Edge(EdgeLogic):
                def step(self, model, x):
                    seen.append(torch.get_num_threads())
                    return EdgeDecision(model(x))
            return Edge()

    dataset, models = tiny
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_unit(Records(), dataset.domains[:1], models, 4, dataset.clean, Protocol(batch_size=50), seed=0)
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
