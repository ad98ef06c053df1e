"""The split-point method (Neurosurgeon's choice under cemabench's time model): it picks the cut a hand computation
picks, and a run's modelled latency is the one it predicted."""
import json

import pytest

from cemabench.cli import main
from cemabench.config import Protocol
from cemabench_methods.split_point import batch_latency, choose

NAMES = ["stem", "layer1", "layer2"]
# per sample: (edge FLOPs, cloud FLOPs, bytes up); the network's 6 MFLOP are mostly in its classifier
PROFILE = {"edge": (6e6, 0.0, 0.0), "input": (0.0, 6e6, 3072.0), "stem": (1e5, 5.9e6, 16384.0),
           "layer1": (2e5, 5.8e6, 8192.0), "layer2": (3e5, 5.7e6, 100.0)}


@pytest.mark.parametrize("regime, expected", [
    # a slow link: all on the edge, 6e6 / 1e9 = 6 ms, against the raw image's 0.01 + 3072 / 1e4 = 0.317 s up alone
    ({"bandwidth": 1e4, "latency": 0.01, "edge_flops_per_s": 1e9}, "edge"),
    # a slow edge and a fast link: input, 0.01 + 0.003072 + 6e6 / 1e11 + 0.01 + 40 / 1e6 = 23.17 ms, against the
    # edge's 0.6 s and layer2's 3e5 / 1e7 = 30 ms on the edge alone
    ({"bandwidth": 1e6, "latency": 0.01, "edge_flops_per_s": 1e7}, "input"),
    # in between: layer2, 3e5 / 1e8 + 100 / 1e5 + 5.7e6 / 1e11 + 40 / 1e5 = 4.457 ms, against input's 31.18 ms and
    # the edge's 60 ms
    ({"bandwidth": 1e5, "edge_flops_per_s": 1e8}, "layer2"),
])
def test_it_picks_the_cut_a_hand_computation_picks(regime, expected):
    protocol = Protocol(batch_size=1, cloud_flops_per_s=1e11, **regime)
    assert choose(PROFILE, NAMES, protocol, 1, 10) == expected


def test_the_latency_of_a_cut_is_computed_as_by_hand():
    protocol = Protocol(batch_size=4, bandwidth=1e5, latency=0.01, edge_flops_per_s=1e8, cloud_flops_per_s=1e11)
    by_hand = 4 * 3e5 / 1e8 + (0.01 + 400 / 1e5) + 4 * 5.7e6 / 1e11 + (0.01 + 160 / 1e5)
    assert batch_latency(PROFILE, "layer2", protocol, 4, 160) == pytest.approx(by_hand, abs=1e-15)
    assert batch_latency(PROFILE, "edge", protocol, 4, 160) == pytest.approx(4 * 6e6 / 1e8)
    untimed = Protocol(batch_size=4)  # no time model and no link model: nothing takes time, so the edge is chosen
    assert choose(PROFILE, NAMES, untimed, 4, 10) == "edge"


def test_a_run_takes_the_modelled_latency_its_choice_predicted(tmp_path, capsys):
    """On the miniature: a fast link and a slow edge make the raw input the fastest cut; every full batch then takes
    the round trip the choice predicted (64 images of 3,072 B up, 64 x 10 float32 logits down)."""
    flags = ["--domains", "fog", "--edge-flops-per-s", "1e7", "--cloud-flops-per-s", "1e10", "--bandwidth", "1e7",
             "--latency", "0.01"]
    out = tmp_path / "auto.json"
    assert main(["run", "--method", "split-point", *flags, "--out", str(out)]) == 0
    (cell,) = json.loads(out.read_text())["cells"]
    flops = cell["cloud_flops"] / cell["seen"]  # the whole edge network per sample, run in the cloud
    assert cell["edge_flops"] == 0 and cell["bytes_up_per_sample"] == 3072
    expected = 0.01 + 64 * 3072 / 1e7 + 64 * flops / 1e10 + 0.01 + 64 * 40 / 1e7
    assert cell["latency_p50"] == pytest.approx(expected, rel=1e-9)
    code = main(["run", "--method", "split-point", "--option", "cut=layer9", *flags])
    assert code == 2 and "option cut='layer9' is not a cut of the edge network; valid: auto, edge, input, stem" in \
        capsys.readouterr().err


def test_a_method_gets_a_copy_of_the_protocol_not_the_links(tiny):
    """A method reads the unit's protocol; rewriting its copy (frozen, but object.__setattr__ gets through) does not
    reach the link, whose deadline still holds."""
    import torch
    from test_guards import _run, plugin

    from cemabench.method import CloudReply, EdgeDecision

    def edge(self, model, x):
        object.__setattr__(method.protocol, "answer_deadline", None)
        return EdgeDecision(logits=model(x), upload=torch.arange(len(x)), await_answers=True)

    method = plugin(edge, lambda upload: CloudReply(answers=torch.zeros(len(upload), 4)))
    protocol = Protocol(batch_size=16, latency=1.0, answer_deadline=0.5)
    (result,) = _run(tiny, method, protocol)
    assert result.status == "ok" and result.link.late_answers == result.seen and protocol.answer_deadline == 0.5


@pytest.mark.parametrize("flags, message", [
    (["--input-codec", "webp:75"], "cannot price input codec webp:75: run it with input_codec raw"),
    (["--cloud-capacity", "8", "--setting", "continual"], "cloud_capacity would leave samples unanswered"),
    (["--upload-budget", "100"], "upload_budget would leave samples unanswered"),
])
def test_where_its_choice_would_be_wrong_it_is_refused_in_one_line(capsys, flags, message):
    assert main(["run", "--method", "split-point", "--domains", "fog", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
