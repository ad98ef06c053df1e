"""Split models: head then tail equals the whole model exactly, parts share the model's parameters, bad stages fail."""
import pytest
import torch

from cemabench.errors import UserError
from cemabench.models.mini import load_model
from cemabench.models.split import feature_shapes, split, stage_names, tail_from
from cemabench.models.zoo import tiny_model, torchvision_model

TORCHVISION_STAGES = ["stem", "layer1", "layer2", "layer3", "layer4"]
MINI_STAGES = ["stem", "layer1", "layer2", "layer3"]


def resnet18():
    torch.manual_seed(0)
    return torchvision_model("resnet18@none")


def _bn_statistics_nonzero(model):
    """Random-weight BN layers start at mean 0 / var 1; move them so eval mode exercises real statistics."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


MODELS = {
    "resnet18": (resnet18, 64, TORCHVISION_STAGES),
    "mini-edge": (lambda: load_model("edge"), 32, MINI_STAGES),
    "mini-foundation": (lambda: load_model("foundation"), 32, MINI_STAGES),
}


# ResNet-18 in float32 (5 s) is in the slow tier: the same split is checked in float64, and the small nets in both
SLOW_SPLIT = ("resnet18", torch.float32)
SPLIT_CASES = [pytest.param(name, dtype, marks=[pytest.mark.slow] if (name, dtype) == SLOW_SPLIT else [])
               for dtype in (torch.float64, torch.float32) for name in sorted(MODELS)]


@pytest.mark.parametrize("name, dtype", SPLIT_CASES)
def test_head_then_tail_is_the_whole_model_exactly(name, dtype):
    build, size, names = MODELS[name]
    model = _bn_statistics_nonzero(build()).to(dtype).eval()
    assert stage_names(model) == names
    x = torch.rand(3, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(x)
        for stage in names:
            head, tail = split(model, stage)
            feature = head(x)
            out = tail(feature)
            assert out.dtype == dtype and torch.equal(out, whole), (name, stage)


def test_split_in_training_mode_matches_and_updates_the_models_own_statistics():
    model = load_model("edge").double().train()
    twin = load_model("edge").double().train()
    x = torch.rand(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    head, tail = split(model, "layer1")
    assert head.training and tail.training
    assert torch.equal(tail(head(x)), twin(x))
    assert torch.equal(model.layer2[0].bn1.running_mean, twin.layer2[0].bn1.running_mean)


def test_splitting_leaves_mixed_module_modes_alone():
    model = load_model("foundation").train()
    model.layer2[0].bn1.eval()  # e.g. a method that freezes some statistics
    head, tail = split(model, "layer1")
    assert head.training and tail.training and not model.layer2[0].bn1.training and model.layer2[0].bn2.training
    tail.eval()
    assert not any(m.training for m in model.layer2.modules()) and model.layer1.training


def test_parts_share_the_models_parameters_unless_copied():
    model = load_model("edge")
    head, tail = split(model, "layer2")
    whole = {id(p) for p in model.parameters()}
    parts = [id(p) for p in head.parameters()] + [id(p) for p in tail.parameters()]
    assert len(parts) == len(whole) and set(parts) == whole
    assert head.names == ["stem", "layer1", "layer2"] and tail.names == ["layer3", "classifier"]
    copied_head, copied_tail = split(model, "layer2", copy=True)
    assert not {id(p) for p in copied_head.parameters()} & whole
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(copied_tail(copied_head(x)), model(x))
        model.fc.bias.add_(1.0)
        assert not torch.equal(copied_tail(copied_head(x)), model(x))
        assert torch.equal(tail(head(x)), model(x))


def test_the_head_normalises_its_input_as_the_zoo_wrapper_does():
    model = resnet18().eval()
    head, _ = split(model, "stem")
    assert head.steps[0] is model.normalize
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        net = model.net
        expected = net.maxpool(net.relu(net.bn1(net.conv1(model.normalize(x)))))
        assert torch.equal(head(x), expected)
    mini_head, _ = split(load_model("edge"), "stem")
    assert isinstance(mini_head.steps[0], type(model.normalize))


def test_tail_from_runs_another_models_later_stages_on_a_feature_of_that_stage():
    edge, cloud = load_model("edge").eval(), load_model("foundation").eval()
    shapes = feature_shapes(cloud, 32)
    feature = torch.rand(4, *shapes["layer1"])
    tail = tail_from(cloud, "layer1")
    with torch.no_grad():
        out = tail(feature)
        assert out.shape == (4, 10)
        assert torch.equal(out, cloud.fc(cloud.layer3(cloud.layer2(feature)).mean(dim=(2, 3))))
    assert feature_shapes(edge, 32)["layer1"] != shapes["layer1"]  # what an adapter must map between


def test_feature_shapes_per_stage_and_the_model_left_as_it_was():
    model = resnet18().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = feature_shapes(model, 64)
    assert shapes == {"stem": (64, 16, 16), "layer1": (64, 16, 16), "layer2": (128, 8, 8), "layer3": (256, 4, 4),
                      "layer4": (512, 2, 2), "classifier": (1000,)}
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert feature_shapes(load_model("edge"), (32, 48)) == {"stem": (8, 32, 48), "layer1": (8, 32, 48),
                                                            "layer2": (16, 16, 24), "layer3": (32, 8, 12),
                                                            "classifier": (10,)}
    assert list(feature_shapes(tiny_model("foundation"), 32)) == MINI_STAGES + ["classifier"]


def test_timm_resnet_splits_exactly():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, drop_rate=0.25).double().eval()
    assert stage_names(model) == TORCHVISION_STAGES
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        whole = model(x)
        for stage in TORCHVISION_STAGES:
            head, tail = split(model, stage)
            assert torch.equal(tail(head(x)), whole)


@pytest.mark.parametrize("stage", ["layer4", "classifier", "fc", ""])
def test_an_unknown_stage_is_a_user_error_naming_the_valid_stages(stage):
    with pytest.raises(UserError, match=r"^MiniResNet has no stage .*; valid: stem, layer1, layer2, layer3$") as error:
        split(load_model("edge"), stage)
    assert "\n" not in str(error.value)


def test_an_unsupported_architecture_is_a_user_error():
    with pytest.raises(UserError, match="cannot split a torch.nn.modules.linear.Linear: stages are described only"):
        stage_names(torch.nn.Linear(2, 2))

