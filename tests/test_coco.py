"""COCO 2017 val and COCO-C from disk (issue 18), on small generated trees in the official layouts: letterboxing,
ground truth in the letterboxed frame, and every layout error as one line."""
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from test_detection_task import _pycocotools, truth_as_detections

from cemabench.cli import main
from cemabench.datasets.coco import coco_c, letterbox
from cemabench.errors import UserError
from cemabench.protocol.tasks import detection

SIZES = {"000000000139.jpg": (80, 60), "000000000285.jpg": (50, 100), "000000000632.jpg": (64, 64)}  # (w, h)


def _tree(root, corruptions=("fog",), severity=3, train=0, categories=(1, 18)):
    """val2017 with SIZES' three images (and coco-c's corruptions of them), and ``train`` train2017 images."""
    rng = np.random.default_rng(0)
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    doc = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"class {c}"} for c in categories]}
    for k, (name, (w, h)) in enumerate(SIZES.items()):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val2017" / name, quality=95)
        for c in corruptions:
            folder = root / "coco-c" / c / str(severity)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(255 - pixels).save(folder / name, quality=95)
        doc["images"].append({"id": int(name[:-4]), "file_name": name, "width": w, "height": h})
        doc["annotations"].append({"id": k + 1, "image_id": int(name[:-4]), "category_id": categories[k > 0],
                                   "bbox": [5.0, 6.0, 20.0, 30.0], "area": 600.0, "iscrowd": 0,
                                   "segmentation": [[5, 6, 25, 6, 25, 36]]})
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    if train:
        (root / "train2017").mkdir()
        listed = {"images": [], "annotations": [], "categories": doc["categories"]}
        for k in range(train):  # listed in reverse file-name order: the split takes the first by name
            name, image_id = f"{900000 - k:012d}.jpg", 900000 - k
            Image.fromarray(rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)).save(root / "train2017" / name)
            listed["images"].append({"id": image_id, "file_name": name, "width": 80, "height": 40})
            listed["annotations"].append({"id": 100 + k, "image_id": image_id, "category_id": categories[k % 2],
                                          "bbox": [10.0, 4.0, 16.0, 12.0], "area": 192.0, "iscrowd": 0})
        (root / "annotations" / "instances_train2017.json").write_text(json.dumps(listed))
    return root


def test_train_images_reads_the_first_of_coco_train_as_the_clean_training_split(tmp_path):
    data = coco_c(str(_tree(tmp_path, train=5)), severity=3, domains=("clean",), image_size=64, train_images=3)
    clean = data.clean
    assert clean.name == "clean-train" and len(clean) == 3 and data.provenance["train_images"] == 3
    assert [f.name for f in clean.files] == [f"{i:012d}.jpg" for i in (899996, 899997, 899998)]
    assert clean.images(np.arange(3)).shape == (3, 3, 64, 64)
    truth = clean.ground_truth()
    assert [i["id"] for i in truth["images"]] == [899996, 899997, 899998] and len(truth["annotations"]) == 3
    assert truth["annotations"][0]["bbox"] == pytest.approx([8.0, 3.2, 12.8, 9.6])  # 80 px wide -> 64: x 0.8
    assert coco_c(str(tmp_path), severity=3, domains=("clean",), image_size=64).clean is None  # 0: no split


