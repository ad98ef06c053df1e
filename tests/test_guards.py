"""What a hostile or careless plugin can no longer do: each test is a small plugin that tries it.

Found by trying cemabench as a hostile plugin author would (issue 10): smuggling inputs past the budget, training a
hidden copy of the edge, finding the labels in memory, ending the process, and errors misclassified or ignored.
"""
import contextlib
import gc
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cemabench.datasets import miniature
from cemabench.errors import ForwardOnlyViolation
from cemabench.method import CloudLogic, CloudReply, EdgeDecision, EdgeLogic, Method
from cemabench.models.mini import load_model
from cemabench.protocol import Link, LinkCounters, Models, Protocol, encode, run_unit
from cemabench.protocol.link import Vocabulary
from cemabench.protocol.meter import ComputeMeter
from cemabench.protocol.plain import NotPlain, plain_decision, plain_map
from cemabench.protocol.stream import domain_order
from conftest import TinyNet, tiny_dataset


def plugin(edge_step, cloud_step=None, receive=None, logic: type | None = None) -> Method:
    """A method whose halves are the given functions (the cloud half only when ``cloud_step`` is given), or whose
    edge logic is the class ``logic``."""

    class Edge(logic or EdgeLogic):
        def step(self, model, x):
            return edge_step(self, model, x) if logic is None else super().step(model, x)

    if receive is not None:
        Edge.receive = lambda self, model, download: receive(model, download)

    class Cloud(CloudLogic):
        def step(self, upload):
            return cloud_step(upload)

    class Plugin(Method):
        name = "hostile"
        paper = "-"

        def edge(self, num_classes):
            return Edge()

        def cloud(self, resources):
            return Cloud() if cloud_step else None

    return Plugin()


def _run(tiny, method, protocol=None, domains=1):
    dataset, models = tiny
    protocol = protocol or Protocol(batch_size=16)
    return run_unit(method, dataset.domains[:domains], models, 4, dataset.clean, protocol, seed=0)


# ---- the budget: everything that crosses is charged ------------------------------------------------------------


def test_raw_images_smuggled_as_per_batch_tensors_are_refused(tiny):
    def smuggle(self, model, x):
        return EdgeDecision(model(x), tensors={"images": x})

    (result,) = _run(tiny, plugin(smuggle, lambda upload: None), Protocol(batch_size=16, upload_budget=10))
    assert result.status == "error" and "per-sample data travels in EdgeDecision.payload" in result.message


def test_flattened_smuggling_pays_every_byte_and_the_byte_budget_stops_it(tiny):
    received = []

    def smuggle(self, model, x):
        return EdgeDecision(model(x), tensors={"flat": x.reshape(-1)})

    def cloud(upload):
        received.append(sum(t.numel() for t in upload.tensors.values()))

    (result,) = _run(tiny, plugin(smuggle, cloud), Protocol(batch_size=16, upload_budget=10))
    assert result.status == "ok" and result.link.uploaded == 0
    assert result.link.upload_tensor_bytes == 100 * 3 * 8 * 8 * 4 == result.link.bytes_up
    assert "no sample was uploaded, but 76800 bytes of per-batch tensors crossed and the cloud" in result.note
    received.clear()
    budget = 3 * 16 * 3 * 8 * 8 * 4  # room for three batches' worth
    (result,) = _run(tiny, plugin(smuggle, cloud), Protocol(batch_size=16, upload_budget_bytes=budget))
    assert result.link.upload_tensor_bytes == budget and sum(received) == 3 * 16 * 3 * 8 * 8
    assert result.link.refused_bytes == 100 * 3 * 8 * 8 * 4 - budget and "budget exhausted" in result.note


def test_payload_rows_travel_only_for_uploaded_samples_and_are_charged(tiny):
    seen = []

    def edge(self, model, x):
        upload = torch.arange(0, len(x), 2)
        return EdgeDecision(model(x), upload=upload, payload={"feature": x[upload].mean((2, 3))},
                            send_input=False)

    def cloud(upload):
        seen.append((len(upload.samples), len(upload), tuple(upload.payload["feature"].shape)))

    (result,) = _run(tiny, plugin(edge, cloud), Protocol(batch_size=16, upload_budget=20))
    assert seen[0] == (0, 8, (8, 3)) and sum(n for _, n, _ in seen) == 20
    assert result.link.uploaded == 20 and result.link.upload_bytes == 0
    assert result.link.upload_payload_bytes == 20 * 3 * 4 and result.link.refused == 50 - 20


def test_payload_rows_must_match_the_upload(tiny):
    def edge(self, model, x):
        return EdgeDecision(model(x), upload=torch.arange(2), payload={"feature": x})

    (result,) = _run(tiny, plugin(edge, lambda upload: None))
    assert result.status == "error" and "one row per uploaded sample (2)" in result.message


@pytest.mark.parametrize("dtype, row_bytes", [(None, 12 * 4), ("float32", 12 * 4), ("float16", 12 * 2),
                                              ("int8", 12 + 4)])
def test_payload_encodings_charge_their_real_bytes(dtype, row_bytes):
    torch.manual_seed(0)
    t = torch.randn(5, 3, 2, 2)
    decoded, nbytes = encode(t, dtype)
    assert nbytes.tolist() == [row_bytes] * 5 and decoded.shape == t.shape and decoded.dtype == torch.float32
    scale = t.abs().reshape(5, -1).amax(1) / 127
    error = {None: 0.0, "float32": 0.0, "float16": 1e-3, "int8": float(scale.max()) / 2 + 1e-7}[dtype]
    assert (decoded - t).abs().max() <= error * (1 if dtype != "float16" else float(t.abs().max()))
    if dtype == "int8":  # every decoded value is a multiple of its row's scale, at most 127 of them
        steps = decoded.reshape(5, -1) / scale[:, None]
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 127 + 1e-4


@pytest.mark.parametrize("dtype", [None, "float32", "float16", "int8", "int8+zstd"])
def test_an_empty_payload_encodes_to_nothing(dtype):
    decoded, nbytes = encode(torch.zeros(0, 3, 2, 2), dtype)
    assert decoded.shape == (0, 3, 2, 2) and nbytes.shape == (0,)


