"""What ``--isolate`` costs a run unit, side by side with the same unit in-process (issue 22, scope 4):

    pytest -m "slow or not slow" tests/benchmarks/test_isolation_cost.py --benchmark-enable -n 0

One Tent unit over 512 images of the miniature's fog domain (8 batches of 64): the isolated unit forks its two halves
from the zygote, sets them up (the method, the models and the clean split cross as pickles) and sends every batch,
upload, download and reply across as bytes. The zygote itself starts once per process, before the first round.
"""
import pytest

from cemabench.protocol import Execution, Models, Protocol, run_unit
from cemabench.protocol.zygote import _zygote_connection
from cemabench.registry import build_method, build_model, dataset_factory

IMAGES = 512


@pytest.fixture(scope="module")
def unit():
    data = dataset_factory("miniature-digits-c", {})(data_root=None, severity=5, domains=("fog",))
    fog = data.domains[0]
    domain = type(fog)(fog.name, fog.pixels[:IMAGES], lambda: fog.labels()[:IMAGES])
    models = Models.copies_of(build_model("mini:edge"), build_model("mini:foundation"))
    _zygote_connection()  # started once per process, as a run's first isolated unit would
    return domain, models, data


# the isolated unit is the slow tier's (a plain isolated Tent unit is in the default tier: tests/test_isolation.py)
@pytest.mark.parametrize("isolate", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["in-process", "isolated"])
def test_a_tent_unit(benchmark, unit, isolate):
    domain, models, data = unit

    def run():
        return run_unit(build_method("tent"), [domain], models, data.num_classes, data.clean, Protocol(), 0,
                        Execution(), isolate=isolate)

    (result,) = benchmark.pedantic(run, rounds=3, iterations=1)
    assert result.status == "ok", result.message
    assert result.seen == IMAGES and result.cloud_forward_samples_grad == IMAGES


def _reader(kind: str):
    """A forked process that reads each batch (as the harness's line does, or as multiprocessing's Connection does)
    and answers with a small message; ended by closing its line."""
    import os
    import socket
    from multiprocessing.connection import Connection

    import torch

    from cemabench.protocol import messages, wire

    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the reader
        ours.close()
        line = Connection(theirs.detach())
        while True:
            try:
                if kind == "line":
                    wire.decode(messages.receive(line))
                else:
                    torch.frombuffer(bytearray(line.recv_bytes()), dtype=torch.uint8)
            except EOFError:
                os._exit(0)
            messages.send(line, {"ok": 1})
    theirs.close()
    return pid, Connection(ours.detach())


@pytest.mark.parametrize("kind", ["line", "connection"])
def test_a_batch_of_imagenet_images_to_a_half(benchmark, kind):
    """A step's batch at ImageNet size (64 x 3 x 224 x 224 float32, 38.5 MB) to another process and a small reply:
    through the harness's line (written from where it lies, read in one copy, each tensor its span of the buffer),
    against multiprocessing's Connection with the tensor's bytes (the bare way; copied into bytes and out in pieces)."""
    import os

    import torch

    from cemabench.protocol import messages, wire

    x = torch.randn(64, 3, 224, 224)
    pid, line = _reader(kind)
    try:
        def send():
            if kind == "line":
                messages.send(line, ("step", (0, x), {}))
            else:
                line.send_bytes(x.numpy().tobytes())
            return wire.decode(messages.receive(line))

        assert benchmark.pedantic(send, rounds=10, iterations=1, warmup_rounds=1) == {"ok": 1}
    finally:
        line.close()
        os.waitpid(pid, 0)


@pytest.fixture(scope="module")
def read_apart():
    """The miniature's fog domain as cemabench's own dataset (read here) and as a plugin's (``plugin-digits`` of the
    test distribution, the same data: read in a reader process under ``--isolate``)."""
    import sys

    from cemabench.datasets.reader import Reader
    from conftest import PLUGINS

    sys.path.insert(0, str(PLUGINS))
    reader = Reader("plugin-digits", None)
    try:
        apart = reader.build({}, 5, ("fog",)).domains[0]
        here = dataset_factory("miniature-digits-c", {})(data_root=None, severity=5, domains=("fog",)).domains[0]
        yield {"here": here, "reader": apart}
    finally:
        reader.close()
        sys.path.remove(str(PLUGINS))


@pytest.mark.parametrize("where", ["here", "reader"])
def test_a_batch_of_a_dataset_plugin(benchmark, read_apart, where):
    """What a dataset plugin's batch costs under --isolate (64 images of 3 x 32 x 32, read in its reader and sent
    back as bytes), against the same batch read in this process: a run's batches cross twice (reader to loop, loop to
    the edge half)."""
    import numpy as np
    import torch

    domain = read_apart[where]
    order = np.arange(64)
    images = benchmark.pedantic(lambda: domain.images(order), rounds=30, iterations=1, warmup_rounds=2)
    assert torch.equal(images, read_apart["here"].images(order))
