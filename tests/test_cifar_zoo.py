"""The ``cifar:`` model zoo: upstream architectures (parameter and multiply-add counts, parameter names), weights from
the weights folder, the torch hub cache or a path, offline errors, bad names, split stages, a real eccentric run."""
import json
import os
import re

import pytest
import torch
from test_cifar import write_batches, write_c_tree
from test_split import _bn_statistics_nonzero
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cemabench.cli import main
from cemabench.errors import UserError
from cemabench.models.cifar import BLOCKS, DATASETS, CifarResNet, cifar_model, published_url
from cemabench.models.split import feature_shapes, head_to, split, stage_names, tail_from
from cemabench.models.zoo import hub_checkpoint, weights_folder
from cemabench.registry import build_model

# Exact counts of this module's nets; chenyaofo/pytorch-cifar-models' README states them rounded to 0.01 M:
# #Params (M) and #MAdds (M) of its CIFAR-10 and CIFAR-100 ResNets.
PARAMETERS = {("resnet20", "cifar10"): 272_474, ("resnet32", "cifar10"): 466_906, ("resnet44", "cifar10"): 661_338,
              ("resnet56", "cifar10"): 855_770, ("resnet20", "cifar100"): 278_324, ("resnet32", "cifar100"): 472_756,
              ("resnet44", "cifar100"): 667_188, ("resnet56", "cifar100"): 861_620}
README = {("resnet20", "cifar10"): (0.27, 40.81), ("resnet32", "cifar10"): (0.47, 69.12),
          ("resnet44", "cifar10"): (0.66, 97.44), ("resnet56", "cifar10"): (0.86, 125.75),
          ("resnet20", "cifar100"): (0.28, 40.82), ("resnet32", "cifar100"): (0.47, 69.13),
          ("resnet44", "cifar100"): (0.67, 97.44), ("resnet56", "cifar100"): (0.86, 125.75)}


def flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def seeded_state(arch: str, dataset: str = "cifar10", seed: int = 7) -> dict:
    """The state dict of a net with seed ``seed``'s weights (not the zoo's seed 0) and moved BN statistics."""
    torch.manual_seed(seed)
    net = cifar_model(f"{arch}@{dataset}:none").net
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0, 0.1)
    return _bn_statistics_nonzero(net).state_dict()