def test_link_counts_an_upload_exactly():
    link = Link(budget=None, delay=0)
    x = torch.randint(0, 256, (4, 3, 8, 8)).float() / 255  # images as the datasets give them: uint8 / 255
    decision = EdgeDecision(torch.zeros(4, 2), upload=torch.tensor([1, 3]), tensors={"stats": torch.zeros(7)},
                            payload={"f": torch.zeros(2, 5, dtype=torch.float64)}, payload_dtype="float16")
    upload = link.send_up(x, decision, sample_nbytes=3 * 8 * 8, batch_index=0, first_id=100)
    assert torch.equal(upload.samples, x[[1, 3]]) and upload.sample_ids.tolist() == [101, 103]
    assert link.counters == LinkCounters(uploaded=2, upload_bytes=2 * 192, upload_payload_bytes=2 * 5 * 2,
                                         upload_tensor_bytes=7 * 4)


# ---- what is not charged carries nothing: names, empty shapes, the order of entries (issue 22) -------------------

def _send(link, decision, x=None):
    x = torch.zeros(4, 3, 8, 8) if x is None else x
    return link.send_up(x, plain_decision(decision), sample_nbytes=3 * 8 * 8, batch_index=0)


def test_names_that_cross_are_the_edge_models_or_a_few_words_of_the_units_own():
    """The edge model's state names, a module path (or a state name) with one of its words, and at most 16 words of
    the unit's own (BatchRenorm's ``initialized``, a method's ``fc.weight.scale``), each of at most 64 characters."""
    state = list(load_model("edge").state_dict())
    link = Link(None, 0, vocabulary=Vocabulary(state))
    allowed = {state[0]: torch.zeros(1), "stem.1.initialized": torch.zeros(1), "fc.weight.scale": torch.zeros(1),
               "layer1.0.bn1.weight": torch.zeros(1)}
    link.send_down(plain_map(allowed, "the download"), 0)
    own = [f"word{i}" for i in range(16 - 2)]
    _send(link, EdgeDecision(torch.zeros(4, 2), tensors={w: torch.zeros(1) for w in own}))
    assert sorted(link.vocabulary.own) == sorted(["initialized", "scale", *own])
    assert link.counters.upload_tensor_bytes == 14 * 4
    with pytest.raises(ValueError, match="a unit may use at most 16 words of its own, of at most 64 characters each "
                                         r"\(it used scale, initialized, word0"):
        link.send_down({"stem.1.one_too_many": torch.zeros(1)}, 1)
    long = Link(None, 0, vocabulary=Vocabulary(state))
    with pytest.raises(ValueError, match="names 'stem.aaaa.*' \\(of 70 characters\\), whose word 65 characters long"):
        _send(long, EdgeDecision(torch.zeros(4, 2), tensors={"stem." + "a" * 65: torch.zeros(1)}))


@pytest.mark.parametrize("name", ["a b", "1st", "fc..weight", "fc.weight.", "é", "x" * 201, ""])
def test_a_name_is_a_dotted_identifier_of_at_most_200_characters(name):
    with pytest.raises(NotPlain, match="keys must be names such as layer1.0.bn1.weight"):
        plain_map({name: torch.zeros(1)}, "the download")


def test_an_index_may_come_first_as_in_a_sequential_models_state():
    """An nn.Sequential's state names start with an index ("1.weight"): a name an edge model gives, refused before
    (a README example's Tent on a Sequential model failed its cell)."""
    assert list(plain_map({"1.weight": torch.zeros(1), "0.running_mean": torch.zeros(1)}, "the download")) == [
        "0.running_mean", "1.weight"]


def test_entries_cross_in_the_order_of_their_names_and_with_at_most_8_dimensions():
    crossed = plain_map({"b": torch.zeros(1), "a": torch.zeros(1), "a.c": torch.zeros(1)}, "EdgeDecision.tensors")
    assert list(crossed) == ["a", "a.c", "b"]
    with pytest.raises(NotPlain, match=r"EdgeDecision.tensors\['a'\] has 9 dimensions; what crosses the link has at "
                                       r"most 8"):
        plain_map({"a": torch.zeros((1,) * 9)}, "EdgeDecision.tensors")


@pytest.mark.parametrize("where", ["tensors", "download"])
def test_an_empty_per_batch_tensor_or_download_entry_is_refused(where):
    """Its shape (0, 10**6, ...) would cross uncharged; an entry that crosses costs at least a byte."""
    link = Link(None, 0)
    empty = {"stats": torch.zeros(0, 1000, 17)}
    with pytest.raises(ValueError, match=r"\['stats'\] has no values \(shape \(0, 1000, 17\)\): the shape of an "
                                         r"empty tensor is charged nothing"):
        if where == "tensors":
            _send(link, EdgeDecision(torch.zeros(4, 2), tensors=empty))
        else:
            link.send_down(empty, 0)


def test_an_empty_payload_crosses_in_the_row_shape_and_dtype_its_name_last_crossed_with():
    """Neither the row shape of no rows that the edge chose, nor that of rows the budget kept back, reaches the cloud;
    rows of no values are refused."""
    link = Link(None, 0, budget_bytes=3 * 4)
    first = _send(link, EdgeDecision(torch.zeros(4, 2), upload=torch.tensor([2]), send_input=False,
                                     payload={"f": torch.ones(1, 3)}))
    assert first.payload["f"].shape == (1, 3)
    chosen = _send(link, EdgeDecision(torch.zeros(4, 2), upload=torch.tensor([], dtype=torch.long), send_input=False,
                                      payload={"f": torch.ones(0, 1000, 7, dtype=torch.int64)}))
    assert chosen.payload["f"].shape == (0, 3) and chosen.payload["f"].dtype == torch.float32
    kept_back = _send(link, EdgeDecision(torch.zeros(4, 2), upload=torch.tensor([0, 1]), send_input=False,
                                         payload={"f": torch.ones(2, 99, 5)}))
    assert len(kept_back) == 0 and kept_back.payload["f"].shape == (0, 3)
    with pytest.raises(ValueError, match=r"EdgeDecision.payload\['f'\] has rows of no values \(shape \(1, 0, 9\)\)"):
        _send(link, EdgeDecision(torch.zeros(4, 2), upload=torch.tensor([0]), send_input=False,
                                 payload={"f": torch.ones(1, 0, 9)}))


