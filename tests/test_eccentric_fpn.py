"""ECC-A and ECC-D on torchvision's detectors (issue 18, cemabench_methods.eccentric_fpn): the adapter makes every map
the cloud's FPN takes at its entry, in the frame the cloud's own head gives; the fine-tuning losses are torchvision's
own; knowledge adaptation trains; the methods run, charged the edge activation's exact bytes. Detectors are built at
random (``@none``): nothing is downloaded, so only the mechanics are checked here, not the quality."""
import json

import numpy as np
import pytest
import torch
import torchvision
from test_coco import _tree

from cemabench.cli import EXIT_INCOMPLETE, main
from cemabench.datasets.coco import coco_c
from cemabench.errors import UserError
from cemabench.method import TrainingResources
from cemabench.models.detection_split import split_detector
from cemabench.models.zoo import Detector
from cemabench.registry import build_method, build_model
from cemabench_methods import eccentric_fpn as fpn

EDGE, CLOUD = "torchvision:ssdlite320_mobilenet_v3_large@none", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@none"


def _built(spec: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(spec).eval()


def _detections_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(g[key], w[key]), key


def test_the_adapter_gives_the_clouds_tail_its_own_frame_and_map_shapes():
    """Entering a Faster R-CNN (MobileNetV3 body) after block 14: the FPN's input from block 13 and the activation
    after block 14 are the entry maps. The adapter's maps have the shapes of the cloud's own, and its frame is the
    cloud head's; with the cloud's own maps in place of the adapter's, the tail gives the whole detector's
    detections, exactly."""
    cloud, edge = _built(CLOUD), _built(EDGE, 1)
    cloud.net.roi_heads.score_thresh = 0.0  # random weights: keep every detection, so that there are some to compare
    entry = fpn.Entry(cloud, "14")
    assert entry.names == ["fpn:0", "x"]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        own, feature = entry.head(x), fpn.EdgeHead(edge, "features.0.3")(x)
        adapter = fpn.MapsAdapter(feature.shape[1:], entry.names, [tuple(own[k].shape[1:]) for k in entry.names],
                                  [bool((own[k] >= 0).all()) for k in entry.names], fpn._frame(own), 2).eval()
        adapted = adapter(feature)
        assert [bool(b.layers[-1].__class__ is torch.nn.ReLU) for b in adapter.branches] == [False, False]
        for k in entry.names:
            assert adapted[k].shape == own[k].shape, k
        for k in ("image_sizes", "original_sizes", "batch_shape"):
            assert torch.equal(adapted[k], own[k]), k
        whole = cloud(x)
        assert sum(len(d["boxes"]) for d in whole) > 0
        _detections_equal(entry.tail({**adapted, **{k: own[k] for k in entry.names}}), whole)
        with pytest.raises(ValueError, match="trained on edge features of shape"):
            adapter(feature[..., :-1])


def _torchvision_losses(net, images, targets, draws):
    """The detector's losses as its own training-mode ``forward`` computes them, with every module but the loss
    computations' containers in eval mode (as cemabench's fine-tuning keeps them). ``draws``: the random numbers its
    transform draws in training (one per image: its choice of size), drawn here too."""
    flags = [(m, m.training) for m in (net, net.transform, getattr(net, "rpn", net), getattr(net, "roi_heads", net))]
    try:
        for m, _ in flags:
            m.training = True
        torch.manual_seed(0)
        return net(list(images), targets)
    finally:
        for m, flag in flags:
            m.training = flag


@pytest.mark.parametrize("arch", ["fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn_v2",
                                  "fcos_resnet50_fpn"])
def test_the_fine_tuning_losses_are_the_detectors_own(arch):
    """The losses through a split detector's tail (cut after its first stage) equal those its own training-mode
    forward computes on the same images and boxes: the same proposals' sampling (the same random numbers), the
    same matching, the same values."""
    torch.manual_seed(0)
    kwargs = {} if arch.startswith("fasterrcnn") else {"min_size": 128, "max_size": 128}
    net = torchvision.models.get_model(arch, weights=None, weights_backbone=None, **kwargs).eval()
    x = torch.rand(2, 3, 96, 96)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0], [50.0, 40.0, 90.0, 95.0]]),
                "labels": torch.tensor([1, 18])}]
    head, tail = split_detector(net, "layer1" if "resnet" in arch else "0")
    want = _torchvision_losses(net, x, [dict(t) for t in targets], len(x))
    torch.manual_seed(0)
    for _ in range(len(x)):  # the random numbers the transform drew in training, one per image
        torch.empty(1).uniform_()
    got = tail.losses(*tail.features(head(x)), targets)
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert all(not m.training for m in net.modules())


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = _tree(tmp_path_factory.mktemp("coco"), train=6)
    return root, coco_c(str(root), severity=3, domains=("fog",), image_size=64, train_images=6, workers=0)


