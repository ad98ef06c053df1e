"""Real size: images per second of `cemabench run` on an ImageNet-C tree of 224 px JPEGs, against a bare PyTorch loop
that does the same work (torchvision's ImageFolder and a DataLoader with the same workers, the same forwards and
backwards), side by side in one run.

    CEMABENCH_BENCH_IMAGES_PER_DOMAIN=1000 pytest -m "slow or not slow" tests/benchmarks/test_real_size.py \\
        --benchmark-enable --benchmark-group-by=param:method

Three domains of ``CEMABENCH_BENCH_IMAGES_PER_DOMAIN`` images (default 4, which is what the tiers run once, untimed:
source in the default tier, tent and cema in the slow one), torchvision ResNet-18 (edge) and ResNet-50 (foundation) with
seeded random weights saved as checkpoints, batch 64, ``CEMABENCH_BENCH_WORKERS`` DataLoader workers (default 0), one
intra-op thread on CPU (what run_unit uses), ``CEMABENCH_BENCH_DEVICE`` (default cpu). Both sides build each model once
from its checkpoint, inside the timed call, and give every domain a fresh copy, as the per-domain protocol does. The
bare loop of a method with a cloud wires the method's own halves without the protocol: edge step, the uploaded rows,
cloud step, the download applied. ``cema`` runs with ``entropy_max = 1`` (random weights put every sample near the
maximum entropy, so the released threshold would upload nothing and leave the cloud idle).
"""
import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from cemabench.cli import main
from cemabench.datasets.imagenet import imagenet_wnids
from cemabench.method import CloudReply, CloudResources, Upload
from cemabench.protocol.execution import warm_allocator
from cemabench.protocol.stream import domain_order
from cemabench.registry import build_method, build_model

DEVICE = os.environ.get("CEMABENCH_BENCH_DEVICE", "cpu")
IMAGES = int(os.environ.get("CEMABENCH_BENCH_IMAGES_PER_DOMAIN", 4))
WORKERS = int(os.environ.get("CEMABENCH_BENCH_WORKERS", 0))
DOMAINS = ("gaussian_noise", "fog", "contrast")
CLASSES = 10  # class folders the images are spread over (ImageNet's first ten wnids)
METHODS = {"source": {}, "tent": {}, "cema": {"entropy_max": 1.0}}
BATCH = 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-size")
    wnids = imagenet_wnids()[:CLASSES]
    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        for i in range(IMAGES):
            folder = root / "imagenet-c" / domain / "5" / wnids[i % CLASSES]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"ILSVRC2012_val_{i:08d}.JPEG", "JPEG", quality=85)
    models = {}
    for arch in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        net = getattr(__import__("torchvision").models, arch)()
        models[arch] = root / f"{arch}.pth"
        torch.save(net.state_dict(), models[arch])
    return root, models





def _loader(root, domain):
    """torchvision's ImageFolder over the domain's folder, in the protocol's sample order, batches of 64."""
    data = ImageFolder(str(root / "imagenet-c" / domain / "5"), transform=v2.PILToTensor())
    order = domain_order(0, domain, len(data)).tolist()
    batches = [order[i:i + BATCH] for i in range(0, len(order), BATCH)]
    return DataLoader(data, batch_sampler=batches, num_workers=WORKERS, pin_memory=DEVICE.startswith("cuda"))


def bare(root, models, method_name):
    """The models built once from their checkpoints, a fresh copy per domain (as the per-domain protocol gives each
    unit), and the method's work, nothing more."""
    warm_allocator()  # the allocator the harness sets (an allocator setting, as the thread count)
    prototypes = {arch: build_model(f"torchvision:{arch}@{path}").to(DEVICE) for arch, path in models.items()}
    predicted = []
    for domain in DOMAINS:
        method = build_method(method_name, METHODS[method_name])
        logic = method.edge(1000)
        edge = logic.configure(copy.deepcopy(prototypes["resnet18"]))
        edge.requires_grad_(False)
        cloud = method.cloud(CloudResources(1000, edge_replica=lambda: copy.deepcopy(prototypes["resnet18"]),
                                            foundation=lambda: copy.deepcopy(prototypes["resnet50"]),
                                            clean_images=lambda n: torch.empty(0), device=torch.device(DEVICE)))
        position = 0
        for i, (pixels, _) in enumerate(_loader(root, domain)):
            x = pixels.to(DEVICE, non_blocking=True).float().div_(255)
            with torch.inference_mode():
                decision = logic.step(edge, x)
            if cloud is not None:
                index = decision.upload if decision.upload is not None else torch.empty(0, dtype=torch.long)
                index = index.to(x.device)
                reply = cloud.step(Upload(samples=x[index], tensors={k: v.clone() for k, v in decision.tensors.items()},
                                          batch_index=i, index=index, sample_ids=index + position))
                download = reply.download if isinstance(reply, CloudReply) else reply
                if download:
                    with torch.no_grad():
                        logic.receive(edge, {k: v.clone() for k, v in download.items()})
            predicted.append(decision.logits.argmax(1).cpu())
            position += len(x)
    return len(torch.cat(predicted))


def through_cemabench(root, models, method_name, store, isolate=False):
    options = [a for k, v in METHODS[method_name].items() for a in ("--option", f"{k}={v}")]
    options += ["--isolate"] if isolate else []
    code = main(["run", "--method", method_name, *options, "--dataset", "imagenet-c", "--data-root", str(root),
                 "--domains", *DOMAINS, "--severity", "5", "--edge", f"torchvision:resnet18@{models['resnet18']}",
                 "--foundation", f"torchvision:resnet50@{models['resnet50']}", "--dataset-option",
                 f"workers={WORKERS}", "--device", DEVICE, "--jobs", "1", "--store", str(store)])
    assert code == 0
    return IMAGES * len(DOMAINS)


# source runs in the default tier (once, untimed); tent and cema at real size are the slow tier's (20 s as plain checks)
SIZED = [m if m == "source" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]


@pytest.mark.parametrize("method", SIZED)
def test_bare_loop(benchmark, tree, method):
    root, models = tree
    benchmark.group = f"real size {method}"
    seen = benchmark.pedantic(bare, args=(root, models, method), rounds=1, iterations=1)
    assert seen == IMAGES * len(DOMAINS)
    if benchmark.stats:
        benchmark.extra_info["images_per_second"] = seen / benchmark.stats.stats.mean


# --isolate: each unit's halves in processes of their own (what isolation costs at real size; the slow tier runs it
# once, untimed: the zygote's start is seconds)
@pytest.mark.parametrize("isolate", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["in-process", "isolated"])
@pytest.mark.parametrize("method", SIZED)
def test_cemabench_run(benchmark, tree, method, tmp_path, isolate):
    root, models = tree
    benchmark.group = f"real size {method}"
    stores = iter(tmp_path / f"store{i}" for i in range(100))  # a fresh store per round: nothing is reused
    seen = benchmark.pedantic(lambda: through_cemabench(root, models, method, next(stores), isolate), rounds=1,
                              iterations=1)
    if benchmark.stats:
        benchmark.extra_info["images_per_second"] = seen / benchmark.stats.stats.mean
