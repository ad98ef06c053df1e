"""Images per second of the full CEMA loop against the plain forward of the edge model, at ImageNet size.

    CEMABENCH_BENCH_DEVICE=cuda CEMABENCH_BENCH_MODELS=resnet pytest tests/benchmarks --benchmark-enable

``resnet`` uses torchvision ResNet-50 (edge) and ResNet-101 (foundation) with random weights (throughput does not
depend on the weights); the default ``tiny`` uses the tiny random models, which is what fits a laptop CPU.
``CEMABENCH_BENCH_IMAGES`` sets the stream length (default 128).

Random weights give every sample near-maximal entropy, so CEMA's own filter would upload nothing and the cloud
would sit idle. The loop therefore runs CEMA's edge-cloud machinery with uniform uploads at CEMA's published
severity-5 rate (28.9% of samples, the mean of ``reproduce/cema-upload-counts.csv``): the cost of a real run.
"""
import os

import numpy as np
import pytest
import torch

from cemabench.data import ArrayDomain
from cemabench.protocol import Execution, ForwardOnlyEdge, Models, Protocol, run_unit
from cemabench.registry import build_method, build_model

DEVICE = os.environ.get("CEMABENCH_BENCH_DEVICE", "cpu")
PAIRS = {"tiny": ("tiny:edge", "tiny:foundation"),
         "resnet": ("torchvision:resnet50@none", "torchvision:resnet101@none")}
IMAGES = int(os.environ.get("CEMABENCH_BENCH_IMAGES", 128))
CEMA_SEVERITY_5_UPLOAD_RATIO = 0.289


@pytest.fixture(scope="module")
def setup():
    edge, foundation = (build_model(m) for m in PAIRS[os.environ.get("CEMABENCH_BENCH_MODELS", "tiny")])
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, IMAGES)
    domain = ArrayDomain("noise", rng.integers(0, 256, (IMAGES, 224, 224, 3), dtype=np.uint8), lambda: labels)
    return Models.copies_of(edge, foundation), domain


def test_edge_forward_images_per_second(benchmark, setup):
    models, domain = setup
    edge = ForwardOnlyEdge(models.edge().to(DEVICE), build_method("source").edge(1000))
    x = domain.images(np.arange(64)).to(DEVICE)

    def forward():
        edge.step(x, 1000)
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()

    benchmark(forward)
    if benchmark.stats:  # None under --benchmark-disable, where this runs once as a plain test
        benchmark.extra_info["images_per_second"] = 64 / benchmark.stats.stats.mean


@pytest.mark.slow  # 19 s as a plain test: CEMA's cloud trains on 224 px replays (the edge forward above stays)
def test_cema_loop_images_per_second(benchmark, setup):
    models, domain = setup
    method = build_method("random-upload", {"upload_ratio": CEMA_SEVERITY_5_UPLOAD_RATIO, "replay_min": 64})
    result = benchmark.pedantic(run_unit, args=(method, [domain], models, 1000, None, Protocol(), 0,
                                                Execution(DEVICE)), rounds=2, iterations=1)
    assert result[0].status == "ok", result[0].message
    assert result[0].cloud_forward_samples_grad > 0
    if benchmark.stats:
        benchmark.extra_info["images_per_second"] = IMAGES / benchmark.stats.stats.mean
        benchmark.extra_info["upload_ratio"] = result[0].upload_ratio