# ---- forward-only, enforced by what executes ---------------------------------------------------------------------


def test_training_a_hidden_copy_of_the_edge_is_caught(tiny):
    def cheat(self, model, x):
        if not hasattr(self, "hidden"):  # a copy in a list: not an attribute the harness would find
            with torch.inference_mode(False):
                self.hidden = [TinyNet()]
                self.hidden[0].load_state_dict(model.state_dict())
            self.optimizer = torch.optim.SGD(self.hidden[0].parameters(), lr=0.1)
        with torch.inference_mode(False), torch.enable_grad():
            copy = self.hidden[0]
            loss = copy(x.clone()).logsumexp(1).mean()
            with contextlib.suppress(Exception):  # swallowing the refusal does not help
                loss.backward()
            self.optimizer.step()
        return EdgeDecision(self.hidden[0](x))

    (result,) = _run(tiny, plugin(cheat))
    assert result.status == "error" and "forward-only" in result.message and "backward kernel" in result.message


def test_an_optimizer_step_on_a_hidden_copy_without_backward_is_caught(tiny):
    def cheat(self, model, x):
        hidden = nn.Linear(2, 2)
        for p in hidden.parameters():
            p.grad = torch.ones_like(p)
        torch.optim.SGD(hidden.parameters(), lr=0.1).step()
        return EdgeDecision(model(x))

    (result,) = _run(tiny, plugin(cheat))
    assert result.status == "error" and "updated a parameter from its gradient" in result.message


@pytest.mark.parametrize("meter_kind", ["native"], indirect=True)
def test_a_kernel_registered_for_the_meters_key_for_one_step_is_caught(tiny, meter_kind):
    """The edge's code registers a kernel for the C++ meter's key, runs the model's linear layer through it (the
    kernel redispatches below the key: no FLOP counted, nothing guarded) and removes it before the step returns, so
    that the unit's checks before and after it find no registration."""
    def cheat(self, model, x):
        library = torch.library.Library("aten", "IMPL")
        below = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        library.impl("addmm", lambda *args, **kwargs: torch.ops.aten.addmm.default.redispatch(below, *args, **kwargs),
                     "TESTING_ONLY_GenericMode")
        try:
            return EdgeDecision(model(x))
        finally:
            library._destroy()

    (result,) = _run(tiny, plugin(cheat))
    assert result.status == "error" and "forward-only" in result.message, result.message
    assert "aten::addmm ran through a kernel registered for the meter's dispatch key" in result.message


def test_writing_an_edge_parameter_through_data_is_caught(tiny):
    def cheat(self, model, x):
        model.fc.weight.data.mul_(0.5)
        return EdgeDecision(model(x))

    (result,) = _run(tiny, plugin(cheat))
    assert result.status == "error" and "fc.weight" in result.message


def test_writing_an_edge_parameter_through_numpy_is_caught(tiny):
    def cheat(self, model, x):
        model.fc.bias.detach().numpy()[:] = 0.0  # behind torch's back: no op to see
        return EdgeDecision(model(x))

    (result,) = _run(tiny, plugin(cheat))
    assert result.status == "error" and "fc.bias" in result.message


def test_a_write_into_an_edge_parameter_from_a_thread_is_caught(tiny):
    """A thread's ops do not carry the step thread's meter. The C++ meter refuses them through a callback that sees
    every thread's ops (remembered, raised when the step returns); the seal compares every parameter's bits after the
    step in either meter, so a write from a thread is caught twice."""
    def cheat(self, model, x):
        worker = threading.Thread(target=lambda: model.fc.weight.mul_(0.5))
        worker.start()
        worker.join()
        return EdgeDecision(model(x))

    (result,) = _run(tiny, plugin(cheat))
    assert result.status == "error" and ("outside a download: fc.weight" in result.message
                                         or "on a thread wrote into the edge parameter fc.weight" in result.message)


def test_training_the_edge_model_itself_in_a_thread_is_caught(tiny):
    """A thread that runs a backward pass and an optimizer step on the edge model's own parameters (unfrozen there,
    frozen again before the step ends) changes their values: the seal sees it."""
    def cheat(self, model, x):
        def train():
            with torch.enable_grad():
                model.requires_grad_(True)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
                model(torch.rand_like(x)).logsumexp(1).mean().backward()
                optimizer.step()
                model.requires_grad_(False)
        worker = threading.Thread(target=train)
        worker.start()
        worker.join()
        return EdgeDecision(model(x))

    (result,) = _run(tiny, plugin(cheat))
    assert result.status == "error" and ("outside a download" in result.message  # the seal (Python meter)
                                         or "a backward kernel (aten::" in result.message  # the C++ meter
                                         and "on a thread" in result.message)


# ---- receive: the edge applies downloads, and does nothing else there ------------------------------------------


def _stash_step(self, model, x):
    self.seen = x  # what a hostile edge keeps to train on later
    return EdgeDecision(model(x))


def test_training_the_edge_inside_receive_is_caught(tiny):
    """A hostile receive that runs autograd and an optimizer step on the edge, with the images it kept, whenever a
    (tiny) download arrives: receive runs under the same guard as the edge step."""

    class Edge(EdgeLogic):
        step = _stash_step

        def receive(self, model, download):
            model.requires_grad_(True)
            with torch.enable_grad():
                model(self.seen).logsumexp(1).mean().backward()
            torch.optim.SGD(model.parameters(), lr=0.1).step()

    method = plugin(None, cloud_step=lambda upload: {"fc.bias": torch.zeros(4)})
    method.edge = lambda num_classes: Edge()
    (result,) = _run(tiny, method)
    assert result.status == "error" and "during the edge's receive" in result.message


