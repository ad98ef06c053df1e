"""Periodic reset (protocol ``reset_every``): the halves return to their source state exactly, and ETA under it is
RDumb."""
import copy
import types

import pytest
import torch
from test_isolation import _both, _spec

from cemabench import registry
from cemabench.config import Protocol, with_link
from cemabench.errors import UserError
from cemabench.protocol import run_unit
from cemabench.tables.plan import plan
from cemabench.tables.spec import load_table
from cemabench_methods.eata import EATA
from conftest import numbers, tiny_dataset


def _state(obj) -> dict:
    """Every tensor and plain value an object holds: a module's parameters and buffers, an optimiser's state, and
    the rest of its attributes (models and optimisers by their state dicts; the recording wrappers left out)."""
    out = {}
    for name, value in vars(obj).items():
        if isinstance(value, types.FunctionType):
            continue
        if isinstance(value, torch.nn.Module):
            out[name] = {k: v.clone() for k, v in value.state_dict().items()}
        elif isinstance(value, torch.optim.Optimizer):
            out[name] = copy.deepcopy(value.state_dict())
        elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.Tensor)):
            out[name] = _state(value)
        else:
            out[name] = copy.deepcopy(value)
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class Recorded(EATA):
    """EATA (a Fisher computed when the cloud is built, a momentum optimiser, the edge's running redundancy mean),
    whose cloud also draws random numbers when built; every step first records the whole state of its half."""

    name = "eata"

    def __init__(self, log, **options):
        super().__init__(**options)
        self.log = log

    def edge(self, num_classes):
        logic, log = super().edge(num_classes), self.log
        step = logic.step

        def recorded(model, x):
            log.append(("edge", {"model": {k: v.clone() for k, v in model.state_dict().items()},
                                 "logic": _state(logic)}))
            return step(model, x)

        logic.step = recorded
        return logic

    def cloud(self, resources):
        cloud, log = super().cloud(resources), self.log
        cloud.drawn = torch.rand(3)  # a build that draws: a reset must draw the same
        step = cloud.step

        def recorded(upload):
            log.append(("cloud", _state(cloud)))
            return step(upload)

        cloud.step = recorded
        return cloud


OPTIONS = {"entropy_margin": 1.0, "lr": 0.05, "fisher_size": 16, "fisher_batch": 8}


def _steps(reset_every, tiny_models):
    dataset = tiny_dataset(n=32)
    log = []
    results = run_unit(Recorded(log, **OPTIONS), dataset.domains, tiny_models, 4, dataset.clean,
                       Protocol(batch_size=16, setting="continual", reset_every=reset_every), seed=0)
    assert all(r.status == "ok" for r in results), [r.message for r in results]
    return [entry for side, entry in log if side == "edge"], [entry for side, entry in log if side == "cloud"]


def test_a_reset_restores_every_parameter_buffer_and_optimiser_state_exactly(tiny):
    _, models = tiny
    edge, cloud = _steps(2, models)  # 3 domains of 2 batches in one stream: reset before batches 2 and 4
    plain_edge, plain_cloud = _steps(None, models)  # its batch 0: a freshly built unit's state
    assert len(edge) == len(cloud) == 6
    for t in (2, 4):
        assert _same(edge[t], plain_edge[0]) and _same(cloud[t], plain_cloud[0])
        # without the reset the unit is elsewhere by then: the comparison can fail
        assert not _same(plain_edge[t], plain_edge[0]) and not _same(plain_cloud[t], plain_cloud[0])
    assert cloud[2]["optimizer"]["state"] == {} and plain_cloud[2]["optimizer"]["state"] != {}


@pytest.mark.parametrize("devices", [1, 2])
def test_eta_under_reset_every_gives_rdumbs_cells(tiny, devices):
    """RDumb is ETA reset every ``reset_every`` batches: its own reset and the protocol's give the same cells, every
    count included, when ETA's step before each reset sends a download (it uploads every batch here: no redundancy
    filter, entropy margin ln C); without a delivery delay, RDumb's source parameters reach the edge just where the
    protocol's reset puts fresh halves."""
    dataset, models = tiny
    options = {"redundancy_margin": None, "entropy_margin": 1.0, "lr": 0.05}
    cells = {}
    for name, own, reset in (("eta", {}, 3), ("rdumb", {"reset_every": 3}, None), ("eta", {}, None)):
        results = run_unit(registry.build_method(name, {**options, **own}), dataset.domains, models, 4,
                           dataset.clean, Protocol(batch_size=16, setting="continual", reset_every=reset,
                                                   devices=devices), seed=0)
        cells[name, reset] = [{k: v for k, v in r.to_dict().items() if "seconds" not in k and "memory" not in k}
                              for r in results]
    assert cells["eta", 3] == cells["rdumb", None]
    assert [c["accuracy"] for c in cells["eta", 3]] != [c["accuracy"] for c in cells["eta", None]]


def test_reset_every_is_checked():
    with pytest.raises(UserError, match="reset_every must be an integer >= 1"):
        Protocol(reset_every=0)


@pytest.mark.slow  # about 100 s (205 s with one edge too, cold); kept out of the default tier's 5 minutes
def test_isolated_halves_reset_as_in_process(tmp_path):
    """Under --isolate a reset rebuilds the halves in their own processes, in the random state of the unit's start:
    CoTTA (random augmentation in the cloud) and EATA (a Fisher built with the cloud) give the in-process cells, on
    two edges sharing the cloud (one edge passed too, in 205 s for both)."""
    for devices in (2,):
        spec = _spec(tmp_path / str(devices), ["cotta", "eata"], domains=("fog", "snow"),
                     protocol=f'setting = "continual"\nreset_every = 2\ndevices = {devices}', batch_size=32)
        inline, isolated = _both(spec, tmp_path / str(devices))
        assert all(c["status"] == "ok" for c in inline["cells"])
        assert numbers(isolated) == numbers(inline)
        for key in ("edge_flops", "cloud_flops"):
            assert [c[key] for c in isolated["cells"]] == [c[key] for c in inline["cells"]]


def test_a_table_entry_sets_its_own_reset_and_is_keyed_apart(tmp_path):
    """A periodic-reset Tent beside plain Tent: the entry's own protocol fields (``link = {...}``) admit reset_every;
    its units carry it (the store key hashes the unit), and a bad value is the entry's one-line error."""
    spec_file = tmp_path / "t.toml"
    head = ('name = "t"\ntitle = "t"\n[protocol]\nbatch_size = 8\nsetting = "continual"\n[data]\nseverity = 5\n'
            'domains = ["fog"]\n[data.real]\ndataset = "miniature-digits-c"\nedge = "mini:edge"\n'
            'foundation = "mini:foundation"\n[[methods]]\nname = "tent"\n[[methods]]\nname = "tent"\n'
            'label = "tent-reset"\n')
    spec_file.write_text(head + "link = { reset_every = 3 }\n")
    spec = load_table(str(spec_file))
    plain, reset = plan(spec, spec.real, spec.seeds)
    assert plain.link == () and reset.link == (("reset_every", 3),)
    assert with_link(spec.protocol, dict(reset.link)).reset_every == 3 and spec.protocol.reset_every is None
    spec_file.write_text(head + "link = { reset_every = 0 }\n")
    with pytest.raises(UserError, match=r"#2: protocol reset_every must be an integer >= 1"):
        load_table(str(spec_file))
