"""Speed of the CEMA loop on the miniature: ``pytest tests/benchmarks --benchmark-enable`` (or ``tox -e bench``)."""

import numpy as np
import pytest

from cemabench.datasets import miniature
from cemabench.method import Upload
from cemabench.models.mini import load_model
from cemabench.protocol import ForwardOnlyEdge, Models, Protocol, run_unit
from cemabench.registry import build_method


@pytest.fixture(scope="module")
def setup():
    dataset = miniature.dataset(severity=5, domains=["fog"])
    models = Models.copies_of(load_model("edge"), load_model("foundation"))
    x = dataset.domains[0].images(np.arange(64))
    return dataset, models, x


def test_edge_forward_source(benchmark, setup):
    _, models, x = setup
    edge = ForwardOnlyEdge(models.edge(), build_method("source").edge(10))
    benchmark(edge.step, x, 10)


def test_cema_edge_step(benchmark, setup):
    _, models, x = setup
    edge = ForwardOnlyEdge(models.edge(), build_method("cema", {"redundancy_margin": 0.5}).edge(10))
    benchmark(edge.step, x, 10)


def test_cema_cloud_step_with_replay(benchmark, setup):
    """One cloud batch of 32 uploads: a foundation step, then distillation on 32 + 96 replayed samples."""
    dataset, models, x = setup
    from cemabench.method import CloudResources

    resources = CloudResources(10, models.edge, models.foundation, lambda n: x[:n])
    cloud = build_method("cema").cloud(resources)
    cloud.replay.extend(dataset.domains[0].images(np.arange(300)).unbind(0))
    upload = Upload(samples=x[:32], tensors={}, batch_index=0)
    benchmark(cloud.step, upload)


def test_cema_full_miniature_domain(benchmark, setup):
    """1,079 fog images at severity 5, edge batch 64, the whole cloud-edge loop."""
    dataset, models, _ = setup
    method = build_method("cema", {"redundancy_margin": 0.5})
    result = benchmark.pedantic(run_unit, args=(method, dataset.domains, models, 10, dataset.clean, Protocol(), 0),
                                rounds=3, iterations=1)
    assert result[0].status == "ok"


@pytest.fixture(scope="module", params=["batchnorm", "batch-renorm"])
def normalisation(request):
    """A training-mode normalisation layer on the miniature foundation's first stage (128 x 16 x 32 x 32)."""
    import torch
    from torch import nn

    from cemabench_methods.common import BatchRenorm2d

    bn = nn.BatchNorm2d(16)
    layer = bn if request.param == "batchnorm" else BatchRenorm2d(bn)
    x = torch.randn(128, 16, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
    layer.train()(x.detach())  # batch renormalisation initialises its statistics on its first batch
    return request.param, layer, x


@pytest.mark.usefixtures("one_torch_thread")
def test_normalisation_forward_backward(benchmark, normalisation):
    """CEMA's batch renormalisation against native BatchNorm, forward and backward (the pair's ratio is its cost)."""
    name, layer, x = normalisation
    benchmark.group = "normalisation forward+backward"

    def step():
        layer(x).square().mean().backward()

    benchmark(step)