def test_a_receive_that_changes_a_parameter_the_download_does_not_name_is_caught(tiny):
    def receive(model, download):
        model.load_state_dict(download, strict=False)
        model.fc.weight.mul_(0.5)  # no autograd, no optimizer: a plain write into a parameter nobody sent

    method = plugin(lambda self, model, x: EdgeDecision(model(x)),
                    cloud_step=lambda upload: {"fc.bias": torch.zeros(4)}, receive=receive)
    (result,) = _run(tiny, method)
    assert result.status == "error" and "fc.weight" in result.message and "fc.bias" not in result.message


def test_a_receive_that_decodes_its_own_download_format_is_allowed(tiny):
    """Downloads in a method's own format (int8 with a scale here) may be decoded by its receive into the
    parameters they name; the bytes charged are those that crossed."""
    applied = []

    def receive(model, download):
        model.fc.weight.copy_(download["fc.weight"].float() * download["fc.weight.scale"])
        applied.append(model.fc.weight.detach().clone())

    def cloud(upload):
        return {"fc.weight": torch.ones(4, 4, dtype=torch.int8), "fc.weight.scale": torch.tensor(0.25)}

    method = plugin(lambda self, model, x: EdgeDecision(model(x)), cloud_step=cloud, receive=receive)
    (result,) = _run(tiny, method)
    assert result.status == "ok", result.message
    assert applied and torch.equal(applied[-1], torch.full((4, 4), 0.25))
    assert result.link.download_bytes == result.link.downloads * (16 + 4)


def _with_edge(edge_class, cloud_step=None) -> Method:
    method = plugin(None, cloud_step=cloud_step)
    method.edge = lambda num_classes: edge_class()
    return method


def test_swapping_the_named_parameter_does_not_excuse_writes_to_the_others(tiny):
    """Replacing the one parameter a download names used to skip the value comparison of all the others."""

    class Edge(EdgeLogic):
        def step(self, model, x):
            return EdgeDecision(model(x))

        def receive(self, model, download):
            model.fc.bias = nn.Parameter(download["fc.bias"].clone(), requires_grad=False)
            torch.Tensor.detach(model.conv.weight).numpy()[:] *= 0.5  # behind the meter, into a parameter not sent

    (result,) = _run(tiny, _with_edge(Edge, lambda upload: {"fc.bias": torch.zeros(4)}))
    assert result.status == "error" and "conv.weight" in result.message


@pytest.mark.parametrize("target", ["fc.bias", "conv.weight"])
def test_after_downloads_the_seal_still_holds_for_sent_and_unsent_parameters(tiny, target):
    """After a receive only the parameters the download names are sealed afresh; the others keep their snapshots.
    Either kind, written behind the meter in a later step, is caught; untouched, the run is clean."""
    steps = []

    def step(self, model, x):
        steps.append(len(steps))
        if target and len(steps) == 4:  # three downloads have been applied by now
            module, name = target.split(".")
            torch.Tensor.detach(getattr(getattr(model, module), name)).numpy()[...] *= 0.5
        return EdgeDecision(model(x), upload=torch.arange(len(x)))

    def cloud(upload):
        return {"fc.bias": torch.full((4,), float(len(steps)))}

    (result,) = _run(tiny, plugin(step, cloud_step=cloud))
    assert result.status == "error" and target in result.message and "outside a download" in result.message
    steps.clear()
    target = None
    (clean,) = _run(tiny, plugin(step, cloud_step=cloud))
    assert clean.status == "ok" and len(steps) > 4 and clean.link.downloads == len(steps)


def test_a_receive_may_not_turn_a_named_parameter_into_a_buffer(tiny):
    """A one-value download naming fc.weight must not license removing the parameter (and training the buffer that
    replaces it, which no seal covers)."""

    class Edge(EdgeLogic):
        def step(self, model, x):
            return EdgeDecision(model(x))

        def receive(self, model, download):
            weight = model.fc._parameters.pop("weight")
            model.fc.register_buffer("weight", weight.detach().clone())

    (result,) = _run(tiny, _with_edge(Edge, lambda upload: {"fc.weight": torch.zeros(1, dtype=torch.bool)}))
    assert result.status == "error" and "removed" in result.message and "fc.weight" in result.message


class _Frozen(nn.Parameter):
    """A parameter whose detach() hands the seal a frozen copy."""

    def detach(self):
        return torch.Tensor.detach(self).clone()


def test_parameter_subclasses_and_quantised_parameters_are_refused_at_the_seal(tiny):
    class Lying(EdgeLogic):
        def configure(self, model):
            model.fc.weight = _Frozen(model.fc.weight.detach().clone(), requires_grad=False)
            return model

        def step(self, model, x):
            return EdgeDecision(model(x))

    (result,) = _run(tiny, _with_edge(Lying))
    assert result.status == "error" and "fc.weight is a _Frozen" in result.message

    class Quantised(Lying):
        def configure(self, model):
            model.q = nn.Parameter(torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8), requires_grad=False)
            return model

    (result,) = _run(tiny, _with_edge(Quantised))
    assert result.status == "error" and "quantised" in result.message


def test_an_edge_parameter_that_is_nan_and_stays_nan_is_not_a_change():
    """The value seal compares bits: a NaN weight that nobody touched is not 'changed' (NaN != NaN as a number), so
    the run ends as diverged (non-finite logits), not as a forward-only violation."""
    torch.manual_seed(0)
    edge = TinyNet().eval()
    with torch.no_grad():
        edge.fc.bias[0] = float("nan")
    (result,) = run_unit(plugin(lambda self, model, x: EdgeDecision(model(x))), tiny_dataset().domains[:1],
                         Models.copies_of(edge, TinyNet()), 4, None, Protocol(batch_size=16), seed=0)
    assert result.status == "diverged", result.message


def test_a_runtime_error_that_mentions_grad_is_not_a_forward_only_violation(tiny):
    def unlucky(self, model, x):
        raise RuntimeError("gradient checkpoint file missing")

    (result,) = _run(tiny, plugin(unlucky))
    assert result.status == "error" and "gradient checkpoint file missing" in result.message
    assert "forward-only" not in result.message


