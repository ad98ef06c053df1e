"""ECCENTRIC's architectures on detection (issue 18): the detection miniature's detectors split and trained offline,
the gates' statistics written out by hand, the cloud's answers recomputed outside the harness, and the bytes each
image costs."""
import numpy as np
import pytest
import torch

from cemabench.datasets import minidet
from cemabench.errors import UserError
from cemabench.method import CloudResources, TrainingResources
from cemabench.models.layouts import detector_training
from cemabench.models.minidet import load_model, nets
from cemabench.models.split import head_to, split, stage_names, tail_from
from cemabench.protocol import ForwardOnlyEdge, Link, Models, Protocol, run_unit
from cemabench.protocol.training import run_training
from cemabench.registry import build_method
from cemabench_methods import eccentric_detection as D
from cemabench_methods.eccentric_blocks import load_adapter
from cemabench_methods.eccentric_fpn import boxes_of

FAST = {"train_samples": 96, "ka_epochs": 1, "ft_epochs": 1}
FEATURE = 16 * 16 * 16  # the edge detector's layer1 output on a 64-px canvas: 16 channels, 16 x 16


def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.long)}


def test_an_images_confidence_is_the_mean_reported_score_and_zero_without_one():
    found = [_det([[0, 0, 1, 1]] * 3, [0.9, 0.5, 0.1], [1, 1, 2]), _det([[0, 0, 1, 1]], [0.2], [1]),
             _det([], [], [])]
    assert D.confidence(found).tolist() == pytest.approx([0.7, 0.0, 0.0])
    inputs = D.Detection().gate_inputs(found)
    assert inputs.shape == (3, D.GATE_SCORES + 1)
    assert inputs[0, :4].tolist() == pytest.approx([0.9, 0.5, 0.1, 0.0]) and inputs[0, -1] == pytest.approx(0.7)
    assert inputs[2].abs().sum() == 0


