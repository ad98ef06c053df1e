"""RobustBench's model zoo as the ``robustbench:`` model prefix (the optional extra ``cemabench[robustbench]``).

    robustbench:<NAME>                    an ImageNet common-corruptions model, e.g. robustbench:Standard_R50
    robustbench:<DATASET>/<THREAT>/<NAME> any zoo entry, e.g. robustbench:imagenet/Linf/Salman2020Do_R50

RobustBench models take images in [0, 1] and normalise themselves, as every cemabench model does. Checkpoints live
in :func:`checkpoint_dir` as ``<DATASET>/<THREAT>/<NAME>.pt``, RobustBench's own layout, so an existing RobustBench
``models/`` folder can be named there. With ``CEMABENCH_OFFLINE=1`` nothing is downloaded and a missing checkpoint is
an error naming the file.

robustbench 1.1.1 cannot be imported as packaged, and this adapter works around it only while it imports:
it needs ``pkg_resources`` (gone from setuptools >= 81), which gets a stand-in answering the one call robustbench
makes (``resource_filename``); and it imports ``autoattack``, which its dependency installs as ``pyautoattack``,
which gets an alias. Neither stays visible to other code. Its ``timm==1.0.9`` pin is why ``constraints.txt``
pins that timm.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import importlib.util
import os
import pickle
import sys
import types
from pathlib import Path

from torch import nn

from cemabench.errors import UserError
from cemabench.models.zoo import hub_checkpoint, weights_dir

DATASETS = ("imagenet", "cifar10", "cifar100")
INSTALL = 'pip install -c constraints.txt -e ".[robustbench]"  (or: pip install "cemabench[robustbench]")'


def checkpoint_dir() -> Path:
    """``$CEMABENCH_ROBUSTBENCH_DIR``, else ``robustbench/`` in the ``--weights`` folder, else the cemabench cache."""
    if os.environ.get("CEMABENCH_ROBUSTBENCH_DIR"):
        return Path(os.environ["CEMABENCH_ROBUSTBENCH_DIR"])
    folder = weights_dir()
    return folder / "robustbench" if folder else Path.home() / ".cache" / "cemabench" / "robustbench"


def _pkg_resources_stand_in() -> types.ModuleType:
    module = types.ModuleType("pkg_resources", "cemabench's stand-in: resource_filename only, for robustbench")

    def resource_filename(package: str, resource: str) -> str:
        return str(importlib.resources.files(package).joinpath(resource))

    module.resource_filename = resource_filename
    return module


@contextlib.contextmanager
def _packaging_fixes():
    added = {}
    if importlib.util.find_spec("pkg_resources") is None:
        added["pkg_resources"] = _pkg_resources_stand_in()
    if importlib.util.find_spec("autoattack") is None:
        if importlib.util.find_spec("pyautoattack") is None:
            raise UserError(f"robustbench needs its dependency pyautoattack, which is not installed: {INSTALL}")
        added["autoattack"] = importlib.import_module("pyautoattack")
        added["autoattack.state"] = importlib.import_module("pyautoattack.state")
    sys.modules.update(added)
    try:
        yield
    finally:
        for name, module in added.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def import_robustbench() -> types.ModuleType:
    """``robustbench.utils``, imported despite robustbench 1.1.1's packaging."""
    if "robustbench.utils" in sys.modules:
        return sys.modules["robustbench.utils"]
    if importlib.util.find_spec("robustbench") is None:
        raise UserError(f"the robustbench: models need the robustbench package, which is not installed: {INSTALL}")
    with _packaging_fixes():
        return importlib.import_module("robustbench.utils")


def _check_offline(spec: str, timm_name: str, gdrive, expected: Path) -> None:
    """Refuse what would download: a missing Google Drive checkpoint, uncached weights of a RobustBench entry
    registered in timm, or uncached torchvision weights (RobustBench's ``Standard_R50`` is torchvision's
    IMAGENET1K_V1 resnet50, built with ``pretrained=True``)."""
    import timm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    url = None
    if timm.is_model(timm_name):
        url = timm.models.get_pretrained_cfg(timm_name).url
    elif gdrive == "" and spec.endswith("Standard_R50"):
        from torchvision.models import ResNet50_Weights

        url = ResNet50_Weights.IMAGENET1K_V1.url
    elif gdrive and not isinstance(gdrive, list) and not expected.is_file():
        raise UserError(f"the checkpoint for {spec} is not at {expected} and CEMABENCH_OFFLINE=1: put RobustBench's "
                        f"file there (Google Drive id {gdrive}), or set CEMABENCH_ROBUSTBENCH_DIR to a folder "
                        f"holding {expected.relative_to(expected.parents[2])}")
    if url and not hub_checkpoint(url).is_file():
        raise UserError(f"the weights of {spec} are not cached and CEMABENCH_OFFLINE=1: put {os.path.basename(url)} "
                        f"(from {url}) at {hub_checkpoint(url)}")


def _parse(name: str) -> tuple[str, str, str]:
    parts = name.split("/")
    if len(parts) == 1:
        return "imagenet", "corruptions", parts[0]
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    raise UserError(f"robustbench models are named robustbench:NAME or robustbench:DATASET/THREAT/NAME, got {name!r}")


def robustbench_model(name: str) -> nn.Module:
    """A RobustBench zoo model in eval mode; see the module docstring for names and where checkpoints go."""
    dataset, threat, model_name = _parse(name)
    utils = import_robustbench()
    if dataset not in DATASETS:
        raise UserError(f"robustbench has no dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    threats = [t.value for t in ThreatModel]
    if threat not in threats:
        raise UserError(f"robustbench has no threat model {threat!r}; valid: {', '.join(threats)}")
    stored_as = threat.replace("_3d", "")  # RobustBench keeps its 3D-corruption models with the corruption ones
    zoo = utils.all_models[BenchmarkDataset(dataset)][ThreatModel(stored_as)]
    if model_name not in zoo:
        raise UserError(f"robustbench has no {dataset}/{threat} model {model_name!r}; valid: {', '.join(zoo)}")
    spec = f"robustbench:{name}"
    root = checkpoint_dir()
    expected = root / dataset / stored_as / f"{model_name}.pt"
    if os.environ.get("CEMABENCH_OFFLINE") == "1":
        timm_name = f"{model_name.lower().replace('-', '_')}_{dataset}_{stored_as}"
        _check_offline(spec, timm_name, zoo[model_name]["gdrive_id"], expected)
    try:
        net = utils.load_model(model_name, model_dir=str(root), dataset=dataset, threat_model=threat)
    except pickle.UnpicklingError as error:
        raise UserError(f"{expected} holds pickled objects that torch refuses to load by default; if you trust the "
                        f"file, set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 ({str(error).splitlines()[0]})") from error
    except (OSError, RuntimeError, ValueError) as error:
        raise UserError(f"robustbench could not build {spec} ({type(error).__name__}: {str(error).splitlines()[0]}); "
                        f"offline, set CEMABENCH_OFFLINE=1 to be told which file to put where"
                        ) from error
    return net.eval()
