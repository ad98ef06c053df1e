"""ImageNet-C generated from the validation images (imagenet-c with source = generated) and CCC on ImageNet, on a
small generated ImageNet-layout tree: lazy, seeded, the same pixels in any order, and a calibrated stream."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cemabench.datasets.corruptions import corrupt
from cemabench.datasets.imagenet import imagenet_c, imagenet_wnids
from cemabench.errors import UserError
from cemabench.protocol import ccc
from cemabench.protocol.stream import derive_seed
from cemabench.run.context import TableContext
from cemabench.tables.spec import load_table
from conftest import reproduce_tiny

WNIDS = ["n01440764", "n01443537"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """ROOT/imagenet/val only (2 classes x 3 images of 300 x 260 px): no imagenet-c folder."""
    root = tmp_path_factory.mktemp("val")
    for c, wnid in enumerate(WNIDS):
        for i in range(3):
            path = root / "imagenet" / "val" / wnid / f"ILSVRC2012_val_{10 * c + i:08d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            yy, xx = np.mgrid[0:260, 0:300]
            waves = [128 + 100 * np.sin(xx / (9 + 3 * k + i) + yy / (13 + c) + k) for k in range(3)]
            Image.fromarray(np.stack(waves, -1).astype(np.uint8)).save(path, "JPEG", quality=95)
    return root


def test_generated_imagenet_c_is_lazy_seeded_and_order_free(root):
    source = imagenet_c(root, severity=3, domains=["contrast", "gaussian_noise"], source="generated", seed=4)
    contrast, noise = source.domains
    assert [d.name for d in source.domains] == ["contrast", "gaussian_noise"] and len(noise) == 6
    assert sorted(set(noise.labels().tolist())) == [imagenet_wnids().index(w) for w in WNIDS]
    whole = noise.images(np.arange(6))
    assert whole.shape == (6, 3, 224, 224)
    assert torch.equal(noise.images(np.array([5, 1])), whole[[5, 1]])  # any batch, any order: the same pixels
    clean = source.corruptor.images()[np.array([5])]
    by_hand = corrupt(clean, "gaussian_noise", 3, np.random.default_rng(
        derive_seed("imagenet-c-generated", 4, "gaussian_noise", 3, 5)), table="imagenet")
    assert torch.equal(whole[5], torch.from_numpy(by_hand[0]).permute(2, 0, 1).float() / 255)
    other = imagenet_c(root, severity=3, domains=["gaussian_noise"], source="generated", seed=5).domains[0]
    assert not torch.equal(other.images(np.arange(2)), whole[:2])
    assert source.provenance["seed"] == 4 and source.corruptor.lazy
    assert source.corruptor.calibration_images == 100 and source.provenance["ccc_calibration_images"] == 100


@pytest.mark.parametrize("options, message", [
    ({"source": "web"}, "imagenet-c source must be one of disk, generated, got 'web'"),
    ({"source": "generated", "ccc_calibration": 0}, "ccc_calibration must be a whole number of images >= 1"),
])
def test_bad_options_are_named(root, options, message):
    with pytest.raises(UserError, match=message):
        imagenet_c(root, **options)


def test_a_tree_without_validation_images_is_named(tmp_path):
    with pytest.raises(UserError, match="imagenet/val does not exist; expected ROOT/imagenet/val/<wnid>/"):
        imagenet_c(tmp_path, source="generated")


class Pooled(torch.nn.Module):
    """A 1000-way linear head on 4 x 4 average-pooled pixels, seeded: the calibration's 121 forward passes of a
    224 px batch in milliseconds (the tiny zoo models take a tenth of a second each on one thread)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(48, 1000)

    def forward(self, x):
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def test_ccc_on_imagenet_is_generated_when_read_and_deterministic_from_its_seed(root):
    corruptor = imagenet_c(root, domains=["contrast"], source="generated").corruptor
    model = Pooled().eval()
    calibration = ccc.Calibration(corruptor, model, size=2)
    names = ("pixelate", "contrast")  # the cheapest two at 224 px
    stream, steps = ccc.build(corruptor, model, names, 0, 40.0, 3, 12, calibration)
    again, same_steps = ccc.build(corruptor, model, names, 0, 40.0, 3, 12, calibration)
    other, _ = ccc.build(corruptor, model, names, 1, 40.0, 3, 12, calibration)
    assert isinstance(stream, ccc.GeneratedStream) and len(stream) == 12 and steps == same_steps
    assert sum(s.count for s in steps) == 12 and all(s.first != s.second for s in steps)
    matrix = calibration.matrices[steps[0].first, steps[0].second]
    assert matrix.shape == (len(ccc.LEVELS),) * 2 and ((matrix >= 0) & (matrix <= 100)).all()
    assert all(s.expected == matrix[ccc.LEVELS.index(s.s1), ccc.LEVELS.index(s.s2)] for s in steps[:1])
    pixels = stream.pixels_at(np.arange(12))
    assert pixels.shape == (12, 224, 224, 3) and np.array_equal(again.pixels_at(np.arange(12)), pixels)
    assert np.array_equal(stream.pixels_at(np.array([7, 2])), pixels[[7, 2]])
    assert not np.array_equal(other.pixels_at(np.arange(12)), pixels)
    assert np.array_equal(stream.labels(), corruptor.labels()[stream.chosen])
    batches = list(stream.batches(np.arange(12), 5))
    assert [len(b) for b in batches] == [5, 5, 2]
    assert torch.equal(torch.cat(batches), torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)


def test_the_ccc_table_on_imagenet_is_no_longer_refused(root):
    context = TableContext(load_table("ccc"), str(root))
    assert context.dataset.corruptor is not None and context.choice.options["source"] == "generated"
    context.check_stream()  # the refusal stays for a dataset without a generator (test_ccc)


@pytest.mark.slow  # the calibration of the pairs walked (2 images of 224 px at 121 points each) and two cells
def test_reproduce_ccc_on_a_generated_tree_with_tiny_models(root, tmp_path, capsys):
    spec = tmp_path / "ccc-2.toml"
    spec.write_text('extends = "ccc"\nname = "ccc-2"\n[protocol]\nccc_speed = 3\nccc_length = 12\n'
                    '[data]\ndomains = ["contrast", "brightness"]\n[[methods]]\nname = "source"\n'
                    '[[methods]]\nname = "tent"\n')
    code = reproduce_tiny(str(spec), root, tmp_path, "--dataset-option", "ccc_calibration=2", "--jobs", "1")
    _, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads((tmp_path / "ccc-2.json").read_text())
    assert [c["status"] for c in doc["cells"]] == ["ok", "ok"] and all(c["seen"] == 12 for c in doc["cells"])
    dataset = doc["provenance"]["dataset"]
    assert dataset["dataset"] == "ImageNet-C generated from the ImageNet validation images"
    assert dataset["ccc_calibration_images"] == 2 and dataset["seed"] == 0
