"""The ``robustbench:`` model prefix on the real robustbench 1.1.1 package, checkpoints written here (no network)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import resnet18

from cemabench.cli import main
from cemabench.errors import UserError
from cemabench.models import robustbench as robustbench_zoo
from cemabench.models.layers import Normalized
from cemabench.models.zoo import IMAGENET_MEAN, IMAGENET_STD
from cemabench.registry import build_model

R18 = "robustbench:imagenet/Linf/Salman2020Do_R18"


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """A checkpoint folder in RobustBench's layout holding a seeded ResNet-18 saved the way RobustBench's are."""
    monkeypatch.setenv("CEMABENCH_ROBUSTBENCH_DIR", str(tmp_path / "rb"))
    monkeypatch.setenv("CEMABENCH_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.manual_seed(0)
    net = resnet18().eval()
    path = tmp_path / "rb" / "imagenet" / "Linf" / "Salman2020Do_R18.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return net


def test_a_zoo_model_loads_from_its_checkpoint_and_normalises_itself(checkpoints):
    model = build_model(R18)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), Normalized(checkpoints, IMAGENET_MEAN, IMAGENET_STD).eval()(x))
    assert not model.training


def test_a_zoo_model_runs_a_table_as_the_edge(checkpoints, tmp_path, capsys):
    root = tmp_path / "data"
    for i, corruption in enumerate(["fog", "snow"]):
        for j, wnid in enumerate(["n01440764", "n01443537"]):
            path = root / "imagenet-c" / corruption / "5" / wnid / f"ILSVRC2012_val_{i}{j}.JPEG"
            path.parent.mkdir(parents=True)
            pixels = np.random.default_rng(10 * i + j).integers(0, 256, (224, 224, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
    code = main(["run", "--method", "tent", "--dataset", "imagenet-c", "--data-root", str(root), "--domains", "fog",
                 "snow", "--edge", R18, "--foundation", "tiny:foundation", "--dataset-option", "workers=0",
                 "--out", str(tmp_path / "cells.json")])
    assert code == 0, capsys.readouterr().err
    cells = json.loads((tmp_path / "cells.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["ok", "ok"] and [c["seen"] for c in cells] == [2, 2]


def test_checkpoints_can_sit_in_the_weights_folder(checkpoints, tmp_path, monkeypatch):
    monkeypatch.delenv("CEMABENCH_ROBUSTBENCH_DIR")
    monkeypatch.setenv("CEMABENCH_WEIGHTS", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    (tmp_path / "rb").rename(tmp_path / "weights" / "robustbench")
    assert robustbench_zoo.checkpoint_dir() == tmp_path / "weights" / "robustbench"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(build_model(R18)(x), Normalized(checkpoints, IMAGENET_MEAN, IMAGENET_STD).eval()(x))


@pytest.mark.parametrize("name, message", [
    ("Hendrycks2020AugMix", "not at .*/rb/imagenet/corruptions/Hendrycks2020AugMix.pt and CEMABENCH_OFFLINE=1: "
                            "put RobustBench's file there \\(Google Drive id 1xRMj1GlO93tLoCMm0e5wEvZwqhIjxhoJ\\)"),
    ("Standard_R50", "put resnet50-0676ba61.pth \\(from https://download.pytorch.org/models/resnet50-0676ba61.pth\\) "
                     "at .*/hub/checkpoints/resnet50-0676ba61.pth"),
    ("Tian2022Deeper_DeiT-S", "put tian2022deeper-deit-s.pth \\(from https://github.com/RobustBench/.*\\) at "
                              ".*/hub/checkpoints/tian2022deeper-deit-s.pth"),
])
def test_offline_missing_weights_say_which_file_goes_where(checkpoints, name, message):
    with pytest.raises(UserError, match=message):
        build_model(f"robustbench:{name}")


@pytest.mark.parametrize("name, message", [
    ("Nobody2026", "no imagenet/corruptions model 'Nobody2026'; valid: Erichson2022NoisyMix"),
    ("imagenet/Linf2/Standard_R50", "no threat model 'Linf2'; valid: Linf, L2, corruptions"),
    ("mnist/Linf/Standard", "no dataset 'mnist'; valid: imagenet, cifar10, cifar100"),
    ("imagenet/Standard_R50", "robustbench:NAME or robustbench:DATASET/THREAT/NAME"),
])
def test_bad_names_are_user_errors(name, message):
    with pytest.raises(UserError, match=message):
        build_model(f"robustbench:{name}")


def test_missing_package_names_the_install_command(robustbench_not_installed):
    with pytest.raises(UserError, match='not installed: pip install -c constraints.txt -e ".\\[robustbench\\]"'):
        build_model(R18)


@pytest.mark.slow  # 6 s: a fresh interpreter; kept out of the default tier's 5 minutes
def test_the_packaging_fixes_do_not_outlive_the_import():
    probe = ("import importlib.util, sys\n"
             "before = {m: importlib.util.find_spec(m) is not None for m in ('pkg_resources', 'autoattack')}\n"
             "from cemabench.models.robustbench import import_robustbench\n"
             "utils = import_robustbench()\n"
             "after = {m: m in sys.modules for m in before}\n"
             "print(all(after[m] <= before[m] for m in before), 'robustbench.eval' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "True"]