def _small_cloud() -> torch.nn.Module:
    """A Faster R-CNN with a ResNet-50 body at 64 px, at random (its maps are not vanishingly small, as a MobileNetV3's
    are at random)."""
    torch.manual_seed(0)
    net = torchvision.models.get_model("fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None, min_size=64,
                                       max_size=64)
    return Detector(net).eval()


def _entry_error(method, data) -> float:
    """Over the clean split's images, the trained adapter's MSE to the cloud's own maps, relative to their mean
    square, summed over the maps."""
    adapter = fpn.load_adapter(method.artefacts, method.options.adapter_depth, _small_cloud(), "layer2")
    entry, head = fpn.Entry(_small_cloud(), "layer2"), fpn.EdgeHead(_built(EDGE, 1), "features.0.3")
    x = data.clean.images(np.arange(len(data.clean)))
    with torch.no_grad():
        adapted, own = adapter(head(x)), entry.head(x)
    return sum(float(torch.nn.functional.mse_loss(adapted[k], own[k]) / own[k].square().mean()) for k in entry.names)


@pytest.mark.slow  # 6 s alone, 24 s beside the default tier's other worker
def test_knowledge_adaptation_brings_the_adapters_maps_to_the_clouds(coco):
    """Entering a ResNet-50 Faster R-CNN at layer3: the adapter makes layer1's and layer2's outputs, which the FPN
    takes."""
    _, data = coco
    errors = []
    for epochs in (0, 12):
        method = build_method("ecc-adaptive", {"edge_stage": "features.0.3", "cloud_stage": "layer3",
                                               "ka_epochs": epochs, "ft_epochs": 0, "train_samples": 6})
        method.task = "detection"
        torch.manual_seed(0)
        method.artefacts = method.train(TrainingResources(91, lambda: _built(EDGE, 1), _small_cloud, data.clean))
        assert method.artefacts["adapter_fpn_maps"].tolist() == [[256, 16, 16, 1], [512, 8, 8, 1]]  # strides 4, 8
        errors.append(_entry_error(method, data))
    assert errors[1] < 0.98 * errors[0], errors  # 12 Adam steps at lr 1e-3 from random maps: a few per cent


