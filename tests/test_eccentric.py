"""ECCENTRIC's methods and the offline training stage, on tiny miniature-architecture nets and 8-px images."""
import numpy as np
import pytest
import torch

from cemabench.errors import UserError
from cemabench.method import CloudResources, TrainingResources
from cemabench.models.split import head_to, tail_from
from cemabench.models.zoo import tiny_model
from cemabench.protocol import ForwardOnlyEdge, Link, Models, Protocol, run_unit
from cemabench.protocol.training import run_training, training_key
from cemabench.registry import build_method
from cemabench_methods import eccentric
from cemabench_methods.eccentric_blocks import load_adapter
from conftest import tiny_dataset

FAST = {"train_samples": 64, "ka_epochs": 1, "ft_epochs": 1}
FEATURE = 8 * 8 * 8  # the tiny edge's layer1 output on 8-px inputs: 8 channels, 8 x 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These nets are tiny: one intra-op thread is faster than two fighting for a loaded machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eccentric-cache")


@pytest.fixture
def setup(shared_cache, monkeypatch):
    """Tiny models and data; one artefact cache for the module, so that equal training keys train once."""
    monkeypatch.setenv("CEMABENCH_CACHE", str(shared_cache))
    dataset = tiny_dataset(domains=("a",), n=48)
    models = Models.copies_of(tiny_model("edge@4"), tiny_model("foundation@4"))
    return dataset, models


def _run(setup, name, options, seed=0):
    dataset, models = setup
    return run_unit(build_method(name, options), dataset.domains, models, 4, dataset.clean,
                    Protocol(batch_size=16), seed=seed)


def _trained(setup, method):
    dataset, models = setup
    run_training(method, TrainingResources(4, models.edge, models.foundation, dataset.clean))
    return method


@pytest.mark.parametrize("name, options", [
    ("ecc-independent", {"epochs": 1, "train_samples": 64}),
    ("ecc-independent", {"distill": False}),
    ("ecc-adaptive", {**FAST, "cloud_stage": "layer3", "adapter_depth": 3}),
    ("ecc-dynamic", {**FAST, "threshold": 0.5, "augment": True}),
    ("ecc-dynamic", {**FAST, "gate": "learned", "gate_epochs": 1, "pareto": True, "edge_stage": "layer2",
                     "cloud_stage": "layer3", "payload_dtype": "int8"}),
    ("learned-switcher", {"train_samples": 64, "gate_epochs": 1}),
])
def test_every_method_runs_under_the_protocol(setup, name, options):
    (result,) = _run(setup, name, options)
    assert result.status == "ok", result.message
    assert result.seen == 48 and set(result.training) == {"key", "seconds", "cached"}


