"""ImageNet-C / ImageNet-R loading and the model zoo, on small generated trees in the real layouts (no network)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cemabench.cli import main
from cemabench.datasets.corruptions import HENDRYCKS_ORDER
from cemabench.datasets.imagenet import imagenet_c, imagenet_r, imagenet_wnids, robustbench_subset
from cemabench.errors import UserError
from cemabench.models.zoo import tiny_model, torchvision_model
from cemabench.protocol import Models, Protocol, run_unit
from cemabench.registry import build_method, build_model
from cemabench.tables.spec import available_tables, load_table
from conftest import reproduce_tiny

WNIDS = ["n01440764", "n01443537", "n09999999"][:2]
R_WNIDS = ["n01443537", "n01484850", "n01494475"]


def _jpeg(path, size=(224, 224), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """ROOT/imagenet-c (15 corruptions at severity 5, 2 classes x 3 images), ROOT/imagenet-r, ROOT/imagenet/val."""
    root = tmp_path_factory.mktemp("data")
    seed = 0
    for corruption in HENDRYCKS_ORDER:
        for wnid in WNIDS:
            for _ in range(3):
                seed += 1
                _jpeg(root / "imagenet-c" / corruption / "5" / wnid / f"ILSVRC2012_val_{seed:08d}.JPEG", seed=seed)
    for wnid in R_WNIDS:
        for i in range(2):
            _jpeg(root / "imagenet-r" / wnid / f"art_{i}.jpg", size=(300, 260), seed=i)
    for wnid in WNIDS:
        _jpeg(root / "imagenet" / "val" / wnid / "ILSVRC2012_val_1.JPEG", size=(320, 300))
    return root


def test_imagenet_c_reads_the_published_layout(root):
    source = imagenet_c(root, severity=5, domains=["fog", "snow"], workers=0)
    assert [d.name for d in source.domains] == ["fog", "snow"] and source.num_classes == 1000
    fog = source.domains[0]
    assert len(fog) == 6 and fog.sample_nbytes == 3 * 224 * 224
    x, y = fog.images(np.arange(6)), torch.from_numpy(fog.labels())
    assert x.shape == (6, 3, 224, 224) and x.min() >= 0 and x.max() <= 1
    assert sorted(set(y.tolist())) == [imagenet_wnids().index(w) for w in WNIDS]
    with Image.open(fog.files[0]) as image:
        assert torch.equal((x[0] * 255).round().byte(), torch.from_numpy(np.array(image)).permute(2, 0, 1))
    assert source.clean is not None and source.clean.images(np.arange(2)).shape == (2, 3, 224, 224)


def test_the_labels_of_imagenet_cs_clean_split_are_withheld(root):
    """ImageNet-C's clean split is ImageNet's validation set, the very images ImageNet-C corrupts: its labels are the
    test stream's, so no method may read them (its images stay: EATA's Fisher reads them, with no label, as the
    official code does). ImageNet-R's images are others: the same clean split keeps its labels there."""
    for source in (imagenet_c(root, severity=5, domains=["fog"], workers=0),
                   imagenet_c(root, severity=5, domains=["fog"], workers=0, source="generated")):
        assert source.clean.images(np.arange(1)).shape == (1, 3, 224, 224)
        with pytest.raises(LookupError, match="labels of ImageNet-C's clean split are withheld"):
            source.clean.labels()
    assert len(imagenet_r(root, workers=0).clean.labels()) == len(imagenet_r(root, workers=0).clean)


def test_batches_follow_the_given_order_with_workers(root):
    fog = imagenet_c(root, domains=["fog"], workers=2).domains[0]
    order = np.array([5, 0, 3, 1, 4, 2])
    batches = list(fog.batches(order, 4))
    assert [len(b) for b in batches] == [4, 2]
    assert torch.equal(torch.cat(batches), fog.images(order))


def test_robustbench_subset_from_a_list_file(root, tmp_path):
    fog = imagenet_c(root, domains=["fog"], workers=0).domains[0]
    listing = tmp_path / "ids.txt"
    listing.write_text("\n".join(f"{f.parent.name}/{f.name}" for f in fog.files[::2]))
    subset = imagenet_c(root, domains=["fog"], subset="robustbench-5000", subset_file=str(listing), workers=0)
    assert subset.domains[0].files == fog.files[::2]


def test_robustbench_subset_from_the_installed_package():
    listed = robustbench_subset(None)
    assert len(listed) == 5000
    assert set(imagenet_wnids()) >= {entry.split("/")[0] for entry in listed}
    assert all(entry.split("/")[1].startswith("ILSVRC2012_val_") for entry in listed)