@pytest.mark.parametrize("train, option, words", [
    (0, 2, "train2017 not found: the option train_images reads COCO 2017 train as train2017/*.jpg and "
           "annotations/instances_train2017.json; leave it out (0) to run without a training split"),
    (2, 3, "train_images = 3, and "),
    (2, -1, "coco-c option train_images must be an integer >= 0, got -1"),
])
def test_a_training_split_that_is_not_there_is_one_line(tmp_path, capsys, train, option, words):
    root = _tree(tmp_path / "coco", train=train)
    code = main(["run", "--method", "source", "--dataset", "coco-c", "--data-root", str(root), "--severity", "3",
                 "--domains", "clean", "--dataset-option", f"train_images={option}", "--edge", "minidet:edge",
                 "--foundation", "minidet:cloud"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1, err


@pytest.mark.parametrize("isolate", [[], ["--isolate"]])
def test_a_method_that_trains_on_a_clean_split_coco_c_lacks_is_refused_before_compute(tmp_path, capsys, isolate):
    """Without train_images, coco-c has no clean split: a method that trains on one is refused in one line that says
    what for and how to give it one, before any compute, in both modes (the planner asks the method in its own
    process under --isolate); a method that needs none runs."""
    root = _tree(tmp_path / "coco", train=2)
    common = ["--dataset", "coco-c", "--data-root", str(root), "--severity", "3", "--domains", "clean",
              "--dataset-option", "image_size=64", "--edge", "minidet:edge", "--foundation", "minidet:cloud", *isolate]
    assert main(["run", "--method", "ecc-adaptive", *common]) == 2
    err = capsys.readouterr().err
    assert err == ("cemabench: error: method ecc-adaptive needs the dataset's labelled clean split (it trains its "
                   "adapter on it), and dataset coco-c has none: the option train_images = N reads the first N images "
                   "of COCO 2017 train (ROOT/train2017/, ROOT/annotations/instances_train2017.json)\n"), err
    assert main(["run", "--method", "ecc-independent", "--option", "distill=false", *common]) == 0


def test_ecc_independent_trains_on_coco_train_and_runs_on_coco_c(tmp_path):
    """The offline stage reads COCO 2017 train (its instances as the detection loss's targets) and the cells run on
    COCO-C from disk: the detection miniature's detectors on a generated tree, categories within theirs."""
    root = _tree(tmp_path / "coco", train=6, categories=(1, 2))
    out = tmp_path / "run.json"
    assert main(["run", "--method", "ecc-independent", "--option", "epochs=1", "--option", "train_samples=6",
                 "--dataset", "coco-c", "--data-root", str(root), "--severity", "3", "--domains", "fog",
                 "--dataset-option", "image_size=64", "--dataset-option", "train_images=6", "--edge", "minidet:edge",
                 "--foundation", "minidet:cloud", "--out", str(out)]) == 0
    (cell,) = json.loads(out.read_text())["cells"]
    assert (cell["status"], cell["seen"]) == ("ok", 3) and cell["map"] is not None


def test_letterbox_keeps_the_aspect_and_pads_right_and_bottom():
    image = torch.full((3, 50, 100), 255, dtype=torch.uint8)
    out, scale = letterbox(image, 64)
    assert out.shape == (3, 64, 64) and scale == 0.64
    assert torch.allclose(out[:, :32], torch.tensor(1.0)) and torch.allclose(out[:, 32:], torch.tensor(114 / 255))


def test_coco_c_domains_and_ground_truth_in_the_letterboxed_frame(tmp_path):
    data = coco_c(str(_tree(tmp_path)), severity=3, domains=("clean", "fog"), image_size=64)
    assert data.task == "detection" and data.num_classes == 19 and [d.name for d in data.domains] == ["clean", "fog"]
    clean, fog = data.domains
    assert clean.sample_nbytes == 3 * 64 * 64 and len(clean) == 3
    assert clean.images(np.arange(3)).shape == (3, 3, 64, 64)
    assert not torch.equal(clean.images(np.arange(1)), fog.images(np.arange(1)))
    truth = fog.ground_truth()
    assert [i["id"] for i in truth["images"]] == [139, 285, 632]
    first = truth["annotations"][0]
    assert first["bbox"] == pytest.approx([5 * 0.8, 6 * 0.8, 20 * 0.8, 30 * 0.8]) and "segmentation" not in first
    assert first["area"] == pytest.approx(600 * 0.64)


def test_the_true_boxes_in_the_letterboxed_frame_score_100(tmp_path):
    data = coco_c(str(_tree(tmp_path)), domains=("clean",), severity=3, image_size=64)
    truth = data.domains[0].ground_truth()
    found = truth_as_detections(truth)
    assert detection.score(truth, [i["id"] for i in truth["images"]], found)["map"] == pytest.approx(100.0)


def test_a_detector_runs_on_coco_c_from_disk(tmp_path):
    root = _tree(tmp_path / "coco")
    out = tmp_path / "run.json"
    assert main(["run", "--method", "source", "--dataset", "coco-c", "--data-root", str(root), "--severity", "3",
                 "--domains", "clean", "fog", "--dataset-option", "image_size=64", "--edge", "minidet:edge",
                 "--foundation", "minidet:cloud", "--out", str(out)]) == 0
    cells = json.loads(out.read_text())["cells"]
    assert [(c["domain"], c["status"], c["seen"]) for c in cells] == [("clean", "ok", 3), ("fog", "ok", 3)]
    assert all(c["map"] is not None for c in cells)


@pytest.mark.parametrize("damage, words", [
    (lambda r: (r / "annotations" / "instances_val2017.json").unlink(),
     "annotations/instances_val2017.json not found: the COCO layout is val2017/*.jpg and"),
    (lambda r: (r / "annotations" / "instances_val2017.json").write_text("<html>"),
     "instances_val2017.json is not JSON"),
    (lambda r: (r / "annotations" / "instances_val2017.json").write_text('{"images": []}'),
     "is not a COCO instances file: it has no 'annotations' list"),
    (lambda r: (r / "val2017" / "000000000285.jpg").unlink(),
     "1 image(s) listed in"),
    (lambda r: (r / "coco-c" / "fog" / "3" / "000000000632.jpg").unlink(),
     "1 of 3 images are missing from"),
    (lambda r: __import__("shutil").rmtree(r / "coco-c"),
     "coco-c/fog/3 not found: COCO-C is read as coco-c/<corruption>/<severity>/<file_name>"),
])
def test_layout_errors_are_one_line_with_exit_2(tmp_path, capsys, damage, words):
    root = _tree(tmp_path / "coco")
    damage(root)
    code = main(["run", "--method", "source", "--dataset", "coco-c", "--data-root", str(root), "--severity", "3",
                 "--domains", "fog", "--edge", "minidet:edge", "--foundation", "minidet:cloud"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and words in err


def test_options_are_checked(tmp_path):
    root = str(_tree(tmp_path))
    with pytest.raises(UserError, match="image_size must be an integer >= 32"):
        coco_c(root, image_size=8)
    with pytest.raises(UserError, match="unknown COCO-C domain"):
        coco_c(root, domains=("rain",))


def test_a_classifier_on_a_detection_dataset_is_one_line(tmp_path, capsys):
    root = _tree(tmp_path / "coco")
    assert main(["run", "--method", "source", "--dataset", "coco-c", "--data-root", str(root), "--severity", "3",
                 "--domains", "fog", "--dataset-option", "image_size=64", "--edge", "mini:edge",
                 "--foundation", "minidet:cloud"]) == 2
    err = capsys.readouterr().err
    assert "the edge model mini:edge is a classifier (logits), and the dataset coco-c is a detection dataset" in err


@pytest.mark.parametrize("arch", ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_torchvision_detectors_come_from_the_zoo_and_answer_per_image(arch):
    from cemabench.registry import build_model

    model = build_model(f"torchvision:{arch}@none")  # no weights, not even the backbone's: nothing to download
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert isinstance(out, list) and len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    with pytest.raises(UserError, match=f"{arch} has no weights 'IMAGENET1K_V1'; valid: COCO_V1"):
        build_model(f"torchvision:{arch}@IMAGENET1K_V1")


@pytest.mark.parametrize("arch", ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_torchvision_detectors_answer_an_empty_batch(arch):
    """A cloud step with no upload (every image of the batch stayed on the edge) asks the foundation detector about
    no image: it answers with no detections instead of failing the cell (torchvision's transform cannot batch none)."""
    from cemabench.registry import build_model

    model = build_model(f"torchvision:{arch}@none")
    with torch.no_grad():
        assert model(torch.zeros(0, 3, 64, 64)) == []


@pytest.mark.slow  # 10 s on a clean clone; kept out of the default tier's 5 minutes
def test_a_router_that_offloads_nothing_runs_on_torchvision_detectors(tmp_path):
    out = tmp_path / "r.json"
    assert main(["run", "--method", "hard-example-offload", "--option", "threshold=0", "--dataset", "coco-c",
                 "--data-root", str(_tree(tmp_path / "coco")), "--severity", "3", "--domains", "fog",
                 "--dataset-option", "image_size=64", "--dataset-option", "workers=0",
                 "--edge", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@none",
                 "--foundation", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@none", "--out", str(out)]) == 0
    (cell,) = json.loads(out.read_text())["cells"]
    assert cell["status"] == "ok" and cell["upload_percent"] == 0, cell["message"]


@pytest.mark.slow  # about 20 s; kept out of the default tier's 5 minutes
def test_ecc_independent_runs_on_torchvision_detectors_distilled_or_not(tmp_path, capsys):
    """ECC-I's gate on torchvision's detectors (random weights: every image is unsure, and goes up): its edge distilled
    from the cloud on COCO train (an SSDlite from a Faster R-CNN), which without train_images is refused in one line
    that says how to give it one; or undistilled, which needs no training split."""
    root = _tree(tmp_path / "coco", train=6)
    common = ["--dataset", "coco-c", "--data-root", str(root), "--severity", "3", "--domains", "fog",
              "--dataset-option", "image_size=64", "--dataset-option", "workers=0",
              "--edge", "torchvision:ssdlite320_mobilenet_v3_large@none",
              "--foundation", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@none"]
    assert main(["run", "--method", "ecc-independent", *common]) == 2
    assert "needs the dataset's labelled clean split (it distils the edge from the cloud on it)" in (
        capsys.readouterr().err)
    for options in (["--option", "distill=false"],
                    ["--option", "epochs=1", "--option", "train_samples=6", "--dataset-option", "train_images=6"]):
        out = tmp_path / "r.json"
        assert main(["run", "--method", "ecc-independent", *options, *common, "--out", str(out)]) == 0
        (cell,) = json.loads(out.read_text())["cells"]
        assert cell["status"] == "ok" and cell["upload_percent"] == 100 and cell["cloud_flops"] > 0, cell["message"]


@pytest.mark.slow  # 9 s on a clean clone; kept out of the default tier's 5 minutes
def test_cloud_only_with_torchvision_detectors_on_coco_c(tmp_path):
    root = _tree(tmp_path / "coco")
    out = tmp_path / "run.json"
    assert main(["run", "--method", "cloud-only", "--dataset", "coco-c", "--data-root", str(root), "--severity", "3",
                 "--domains", "fog", "--dataset-option", "image_size=64",
                 "--edge", "torchvision:ssdlite320_mobilenet_v3_large@none",
                 "--foundation", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@none", "--out", str(out)]) == 0
    (cell,) = json.loads(out.read_text())["cells"]
    assert cell["status"] == "ok" and cell["cloud_flops"] > 0 and cell["link"]["upload_bytes"] == 3 * 3 * 64 * 64
    assert cell["link"]["answer_bytes"] >= 3 * 4 and (cell["link"]["answer_bytes"] - 12) % 22 == 0


def test_exported_predictions_and_ground_truth_are_in_the_original_images_pixels(tmp_path):
    """The scored frame is the letterboxed one; what --save-predictions writes is in the original images' pixels,
    so that COCO's own annotation file scores it: perfect predictions made in the letterboxed frame score 100
    against instances_val2017.json."""
    root = _tree(tmp_path)
    truth = coco_c(str(root), domains=("clean",), severity=3, image_size=64).domains[0].ground_truth()
    ids = [i["id"] for i in truth["images"]]
    perfect = truth_as_detections(truth)
    scales = [i["letterbox_scale"] for i in truth["images"]]
    exported = detection.coco_results(ids, perfect, scales)
    official = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    assert _pycocotools(official, exported, ids)[0] == pytest.approx(1.0)
    back = detection.original_frame(truth)
    assert np.allclose([a["bbox"] for a in back["annotations"]], [a["bbox"] for a in official["annotations"]])
    assert [(i["width"], i["height"]) for i in back["images"]] == [SIZES[i["file_name"]] for i in back["images"]]


def _split_equals_whole(arch, stages):
    from cemabench.models.detection_split import detector_stages, split_detector
    from cemabench.registry import build_model

    torch.manual_seed(0)
    model = build_model(f"torchvision:{arch}@none")
    net = model.net
    thresholds = net.roi_heads if hasattr(net, "roi_heads") else net  # Faster R-CNN's box head, or the detector
    thresholds.score_thresh = 0.0  # random weights: keep every box, so that the comparison has the most each
    net.transform.min_size, net.transform.max_size = (96,), 128  # the input's own size (not 800 px)
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        whole = model(x)
    assert all(len(d["boxes"]) == thresholds.detections_per_img for d in whole)
    for stage in stages or detector_stages(model):
        head, tail = split_detector(model, stage)
        with torch.no_grad():
            crossed = head(x)
            parts = tail(crossed)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(whole, parts, strict=True) for k in a), stage
        assert len({t.data_ptr() for t in crossed.values()}) == len(crossed)  # nothing crosses twice


@pytest.mark.slow  # 9 s; the default tier's 5 minutes (the split is used by no method yet)
def test_a_split_faster_rcnn_head_plus_tail_is_the_whole_detector_at_every_stage():
    _split_equals_whole("fasterrcnn_mobilenet_v3_large_320_fpn", None)


@pytest.mark.slow
def test_a_split_resnet50_faster_rcnn_sends_every_fpn_input_that_crosses():
    """Cut at layer2, the FPN's layer1 input crosses too; cut at layer3 (an FPN input itself) it crosses once."""
    _split_equals_whole("fasterrcnn_resnet50_fpn_v2", ["layer2", "layer3"])


@pytest.mark.slow  # 2 x 4 s (ResNet-50 detectors, built at random)
@pytest.mark.parametrize("arch", ["retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"])
def test_a_split_one_stage_detector_head_plus_tail_is_the_whole_detector(arch):
    """RetinaNet (9 anchors a location, an FPN with P6 and P7 from P5 or C5) and FCOS (one a location): cut in front of
    an FPN input and behind one, the tail's head, anchors and decoding give the detector's own boxes."""
    _split_equals_whole(arch, ["layer1", "layer3"])


def test_a_split_names_the_stages_a_detector_has():
    from cemabench.models.detection_split import split_detector
    from cemabench.registry import build_model

    model = build_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@none")
    with pytest.raises(UserError, match="the detector has no stage 'layer2' to cut at; valid: 0, 1, 2"):
        split_detector(model, "layer2")
    ssdlite = build_model("torchvision:ssdlite320_mobilenet_v3_large@none")
    with pytest.raises(UserError, match=r"no stage 'layer2' to cut at; valid: features\.0\.0, .*, features\.0\.13, "
                                        r"features\.1\.0, .*, features\.1\.3, extra\.0, extra\.1, extra\.2$"):
        split_detector(ssdlite, "layer2")


@pytest.mark.slow  # 4 x 3 s (SSDlite at 320 px, every box kept), and SSD300 built at random to be refused
def test_a_split_ssdlite_head_plus_tail_is_the_whole_detector():
    """Cut inside its first features part (only the activation crosses), after it (its feature map crosses once), in
    its second and in its extra layers (every feature map so far crosses), the tail's SSD heads, anchors and decoding
    give the detector's own boxes. SSD300's VGG backbone is refused."""
    from cemabench.models.detection_split import split_detector

    _split_equals_whole("ssdlite320_mobilenet_v3_large", ["features.0.5", "features.0.13", "features.1.2", "extra.1"])
    with pytest.raises(UserError, match="needs a torchvision Faster R-CNN, RetinaNet or FCOS .* or an SSDlite"):
        split_detector(torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None), "0")


def test_coco_c_generated_from_val_needs_no_coco_c_folder_and_is_seeded(tmp_path):
    """source = generated: each val2017 image corrupted at its own size with the ImageNet-C table, from a generator
    seeded by (seed, corruption, severity, file name), then letterboxed; any order, any loader, the same pixels."""
    import shutil

    from cemabench.datasets.corruptions import corrupt
    from cemabench.protocol.stream import derive_seed

    root = _tree(tmp_path / "coco")
    shutil.rmtree(root / "coco-c")
    data = coco_c(str(root), severity=3, domains=("clean", "fog", "gaussian_noise"), image_size=64,
                  source="generated", seed=2)
    clean, fog, noise = data.domains
    whole = noise.images(np.arange(3))
    assert torch.equal(noise.images(np.array([2, 0])), whole[[2, 0]])
    name = "000000000285.jpg"  # 50 x 100 px: corrupted at that size, then letterboxed
    pixels = np.asarray(Image.open(root / "val2017" / name).convert("RGB"))[None]
    by_hand = corrupt(pixels, "gaussian_noise", 3, np.random.default_rng(
        derive_seed("coco-c-generated", 2, "gaussian_noise", 3, name)), table="imagenet")[0]
    assert torch.equal(whole[1], letterbox(torch.from_numpy(by_hand).permute(2, 0, 1), 64)[0])
    assert not torch.equal(fog.images(np.arange(1)), clean.images(np.arange(1)))
    again = coco_c(str(root), severity=3, domains=("fog",), image_size=64, source="generated", seed=2, workers=1)
    assert torch.equal(torch.cat(list(again.domains[0].batches(np.arange(3), 2))), fog.images(np.arange(3)))
    other = coco_c(str(root), severity=3, domains=("gaussian_noise",), image_size=64, source="generated", seed=3)
    assert not torch.equal(other.domains[0].images(np.arange(3)), whole)
    assert data.provenance["seed"] == 2 and data.provenance["source"] == "generated"
    assert fog.ground_truth() == clean.ground_truth()
    with pytest.raises(UserError, match="coco-c source must be one of disk, generated, got 'web'"):
        coco_c(str(root), source="web")