def test_batchnorm_statistics_may_change_on_the_edge(tiny):
    def adapt_statistics(self, model, x):
        model.train()
        return EdgeDecision(model(x))

    (result,) = _run(tiny, plugin(adapt_statistics))
    assert result.status == "ok"


# ---- FLOPs of what executes ----------------------------------------------------------------------------------------


class Linear4(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_flops_are_exact_for_a_known_model(tiny):
    dataset, _ = tiny
    torch.manual_seed(0)
    edge_model, replica = Linear4(), Linear4()

    def edge(self, model, x):
        return EdgeDecision(model(x), upload=torch.arange(len(x)))

    state = {}

    def cloud(upload):
        if "model" not in state:
            state["model"] = Linear4()
        out = state["model"](upload.samples)
        out.sum().backward()  # backward: the weight's and bias's gradients only (inputs need none)

    models = Models.copies_of(edge_model, replica)
    (result,) = run_unit(plugin(edge, cloud), dataset.domains[:1], models, 4, None, Protocol(batch_size=16), seed=0)
    n, features = 100, 3 * 8 * 8
    assert result.edge_flops == 2 * n * features * 4
    assert result.cloud_flops == 2 * n * features * 4 * 2  # forward + the weight-gradient matmul
    with FlopCounterMode(display=False) as reference:
        out = Linear4()(torch.rand(n, 3, 8, 8))
        out.sum().backward()
    assert reference.get_total_flops() == result.cloud_flops
    assert result.to_dict()["edge_gflops_per_sample"] == pytest.approx(2 * features * 4 / 1e9)


# ---- labels out of reach -----------------------------------------------------------------------------------------


def _integer_arrays_in_memory(n: int) -> list[np.ndarray]:
    """Every integer array or tensor of length ``n`` reachable from the live frames or the garbage collector
    (objects and one level of their referents), as a copy."""
    found, seen = [], set()

    def consider(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "iu" and obj.shape == (n,):
            found.append(np.array(obj))
        elif isinstance(obj, torch.Tensor) and not obj.is_floating_point() and tuple(obj.shape) == (n,):
            found.append(obj.detach().cpu().numpy().copy())

    frame = sys._getframe()
    while frame is not None:
        for value in list(frame.f_locals.values()):
            consider(value)
            for inner in gc.get_referents(value):
                consider(inner)
        frame = frame.f_back
    for obj in gc.get_objects():
        consider(obj)
        for inner in gc.get_referents(obj):
            consider(inner)
    return found


def _label_hunter(found: list, n: int):
    def hunt(self, model, x):
        self.batches = getattr(self, "batches", 0) + 1
        if self.batches == 3:
            found.extend(_integer_arrays_in_memory(n))
        return EdgeDecision(model(x))

    return hunt


def test_a_plugin_searching_frames_and_gc_finds_no_labels():
    source = miniature.dataset(domains=["fog"])
    domain, found = source.domains[0], []
    models = Models(edge=lambda: load_model("edge"), foundation=lambda: load_model("foundation"))
    (result,) = run_unit(plugin(_label_hunter(found, len(domain))), [domain], models, 10, source.clean,
                         Protocol(batch_size=64), seed=0)
    assert result.status == "ok" and result.seen == len(domain)
    assert found, "the search saw no integer array of the stream's length at all (the order is one)"
    labels = miniature.stream_labels()  # read only now, after the run
    stream = labels[domain_order(0, "fog", len(labels))]
    assert not any(np.array_equal(a, labels) or np.array_equal(a, stream) for a in found)


def test_the_label_hunter_does_find_labels_that_are_held_in_memory(tiny):
    """The search above can fail: with a domain that keeps its labels in a closure, it finds them."""
    dataset, models = tiny
    found = []
    run_unit(plugin(_label_hunter(found, 100)), dataset.domains[:1], models, 4, dataset.clean,
             Protocol(batch_size=16), seed=0)
    labels = dataset.domains[0].labels()
    assert any(np.array_equal(a, labels) for a in found)


# ---- what must end a cell, not the table ---------------------------------------------------------------------------


def test_sys_exit_in_method_code_is_an_error_cell(tiny):
    def leave(self, model, x):
        self.batches = getattr(self, "batches", 0) + 1
        if self.batches == 3:
            sys.exit(0)
        return EdgeDecision(model(x))

    results = _run(tiny, plugin(leave), domains=2)
    assert results[0].status == "error" and "sys.exit(0)" in results[0].message
    assert results[1].status == "skipped"


def test_a_download_key_the_edge_model_lacks_is_an_error(tiny):
    def edge(self, model, x):
        return EdgeDecision(model(x), upload=torch.arange(len(x)))

    def cloud(upload):
        return CloudReply(download={"fc.weight_typo": torch.zeros(4, 4)})

    (result,) = _run(tiny, plugin(edge, cloud))
    assert result.status == "error" and "fc.weight_typo" in result.message


def test_an_edge_without_logits_must_await_answers_and_unanswered_samples_are_errors(tiny):
    dataset, models = tiny

    def offload_all(self, model, x):
        return EdgeDecision(None, upload=torch.arange(len(x)), await_answers=True)

    def answer(upload):
        return CloudReply(answers=torch.zeros(len(upload), 4).index_fill_(1, torch.tensor([0]), 1.0))

    (result,) = _run(tiny, plugin(offload_all, answer), Protocol(batch_size=16, upload_budget=40))
    labels = dataset.domains[0].labels()
    stream = labels[domain_order(0, "a", 100)]
    assert result.status == "ok" and result.unanswered == 60 and result.edge_flops == 0
    assert result.correct == int((stream[:40] == 0).sum()) and "60 samples had no prediction" in result.note

    def no_logits(self, model, x):
        return EdgeDecision(None, upload=torch.arange(len(x)))

    (result,) = _run(tiny, plugin(no_logits, answer))
    assert result.status == "error" and "may be None only when the edge awaits" in result.message


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("batch_size", -5), ("delivery_delay", -1),
                                          ("upload_budget", -5), ("upload_budget_bytes", -1), ("rounds", 0),
                                          ("setting", "sometimes"), ("setting", "continual+correlated+correlated"),
                                          ("concentration", 0), ("concentration", float("nan"))])
