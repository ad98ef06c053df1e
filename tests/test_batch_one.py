"""Batch size 1 is a first-class protocol setting: every registered method either runs at it, scoring every sample, or
is refused before any compute with one line that says why and which batch size it needs (the CLI exits 2)."""
import copy
import re

import pytest
import torch
from torch import nn

from cemabench.cli import main
from cemabench.errors import UserError
from cemabench.method import EdgeDecision, EdgeLogic, Method
from cemabench.protocol import Models, Protocol, run_unit
from cemabench.registry import build_method, build_model, load_method
from cemabench_methods.common import BatchRenorm2d, use_batch_statistics
from conftest import builtin_methods, granted_labels, small_options, tiny_dataset, write_spec

ROSTER = builtin_methods()  # the registry's built-in entry points: a new method is covered without editing a list
REFUSAL = re.compile(r"method (\S+) cannot run at batch size 1: [^\n;]+; use batch size >= (\d+)")


def _refuses(name: str) -> bool:
    return load_method(name).min_batch_size > 1


# 8 px (2x2 maps at the last stage) in the slow tier: the default tier's 4 px case is the stricter one
@pytest.mark.parametrize("size", [pytest.param(8, marks=pytest.mark.slow), 4], ids=["maps", "1x1-maps"])
@pytest.mark.parametrize("name", ROSTER)
def test_every_method_runs_at_batch_size_one_or_refuses_before_compute(name, size, one_torch_thread):
    """At 4 px the last stage's normalisation layers see one value per channel at batch size 1: a batch without
    statistics, which torch's BatchNorm refuses in training mode and an unbiased variance turns into NaN."""
    dataset = tiny_dataset(domains=("a", "b"), n=16, size=size)
    built = []

    def model():  # random 4-class miniature nets: they split at named stages, as the feature-offloading methods need
        built.append(1)
        return build_model("tiny:edge@4").eval()

    torch.manual_seed(0)
    method = build_method(name, small_options(name))
    protocol = Protocol(batch_size=1, setting="continual", **granted_labels(name))
    if _refuses(name):
        with pytest.raises(UserError) as refused:
            run_unit(method, dataset.domains, Models(model, model), 4, dataset.clean, protocol, seed=0)
        message = str(refused.value)
        assert REFUSAL.fullmatch(message), message
        assert REFUSAL.fullmatch(message).groups() == (name, str(load_method(name).min_batch_size))
        assert built == [], "the refusal came after models were built"
        return
    results = run_unit(method, dataset.domains, Models(model, model), 4, dataset.clean, protocol, seed=0)
    assert [r.status for r in results] == ["ok", "ok"], results[0].message or results[1].message
    assert [r.seen for r in results] == [len(d) for d in dataset.domains]
    assert [r.unanswered for r in results] == [0, 0]