def test_robustbench_subset_without_the_package_says_what_to_do(root, robustbench_not_installed):
    with pytest.raises(UserError, match="'robustbench-5000' needs RobustBench's list .* or set subset_file"):
        imagenet_c(root, domains=["fog"], subset="robustbench-5000", workers=0)


@pytest.mark.parametrize("breakage, message", [
    (lambda r: None, "does not exist; expected ROOT/imagenet-c/<corruption>/<severity>/<wnid>/\\*.JPEG"),
    (lambda r: (r / "imagenet-c" / "fog" / "5" / "n01440764").mkdir(parents=True), "holds no images"),
    (lambda r: (r / "imagenet-c" / "fog" / "5" / "cats").mkdir(parents=True), "not ImageNet wnids \\(cats\\)"),
])
def test_layout_problems_are_named(tmp_path, breakage, message):
    breakage(tmp_path)
    with pytest.raises(UserError, match=message):
        imagenet_c(tmp_path, domains=["fog"], workers=0)


@pytest.mark.parametrize("content, message", [(b"not a jpeg", "cannot read image"), (None, "is 100x80 px")])
def test_unreadable_or_resized_images_fail_their_cell_with_the_path(tmp_path, content, message):
    path = tmp_path / "imagenet-c" / "fog" / "5" / "n01440764" / "bad.JPEG"
    if content is None:
        _jpeg(path, size=(100, 80))
    else:
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    source = imagenet_c(tmp_path, domains=["fog"], workers=0)
    (result,) = run_unit(build_method("source"), source.domains, Models.copies_of(tiny_model("edge"),
                         tiny_model("foundation")), 1000, source.clean, Protocol(), seed=0)
    assert result.status == "error" and message in result.message and "bad.JPEG" in result.message


@pytest.mark.parametrize("scoring", ["mask-200", "argmax-1000"])
def test_imagenet_r_resizes_crops_and_scores_as_the_spec_says(root, scoring):
    source = imagenet_r(root, scoring=scoring, workers=0)
    x, y = source.domains[0].images(np.arange(6)), torch.from_numpy(source.domains[0].labels())
    assert x.shape == (6, 3, 224, 224)
    index = imagenet_wnids()
    assert sorted(set(y.tolist())) == [index.index(w) for w in R_WNIDS]
    if scoring == "mask-200":
        assert source.scored_classes.tolist() == [index.index(w) for w in R_WNIDS]
    else:
        assert source.scored_classes is None


def test_masked_scoring_takes_the_argmax_over_the_scored_classes(root):
    class Fixed(torch.nn.Module):
        """Puts the highest logit on class 0 (outside ImageNet-R) and the next on each image's true class."""

        def forward(self, x):
            logits = torch.zeros(len(x), 1000)
            logits[:, 0] = 10.0
            logits[:, imagenet_wnids().index(R_WNIDS[0])] = 5.0
            return logits

    results = {}
    for scoring in ("mask-200", "argmax-1000"):
        source = imagenet_r(root, scoring=scoring, workers=0)
        (results[scoring],) = run_unit(build_method("source"), source.domains, Models.copies_of(Fixed(), Fixed()),
                                       1000, source.clean, Protocol(), seed=0, scored_classes=source.scored_classes)
    assert results["mask-200"].correct == 2 and results["argmax-1000"].correct == 0


def test_reproduce_a_table2_excerpt_on_a_generated_tree_with_tiny_models(root, tmp_path, capsys):
    """The default tier's cheap cut of the slow whole-table test below: two corruptions, three methods."""
    spec = tmp_path / "excerpt.toml"
    spec.write_text('extends = "table2"\nname = "excerpt"\n[data]\ndomains = ["fog", "contrast"]\n'
                    '[[methods]]\nname = "source"\n[[methods]]\nname = "cema"\n[[methods]]\n'
                    'name = "random-upload"\nmatch_uploads_of = "cema"\n')
    code = reproduce_tiny(str(spec), root, tmp_path)
    _, err = capsys.readouterr()
    assert code == 0, err
    out = (tmp_path / "excerpt.md").read_text()  # stdout holds a summary; the full tables are in the file
    doc = json.loads((tmp_path / "excerpt.json").read_text())
    assert [(c["method"], c["domain"]) for c in doc["cells"]] == [
        (m, d) for m in ("source", "cema", "random-upload") for d in ("fog", "contrast")]
    assert all(c["status"] == "ok" and c["seen"] == 6 for c in doc["cells"])
    for needle in ("all 50,000 images per corruption", "tiny:edge", "Uploads against the authors' published counts"):
        assert needle in out