def test_protocol_values_out_of_range_are_user_errors(field, value):
    from cemabench.errors import UserError

    with pytest.raises(UserError, match=field):
        Protocol(**{field: value})


# ---- the link model: bytes become delay ---------------------------------------------------------------------------


@pytest.mark.parametrize("bandwidth, latency, interval, expected", [
    (None, 0.0, 1.0, 0),  # a link that only counts: next batch
    (1000.0, 0.0, 1.0, 2),  # 2000 B up + 600 B down at 1000 B/s = 2.6 s: ceil(2.6 / 1) - 1 = 2 batches late
    (1000.0, 0.5, 1.0, 3),  # + 2 x 0.5 s latency = 3.6 s
    (1000.0, 0.0, 4.0, 0),  # 2.6 s within one 4 s batch interval
])
def test_a_transfer_arrives_when_the_formula_says(bandwidth, latency, interval, expected):
    protocol = Protocol(bandwidth=bandwidth, latency=latency, batch_interval=interval)
    link = Link(None, 0, protocol=protocol)
    x = torch.zeros(2, 1, 10, 10, dtype=torch.uint8)
    link.send_up(x, EdgeDecision(torch.zeros(2, 2), upload=torch.arange(2)), sample_nbytes=1000, batch_index=5)
    link.send_down({"w": torch.zeros(150)}, batch_index=5)  # 600 bytes
    arrivals = [t for t in range(5, 12) if link.arrived(t)]
    assert arrivals == [6 + expected] and link.counters.download_delay_batches == expected
    assert protocol.transfer_seconds(2000) == pytest.approx(latency + (2000 / bandwidth if bandwidth else 0))


def test_answers_after_the_deadline_leave_the_edge_prediction(tiny):
    dataset, models = tiny

    def offload_half(self, model, x):
        return EdgeDecision(model(x), upload=torch.arange(0, len(x), 2), await_answers=True)

    def answer(upload):
        return CloudReply(answers=torch.full((len(upload), 4), 0.0).index_fill_(1, torch.tensor([3]), 9.0))

    # 8 samples x 192 B up + 8 x 4 x 4 B down at 1000 B/s: 1.664 s per batch of 16 (0.416 s for the last 4)
    slow = Protocol(batch_size=16, bandwidth=1000.0, answer_deadline=0.4)
    fast = Protocol(batch_size=16, bandwidth=1000.0, answer_deadline=2.0)
    (late,) = _run(tiny, plugin(offload_half, answer), slow)
    (on_time,) = _run(tiny, plugin(offload_half, answer), fast)
    (instant,) = _run(tiny, plugin(offload_half, answer), Protocol(batch_size=16))
    (edge_only,) = _run(tiny, plugin(lambda self, model, x: EdgeDecision(model(x))), Protocol(batch_size=16))
    assert late.link.late_answers == 50 and late.correct == edge_only.correct and "after the deadline" in late.note
    assert on_time.link.late_answers == 0 and on_time.correct == instant.correct


@pytest.mark.parametrize("field, value", [("bandwidth", 0), ("bandwidth", -1.0), ("latency", -0.1),
                                          ("batch_interval", 0), ("answer_deadline", -1), ("latency", float("nan"))])
def test_link_model_values_out_of_range_are_user_errors(field, value):
    from cemabench.errors import UserError

    with pytest.raises(UserError, match=field):
        Protocol(**{field: value})


@pytest.mark.parametrize("flag, value, named", [
    ("--bandwidth", "-1", "bandwidth"), ("--latency", "-0.5", "latency"), ("--batch-interval", "0", "batch_interval"),
    ("--answer-deadline", "-2", "answer_deadline"), ("--upload-budget-bytes", "-1", "upload_budget_bytes"),
    ("--batch-size", "0", "batch_size"), ("--delay", "-1", "delivery_delay"),
    ("--upload-budget", "-5", "upload_budget")])