@pytest.mark.parametrize("name", [n for n in ROSTER if _refuses(n)] or [pytest.param(None, marks=pytest.mark.skip)])
def test_the_cli_refuses_batch_size_one_with_one_line_and_exit_2(name, tmp_path, capsys):
    assert main(["run", "--method", name, "--domains", "fog", "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cemabench: error: method {name} cannot run at batch size 1: ") and err.count("\n") == 1
    spec = tmp_path / "bs1.toml"
    write_spec(spec, ["source", name])
    spec.write_text(spec.read_text().replace("batch_size = 64", "batch_size = 1"))
    assert main(["reproduce", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert REFUSAL.fullmatch(err.removeprefix("cemabench: error: ").rstrip("\n"))
    assert not list((tmp_path / "out").rglob("*"))  # no cell ran, nothing was written


class NeedsFour(Method):
    """A method whose edge step needs at least four samples per batch, and says so."""

    name = "needs-four"
    min_batch_size = 4
    min_batch_reason = "its edge compares every sample with three others of its batch"

    def edge(self, num_classes):
        class Edge(EdgeLogic):
            def step(self, model, x):
                return EdgeDecision(model(x))

        return Edge()


def test_a_declared_minimum_is_enforced_against_the_protocol(tiny):
    dataset, models = tiny
    with pytest.raises(UserError, match=r"^method needs-four cannot run at batch size 3: its edge compares every "
                                        r"sample with three others of its batch; use batch size >= 4$"):
        run_unit(NeedsFour(), dataset.domains[:1], models, 4, dataset.clean, Protocol(batch_size=3), seed=0)
    (result,) = run_unit(NeedsFour(), dataset.domains[:1], models, 4, dataset.clean, Protocol(batch_size=4), seed=0)
    assert result.status == "ok" and result.seen == len(dataset.domains[0])


class WithBatchNorm1d(nn.Module):
    """A head with BatchNorm1d: batch statistics of one sample do not exist."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.hidden, self.bn1d, self.fc = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)
        with torch.no_grad():
            self.bn1d.running_mean.uniform_(-1, 1)
            self.bn1d.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn1d(self.hidden(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))))))


def test_batch_statistics_fall_back_to_source_statistics_only_for_one_value_per_channel():
    torch.manual_seed(0)
    source = WithBatchNorm1d().eval()
    model = use_batch_statistics(copy.deepcopy(source))
    assert not [k for k in model.state_dict() if "source" in k]  # downloads and stored states are unchanged
    x = torch.rand(5, 3, 6, 6)

    def hidden(x):  # BatchNorm2d sees a map, and normalises with the batch's statistics at any batch size
        return model.hidden(torch.relu(model.bn(model.conv(x))).mean(dim=(2, 3)))

    # several samples: the plain batch statistics, exactly as without the fallback
    batch = nn.functional.batch_norm(hidden(x), None, None, model.bn1d.weight, model.bn1d.bias, True, 0.0, 1e-5)
    assert torch.equal(model(x), model.fc(torch.relu(batch)))
    # one sample: BatchNorm1d has one value per channel and normalises it with the source statistics
    one = nn.functional.batch_norm(hidden(x[:1]), source.bn1d.running_mean, source.bn1d.running_var,
                                   model.bn1d.weight, model.bn1d.bias, False, 0.0, 1e-5)
    assert torch.allclose(model(x[:1]), model.fc(torch.relu(one)))
    assert model.bn1d.training and model.bn1d.running_mean is None  # back to batch statistics after the forward
    copied = copy.deepcopy(model)
    copied.bn1d.source_running_mean.add_(1.0)  # a deep copy's fallback uses its own statistics, not the original's
    assert not torch.allclose(copied(x[:1]), model(x[:1]))


def test_batch_renormalisation_without_batch_statistics_uses_running_or_source_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
    tbr = BatchRenorm2d(bn).train()
    assert "source_running_mean" not in tbr.state_dict()  # CEMA's downloads carry what they carried
    one = torch.randn(1, 3, 1, 1)
    expected = nn.functional.batch_norm(one, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert torch.allclose(tbr(one), expected)  # not yet initialised: the source statistics stand in, and stay
    assert bool(tbr.initialized) and torch.equal(tbr.running_mean, bn.running_mean)
    tbr(torch.randn(4, 3, 2, 2))  # a batch with statistics initialises nothing now, but moves the statistics
    moved = tbr.running_mean.clone()
    assert not torch.equal(moved, bn.running_mean)
    expected = nn.functional.batch_norm(one, moved, tbr.running_var, tbr.weight, tbr.bias, False, 0.0, tbr.eps)
    assert torch.allclose(tbr(one), expected) and torch.equal(tbr.running_mean, moved)  # running statistics, kept


def test_lame_on_one_sample_is_the_source_model_which_is_why_it_refuses_batch_size_one():
    torch.manual_seed(0)
    model = build_model("tiny:edge@4").eval()
    edge = build_method("lame").edge(4)
    model = edge.configure(model)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(edge.step(model, x).logits, model(x).softmax(1))  # no neighbours: nothing refined
        batch = torch.rand(8, 3, 8, 8)
        assert not torch.allclose(edge.step(model, batch).logits, model(batch).softmax(1))
    assert load_method("lame").min_batch_size == 2
