"""Split models: cut a classifier at a named stage into a head (input to that stage's output) and a tail (the rest,
through the classifier), for edge/cloud collaborative inference (an edge sends a feature map; the cloud finishes).

Each supported family is described once, by the zoo that builds it (:func:`~cemabench.models.layouts.register_layout`),
as its ordered stages;
a stage is a list of the network's own modules (plus parameter-free glue such as flattening) that run one after
another. The stage names are
the cut points (``stem``, ``layer1`` .. ``layerN``); the last stage, ``classifier``, is not a cut point. A model
behind an input-normalisation wrapper (:class:`~cemabench.models.layers.Normalized`) gets the normalisation as the
first step of its first stage, so a head always takes images in [0, 1], as every cemabench model does.

Head and tail hold the original modules (no copies unless ``copy=True``), so they share parameters, buffers and
train/eval mode with the model, and head then tail computes exactly what the model computes: the same operations
in the same order.
"""
from __future__ import annotations

import contextlib
import copy as copying

import torch
from torch import nn

from cemabench.errors import UserError
from cemabench.models.layers import Normalized
from cemabench.models.layouts import Stages, layout_of
from cemabench.protocol.meter import COUNTERS


def _unwrap(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The input normalisations in front of the network (outermost first) and the network itself."""
    before = []
    while isinstance(model, Normalized):
        before.append(model.normalize)
        model = model.net
    return before, model


def stages(model: nn.Module) -> Stages:
    """The model's ordered stages, the last one being ``classifier``; normalisation wrappers lead the first stage.
    A family no loaded zoo has registered is looked for in every model plugin's module."""
    before, net = _unwrap(model)
    described = layout_of(net)(net)
    first_name, first = described[0]
    return [(first_name, before + first), *described[1:]]


def stage_names(model: nn.Module) -> list[str]:
    """The names a model can be cut at, in order (every stage but the classifier)."""
    return [name for name, _ in stages(model)[:-1]]


class Part(nn.Module):
    """A contiguous run of a model's stages, named in ``names``; the modules are the model's own."""

    def __init__(self, steps: Stages, training: bool):
        super().__init__()
        self.names = [name for name, _ in steps]
        self.steps = nn.Sequential(*[module for _, modules in steps for module in modules])
        self.training = self.steps.training = training  # the containers' flags only: the model's modules keep theirs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.steps(x)


def _cut(model: nn.Module, stage: str) -> int:
    names = stage_names(model)
    if stage not in names:
        raise UserError(f"{type(_unwrap(model)[1]).__name__} has no stage {stage!r}; valid: {', '.join(names)}")
    return names.index(stage) + 1


def split(model: nn.Module, stage: str, copy: bool = False) -> tuple[Part, Part]:
    """(head, tail): the head runs the input through ``stage`` (input normalisation included), the tail runs the rest
    through the classifier. They share the model's modules unless ``copy`` (then both share one deep copy)."""
    if copy:
        model = copying.deepcopy(model)
    all_stages, cut = stages(model), _cut(model, stage)
    head, tail = Part(all_stages[:cut], model.training), Part(all_stages[cut:], model.training)
    for counter in vars(model).get(COUNTERS, ()):  # the harness counts passes that reach the output
        counter.attach(tail)
    return head, tail


def head_to(model: nn.Module, stage: str, copy: bool = False) -> Part:
    """The part of ``model`` from its input through ``stage``."""
    return split(model, stage, copy)[0]


def tail_from(model: nn.Module, stage: str, copy: bool = False) -> Part:
    """The part of ``model`` after ``stage``, through its classifier: where a feature of the shape ``model`` has
    after ``stage`` enters it (e.g. the cloud finishing from its stage k on an adapted edge feature)."""
    return split(model, stage, copy)[1]


def feature_shapes(model: nn.Module, input_size: int | tuple[int, int], channels: int = 3
                   ) -> dict[str, tuple[int, ...]]:
    """Per cut stage, in order, the shape (C, H, W) of one sample's feature after it, for an input of ``input_size``
    pixels (``classifier``: the output shape). Runs one zero image in eval mode without autograd; the model's modes,
    parameters and buffers are left as they were."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    reference = next(iter(model.parameters()), None)
    x = torch.zeros(1, channels, height, width, dtype=reference.dtype if reference is not None else None,
                    device=reference.device if reference is not None else None)
    shapes = {}
    with probing(model):
        for name, modules in stages(model):
            for module in modules:
                x = module(x)
            shapes[name] = tuple(x.shape[1:])
    return shapes


@contextlib.contextmanager
def probing(model: nn.Module):
    """Eval mode without autograd for a look at a model (its shapes, its outputs); every module's mode is put back
    afterwards, and eval mode leaves parameters and buffers as they were."""
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes.items():
            module.train(training)