def test_protocol_flags_out_of_range_are_one_line_and_exit_2(flag, value, named, capsys):
    from cemabench.cli import main

    assert main(["run", "--method", "source", "--domains", "fog", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cemabench: error: protocol ") and named in err and err.count("\n") == 1


def test_the_flop_cache_counts_what_torchs_formulas_count_for_every_shape(meter_kind):
    """The meter looks counts up by argument shapes and values (stride, padding, groups); each must equal
    FlopCounterMode's, also when only a non-shape argument differs."""
    torch.manual_seed(0)
    x = torch.rand(5, 3, 12, 12)
    convs = [torch.nn.Conv2d(3, 6, 3), torch.nn.Conv2d(3, 6, 3, stride=2), torch.nn.Conv2d(3, 6, 3, padding=1),
             torch.nn.Conv2d(3, 6, 3, groups=3)]
    for conv in convs + convs:  # the second pass is served from the cache
        for batch in (x, x[:2]):
            meter = ComputeMeter()
            with meter, torch.no_grad():
                conv(batch)
            with FlopCounterMode(display=False) as reference, torch.no_grad():
                conv(batch)
            assert meter.take() == reference.get_total_flops() > 0


def test_composite_ops_on_the_edge_are_counted_as_torch_counts_them_first_decomposed_then_from_the_cache(meter_kind):
    """In inference mode (the edge's step) the meter sees composite ops such as conv2d, linear and matmul whole. It
    decomposes a call once per argument shapes, layouts and values and serves repeats from a cache: every count,
    first or repeated, must equal FlopCounterMode's, also when only the strides, a non-shape argument or a missing
    bias differ."""
    from cemabench.protocol import meter as M

    torch.manual_seed(0)
    x = torch.rand(5, 3, 12, 12)
    conv, strided = torch.nn.Conv2d(3, 6, 3), torch.nn.Conv2d(3, 6, 3, stride=2, bias=False)
    linear, bare = torch.nn.Linear(7, 4), torch.nn.Linear(7, 4, bias=False)
    a, b = torch.rand(6, 7), torch.rand(2, 6, 7)
    cases = [(conv, x), (conv, x.contiguous(memory_format=torch.channels_last)), (conv, x[:2]), (strided, x),
             (linear, a), (bare, a), (linear, b), (lambda t: t @ a.T, b),
             (lambda t: torch.einsum("ij,kj->ik", t, a), a)]
    for _ in range(2):  # the second pass is served from the cache
        for fn, arg in cases:
            meter = ComputeMeter(guard=True)
            with torch.inference_mode(), meter:
                fn(arg)
            with FlopCounterMode(display=False) as reference, torch.no_grad():
                fn(arg)
            assert meter.take() == reference.get_total_flops() > 0
    assert meter_kind == "native" or any(key[0] is torch.ops.aten.conv2d.default for key in M._decomposed)


def test_a_composite_op_that_writes_into_an_edge_parameter_is_refused_at_every_call(meter_kind):
    """``matmul(out=)`` is a composite op that writes. Into a scratch tensor it may run (and be served from the
    decomposition cache); into an edge parameter, directly or through a view, it is refused at the op every time,
    before and after the cache holds the scratch call's key."""
    a = torch.rand(4, 4)
    weight = torch.nn.Parameter(torch.zeros(4, 4), requires_grad=False)
    scratch = torch.zeros(4, 4)
    meter = ComputeMeter(guard=True)
    meter.protect({"fc.weight": weight})
    for _ in range(2):
        with torch.inference_mode(), meter:
            torch.matmul(a, a, out=scratch)  # allowed: not a parameter
        assert meter.take() == 2 * 4 * 4 * 4
        for target in (weight, weight.detach()):
            refusals = meter.refusals
            with pytest.raises(ForwardOnlyViolation, match="fc.weight"), torch.inference_mode(), meter:
                torch.matmul(a, a, out=target)
            assert meter.refusals == refusals + 1
    assert torch.equal(weight, torch.zeros(4, 4))

def test_moving_a_parameter_onto_another_storage_at_the_same_address_is_caught(tiny):
    """``.data`` can move a parameter onto a new storage at the same address (no aten op runs) while the old
    storage's bits move away: the parameter keeps its tensor, address, shape and strides, and a seal that read the
    old storage would see nothing change. The seal holds the storage object itself."""

    class Edge(EdgeLogic):
        def configure(self, model):
            self.array = model.fc.weight.detach().numpy().copy()
            model.fc.weight = nn.Parameter(torch.from_numpy(self.array), requires_grad=False)
            return model

        def step(self, model, x):
            if not hasattr(self, "moved"):
                self.moved = sealed = torch.Tensor.detach(model.fc.weight)
                model.fc.weight.data = torch.from_numpy(self.array)  # another storage, the same address
                sealed.untyped_storage().share_memory_()  # the sealed storage's bits move elsewhere
            self.array[...] += 0.25  # behind torch's back, into what the model now reads
            return EdgeDecision(model(x))

    (result,) = _run(tiny, _with_edge(Edge))
    assert result.status == "error" and "fc.weight" in result.message


def test_a_module_kept_on_the_edge_logic_may_not_shadow_the_models_parameters(tiny):
    """An extra module named like a part of the model (``self.conv`` beside the model's ``conv``) would give two
    parameters one name, and the seal would keep only one of them."""

    class Edge(EdgeLogic):
        def __init__(self):
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def step(self, model, x):
            model.conv.weight.mul_(0.9)
            return EdgeDecision(model(x))

    (result,) = _run(tiny, _with_edge(Edge))
    assert result.status == "error" and "conv.weight" in result.message and "named" in result.message


def test_a_plugins_own_composite_op_is_metered_op_by_op_at_every_call(meter_kind):
    """A composite op a plugin defines (here through torch.library) is decomposed under the meter at every call,
    never run whole from a cache seeded by a harmless first call."""
    library = torch.library.Library("cemabench_test_guards", "DEF")
    library.define("project(Tensor x, Tensor w) -> Tensor")
    calls, hidden = [], nn.Linear(8, 8)
    with torch.inference_mode(False):
        hidden.weight.grad = torch.ones_like(hidden.weight)
    optimizer = torch.optim.SGD(hidden.parameters(), lr=0.1, foreach=True)

    def project(x, w):
        calls.append(1)
        if len(calls) > 1:  # harmless the first time, an optimizer step on a hidden model afterwards
            with torch.inference_mode(False):
                optimizer.step()
        return x @ w.T

    library.impl("project", project, "CompositeImplicitAutograd")
    x, w = torch.rand(8, 8), torch.rand(8, 8)
    meter = ComputeMeter(guard=True)
    with torch.inference_mode(), meter:
        torch.ops.cemabench_test_guards.project(x, w)
    assert meter.take() == 2 * 8 * 8 * 8
    with pytest.raises(ForwardOnlyViolation, match="optimizer"), torch.inference_mode(), meter:
        torch.ops.cemabench_test_guards.project(x, w)


def test_a_first_call_that_counts_no_flops_does_not_zero_later_calls(meter_kind):
    """A zero-size contraction, or a matrix power of 1, counts no FLOPs; the same op with other arguments must still
    count what FlopCounterMode counts (the cache is per argument key, not per op)."""
    a = torch.rand(16, 16)
    cases = [(lambda: torch.tensordot(torch.rand(4, 0), torch.rand(0, 4), 1), lambda: torch.tensordot(a, a, 1)),
             (lambda: torch.linalg.matrix_power(a, 1), lambda: torch.linalg.matrix_power(a, 8)),
             (lambda: torch.inner(torch.rand(4, 0), torch.rand(4, 0)), lambda: torch.inner(a, a)),
             (lambda: torch.linalg.multi_dot([torch.rand(4, 0), torch.rand(0, 4)]),
              lambda: torch.linalg.multi_dot([a, a, a]))]
    for first, later in cases:
        for fn in (first, later, later):
            meter = ComputeMeter(guard=True)
            with torch.inference_mode(), meter:
                fn()
            with FlopCounterMode(display=False) as reference, torch.no_grad():
                fn()
            assert meter.take() == reference.get_total_flops()
        assert reference.get_total_flops() > 0


def test_complex128_parameters_and_buffers_are_sealed_whole():
    """A 16-byte element is two 64-bit words: the seal and the buffer check compare every word (review of issue 22:
    a complex128 parameter failed its first step, and a change in a complex128 buffer went unseen)."""
    from cemabench.errors import ForwardOnlyViolation
    from cemabench.method import EdgeDecision, EdgeLogic
    from cemabench.protocol.checks import Checks
    from cemabench.protocol.edge import ForwardOnlyEdge

    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, dtype=torch.complex128), requires_grad=False)
            self.register_buffer("a", torch.zeros(3, dtype=torch.complex128))
            self.register_buffer("b", torch.zeros(5, dtype=torch.complex128))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x.flatten(1)[:, :4]) + self.w.real.sum()

    class Predict(EdgeLogic):
        def step(self, model, x):
            return EdgeDecision(logits=model(x))

    edge = ForwardOnlyEdge(Complex(), Predict())
    x = torch.rand(2, 4)
    edge.step(x, 2)  # an honest step passes
    for name, index in (("b", 0), ("b", 3), ("a", 2)):
        getattr(edge.model, name)[index] = 1 + 1j
        checks = Checks()
        edge.check_untouched(checks, "the cloud step")
        with pytest.raises(ForwardOnlyViolation, match=f"changed the edge's {name}"):
            checks.read()
        edge.step(x, 2)  # a new snapshot
    with torch.no_grad():
        edge.model.w.numpy()[3] = 2  # behind torch's back, in the upper half of the tensor's words
    with pytest.raises(ForwardOnlyViolation, match="w"):
        edge.step(x, 2)