def _without_val(root, tmp_path):
    """ROOT/imagenet-c/fog of ``root``, and no ROOT/imagenet/val: a dataset without a clean split."""
    bare = tmp_path / "bare"
    (bare / "imagenet-c").mkdir(parents=True)
    (bare / "imagenet-c" / "fog").symlink_to(root / "imagenet-c" / "fog")
    return bare


def test_eata_without_imagenet_val_is_refused_before_compute_and_eta_runs(root, tmp_path, capsys):
    """EATA's Fisher regulariser reads clean images: on a tree without ROOT/imagenet/val it is refused in one line
    that names the folder, before any compute; ETA (EATA without the regulariser) needs none and runs."""
    bare = _without_val(root, tmp_path)
    spec = tmp_path / "e.toml"
    spec.write_text('extends = "table2"\nname = "e"\n[data]\ndomains = ["fog"]\n[[methods]]\nname = "eata"\n'
                    '[[methods]]\nname = "eta"\n')
    assert reproduce_tiny(str(spec), bare, tmp_path / "out") == 2
    assert capsys.readouterr().err == (
        "cemabench: error: method eata needs the dataset's labelled clean split (its Fisher regulariser is "
        "estimated on clean images), and dataset imagenet-c has none: it reads ImageNet's validation images from "
        "ROOT/imagenet/val/<wnid>/*.JPEG\n")
    spec.write_text(spec.read_text().replace('name = "eata"', 'name = "eata"\noptions = { fisher_alpha = 0.0 }'))
    assert reproduce_tiny(str(spec), bare, tmp_path / "out") == 0, capsys.readouterr().err


@pytest.mark.parametrize("isolate", [(), ("--isolate",)])
def test_a_derived_entry_that_needs_the_clean_split_fails_its_cells_with_the_hint(root, tmp_path, capsys, isolate):
    """An entry whose options are derived from other units is built, and checked, when its unit is: RMT matched to
    source's uploads fails its cell in one line that names what it needs and how the dataset gets it, in both modes
    (isolated, it crashed in its cloud half); the other entry's cells are computed."""
    bare = _without_val(root, tmp_path)
    spec = tmp_path / "d.toml"
    spec.write_text('extends = "table2"\nname = "d"\n[data]\ndomains = ["fog"]\n[[methods]]\nname = "source"\n'
                    '[[methods]]\nname = "rmt"\nmatch_uploads_of = "source"\n')
    assert reproduce_tiny(str(spec), bare, tmp_path / "out", *isolate) == 3
    cells = {c["method"]: c for c in json.loads((tmp_path / "out" / "d.json").read_text())["cells"]}
    assert cells["source"]["status"] == "ok"
    assert cells["rmt"]["status"] == "error" and cells["rmt"]["message"].splitlines()[0].endswith(
        "method rmt needs the dataset's labelled clean split (its prototypes, warm-up and replay set come from it), "
        "and dataset imagenet-c has none: it reads ImageNet's validation images from ROOT/imagenet/val/<wnid>/*.JPEG"
    ), cells["rmt"]["message"]


@pytest.mark.parametrize("table", ["continual", "multi-edge"])
def test_continual_and_multi_edge_excerpts_run_on_a_generated_tree(root, tmp_path, capsys, table):
    """The real-data versions of the continual and multi-edge tables, cut to two corruptions and two methods."""
    spec = tmp_path / "excerpt.toml"
    devices = 2 if table == "multi-edge" else 1
    spec.write_text(f'extends = "{table}"\nname = "excerpt"\n[protocol]\ndevices = {devices}\n'
                    '[data]\ndomains = ["fog", "contrast"]\n[[methods]]\nname = "source"\n[[methods]]\nname = "tent"\n')
    code = reproduce_tiny(str(spec), root, tmp_path, "--jobs", "1")
    _, err = capsys.readouterr()
    assert code == 0, err
    out = (tmp_path / "excerpt.md").read_text()  # stdout holds a summary; the full tables are in the file
    doc = json.loads((tmp_path / "excerpt.json").read_text())
    assert [(c["method"], c["domain"], c["device"]) for c in doc["cells"]] == [
        (m, d, i if devices > 1 else 0) for m in ("source", "tent") for i, d in enumerate(("fog", "contrast"))]
    assert all(c["status"] == "ok" and c["seen"] == 6 for c in doc["cells"])
    assert doc["provenance"]["miniature"] is False and "Setting**: `continual`" in out


