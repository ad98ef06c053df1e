"""The harness's overhead: the same `source` stream as a bare PyTorch loop and through the protocol, as a pair.

    pytest tests/benchmarks/test_overhead.py --benchmark-enable                               # miniature
    CEMABENCH_BENCH_MODELS=resnet pytest tests/benchmarks/test_overhead.py --benchmark-enable # + ResNet-50, 224 px
    (and CEMABENCH_BENCH_DEVICE=cuda for the GPU)

Each group holds the bare loop and the protocol on the same images and model; the ratio of their means is the
overhead (online scoring, the link, the forward-only meter that sees every op and counts FLOPs, the parameter seal).
"""
import copy
import os

import numpy as np
import pytest
import torch

from cemabench.data import ArrayDomain
from cemabench.datasets import miniature
from cemabench.models.mini import load_model
from cemabench.protocol import Execution, Models, Protocol, run_unit
from cemabench.protocol.execution import warm_allocator
from cemabench.protocol.stream import domain_order
from cemabench.registry import build_method, build_model

DEVICE = os.environ.get("CEMABENCH_BENCH_DEVICE", "cpu")
# run_unit runs a unit with one intra-op thread on CPU (deterministic numbers); the bare loop gets the same
pytestmark = pytest.mark.usefixtures("one_torch_thread")
IMAGES = int(os.environ.get("CEMABENCH_BENCH_IMAGES", 128))
ROUNDS = int(os.environ.get("CEMABENCH_BENCH_ROUNDS", 3))


def _case(name: str):
    if name == "miniature":
        domain = miniature.dataset(domains=["fog"]).domains[0]
        return domain, load_model("edge"), 10
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, IMAGES)
    domain = ArrayDomain("noise", rng.integers(0, 256, (IMAGES, 224, 224, 3), dtype=np.uint8), lambda: labels)
    return domain, build_model("torchvision:resnet50@none").eval(), 1000


CASES = ["miniature"] + (["resnet50"] if os.environ.get("CEMABENCH_BENCH_MODELS") == "resnet" else [])


@pytest.fixture(scope="module", params=CASES)
def case(request):
    return request.param, *_case(request.param)


def _bare(domain, model, seed=0):
    """What a user would write: the same order, batches of 64, eval-mode forward, argmax, scored afterwards; with
    the allocator the harness sets (an allocator setting, as the thread count)."""
    warm_allocator()
    order = domain_order(seed, domain.name, len(domain))
    predicted = []
    with torch.inference_mode():
        for x in domain.batches(order, 64):
            predicted.append(model(x.to(DEVICE)).argmax(1).cpu())
    return int((torch.cat(predicted) == torch.from_numpy(domain.labels()[order])).sum())


def test_bare_loop(benchmark, case):
    name, domain, model, _ = case
    benchmark.group = f"overhead {name}"
    correct = benchmark.pedantic(_bare, args=(domain, model.to(DEVICE)), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert correct >= 0


def test_protocol_loop(benchmark, case):
    name, domain, model, classes = case
    benchmark.group = f"overhead {name}"
    # a fresh copy per unit, made before the clock runs (the bare loop's model is built beforehand too): a unit
    # attaches its sample counter to the model it gets, and the bare loop's model must stay as the user built it
    copies = iter([copy.deepcopy(model) for _ in range(ROUNDS + 2)])
    models = Models(edge=lambda: next(copies), foundation=lambda: next(copies))
    args = (build_method("source"), [domain], models, classes, None, Protocol(batch_size=64), 0, Execution(DEVICE))
    (result,) = benchmark.pedantic(run_unit, args=args, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert result.status == "ok" and result.correct == _bare(domain, model.to(DEVICE))
