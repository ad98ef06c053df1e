import copy
import dataclasses
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cemabench.data import ArrayDomain, DatasetSource
from cemabench.method import CloudResources
from cemabench.protocol import Models


def builtin_methods() -> list[str]:
    """The built-in roster: the method entry points that cemabench's own distribution declares (pyproject.toml), so
    that a new built-in method is picked up by every test without editing a list."""
    eps = metadata.distribution("cemabench").entry_points.select(group="cemabench.methods")
    return sorted(ep.name for ep in eps)


# Small values for options that only matter at scale, set wherever a method has them (not by method name), so that
# every method runs on a few dozen samples: the cloud batch and replay threshold, a rate for rate-matched uploads,
# short offline training, and few training steps per batch.
SMALL = {"cloud_batch": 8, "replay_min": 16, "upload_ratio": 0.5, "epochs": 1, "ka_epochs": 1, "ft_epochs": 1,
         "gate_epochs": 1, "train_samples": 64, "steps": 0, "warm_up_samples": 64}


def small_options(name: str) -> dict:
    """The options of SMALL that the registered method ``name`` has."""
    from cemabench.registry import load_method

    fields = {f.name for f in dataclasses.fields(load_method(name).Options)}
    return {k: v for k, v in SMALL.items() if k in fields}


def granted_labels(name: str) -> dict:
    """A label budget for the registered method ``name`` when it declares ``uses_labels`` (active TTA methods run
    only where the protocol grants one), else nothing: protocol fields for the roster's generic runs."""
    from cemabench.registry import load_method

    return {"label_budget": 4} if load_method(name).uses_labels else {}


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Corrupted miniature domains are generated into a cache private to this test session."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CEMABENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(params=["native", "python"])
def meter_kind(request, monkeypatch):
    """Each of the meter's two implementations (cemabench.protocol.native): the C++ one must build here."""
    from cemabench.protocol import native

    if request.param == "python":
        monkeypatch.setattr(native, "_loaded", {"module": None, "why": "the test asks for the Python meter"})
    else:
        monkeypatch.delenv("CEMABENCH_METER", raising=False)
        assert native.meter_module() is not None, native._loaded.get("why")
    return request.param


class TinyNet(nn.Module):
    """A BatchNorm network small enough for exact, fast protocol tests."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def tiny_dataset(domains=("a", "b", "c"), n=100, classes=4, seed=0, size=8) -> DatasetSource:
    """Random ``size`` x ``size`` images with random labels (at 4 px, the miniature nets' last stage has 1x1 maps)."""
    rng = np.random.default_rng(seed)
    def domain(name):
        pixels, labels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, classes, n)
        return ArrayDomain(name, pixels, lambda: labels)

    made = [domain(d) for d in domains]
    clean = domain("clean")
    return DatasetSource("tiny", classes, made, clean, is_miniature=False)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    edge, foundation = TinyNet().eval(), TinyNet().eval()
    return tiny_dataset(), Models.copies_of(edge, foundation)


@pytest.fixture
def float64():
    """Method conformance tests run in float64, so that hand-derived values match tightly."""
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(torch.float32)


def cloud_resources(counter=None, classes=4) -> CloudResources:
    """Cloud resources over TinyNet edge and foundation models, with fixed clean images."""
    torch.manual_seed(1)
    edge, foundation = TinyNet(classes), TinyNet(classes)
    clean = torch.rand(40, 3, 6, 6)

    def fresh(model):
        clone = copy.deepcopy(model)
        return counter.attach(clone) if counter else clone

    return CloudResources(num_classes=classes, edge_replica=lambda: fresh(edge), foundation=lambda: fresh(foundation),
                          clean_images=lambda n: clean[:n])


@pytest.fixture
def robustbench_not_installed(monkeypatch):
    """The interpreter as it looks without the robustbench package."""
    find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "robustbench.utils", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "robustbench" else find_spec(name, *a))


PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture
def plugins(monkeypatch):
    """The test distribution cemabench-test-plugins (tests/plugins: the README example, broken and hostile method
    plugins), found through its entry points exactly as an installed distribution; forgotten afterwards."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    yield PLUGINS
    for name, module in list(sys.modules.items()):
        if PLUGINS in Path(getattr(module, "__file__", None) or "/").parents:
            del sys.modules[name]


def write_spec(path, methods, domains=("fog",), images=320) -> str:
    """A small miniature table spec of ``methods`` over ``domains`` (their first ``images`` images: five batches, or
    the whole domain with None) at ``path``; returns the path for the CLI."""
    lines = ['name = "small"', 'title = "a small table"', "[protocol]", "batch_size = 64", 'setting = "per-domain"',
             "[data]", "severity = 5", f"domains = {list(domains)!r}".replace("'", '"')]
    models = ['edge = "mini:edge"', 'foundation = "mini:foundation"']
    lines += ["[data.miniature]", 'dataset = "miniature-digits-c"', *models]
    lines += [f"options = {{ n_examples = {images} }}"] if images else []
    lines += ["[data.real]", 'dataset = "imagenet-c"', *models]
    lines += [line for name in methods for line in ("[[methods]]", f'name = "{name}"')]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


RESULT_NUMBERS = ("status", "seen", "correct", "accuracy", "upload_percent", "link", "edge_forward_samples",
                  "cloud_forward_samples_grad", "cloud_forward_samples_nograd")


def numbers(doc: dict) -> list[dict]:
    """What two runs of one table must agree on, cell by cell."""
    return [{k: c[k] for k in ("method", "domain", "seed") + RESULT_NUMBERS} for c in doc["cells"]]


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process runs use one torch thread: on a shared, oversubscribed machine two spin far slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def local_ray(monkeypatch):
    """A local Ray for one test. Its workers run at the test process's priority: Ray starts them at nice 15, which
    under pytest-xdist (other test processes at nice 0 on the same cores) made two small units take 190 s instead of
    10 s. Workers inherit the driver's environment, so a test can set theirs before asking for this fixture."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_worker_niceness", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def reproduce_tiny(spec, root, out, *more: str) -> int:
    """``cemabench reproduce SPEC`` on the real-layout tree ``root`` with the tiny 1000-class zoo models, no loader
    workers and no progress bar, writing to ``out``; ``more`` are further arguments. Returns the exit code."""
    from cemabench.cli import main

    return main(["reproduce", str(spec), "--data-root", str(root), "--out", str(out), "--edge", "tiny:edge",
                 "--foundation", "tiny:foundation", "--dataset-option", "workers=0", "--no-progress", *more])