def assert_state(model: nn.Module, state: dict) -> None:
    loaded = model.net.state_dict()
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No download possible, no weights folder from the environment, a torch hub cache of this test's own."""
    monkeypatch.setenv("CEMABENCH_OFFLINE", "1")
    monkeypatch.delenv("CEMABENCH_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert str(hub_checkpoint("https://x/y.pt")).startswith(str(tmp_path / "torch"))
    return tmp_path


@pytest.mark.parametrize("arch, dataset", sorted(PARAMETERS))
def test_parameter_and_multiply_add_counts_are_the_upstream_models(arch, dataset):
    model = cifar_model(f"{arch}@{dataset}:none")
    count = sum(p.numel() for p in model.parameters())
    madds = flops(model.net, torch.zeros(1, 3, 32, 32)) / 2  # torch counts a multiply-add as 2 FLOPs
    assert count == PARAMETERS[arch, dataset]
    assert (round(count / 1e6, 2), round(madds / 1e6, 2)) == README[arch, dataset]
    assert isinstance(model.net, CifarResNet) and model.net.fc.out_features == DATASETS[dataset].num_classes
    assert not model.training


def upstream_names(blocks: int) -> list[str]:
    """chenyaofo's CifarResNet parameter names, in order: stem, three stages of basic blocks (the first block of
    stages 2 and 3 with a 1x1-conv + BN ``downsample``), classifier."""
    def bn(prefix):
        return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    names = ["conv1.weight", *bn("bn1")]
    for stage in (1, 2, 3):
        for block in range(blocks):
            at = f"layer{stage}.{block}"
            names += [f"{at}.conv1.weight", *bn(f"{at}.bn1"), f"{at}.conv2.weight", *bn(f"{at}.bn2")]
            if stage > 1 and block == 0:
                names += [f"{at}.downsample.0.weight", *bn(f"{at}.downsample.1")]
    return names + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("arch", sorted(BLOCKS))
def test_parameter_names_and_shapes_are_the_published_checkpoints(arch):
    state = cifar_model(f"{arch}@cifar100:none").net.state_dict()
    assert list(state) == upstream_names(BLOCKS[arch])
    assert state["conv1.weight"].shape == (16, 3, 3, 3) and state["layer2.0.conv1.weight"].shape == (32, 16, 3, 3)
    assert state["layer3.0.downsample.0.weight"].shape == (64, 32, 1, 1) and state["fc.weight"].shape == (100, 64)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_torchvision_style_nets_have_torchvisions_names_and_a_cifar_stem(arch):
    from torchvision.models import get_model

    model = cifar_model(f"{arch}@none")
    net = model.net
    assert list(net.state_dict()) == list(get_model(arch, weights=None, num_classes=10).state_dict())
    assert net.conv1.weight.shape == (64, 3, 3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity) and feature_shapes(model, 32)["layer4"][1:] == (4, 4)


@pytest.mark.parametrize("arch, dataset", [("resnet20", "cifar10"), ("resnet56", "cifar100")])
def test_published_weights_from_the_weights_folder_by_file_name(offline, arch, dataset):
    folder = offline / "weights"
    folder.mkdir()
    state = seeded_state(arch, dataset)
    torch.save(state, folder / os.path.basename(published_url(dataset, arch)))
    name = arch if dataset == "cifar10" else f"{arch}@{dataset}"  # cifar10 is the default
    with weights_folder(folder):
        model = build_model(f"cifar:{name}")
    assert_state(model, state)
    assert os.path.basename(published_url(dataset, arch)) == {
        "cifar10": "cifar10_resnet20-4118986f.pt", "cifar100": "cifar100_resnet56-f2eff4c8.pt"}[dataset]


def test_published_weights_from_the_torch_hub_cache(offline):
    state = seeded_state("resnet32", "cifar100")
    cached = hub_checkpoint(published_url("cifar100", "resnet32"))
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    assert cached.name == "cifar100_resnet32-84213ce6.pt"
    assert_state(cifar_model("resnet32@cifar100"), state)


def test_a_missing_published_file_offline_says_where_to_put_it(offline):
    url = published_url("cifar10", "resnet44")
    with pytest.raises(UserError) as error:
        cifar_model("resnet44")
    message = str(error.value)
    assert "\n" not in message and message.startswith("weights for cifar:resnet44 are not cached and "
                                                      "CEMABENCH_OFFLINE=1: put cifar10_resnet44-2a3cabcb.pt")
    assert f"(from {url}) at {hub_checkpoint(url)}" in message and "cifar:resnet44@cifar10:/path/to/" in message
    folder = offline / "weights"
    folder.mkdir()
    with weights_folder(folder), pytest.raises(UserError, match=rf"at .* or in {re.escape(str(folder))}, or name"):
        cifar_model("resnet44")


@pytest.mark.parametrize("arch, dataset", [("resnet20", "cifar10"), ("resnet18", "cifar100")])
def test_checkpoint_paths_load_with_the_datasets_classes_and_normalisation(tmp_path, arch, dataset):
    state = seeded_state(arch, dataset)
    path = tmp_path / "trained.pth"
    torch.save({"state_dict": state}, path)
    name = f"{arch}@{path}" if dataset == "cifar10" else f"{arch}@{dataset}:{path}"
    model = build_model(f"cifar:{name}")
    assert_state(model, state)
    assert model.net.fc.out_features == DATASETS[dataset].num_classes
    assert torch.equal(model.normalize.mean.flatten(), torch.tensor(DATASETS[dataset].mean))


def test_a_checkpoint_that_does_not_fit_names_the_mismatch(tmp_path):
    path = tmp_path / "c100.pt"
    torch.save(seeded_state("resnet20", "cifar100"), path)
    with pytest.raises(UserError, match=r"^checkpoint .*c100\.pt does not fit cifar:resnet20@.*c100\.pt: Error\(s\) "
                                        r"in loading state_dict for CifarResNet: size mismatch for fc\.weight"):
        cifar_model(f"resnet20@{path}")
    with pytest.raises(UserError, match=r"checkpoint /no/such\.pt for cifar:resnet20@/no/such\.pt does not exist"):
        cifar_model("resnet20@/no/such.pt")


@pytest.mark.parametrize("name, message", [
    ("resnet19", r"unknown cifar model 'resnet19'; valid: resnet20, resnet32, resnet44, resnet56 \(published "
                 r"CIFAR-10/100 weights\), resnet18, resnet34, resnet50 \(torchvision-style, a checkpoint path"),
    ("resnet20@imagenet", r"cifar:resnet20 has no weights 'imagenet'; valid: cifar10, cifar100 \(published weights\), "
                          r"\[cifar10:\|cifar100:\]none, or \[cifar10:\|cifar100:\]/path/to/checkpoint\.pt$"),
    ("resnet20@cifar1000:none", r"has no weights 'cifar1000:none'; valid: cifar10, cifar100"),
    ("resnet18", r"^cifar:resnet18: there are no published CIFAR weights for resnet18; name a checkpoint as "
                 r"cifar:resnet18@cifar10:/path/to/weights\.pth .* or cifar:resnet18@cifar10:none"),
    ("resnet50@cifar100", r"no published CIFAR weights for resnet50; .*cifar:resnet50@cifar100:/path"),
])
def test_bad_names_are_one_line_errors_naming_the_valid_choices(name, message):
    with pytest.raises(UserError, match=message) as error:
        build_model(f"cifar:{name}")
    assert "\n" not in str(error.value)


def test_random_weights_are_seeded_and_leave_the_callers_random_state_alone():
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    first, second = cifar_model("resnet20@none"), cifar_model("resnet20@none")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_models_take_images_in_0_1_and_normalise_with_the_training_sets_statistics():
    model = cifar_model("resnet20@none")
    assert DATASETS["cifar10"].mean == (0.4914, 0.4822, 0.4465) and DATASETS["cifar10"].std == (0.2023, 0.1994, 0.2010)
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(DATASETS["cifar10"].mean).view(1, 3, 1, 1), torch.tensor(DATASETS["cifar10"].std).view(
        1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(model(x), model.net((x - mean) / std))


SPLITS = {"resnet20": ["stem", "layer1", "layer2", "layer3"],
          "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"]}


@pytest.mark.parametrize("arch", sorted(SPLITS))
def test_head_then_tail_is_the_whole_model_at_every_stage(arch):
    model = _bn_statistics_nonzero(cifar_model(f"{arch}@none")).double().eval()
    assert stage_names(model) == SPLITS[arch]
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(x)
        for stage in SPLITS[arch]:
            head, tail = split(model, stage)
            assert torch.equal(tail(head(x)), whole), stage


def test_the_cloud_entered_at_layer2_finishes_a_layer1_feature():
    cloud = _bn_statistics_nonzero(cifar_model("resnet56@none")).eval()
    edge_feature = head_to(cifar_model("resnet20@none").eval(), "layer1")(torch.rand(2, 3, 32, 32))
    assert feature_shapes(cloud, 32)["layer1"] == tuple(edge_feature.shape[1:]) == (16, 32, 32)
    net = cloud.net
    with torch.no_grad():
        expected = net.fc(torch.flatten(net.avgpool(net.layer3(net.layer2(edge_feature))), 1))
        assert torch.equal(tail_from(cloud, "layer1")(edge_feature), expected)
    with pytest.raises(UserError, match=r"CifarResNet has no stage 'layer4'; valid: stem, layer1, layer2, layer3$"):
        split(cloud, "layer4")


def test_the_real_eccentric_table_runs_on_generated_cifar10_c_with_the_zoos_models(offline, capsys):
    """ECC-A at the paper's cut (edge after layer1, cloud entering at layer2), from a generated CIFAR-10-C tree and
    generated checkpoints under the published file names; the bytes and FLOPs are the models' own."""
    root, folder = offline / "data", offline / "weights"
    write_c_tree(root, corruptions=("fog",))
    write_batches(root, files=("test_batch",))
    write_batches(root, files=tuple(f"data_batch_{i}" for i in range(1, 6)), n=8, seed=2)
    folder.mkdir()
    for arch in ("resnet20", "resnet56"):
        torch.save(seeded_state(arch), folder / os.path.basename(published_url("cifar10", arch)))
    code = main(["run", "--table", "eccentric", "--method", "ecc-a:l1>l2,r1", "--domains", "fog", "--data-root",
                 str(root), "--weights", str(folder), "--batch-size", "10", "--option", "ka_epochs=1", "--option",
                 "ft_epochs=1", "--option", "train_samples=16", "--out", str(offline / "run.json")])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((offline / "run.json").read_text())
    assert {k: v["name"] for k, v in doc["provenance"]["models"].items()} == {
        "edge": "cifar:resnet20@cifar10", "foundation": "cifar:resnet56@cifar10"}
    [cell] = doc["cells"]
    assert cell["status"] == "ok" and cell["seen"] == 20 and cell["upload_percent"] == 100.0
    assert cell["bytes_up_per_sample"] == 16 * 32 * 32 + 4  # the layer1 feature map as int8, plus its fp32 scale
    assert cell["bytes_down_per_sample"] == 10 * 4  # the cloud's fp32 logits
    with weights_folder(folder):
        edge, cloud = build_model("cifar:resnet20"), build_model("cifar:resnet56")
    one = torch.zeros(1, 3, 32, 32)
    assert cell["edge_flops"] == 20 * flops(head_to(edge, "layer1"), one)
    adapter = 2 * 16 * 16 * 9 * 32 * 32  # adapter_depth 1: one 3x3 16 -> 16 conv at 32 x 32
    assert cell["cloud_flops"] == 20 * (adapter + flops(tail_from(cloud, "layer1"), torch.zeros(1, 16, 32, 32)))