# ---- reviewer's findings on the seal's faster walk (2026-12-06) ------------------------------------------------------
class _Predict(EdgeLogic):
    def step(self, model, x):
        return EdgeDecision(model(x))


class _ReachDeviceZero(CloudLogic):
    """Device 1's cloud moves device 0's edge BatchNorm statistics (found through gc)."""

    def step(self, upload):
        for edge in [o for o in gc.get_objects() if type(o).__name__ == "ForwardOnlyEdge"]:
            if getattr(edge.logic, "device", None) == 0:
                with torch.no_grad():
                    edge.model.bn.running_mean.add_(0.5)


class _CloudOnDeviceOne(Method):
    name = "cloud-on-device-one"
    paper = "-"

    def __init__(self):
        self.clouds = 0

    def edge(self, num_classes):
        return _Predict()

    def edge_for(self, num_classes, device):
        logic = _Predict()
        logic.device = device
        return logic

    def cloud(self, resources):  # one replica per device: none for device 0, a cloud for device 1
        self.clouds += 1
        return None if self.clouds == 1 else _ReachDeviceZero()


def test_an_edge_without_a_cloud_of_its_own_is_checked_after_another_devices_cloud_step():
    """Every edge's buffers are checked after any cloud step, the edges of devices whose replica has no cloud too."""
    from cemabench.protocol.stream import DeviceStreams, build_blocks

    torch.manual_seed(0)
    dataset = tiny_dataset()
    models = Models.copies_of(TinyNet().eval(), TinyNet().eval())
    by = {d.name: d for d in dataset.domains}
    streams = DeviceStreams([build_blocks("continual", [by[n]], seed=0) for n in ("a", "b")])
    results = run_unit(_CloudOnDeviceOne(), streams, models, 4, dataset.clean,
                       Protocol(batch_size=16, setting="continual", devices=2), seed=0)
    assert [r.status for r in results] == ["skipped", "error"], [(r.status, r.message) for r in results]
    assert "changed the edge's bn.running_mean outside a download" in results[1].message


class _Shadow(EdgeLogic):
    """Keeps a parameter-free module named like the model's BatchNorm: its buffers would take the model's names."""

    def __init__(self):
        self.bn = nn.BatchNorm2d(4, affine=False)

    def step(self, model, x):
        return EdgeDecision(model(x))


class _Same(nn.Linear):
    """Modules that compare equal: torch's named_modules() keeps the first of them only."""

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Same)


class _TwoHeads(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base, self.a, self.b = base, _Same(4, 4), _Same(4, 4)

    def forward(self, x):
        return self.base(x) + self.b(self.base(x)) * 0


class _Hebbian(EdgeLogic):
    def configure(self, model):
        return _TwoHeads(model)

    def step(self, model, x):
        model.b.weight.add_(0.1)  # an in-place update of an edge parameter, outside any download
        return EdgeDecision(model(x))


@pytest.mark.parametrize("logic, words", [(_Shadow, "two edge buffers are named bn.num_batches_tracked"),
                                          (_Hebbian, "wrote into the edge parameter b.weight")])
def test_no_edge_tensor_hides_behind_a_shared_name_or_an_equal_module(tiny, logic, words):
    (result, *_) = _run(tiny, plugin(None, logic=logic))
    assert result.status == "error" and words in result.message, result.message


def test_a_static_method_of_the_harness_re_initialised_with_a_look_alike_is_found(monkeypatch):
    """``staticmethod.__init__`` called again on the recorded object, with a callable that copies the original's
    code, defaults and closure: the function the method holds is recorded and compared by identity."""
    import functools

    from cemabench.protocol import hygiene
    from cemabench.protocol.codecs import InputCodec

    wrapper = vars(InputCodec)["decode"]
    original = wrapper.__func__

    class LookAlike:
        def __init__(self):
            self.__code__, self.__defaults__, self.__closure__ = original.__code__, original.__defaults__, None

        def __call__(self, *args, **kwargs):
            return original(*args, **kwargs)

    try:
        for replacement in (LookAlike(), functools.partial(original)):
            wrapper.__init__(replacement)
            assert hygiene.replaced_harness_code() == ["cemabench.protocol.codecs.InputCodec.decode"]
    finally:
        wrapper.__init__(original)
    assert hygiene.replaced_harness_code() == []