def test_gradual_on_a_tree_with_one_severity_names_the_missing_folder(root, tmp_path, capsys):
    spec = tmp_path / "g.toml"
    spec.write_text('extends = "table2"\nname = "g"\n[protocol]\nsetting = "gradual"\n[data]\ndomains = ["fog"]\n'
                    '[[methods]]\nname = "source"\n')
    code = reproduce_tiny(str(spec), root, tmp_path, "--jobs", "1")
    err = capsys.readouterr().err
    assert code == 2 and "fog" in err and "1" in err, err


@pytest.mark.slow  # every method of table2 on three corruptions (noise, weather, digital)
def test_reproduce_table2_on_a_generated_tree_with_tiny_models(root, tmp_path, capsys):
    """table2's every method but rmt through the real ImageNet-C path (JPEG tree, DataLoader, tiny 1000-class
    models), on three of its corruptions: all fifteen took 170 s of the slow tier and exercise no other code. rmt's
    source prototypes need a clean sample of each of the 1000 classes, which the generated tree does not hold (it
    refuses, naming the missing classes: tests/test_rmt.py)."""
    entries = [e for e in load_table("table2").methods if e.name != "rmt"]
    lines = ['extends = "table2"', 'name = "table2-3"', "[data]",
             'domains = ["gaussian_noise", "fog", "jpeg_compression"]']
    for e in entries:
        lines += ["[[methods]]", f'name = "{e.name}"', f'label = "{e.label}"']
        options = ", ".join(f"{k} = {json.dumps(v)}" for k, v in e.options.items())
        lines += [f"options = {{ {options} }}"] if options else []
        lines += [f'match_uploads_of = "{e.match_uploads_of}"'] if e.match_uploads_of else []
    spec_path = tmp_path / "table2-3.toml"
    spec_path.write_text("\n".join(lines) + "\n")
    code = reproduce_tiny(str(spec_path), root, tmp_path)
    _, err = capsys.readouterr()
    assert code == 0, err
    out = (tmp_path / "table2-3.md").read_text()  # stdout holds a summary; the full tables are in the file
    doc = json.loads((tmp_path / "table2-3.json").read_text())
    assert doc["provenance"]["miniature"] is False and len(doc["cells"]) == len(entries) * 3
    assert all(c["status"] == "ok" and c["seen"] == 6 for c in doc["cells"])
    for needle in ("ImageNet-C", "all 50,000 images per corruption", "224 px", "tiny:edge", "tiny:foundation",
                   "Seeds**: 0", "torch 2", "Uploads against the authors' published counts"):
        assert needle in out
    assert "EMBEDDED MINIATURE" not in out


class TestZoo:
    def test_torchvision_random_and_local_checkpoint(self, tmp_path):
        model = torchvision_model("resnet18@none")
        with torch.no_grad():
            assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1000)
        path = tmp_path / "r18.pth"
        torch.save(model.net.state_dict(), path)
        loaded = torchvision_model(f"resnet18@{path}")
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    def test_offline_missing_weights_say_where_to_put_them(self, tmp_path, monkeypatch):
        monkeypatch.setenv("CEMABENCH_OFFLINE", "1")
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
        with pytest.raises(UserError, match=f"put resnet50-0676ba61.pth .* at {tmp_path}/hub/checkpoints"):
            torchvision_model("resnet50")

    @pytest.mark.parametrize("spec, message", [("resnet51", "torchvision has no model 'resnet51'"),
                                               ("resnet18@IMAGENET9K", "no weights 'IMAGENET9K'; valid: IMAGENET1K_V1"),
                                               ("resnet18@/nope.pth", "checkpoint /nope.pth .* does not exist")])
    def test_bad_names_are_user_errors(self, spec, message):
        with pytest.raises(UserError, match=message):
            torchvision_model(spec)

    def test_every_named_pair_of_the_built_in_tables_builds(self):
        names = {model for table in available_tables() for pair in load_table(table).real.pairs.values()
                 for model in pair.values()}
        assert names >= {"torchvision:resnet18", "timm:vit_base_patch16_224"}
        for name in sorted(names):
            model = build_model(f"{name}@none")
            with torch.no_grad():
                assert model(torch.rand(1, 3, 224, 224)).shape == (1, 1000)

    def test_a_weights_folder_comes_before_the_caches(self, tmp_path, monkeypatch, capsys):
        monkeypatch.setenv("CEMABENCH_OFFLINE", "1")
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
        folder = tmp_path / "weights"
        folder.mkdir()
        reference = torchvision_model("resnet18@none").net
        torch.save(reference.state_dict(), folder / "resnet18-f37072fd.pth")  # IMAGENET1K_V1's published file name
        monkeypatch.setenv("CEMABENCH_WEIGHTS", str(folder))
        loaded = torchvision_model("resnet18").net
        assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), loaded.state_dict().values()))
        with pytest.raises(UserError, match=f"put resnet34-b627a593.pth .* or in {folder}"):
            torchvision_model("resnet34")
        monkeypatch.delenv("CEMABENCH_WEIGHTS")
        code = main(["run", "--method", "source", "--domains", "fog", "--edge", "torchvision:resnet18",
                     "--weights", str(tmp_path / "nowhere")])
        assert code == 2 and "weights folder" in capsys.readouterr().err

    @pytest.mark.slow  # 8 s; kept out of the default tier's 5 minutes
    def test_timm_weights_load_offline_from_a_weights_folder_or_the_hugging_face_cache(self, tmp_path):
        import timm
        from safetensors.torch import save_file

        reference = timm.create_model("resnet10t")
        save_file(reference.state_dict(), tmp_path / "resnet10t.safetensors")
        repo = tmp_path / "hf" / f"models--{timm.models.get_pretrained_cfg('resnet10t').hf_hub_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0" * 40)
        (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
        save_file(reference.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
        probe = ("import sys, torch\nfrom cemabench.models.zoo import timm_model\n"
                 "from safetensors.torch import load_file\nexpected = load_file(sys.argv[1])\n"
                 "loaded = timm_model('resnet10t').net.state_dict()\n"
                 "print(all(torch.equal(expected[k], loaded[k]) for k in expected))\n")
        for extra in ({"CEMABENCH_WEIGHTS": str(tmp_path)}, {"HF_HUB_CACHE": str(tmp_path / "hf")}):
            env = {**os.environ, "CEMABENCH_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), **extra}
            run = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "resnet10t.safetensors")], env=env,
                                 capture_output=True, text=True)
            assert run.returncode == 0 and run.stdout.split() == ["True"], run.stderr[-2000:]

    def test_timm_random_model(self):
        from cemabench.models.zoo import timm_model

        model = timm_model("resnet10t@none")
        with torch.no_grad():
            assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1000)


