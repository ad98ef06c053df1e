"""At most one host-device synchronisation per edge batch, the seal included: the harness's checks of a batch are
flags read together (cemabench.protocol.checks), predictions stay on the device until their block ends, and steps
are timed with events. On CPU the test counts the calls that would synchronise on a GPU: the ops that hand a value
to Python or have a data-dependent shape, and the harness's reads of its flags."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cemabench.method import CloudEdgeMapping, CloudLogic, CloudReply, EdgeDecision, EdgeLogic, Method
from cemabench.protocol import Models, Protocol, hygiene, run_unit
from cemabench.protocol import checks as device_checks
from cemabench.protocol.checks import Checks
from conftest import TinyNet, tiny_dataset

aten = torch.ops.aten
# ops that wait for the device on a GPU: a value handed to Python, or an output whose size depends on the values
SYNCING = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default, aten.nonzero.default,
           aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
           aten.masked_select.default, aten.item.default}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


class _Edge(EdgeLogic):
    """Uploads every other sample and awaits nothing; or, offloading, uploads all and awaits the answers."""

    def __init__(self, offload: bool):
        self.offload = offload

    def step(self, model, x):
        logits = model(x)
        if self.offload:
            return EdgeDecision(None, torch.arange(len(x), device=x.device), await_answers=True)
        return EdgeDecision(logits, torch.arange(0, len(x), 2, device=x.device), tensors={"mean": x.mean((0, 2, 3))})


class _Cloud(CloudLogic):
    def __init__(self, resources, offload: bool):
        self.model, self.offload = resources.foundation(), offload

    def step(self, upload):
        if self.offload:
            with torch.no_grad():
                return CloudReply(answers=self.model(upload.samples))
        return {"bn.weight": torch.ones(4, device=upload.samples.device) * 0.5}


class _SyncFree(Method):
    """A method whose own code never synchronises, so that every synchronisation counted is the harness's."""

    name = "sync-free"
    mapping = CloudEdgeMapping("-", "-", "-", "-")
    offload = False

    def edge(self, num_classes):
        return _Edge(self.offload)

    def cloud(self, resources):
        return _Cloud(resources, self.offload)


class _Offloading(_SyncFree):
    name = "sync-free-offload"
    offload = True


def _run(method, setting="per-domain", monkeypatch=None):
    dataset = tiny_dataset(domains=("a", "b"), n=40)
    torch.manual_seed(0)
    models = Models.copies_of(TinyNet().eval(), TinyNet().eval())
    reads = []
    real = Checks.read

    def counted(self):
        reads.append(len(self))
        return real(self)

    monkeypatch.setattr(Checks, "read", counted)
    # the CPU compares the seal and reads the flags on the host (torch.equal, a read per flag: on a GPU each would
    # wait for the device); here it takes the GPU's way, so that what is counted is what a GPU would do
    monkeypatch.setattr(device_checks, "ON_HOST", ())
    monkeypatch.setattr(hygiene, "_SEALED", hygiene._harness_code())  # wrapped on purpose: what the units must find
    counter = SyncCounter()
    with counter:
        results = run_unit(method, dataset.domains, models, 4, dataset.clean, Protocol(batch_size=16, setting=setting),
                           seed=0)
    return results, counter.ops, [n for n in reads if n]


def test_the_harness_synchronises_once_per_edge_batch(monkeypatch):
    for method in (_SyncFree(), _Offloading()):
        results, syncing, reads = _run(method, monkeypatch=monkeypatch)
        assert all(r.status == "ok" for r in results), [r.message for r in results]
        batches = sum(-(-r.seen // 16) for r in results)  # 3 batches of each 40-sample domain
        assert batches == 6
        assert syncing == [], syncing  # no .item(), no torch.equal, no data-dependent shape in the harness
        # one read per batch (seal, indices, logits, the last reply's downloads and answers), and one per block end
        assert len(reads) <= batches + len(results), reads


def test_one_read_also_under_a_continual_stream_with_downloads(monkeypatch):
    results, syncing, reads = _run(_SyncFree(), setting="continual", monkeypatch=monkeypatch)
    assert [r.status for r in results] == ["ok", "ok"] and results[0].link.downloads == 3
    assert syncing == [] and len(reads) <= 6 + 2


def test_the_read_still_refuses_what_it_checks(monkeypatch):
    """Deferred to the batch's read, the checks still end the unit: a non-finite download, at the batch it was sent."""

    class NaNDownload(_SyncFree):
        def cloud(self, resources):
            class Cloud(CloudLogic):
                def step(self, upload):
                    return {"bn.weight": torch.full((4,), float("nan"))}
            return Cloud()

    results, syncing, _ = _run(NaNDownload(), setting="continual", monkeypatch=monkeypatch)
    assert results[0].status == "diverged" and "non-finite parameters at batch 0" in results[0].message
    assert results[1].status == "skipped" and syncing == []


def test_both_ways_of_reading_the_seal_name_exactly_the_changed_parameters(monkeypatch):
    """The GPU's way (one concatenation, one comparison, a segmented reduction per group) and the CPU's (torch.equal
    on the host, of the group as one copy or per parameter) flag the same parameters, here all run on the CPU; the
    CPU's is the default there."""
    from cemabench.protocol import edge as edge_module
    from cemabench.registry import build_method

    assert device_checks.ON_HOST == ("cpu",)
    edge = edge_module.ForwardOnlyEdge(TinyNet().eval(), build_method("source").edge(4))
    params = edge._parameters()
    ways = [(None, edge_module.SEAL_COPY_ELEMENTS), (True, edge_module.SEAL_COPY_ELEMENTS), (True, 0), (False, 0)]
    for on_host, copy_limit in ways:
        monkeypatch.setattr(edge_module, "SEAL_COPY_ELEMENTS", copy_limit)
        assert [b for _, flags in edge._value_flags(params, on_host) for b in flags.tolist()] == [False] * len(params)
    params["bn.weight"].detach().numpy()[1] += 1.0  # behind torch's back
    params["fc.bias"].detach().numpy()[0] = float("nan")
    for on_host, copy_limit in ways:
        monkeypatch.setattr(edge_module, "SEAL_COPY_ELEMENTS", copy_limit)
        flagged = [n for names, flags in edge._value_flags(params, on_host) for n, b in zip(names, flags.tolist())
                   if b]
        assert flagged == ["bn.weight", "fc.bias"], (on_host, copy_limit, flagged)
