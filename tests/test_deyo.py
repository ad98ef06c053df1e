"""DeYO (Lee et al., ICLR 2024) against values derived by hand from the released algorithm (Jhyun17/DeYO), float64:
the patch shuffle, PLPD on a hand-built model, both filters and their switches, the sample weights, and one SGD step
in each cloud-edge mapping."""
import math

import pytest
import torch
import torchvision
from torch import nn

from cemabench.method import Upload
from cemabench.protocol import Models, Protocol, run_unit
from cemabench.registry import build_method
from cemabench_methods.common import entropy, use_batch_statistics
from cemabench_methods.deyo import DeYOSelection, patch_shuffle
from conftest import TinyNet, cloud_resources, tiny_dataset

pytestmark = pytest.mark.usefixtures("float64")

LR, MOMENTUM = 0.00025, 0.9


def drawn_orders(seed: int, n: int, tiles: int) -> torch.Tensor:
    """The released code's tile orders: the argsort of each row of torch.rand(n, tiles), on the CPU generator."""
    torch.manual_seed(seed)
    return torch.argsort(torch.rand(n, tiles), dim=-1)


def shuffled_by_hand(x: torch.Tensor, orders: torch.Tensor, patches: int) -> torch.Tensor:
    """Tile k (row by row) of image i becomes tile orders[i, k] of the input, one tile at a time."""
    tile = x.shape[-1] // patches
    out = torch.empty_like(x)
    for i in range(len(x)):
        for k in range(patches * patches):
            src, (r, c) = divmod(int(orders[i, k]), patches), divmod(k, patches)
            out[i, :, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = \
                x[i, :, src[0] * tile:(src[0] + 1) * tile, src[1] * tile:(src[1] + 1) * tile]
    return out


def test_patch_shuffle_moves_whole_tiles_in_the_drawn_order():
    x = torch.arange(3 * 2 * 8 * 8, dtype=torch.float64).reshape(3, 2, 8, 8)
    expected = shuffled_by_hand(x, drawn_orders(5, 3, 16), 4)
    torch.manual_seed(5)
    assert torch.equal(patch_shuffle(x, 4), expected)
    assert not torch.equal(expected, x)


@pytest.mark.parametrize("antialias", [False, True])
def test_a_width_that_is_no_multiple_of_the_patches_is_resized_as_the_released_code_does(antialias):
    """6 px, 4 x 4 tiles: torchvision's Resize((4, 4)), the tiles shuffled, Resize((6, 6)), as released; without
    antialiasing as torchvision 0.11 (the released environment) resized tensors, with it as torchvision >= 0.17."""
    x = torch.rand(2, 3, 6, 6)
    down = torchvision.transforms.Resize((4, 4), antialias=antialias)
    up = torchvision.transforms.Resize((6, 6), antialias=antialias)
    expected = up(shuffled_by_hand(down(x), drawn_orders(3, 2, 16), 4))
    torch.manual_seed(3)
    assert torch.equal(patch_shuffle(x, 4, antialias), expected)


class BrightPixelNet(nn.Module):
    """Four classes, one per pixel of a 2 x 2 grey image: logit k is pixel k (no normalisation layer)."""

    def forward(self, x):
        return x.flatten(1)


def _options(**changes):
    return build_method("deyo", {"patch_len": 2, **changes}).options


def test_plpd_filters_and_weights_on_a_hand_built_model():
    """Samples: a bright pixel of 3 at position 0 (entropy below 0.5 ln 4), of 5 at position 3 (also), of 1 at
    position 0 (entropy above), and an all-dark image (uniform: ln 4). Shuffling the four one-pixel tiles moves a
    bright pixel to where the drawn order puts it; PLPD = p_c(x) - p_c(x'), c = argmax p(x)."""
    x = torch.zeros(4, 1, 2, 2)
    x[0, 0, 0, 0], x[1, 0, 1, 1], x[2, 0, 0, 0] = 3.0, 5.0, 1.0
    seed = 7
    orders = drawn_orders(seed, 2, 4)  # the two samples that pass the entropy filter reach the shuffle
    moved = [int((orders[0] == 0).nonzero()) != 0, int((orders[1] == 3).nonzero()) != 3]
    assert moved == [True, True], "the seed must move both bright pixels for the values below"
    ent = [(math.log(math.exp(v) + 3) - v * math.exp(v) / (math.exp(v) + 3)) for v in (3.0, 5.0)]
    plpd = [(math.exp(v) - 1) / (math.exp(v) + 3) for v in (3.0, 5.0)]  # e^v/(e^v+3) - 1/(e^v+3)
    weights = [math.exp(-(h - 0.4 * math.log(4))) + math.exp(d) for h, d in zip(ent, plpd)]

    model = BrightPixelNet()
    select = DeYOSelection(_options(), 4)
    torch.manual_seed(seed)
    keep, got = select(model, x, model(x))
    assert keep.tolist() == [0, 1]
    assert torch.allclose(got, torch.tensor(weights), rtol=1e-14, atol=0)

    # the threshold is strict: with tau_PLPD just above the smaller PLPD only the larger stays
    torch.manual_seed(seed)
    keep, got = DeYOSelection(_options(plpd_threshold=plpd[0] + 1e-9), 4)(model, x, model(x))
    assert keep.tolist() == [1] and torch.allclose(got, torch.tensor(weights[1:]), rtol=1e-14, atol=0)


def test_the_released_filter_switches_and_strictness():
    """Filters off, as released: entropy <= ln 1000 (the uniform image passes) and PLPD >= -2 (every one passes).
    PLPD filter on at 0: the uniform image's PLPD is exactly 0 (uniform stays uniform) and 0 > 0 fails."""
    x = torch.zeros(4, 1, 2, 2)
    x[0, 0, 0, 0], x[1, 0, 1, 1], x[2, 0, 0, 0] = 3.0, 5.0, 1.0
    model = BrightPixelNet()
    everything = DeYOSelection(_options(filter_entropy=False, filter_plpd=False), 4)
    assert everything(model, x, model(x))[0].tolist() == [0, 1, 2, 3]
    strict = DeYOSelection(_options(filter_entropy=False, plpd_threshold=0.0), 4)
    keep = strict(model, x, model(x))[0].tolist()
    assert 3 not in keep and set(keep) <= {0, 1, 2}
    nothing = DeYOSelection(_options(entropy_margin=0.0), 4)
    keep, weights = nothing(model, x, model(x))
    assert keep.tolist() == [] and weights is None


@pytest.mark.parametrize("ent_on, plpd_on", [(True, True), (True, False), (False, True), (False, False)])
def test_the_sample_weights_and_their_switches(ent_on, plpd_on):
    """alpha = 1 / exp(Ent - Ent_0) + 1 / exp(-PLPD) (Ent_0 = 0.4 ln C); a switched-off term is left out, both off:
    no weights at all (plain mean entropy)."""
    select = DeYOSelection(_options(reweight_entropy=ent_on, reweight_plpd=plpd_on), 10)
    ent, plpd = torch.tensor([0.1, 1.0, 2.0]), torch.tensor([0.3, 0.5, 0.9])
    expected = ((torch.exp(-(ent - 0.4 * math.log(10))) if ent_on else 0) + (torch.exp(plpd) if plpd_on else 0))
    got = select.weights(ent, plpd)
    if ent_on or plpd_on:
        assert torch.allclose(got, expected, rtol=1e-14, atol=0)
    else:
        assert got is None


def _selected(model, x, ent, seed, tau_ent, tau_plpd):
    first = torch.where(ent < tau_ent)[0]
    x_prime = shuffled_by_hand(x[first], drawn_orders(seed, len(first), 16), 4)
    with torch.no_grad():
        destroyed = model(x_prime).softmax(1)
    probs = model(x).detach().softmax(1)[first]
    label = probs.argmax(1)
    plpd = probs[torch.arange(len(first)), label] - destroyed[torch.arange(len(first)), label]
    second = plpd > tau_plpd
    keep = first[second]
    weights = torch.exp(-(ent[keep].detach() - 0.4 * math.log(4))) + torch.exp(plpd[second])
    return keep, weights


def _thresholds(model, x, seed):
    """tau_Ent and tau_PLPD between the values of this random net, so that each filter keeps some and drops some."""
    ent = entropy(model(x)).detach()
    tau_ent = ent.sort().values[len(x) // 2].item()
    first = torch.where(ent < tau_ent)[0]
    with torch.no_grad():
        destroyed = model(shuffled_by_hand(x[first], drawn_orders(seed, len(first), 16), 4)).softmax(1)
    probs = model(x).detach().softmax(1)[first]
    label = probs.argmax(1)
    plpd = probs[torch.arange(len(first)), label] - destroyed[torch.arange(len(first)), label]
    return tau_ent, plpd.sort().values[len(first) // 2].item()


def test_cloud_selection_is_one_released_step_on_the_whole_batch():
    """select_on = "cloud": the loss is the mean of alpha * entropy over the selected samples of the whole batch's
    forward (BatchNorm on all 16 samples' statistics), one SGD step; no step when nothing passes."""
    resources = cloud_resources()
    ref = use_batch_statistics(resources.edge_replica())
    x, seed = torch.rand(16, 3, 8, 8), 11
    tau_ent, tau_plpd = _thresholds(ref, x, seed)
    keep, weights = _selected(ref, x, entropy(ref(x)), seed, tau_ent, tau_plpd)
    assert 0 < len(keep) < 8
    loss = (entropy(ref(x))[keep] * weights).mean()
    g = torch.autograd.grad(loss, [ref.bn.weight, ref.bn.bias])
    options = {"select_on": "cloud", "entropy_margin": tau_ent / math.log(4), "plpd_threshold": tau_plpd}
    cloud = build_method("deyo", options).cloud(resources)
    torch.manual_seed(seed)
    down = cloud.step(Upload(x, {}, 0, index=torch.arange(16)))
    assert set(down) == {"bn.weight", "bn.bias"}
    assert torch.allclose(down["bn.weight"], ref.bn.weight - LR * g[0], rtol=0, atol=1e-15)
    assert torch.allclose(down["bn.bias"], ref.bn.bias - LR * g[1], rtol=0, atol=1e-15)
    none = build_method("deyo", {"select_on": "cloud", "entropy_margin": 0.0}).cloud(resources)
    assert none.step(Upload(x, {}, 0, index=torch.arange(16))) is None and not none.optimizer.state


def test_edge_selection_uploads_the_selected_samples_with_their_weights_and_the_cloud_steps_on_them():
    """The default mapping: the edge uploads exactly the released selection with alpha as payload; the cloud forwards
    the uploaded samples alone (BatchNorm on their statistics) and steps on mean(alpha * entropy), twice (momentum)."""
    resources = cloud_resources()
    ref = use_batch_statistics(resources.edge_replica())
    x, seed = torch.rand(16, 3, 8, 8), 11
    tau_ent, tau_plpd = _thresholds(ref, x, seed)
    keep, weights = _selected(ref, x, entropy(ref(x)), seed, tau_ent, tau_plpd)
    method = build_method("deyo", {"entropy_margin": tau_ent / math.log(4), "plpd_threshold": tau_plpd})
    edge = method.edge(4)
    model = edge.configure(resources.edge_replica().requires_grad_(False))
    torch.manual_seed(seed)
    with torch.inference_mode():
        decision = edge.step(model, x)
    assert torch.equal(decision.upload, keep) and torch.equal(decision.logits, ref(x).detach())
    assert torch.allclose(decision.payload["weight"], weights, rtol=1e-14, atol=0)

    cloud = method.cloud(resources)
    params = [ref.bn.weight, ref.bn.bias]
    g1 = torch.autograd.grad((entropy(ref(x[keep])) * weights).mean(), params)
    down = cloud.step(Upload(x[keep], {}, 0, index=keep, payload={"weight": weights}))
    for name, p, g in zip(("bn.weight", "bn.bias"), params, g1):
        assert torch.allclose(down[name], p - LR * g, rtol=0, atol=1e-15)
    with torch.no_grad():
        for p, g in zip(params, g1):
            p.sub_(LR * g)
    g2 = torch.autograd.grad((entropy(ref(x[:5])) * weights[:1]).mean(), params)
    down = cloud.step(Upload(x[:5], {}, 1, index=torch.arange(5), payload={"weight": weights[:1].expand(5)}))
    for name, p, a, b in zip(("bn.weight", "bn.bias"), params, g1, g2):
        assert torch.allclose(down[name], p - LR * (MOMENTUM * a + b), rtol=0, atol=1e-15)
    assert cloud.step(Upload(x[:0], {}, 2, index=torch.arange(0))) is None


def test_a_unit_is_deterministic_from_its_seed():
    """Same seed, same unit: the same predictions, uploads and bytes (the shuffles draw from the unit's random
    state)."""
    torch.set_default_dtype(torch.float32)
    dataset = tiny_dataset(domains=("a",), n=48)

    def unit(seed):
        torch.manual_seed(0)
        models = Models.copies_of(TinyNet().eval(), TinyNet().eval())
        method = build_method("deyo", {"entropy_margin": 1.0, "plpd_threshold": -1.0, "lr": 0.05})
        (result,) = run_unit(method, dataset.domains, models, 4, dataset.clean, Protocol(batch_size=16), seed=seed)
        assert result.status == "ok", result.message
        return result.correct, result.link.uploaded, result.link.upload_payload_bytes, result.link.bytes_down

    first = unit(0)
    assert first == unit(0)
    assert first[1] > 0 and first[2] == first[1] * 4  # each uploaded sample's weight, one float32
