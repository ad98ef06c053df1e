"""Entropic Student (issue 19): trains in two stages on tiny miniature-architecture nets and 8-px images, sends every
sample up as the harness's entropy-coded bitstream, and the cloud answers from exactly what that bitstream decodes
to."""
import numpy as np
import pytest
import torch

from cemabench.errors import UserError
from cemabench.method import CloudResources, TrainingResources
from cemabench.models.split import tail_from
from cemabench.models.zoo import tiny_model
from cemabench.protocol import ForwardOnlyEdge, Link, Models, Protocol, run_unit
from cemabench.protocol.bottleneck import EntropyCoder
from cemabench.protocol.training import run_training, train_here
from cemabench.registry import build_method
from cemabench_methods.eccentric_blocks import prefixed
from cemabench_methods.entropic_student import EntropicStudent, Student
from conftest import tiny_dataset

FAST = {"train_samples": 64, "stage1_epochs": 2, "stage2_epochs": 1}


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """These nets are tiny: one intra-op thread (conftest's fixture) for every test here."""


@pytest.fixture
def setup(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CEMABENCH_CACHE", str(tmp_path_factory.mktemp("entropic-cache")))
    dataset = tiny_dataset(domains=("a",), n=48)
    models = Models.copies_of(tiny_model("edge@4"), tiny_model("foundation@4"))
    return dataset, models


def _trained(setup, options):
    dataset, models = setup
    method = build_method("entropic-student", options)
    run_training(method, TrainingResources(4, models.edge, models.foundation, dataset.clean))
    return method


def test_it_runs_under_the_protocol_and_pays_each_samples_bitstream(setup):
    dataset, models = setup
    (result,) = run_unit(build_method("entropic-student", FAST), dataset.domains, models, 4, dataset.clean,
                         Protocol(batch_size=16), seed=0)
    assert result.status == "ok", result.message
    assert result.seen == 48 and result.link.uploaded == 48 and result.link.upload_bytes == 0
    method = _trained(setup, FAST)  # the same key: the cached artefacts
    coder = EntropyCoder(method.entropy_tables())
    edge = ForwardOnlyEdge(models.edge(), method.edge(4))
    x = dataset.domains[0].images(np.arange(48))
    symbols = torch.cat([edge.step(x[i:i + 16], 4).payload["latent"] for i in range(0, 48, 16)])
    assert result.link.upload_payload_bytes == sum(len(s) for s in coder.encode_rows(symbols)) == result.link.bytes_up


def test_the_cloud_answers_from_what_the_bitstream_decodes_to(setup):
    dataset, models = setup
    method = _trained(setup, FAST)
    edge = ForwardOnlyEdge(models.edge(), method.edge(4))
    x = dataset.domains[0].images(np.arange(16))
    decision = edge.step(x, 4)
    link = Link(None, 0, coder=EntropyCoder(method.entropy_tables()))
    upload = link.send_up(x, decision, dataset.domains[0].sample_nbytes, 0)
    reply = method.cloud(CloudResources(4, models.edge, models.foundation, lambda n: None)).step(upload)
    student = Student(8, 32, (2, 1))
    for name in ("encoder", "bottleneck", "decoder"):
        getattr(student, name).load_state_dict({k.split(".", 1)[1]: v for k, v in method.artefacts.items()
                                                if k.startswith(name + ".")})
    student.eval()
    cloud = models.foundation()
    cloud.load_state_dict({k[6:]: v for k, v in method.artefacts.items() if k.startswith("cloud.")})
    with torch.no_grad():
        symbols = student.bottleneck.symbols(student.encoder(x))  # 8 px: layer2's grid is 4x4, the latent's 3x3
        expected = tail_from(cloud.eval(), "layer2")(student.decoder(student.bottleneck.dequantize(symbols)))
    assert decision.logits is None and not decision.send_input and decision.payload_dtype == "entropy"
    assert symbols.shape == (16, 8, 3, 3) and torch.equal(upload.payload["latent"], symbols)
    torch.testing.assert_close(reply.answers, expected, rtol=0, atol=1e-6)


def test_stage_two_leaves_the_encoder_and_entropy_model_as_stage_one_left_them(setup, monkeypatch):
    seen = {}
    fine_tune = EntropicStudent._fine_tune

    def recorded(self, student, tail, *args):
        seen.update({**prefixed("encoder", student.encoder), **prefixed("bottleneck", student.bottleneck)})
        seen.update(prefixed("decoder", student.decoder))
        return fine_tune(self, student, tail, *args)

    monkeypatch.setattr(EntropicStudent, "_fine_tune", recorded)
    after = _trained(setup, FAST).artefacts
    frozen = [k for k in seen if k.startswith(("encoder.", "bottleneck."))]
    assert frozen and all(torch.equal(seen[k], after[k]) for k in frozen)
    assert not all(torch.equal(seen[k], after[k]) for k in seen if k.startswith("decoder."))


def test_training_is_deterministic(setup):
    dataset, models = setup
    resources = TrainingResources(4, models.edge, models.foundation, dataset.clean)
    first, second = (train_here(build_method("entropic-student", FAST), resources) for _ in range(2))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_larger_beta_sends_fewer_bytes(setup):
    dataset, models = setup
    sizes = []
    for beta in (0.0, 100.0):
        method = _trained(setup, {**FAST, "beta": beta, "stage1_epochs": 20})
        x = dataset.domains[0].images(np.arange(16))
        symbols = ForwardOnlyEdge(models.edge(), method.edge(4)).step(x, 4).payload["latent"]
        sizes.append(sum(len(s) for s in EntropyCoder(method.entropy_tables()).encode_rows(symbols)))
    assert sizes[1] < sizes[0]


@pytest.mark.parametrize("options, words", [
    ({"cloud_stage": "layer4"}, "no entry stage 'layer4'; valid cloud_stage: layer1, layer2, layer3"),
    ({"beta": -1}, "option 'beta' must be a number >= 0"),
    ({"bottleneck_channels": 0}, "option 'bottleneck_channels' must be an integer >= 1"),
])
def test_bad_options_are_user_errors_before_any_compute(setup, options, words):
    dataset, models = setup
    with pytest.raises(UserError, match=words):
        run_unit(build_method("entropic-student", {**FAST, **options}), dataset.domains, models, 4, dataset.clean,
                 Protocol(batch_size=16), seed=0)


def test_a_split_the_encoder_cannot_reach_is_a_user_error(setup):
    """cloud_stage layer1 enters after the stem, whose 8x8 grid is the input's: fine; on 8-px images layer3's entry
    (layer2: 4x4) is a downsampling of 2; a stem-less grid of 3x3 from 8 px would not be one of 1, 2, 4."""
    dataset, models = setup
    (result,) = run_unit(build_method("entropic-student", {**FAST, "cloud_stage": "layer1"}), dataset.domains,
                         models, 4, dataset.clean, Protocol(batch_size=16), seed=0)
    assert result.status == "ok", result.message
    odd = tiny_dataset(domains=("a",), n=48, size=6)  # layer2 of 6 px: 3x3, a downsampling of 2
    (result,) = run_unit(build_method("entropic-student", FAST), odd.domains, models, 4, odd.clean,
                         Protocol(batch_size=16), seed=0)
    assert result.status == "ok", result.message
    five = tiny_dataset(domains=("a",), n=48, size=5)  # layer2 of 5 px: 3x3, not a whole downsampling
    with pytest.raises(UserError, match="the encoder downsamples by 1, 2 or 4"):
        run_unit(build_method("entropic-student", FAST), five.domains, models, 4, five.clean,
                 Protocol(batch_size=16), seed=0)