@pytest.mark.parametrize("found, boxes, labels, verdict", [
    # every reported box matches one reference box of its category at IoU >= 0.5; unreported boxes do not count
    (_det([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0.9, 0.8, 0.29], [1, 2, 3]),
     [[1, 0, 10, 10], [20, 20, 30, 31]], [1, 2], True),
    (_det([[0, 0, 10, 10]], [0.9], [1]), [[0, 0, 10, 10]], [2], False),  # the wrong category
    (_det([[0, 0, 10, 10]], [0.9], [1]), [[5, 0, 15, 10]], [1], False),  # IoU 1/3
    (_det([[0, 0, 10, 10]], [0.9], [1]), [[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1], False),  # a missed object
    (_det([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [1, 1]), [[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1],
     False),  # a duplicate cannot match the other object
    (_det([], [], []), [], [], True),
    # the first box overlaps both objects, the second only the one the first overlaps most: a greedy match in score
    # order fails, the one-to-one matching (first to the other object) exists
    (_det([[2, 0, 12, 10], [4, 0, 14, 10]], [0.9, 0.8], [1, 1]), [[0, 0, 10, 10], [3, 0, 13, 10]], [1, 1], True),
    (_det([[2, 0, 12, 10], [4, 0, 14, 10]], [0.8, 0.8], [1, 1]), [[0, 0, 10, 10], [3, 0, 13, 10]], [1, 1], True),
    (_det([[5, 5, 5, 9]], [0.9], [1]), [[40, 40, 40, 50]], [2], False),  # two empty boxes do not overlap
])
def test_an_answer_stands_when_its_reported_boxes_match_the_reference_one_to_one(found, boxes, labels, verdict):
    assert D.stands(found, torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                    torch.tensor(labels, dtype=torch.long)) is verdict


@pytest.mark.parametrize("kind", ["edge", "cloud"])
def test_the_miniature_detectors_split_at_every_stage_give_the_whole_detectors_output(kind):
    model = load_model(kind)
    x = torch.from_numpy(minidet.canvases("test", 8)[0]).permute(0, 3, 1, 2).float() / 255
    postprocess = detector_training(model).postprocess
    with torch.no_grad():
        whole = model(x)
        for stage in stage_names(model):
            head, tail = split(model, stage)
            for got, want in zip(postprocess(tail(head(x))), whole, strict=True):
                for key in ("boxes", "scores", "labels"):
                    assert torch.equal(got[key], want[key]), (stage, key)


def test_the_miniature_detectors_answer_an_empty_batch():
    """A cloud asked about no image (a batch whose images all stayed on the edge) answers with no detections."""
    with torch.no_grad():
        assert load_model("cloud")(torch.zeros(0, 3, 64, 64)) == []


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    source = minidet.dataset(severity=3, domains=("fog",))
    return source, Models.copies_of(load_model("edge"), load_model("cloud"))


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CEMABENCH_CACHE", str(tmp_path_factory.getbasetemp() / "ecc-detection-cache"))


def _trained(data, method):
    source, models = data
    method.task = "detection"
    run_training(method, TrainingResources(source.num_classes, models.edge, models.foundation, source.clean))
    return method


def test_adaptive_cloud_answers_are_the_cloud_tail_of_the_adapted_edge_head(data, cache):
    source, models = data
    method = _trained(data, build_method("ecc-adaptive", {**FAST, "adapter_depth": 2}))
    edge = ForwardOnlyEdge(models.edge(), method.edge(source.num_classes))
    x = source.domains[0].images(np.arange(8))
    decision = edge.step(x, 0)
    upload = Link(None, 0).send_up(x, decision, source.domains[0].sample_nbytes, 0)
    cloud = method.cloud(CloudResources(source.num_classes, models.edge, models.foundation, lambda n: None))
    reply = cloud.step(upload)
    with torch.no_grad():
        head = head_to(load_model("edge").eval(), "layer1")
        tail = tail_from(load_model("cloud").eval(), "layer1")  # entering at layer2 = after layer1
        expected = nets.decode(tail(load_adapter(method.artefacts, 2)(head(x))))
    assert decision.logits is None and decision.detections is None and len(upload.samples) == 0
    for got, want in zip(reply.answers, expected, strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)


def _unit(data, name, options):
    source, models = data
    (result,) = run_unit(build_method(name, options), source.domains, models, source.num_classes, source.clean,
                         Protocol(batch_size=50), seed=0, task="detection")
    assert result.status == "ok", result.message
    return result


def test_dynamic_pays_int8_feature_maps_up_and_wire_bytes_down_for_the_images_its_gate_picks(data, cache):
    source, models = data
    with torch.no_grad():
        found = models.edge().eval()(source.domains[0].images(np.arange(300)))
    confidence = D.confidence(found)
    threshold = float(confidence.median())
    result = _unit(data, "ecc-dynamic", {**FAST, "threshold": threshold, "payload_dtype": "int8"})
    picked = int((confidence < threshold).sum())
    assert 0 < picked < 300 and result.link.uploaded == picked and result.link.upload_bytes == 0
    assert result.link.bytes_up == picked * (FEATURE + 4)  # int8 symbols and one float32 scale per image
    assert result.cloud_forward_samples_nograd == picked
    # each answer: a uint32 count and 22 bytes per detection; the miniature detector always returns its top 20
    assert result.link.answer_bytes == picked * (4 + nets.TOP_K * 22)
    assert result.seen == 300 and 0 < result.metrics["map"] < 100


@pytest.mark.parametrize("name, options", [  # ECC-D and the switcher: the slow tier (the detection tables run them)
    ("ecc-independent", {"epochs": 1, "train_samples": 96, "threshold": 0.6}),
    pytest.param("ecc-dynamic", {**FAST, "gate": "learned", "gate_epochs": 1, "threshold": 0.5},
                 marks=pytest.mark.slow),
    pytest.param("learned-switcher", {"train_samples": 96, "gate_epochs": 1}, marks=pytest.mark.slow),
])
def test_the_gated_methods_run_on_detection_and_are_the_same_twice(data, cache, name, options):
    first, second = _unit(data, name, options), _unit(data, name, options)
    assert first.metrics == second.metrics and first.link.uploaded == second.link.uploaded
    assert 0 < first.metrics["map"] < 100 and first.seen == 300


def test_a_learned_gate_learns_where_the_edge_is_wrong(data):
    """Labels of the gate's training: an image the edge gets right on clean canvases is one the objectives call not
    wrong, and one with a box removed from the edge's answer is wrong."""
    source, models = data
    objectives = D.Detection(TrainingResources(source.num_classes, models.edge, models.foundation, source.clean))
    chosen = np.arange(40)
    objectives.targets(source.clean, chosen)
    with torch.no_grad():
        found = models.foundation().eval()(source.clean.images(chosen))
    perfect = [{"boxes": boxes_of(a)[0].float(), "scores": torch.ones(len(a)),
                "labels": boxes_of(a)[1]} for a in objectives.annotations]
    order = torch.arange(40)
    assert not objectives.wrong(perfect, order, None, None).any()
    dropped = [{k: v[1:] for k, v in d.items()} for d in perfect]
    assert objectives.wrong(dropped, order, None, None).all()
    assert (objectives.wrong(found, order, None, None).float().mean() < 0.5)  # the cloud is mostly right on clean


@pytest.mark.slow  # 5 s of training; the eccentric-detection table's slow check also holds it to its numbers
def test_detection_training_is_the_same_twice(data, tmp_path, monkeypatch):
    """The adapter, the distilled edge and the learned gate trained twice (two empty caches): identical tensors."""
    states = []
    for run in ("a", "b"):
        monkeypatch.setenv("CEMABENCH_CACHE", str(tmp_path / run))
        method = _trained(data, build_method("ecc-dynamic", {**FAST, "gate": "learned", "gate_epochs": 1,
                                                              "distill": True, "epochs": 1}))
        states.append(method.artefacts)
    assert states[0].keys() == states[1].keys() and any(k.startswith("gate.") for k in states[0])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_family_is_described_once():
    """A plugin cannot replace how another family's detections are made or trained (what ECC's cells score)."""
    from dataclasses import replace

    from cemabench.models.layouts import register_detector_training, register_layout

    model = load_model("edge")
    described = detector_training(model)
    register_detector_training("cemabench.models.minidet.nets", "MiniDetector", described)  # the same: fine
    with pytest.raises(UserError, match="already described"):
        register_detector_training("cemabench.models.minidet.nets", "MiniDetector",
                                   replace(described, postprocess=lambda raw: []))
    with pytest.raises(UserError, match="already described"):
        register_layout("cemabench.models.minidet.nets", "MiniDetector", lambda net: [])
    assert detector_training(model) is described


def test_methods_on_detection_refuse_what_they_cannot_do_in_one_line(data):
    source, models = data
    method = build_method("ecc-independent", {"temperature": 3.0})
    with pytest.raises(UserError, match="temperature is the classification distillation's"):
        method.check_task_options("detection")
    method.check_task_options("classification")
    adaptive = build_method("ecc-adaptive", {"cloud_stage": "layer3"})
    adaptive.task = "detection"
    with pytest.raises(UserError, match="no entry stage 'layer3'; valid cloud_stage: layer1, layer2"):
        adaptive.check_models(models.edge(), models.foundation())


def test_a_detector_family_without_a_training_description_is_one_line(tmp_path, capsys):
    from cemabench.cli import main

    code = main(["run", "--method", "ecc-independent", "--dataset", "miniature-digits-det-c", "--domains", "fog",
                 "--foundation", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@none", "--out",
                 str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "cannot train a cemabench.models.zoo.Detector" in err or "one family" in err
    assert not (tmp_path / "x.json").exists()