def test_adaptive_cloud_answers_are_the_cloud_tail_of_the_adapted_edge_head(setup):
    dataset, models = setup
    method = _trained(setup, build_method("ecc-adaptive", {**FAST, "adapter_depth": 2}))
    edge = ForwardOnlyEdge(models.edge(), method.edge(4))
    x = dataset.domains[0].images(np.arange(16))
    decision = edge.step(x, 4)
    upload = Link(None, 0).send_up(x, decision, dataset.domains[0].sample_nbytes, 0)
    reply = method.cloud(CloudResources(4, models.edge, models.foundation, lambda n: None)).step(upload)
    with torch.no_grad():
        head = head_to(models.edge().eval(), "layer1")
        tail = tail_from(models.foundation().eval(), "layer1")  # entering at layer2 = after layer1
        expected = tail(load_adapter(method.artefacts, 2)(head(x)))
    assert decision.logits is None and not decision.send_input and len(upload.samples) == 0
    torch.testing.assert_close(reply.answers, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype, row", [("float32", FEATURE * 4), ("float16", FEATURE * 2), ("int8", FEATURE + 4)])
def test_adaptive_pays_the_encoded_feature_map_per_sample(setup, dtype, row):
    (result,) = _run(setup, "ecc-adaptive", {**FAST, "payload_dtype": dtype})
    assert result.link.upload_bytes == 0 and result.link.uploaded == 48
    assert result.link.upload_payload_bytes == 48 * row == result.link.bytes_up
    assert result.link.answer_bytes == 48 * 4 * 4  # float32 logits down


def test_dynamic_uploads_only_the_samples_its_gate_picks(setup):
    dataset, models = setup
    with torch.no_grad():
        confidence = models.edge().eval()(dataset.domains[0].images(np.arange(48))).softmax(1).amax(1)
    threshold = float(confidence.median())
    (result,) = _run(setup, "ecc-dynamic", {**FAST, "threshold": threshold, "payload_dtype": "float16"})
    picked = int((confidence < threshold).sum())
    assert 0 < picked < 48 and result.link.uploaded == picked
    # the cloud runs the foundation's tail on each offloaded sample: a pass that reaches the model's output
    assert result.cloud_forward_samples_nograd == picked and result.cloud_forward_samples_grad == 0
    assert result.link.bytes_up == picked * FEATURE * 2 and result.link.upload_bytes == 0
    (nothing,) = _run(setup, "ecc-dynamic", {**FAST, "threshold": 0.0, "payload_dtype": "int8"})
    assert nothing.status == "ok" and nothing.link.uploaded == 0 and nothing.link.bytes_up == 0


def test_training_is_cached_and_reused_by_key(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("CEMABENCH_CACHE", str(tmp_path))
    calls = []
    train = eccentric.ECCAdaptive.train
    monkeypatch.setattr(eccentric.ECCAdaptive, "train", lambda self, res: calls.append(1) or train(self, res))
    (first,) = _run(setup, "ecc-adaptive", FAST)
    (second,) = _run(setup, "ecc-adaptive", {**FAST, "payload_dtype": "int8"})  # an online option: same artefacts
    assert len(calls) == 1 and first.training["cached"] is False and second.training["cached"] is True
    assert first.training["key"] == second.training["key"]
    (third,) = _run(setup, "ecc-adaptive", {**FAST, "ka_epochs": 2})
    assert len(calls) == 2 and third.training["key"] != first.training["key"]
    (again,) = _run(setup, "ecc-adaptive", FAST)
    assert len(calls) == 2 and again.correct == first.correct and again.training["cached"] is True
    dataset, models = setup
    resources = TrainingResources(4, models.edge, models.foundation, dataset.clean)
    before = torch.get_num_threads()
    try:  # artefacts trained with other CPU threads (other numbers) are not reused
        keys = {torch.set_num_threads(n) or training_key(build_method("ecc-adaptive", FAST), resources) for n in (1, 2)}
    finally:
        torch.set_num_threads(before)
    assert len(keys) == 2 and first.training["key"] in keys


def test_training_is_deterministic_and_leaves_the_online_random_state_alone(setup, tmp_path, monkeypatch):
    states = []
    for folder in ("one", "two"):
        monkeypatch.setenv("CEMABENCH_CACHE", str(tmp_path / folder))
        torch.manual_seed(5)
        method = _trained(setup, build_method("ecc-dynamic", {**FAST, "gate": "learned", "gate_epochs": 1}))
        states.append((method.artefacts, torch.rand(1)))
    assert states[0][0].keys() == states[1][0].keys()
    assert all(torch.equal(states[0][0][k], states[1][0][k]) for k in states[0][0])
    torch.manual_seed(5)
    assert torch.equal(states[0][1], torch.rand(1)) and torch.equal(states[1][1], states[0][1])


def test_recall_weight_makes_the_learned_gate_offload_more(setup):
    uploaded = []
    for weight in (0.05, 20.0):
        (result,) = _run(setup, "ecc-dynamic", {**FAST, "gate": "learned", "gate_epochs": 3, "recall_weight": weight,
                                                "comm_weight": 0.0, "threshold": 0.5})
        assert result.status == "ok", result.message
        uploaded.append(result.link.uploaded)
    assert uploaded[0] < uploaded[1]


@pytest.mark.parametrize("name, options, words", [
    ("ecc-adaptive", {"adapter_depth": 4}, "option 'adapter_depth' must be one of 1, 2, 3, got 4"),
    ("ecc-dynamic", {"threshold": 1.5}, "option 'threshold' must be a number >= 0 and <= 1, got 1.5"),
    ("ecc-independent", {"threshold": -0.1}, "option 'threshold' must be a number >= 0 and <= 1"),
    ("ecc-adaptive", {"payload_dtype": "int4"}, "option 'payload_dtype' must be one of float32, float16, int8"),
    ("ecc-dynamic", {"gate": "oracle"}, "option 'gate' must be one of confidence, learned"),
    ("ecc-dynamic", {"gate": "learned", "pareto": True, "comm_weight": 0.0}, "needs comm_weight > 0"),
    ("learned-switcher", {"threshold": 2}, "option 'threshold' must be a number >= 0 and <= 1"),
    ("ecc-dynamic", {"recall_weight": 0}, "option 'recall_weight' must be a number > 0"),
    ("ecc-adaptive", {"ka_epochs": -1}, "option 'ka_epochs' must be an integer >= 0"),
])
def test_bad_options_are_user_errors_before_any_compute(name, options, words):
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]")):
        build_method(name, options)


@pytest.mark.parametrize("options, words", [
    ({"cloud_stage": "layer4"}, "no entry stage 'layer4'; valid cloud_stage: layer1, layer2, layer3"),
    ({"edge_stage": "layer7"}, "no stage 'layer7'; valid edge_stage: stem, layer1, layer2, layer3"),
])
def test_a_stage_the_model_lacks_is_a_user_error_from_run_unit(setup, options, words):
    with pytest.raises(UserError, match=words):
        _run(setup, "ecc-dynamic", {**FAST, **options})