@pytest.mark.slow  # 7 s alone (four detectors built, two training passes and a teacher pass)
def test_ecc_i_distils_a_torchvision_edge_on_the_splits_boxes_and_the_clouds_detections(coco):
    """Every edge weight trains (on two objectives: the split's boxes, the cloud's reported detections), and every
    BatchNorm keeps its statistics; the distilled edge is what the edge half deploys."""
    _, data = coco
    method = build_method("ecc-independent", {"epochs": 1, "train_samples": 2})
    method.task = "detection"
    torch.manual_seed(0)
    method.artefacts = method.train(TrainingResources(91, lambda: _built(CLOUD, 1), lambda: _built(CLOUD), data.clean))
    source = _built(CLOUD, 1).state_dict()
    trained = {k[len("edge."):]: v for k, v in method.artefacts.items()}
    assert trained.keys() == source.keys()
    statistics = [k for k in source if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and all(torch.equal(trained[k], source[k]) for k in statistics)
    learnt = [k for k in source if k not in statistics and not torch.equal(trained[k], source[k])]
    assert len(learnt) > 0.9 * (len(source) - len(statistics)), len(learnt)
    edge = method.edge(91).configure(_built(CLOUD, 1))
    assert all(torch.equal(edge.state_dict()[k], trained[k]) for k in trained)


@pytest.mark.parametrize("args, words", [
    (["--method", "ecc-adaptive", "--option", "edge_stage=features.0.3", "--option", "cloud_stage=17", "--edge", EDGE,
      "--foundation", CLOUD],
     "no entry stage '17'; valid cloud_stage: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16\n"),
    (["--method", "ecc-adaptive", "--edge", "minidet:edge", "--foundation", CLOUD],
     "trains between two torchvision detectors, or between detectors of a family"),
    pytest.param(["--method", "ecc-independent", "--edge", EDGE, "--foundation", "minidet:cloud"],
                 "trains between two torchvision detectors, or between detectors of a family", marks=pytest.mark.slow),
    pytest.param(["--method", "ecc-adaptive", "--option", "edge_stage=features.0.3", "--edge", EDGE, "--foundation",
                  "torchvision:ssdlite320_mobilenet_v3_large@none"],
                 "so the cloud is a Faster R-CNN, RetinaNet or FCOS", marks=pytest.mark.slow),
])
def test_what_cannot_be_done_on_torchvision_detectors_is_one_line(coco, capsys, args, words):
    root, _ = coco
    assert main(["run", *args, "--dataset", "coco-c", "--data-root", str(root), "--severity", "3", "--domains", "fog",
                 "--dataset-option", "image_size=64", "--dataset-option", "train_images=6", "--dataset-option",
                 "workers=0"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


def test_an_edge_refuses_images_of_another_size_than_its_adapters_frame():
    """The cloud answers in the frame the adapter was trained in; an SSDlite resizes every input to 320 px, so its
    feature would not tell a 128-px stream from a 64-px one: the edge refuses it."""
    head = fpn.EdgeHead(_built(EDGE, 1), "features.0.3", (64, 64))
    with torch.no_grad():
        assert head(torch.rand(1, 3, 64, 64)).shape == (1, 24, 80, 80)
        with pytest.raises(ValueError, match="trained on 64x64 images .* and the stream's are 128x128"):
            head(torch.rand(1, 3, 128, 128))
        with pytest.raises(ValueError, match="trained on 64x64 images"):
            fpn.EdgeSplit(_built(EDGE, 1), "features.0.3", (64, 64))(torch.rand(1, 3, 128, 128))


def _run(root, tmp_path, method, *options):
    out = tmp_path / f"{method}.json"
    assert main(["run", "--method", method, "--option", "ka_epochs=1", "--option", "ft_epochs=1", "--option",
                 "train_samples=6", *options, "--dataset", "coco-c", "--data-root", str(root), "--severity", "3",
                 "--domains", "fog", "--dataset-option", "image_size=64", "--dataset-option", "train_images=6",
                 "--dataset-option", "workers=0", "--edge", EDGE, "--foundation", CLOUD, "--out", str(out)]) == 0
    (cell,) = json.loads(out.read_text())["cells"]
    return cell


@pytest.mark.slow  # about 25 s: two trainings and runs, one of them twice
def test_ecc_adaptive_and_dynamic_run_on_torchvision_detectors_charged_the_edge_activations_bytes(coco, tmp_path):
    root, _ = coco
    feature = 24 * 80 * 80  # SSDlite's block features.0.3 at 320 px (its transform resizes 64 px to 320)
    cell = _run(root, tmp_path, "ecc-adaptive", "--option", "edge_stage=features.0.3", "--option", "cloud_stage=15")
    assert cell["status"] == "ok", cell["message"]
    assert cell["upload_percent"] == 100 and cell["bytes_up_per_sample"] == feature * 4
    assert cell["cloud_flops"] > 0 and cell["edge_flops"] > 0
    again = _run(root, tmp_path / "again", "ecc-adaptive", "--option", "edge_stage=features.0.3", "--option",
                 "cloud_stage=15")
    assert {k: again[k] for k in ("map", "bytes_up_per_sample", "cloud_flops")} == {
        k: cell[k] for k in ("map", "bytes_up_per_sample", "cloud_flops")}
    dynamic = _run(root, tmp_path, "ecc-dynamic", "--option", "edge_stage=features.0.3", "--option",
                   "cloud_stage=15", "--option", "threshold=1", "--option", "payload_dtype=int8")
    assert dynamic["status"] == "ok", dynamic["message"]
    assert dynamic["upload_percent"] == 100 and dynamic["bytes_up_per_sample"] == feature + 4  # int8, a float scale


def test_an_adapter_for_another_number_of_maps_is_refused():
    state = {"adapter_fpn_maps": torch.tensor([[16, 8, 8, 1]]), "adapter_fpn_edge": torch.tensor([24, 80, 80]),
             "adapter_fpn_frame": torch.tensor([[320, 320], [64, 64], [320, 320]])}
    with pytest.raises(UserError, match="trained for 1 entry maps, and the cloud takes 2 after 14"):
        fpn.load_adapter(state, 1, _built(CLOUD), "14")


@pytest.mark.slow  # about 12 s: every entry checked against torchvision's detectors, built at random
def test_the_eccentric_detection_tables_real_variant_is_accepted_on_torchvision_detectors(tmp_path, capsys):
    """The table's COCO variant sets ECC's knobs for its torchvision detectors ([data.real.method_options]): every
    entry is accepted before any compute (a generated COCO tree, the detectors at random; ``status`` exits 3 while
    units are missing, 2 where an entry is refused)."""
    root = _tree(tmp_path / "coco", corruptions=("gaussian_noise", "defocus_blur", "fog", "jpeg_compression"), train=6)
    assert main(["status", "eccentric-detection", "--data-root", str(root), "--edge",
                 "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@none", "--foundation",
                 "torchvision:fasterrcnn_resnet50_fpn_v2@none", "--dataset-option", "image_size=64", "--dataset-option",
                 "train_images=6", "--dataset-option", "workers=0", "--out", str(tmp_path / "out")]) == EXIT_INCOMPLETE
    assert "60 units: 0 done, 0 running, 0 failed, 60 missing" in capsys.readouterr().out


def test_the_training_targets_leave_out_crowd_regions_and_boxes_of_no_area():
    """torchvision refuses a box of no area in training (and its reference training drops them, and crowd regions):
    a COCO annotation of zero height (they exist) must not make the fine-tuning's losses infinite."""
    annotations = [[{"bbox": [10.0, 12.0, 5.5, 0.0], "category_id": 1, "iscrowd": 0},
                    {"bbox": [20.0, 20.0, 30.0, 30.0], "category_id": 2, "iscrowd": 1},
                    {"bbox": [1.0, 2.0, 3.0, 4.0], "category_id": 3}]]
    (target,) = fpn._targets(annotations, torch.tensor([0]), "cpu")
    assert target["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]] and target["labels"].tolist() == [3]
    assert target["boxes"].dtype == torch.float32


def _trained_adapter(data, **options) -> dict:
    method = build_method("ecc-adaptive", {"edge_stage": "features.0.3", "cloud_stage": "15", "ka_epochs": 1,
                                           "train_samples": 6, **options})
    method.task = "detection"
    torch.manual_seed(0)
    return method.train(_resources(data))


def _resources(data):
    return TrainingResources(91, lambda: _built(EDGE, 1), lambda: _built(CLOUD), data.clean)


@pytest.mark.slow  # about 15 s: three trainings
def test_fine_tuning_moves_the_adapter_and_training_is_the_same_twice(coco):
    """Fine-tuning steps move every weight of the adapter; it gives the cloud's RPN the split's boxes (by position, in
    the frame of the cloud's transform: 64 px to 320, x5); two trainings from one seed are bit-identical."""
    _, data = coco
    seen = []

    def cloud():
        model = _built(CLOUD)
        model.net.rpn.register_forward_pre_hook(lambda m, args: seen.append(args[2]) if len(args) > 2 else None)
        return model

    torch.manual_seed(0)
    method = build_method("ecc-adaptive", {"edge_stage": "features.0.3", "cloud_stage": "15", "ka_epochs": 1,
                                           "ft_epochs": 1, "train_samples": 6})
    method.task = "detection"
    tuned = method.train(TrainingResources(91, lambda: _built(EDGE, 1), cloud, data.clean))
    (targets,) = seen
    ground = data.clean.ground_truth()
    for target, image in zip(targets, ground["images"], strict=True):
        boxes, labels = fpn.boxes_of([a for a in ground["annotations"] if a["image_id"] == image["id"]])
        assert torch.equal(target["labels"], labels)
        torch.testing.assert_close(target["boxes"], boxes.float() * 5)
    again, untuned = _trained_adapter(data, ft_epochs=1), _trained_adapter(data, ft_epochs=0)
    assert tuned.keys() == again.keys() == untuned.keys()
    assert all(torch.equal(tuned[k], again[k]) for k in tuned)
    weights = [k for k in tuned if k.endswith("weight")]
    assert all(bool(torch.isfinite(tuned[k]).all()) for k in weights)
    assert all(not torch.equal(tuned[k], untuned[k]) for k in weights), "the fine-tuning's step moved no weight"


def test_an_adapters_recorded_shapes_are_checked_against_the_clouds_own_when_loaded(coco):
    _, data = coco
    state = _trained_adapter(data, ka_epochs=0, ft_epochs=0)
    cloud = _built(CLOUD)
    assert isinstance(fpn.load_adapter(state, 1, cloud, "14"), fpn.MapsAdapter)
    for key, value, words in [
        ("adapter_fpn_frame", torch.tensor([[320, 320], [64, 1 << 20], [320, 320]]), "three sizes of at most"),
        ("adapter_fpn_frame", torch.tensor([320, 320]), "three sizes of at most"),
        ("adapter_fpn_maps", torch.tensor([[160, 10, 10, 0], [112, 100000, 100000, 0]]), "not the cloud's own"),
        ("adapter_fpn_maps", torch.tensor([[160, 10, 10, 2], [112, 10, 10, 0]]), "not the cloud's own"),
        ("adapter_fpn_edge", torch.tensor([24, 0, 80]), "not a shape"),
    ]:
        with pytest.raises(ValueError, match=words):
            fpn.load_adapter({**state, key: value}, 1, cloud, "14")


def _few_classes(seed: int) -> torch.nn.Module:
    """A Faster R-CNN (MobileNetV3, 320 px) for two categories at random: its scores are near 1/3, so that it reports
    detections at 0.3 (a 91-category one at random reports none)."""
    torch.manual_seed(seed)
    return Detector(torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3)).eval()


@pytest.mark.slow  # about 10 s
def test_the_distillations_second_objective_has_the_clouds_reported_detections_as_targets(tmp_path):
    """The edge's training forward is called twice a step: with the split's boxes, then with the cloud's reported
    detections (each image's, in the frame of the images the edge is given)."""
    from cemabench_methods.eccentric_detection import Detection

    data = coco_c(str(_tree(tmp_path, train=6, categories=(1, 2))), severity=3, domains=("fog",), image_size=64,
                  train_images=6, workers=0)
    seen = []


    def edge():
        model = _few_classes(1)
        model.net.register_forward_pre_hook(lambda module, args: seen.append([dict(t) for t in args[1]]))
        return model

    method = build_method("ecc-independent", {"epochs": 1, "train_samples": 6})
    method.task = "detection"
    torch.manual_seed(0)
    method.train(TrainingResources(3, edge, lambda: _few_classes(0), data.clean))
    x = data.clean.images(np.arange(6))
    with torch.no_grad():
        reported = Detection().reported(_few_classes(0)(x))
    truth, pseudo = seen
    assert sum(len(t["boxes"]) for t in pseudo) > 0
    for target, (boxes, labels) in zip(pseudo, reported, strict=True):
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        assert torch.equal(target["boxes"], boxes[keep]) and torch.equal(target["labels"], labels[keep])
    ground = data.clean.ground_truth()
    expected = [[a["category_id"] for a in ground["annotations"] if a["image_id"] == image["id"]]
                for image in ground["images"]]
    assert [t["labels"].tolist() for t in truth] == expected and len(set(map(tuple, expected))) == 2