class TestHuggingFace:
    def test_imagefolder_in_the_imagenet_c_layout_matches_the_native_loader(self, root, tmp_path):
        from cemabench.datasets.hf import hf_dataset

        source = hf_dataset(root, severity=5, domains=["fog"], layout="imagenet-c/{domain}/{severity}",
                            cache_dir=str(tmp_path))
        native = imagenet_c(root, domains=["fog"], workers=0).domains[0]
        domain = source.domains[0]
        assert source.num_classes == 1000 and len(domain) == len(native) == 6
        x, y = domain.images(np.arange(6)), torch.from_numpy(domain.labels())
        x_native, y_native = native.images(np.arange(6)), torch.from_numpy(native.labels())
        assert sorted(y.tolist()) == sorted(y_native.tolist())
        sums, native_sums = (sorted(float(v) for v in t.sum((1, 2, 3))) for t in (x, x_native))
        assert sums == pytest.approx(native_sums)
        (result,) = run_unit(build_method("tent"), source.domains, Models.copies_of(tiny_model("edge"),
                             tiny_model("foundation")), 1000, None, Protocol(batch_size=4), seed=0)
        assert result.status == "ok" and result.seen == 6

    def test_parquet_files_per_domain(self, root, tmp_path):
        from datasets import load_dataset

        from cemabench.datasets.hf import hf_dataset

        folder = tmp_path / "parquet" / "fog"
        folder.mkdir(parents=True)
        load_dataset("imagefolder", data_dir=str(root / "imagenet-c" / "fog" / "5"), split="validation",
                     cache_dir=str(tmp_path / "c1")).to_parquet(str(folder / "part-0.parquet"))
        source = hf_dataset(tmp_path / "parquet", domains=["fog"], builder="parquet", cache_dir=str(tmp_path / "c2"))
        assert len(source.domains[0]) == 6 and source.domains[0].images(np.arange(2)).shape == (2, 3, 224, 224)

    @pytest.mark.parametrize("options, message", [({"domains": None}, "needs the domains"),
                                                  ({"layout": "nope/{domain}"}, "nope/fog does not exist"),
                                                  ({"label_column": "class"},
                                                   "no column class; columns: image, label")])
    def test_problems_are_named(self, root, tmp_path, options, message):
        from cemabench.datasets.hf import hf_dataset

        kwargs = {"domains": ["fog"], "layout": "imagenet-c/{domain}/{severity}", "cache_dir": str(tmp_path), **options}
        with pytest.raises(UserError, match=message):
            hf_dataset(root, **kwargs)
