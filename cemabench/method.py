"""The plugin API: what a cloud-edge method implements.

A method is two halves that talk only through the link: an :class:`EdgeLogic`, which runs forward-only on the edge
model, and a :class:`CloudLogic`, which trains whatever models the cloud holds. The harness builds both halves for
every run unit (a domain under ``per_domain`` reset, the whole stream under ``continual``), so method state never
leaks across a reset. Labels never reach either half.

Python cannot stop a plugin that shares objects between its halves on purpose; the harness enforces what it can
observe (no gradient through the edge, no edge parameter change outside a download, every byte that crosses counted).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from cemabench.errors import UserError

Download = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CloudEdgeMapping:
    """How a method maps onto the cloud-edge setting, for the methods table."""

    selection: str
    uploads: str
    cloud: str
    download: str


@dataclass
class EdgeDecision:
    """What the edge decides for one batch: the scored prediction and what to send up."""

    logits: torch.Tensor
    upload: torch.Tensor | None = None  # indices into the batch of the samples to upload
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # extra named tensors to upload
    await_answers: bool = False  # offloading: the cloud's answers replace the scored logits of the uploaded samples


@dataclass
class Upload:
    """What reaches the cloud for one edge batch, after the link applied the budget. May be empty."""

    samples: torch.Tensor
    tensors: dict[str, torch.Tensor]
    batch_index: int
    index: torch.Tensor | None = None  # positions of the samples in the edge batch


@dataclass
class CloudReply:
    """A cloud step's full reply: a download for the edge, and/or answers (logits) for the uploaded samples of
    this batch when the edge awaits them. Answers arrive at once; downloads after the delivery delay."""

    download: Download | None = None
    answers: torch.Tensor | None = None


@dataclass
class CloudResources:
    """What the cloud may build from. Each call returns a fresh model with the source weights."""

    num_classes: int
    edge_replica: Callable[[], nn.Module]
    foundation: Callable[[], nn.Module]
    clean_images: Callable[[int], torch.Tensor]  # up to n clean in-distribution images (source data the cloud keeps)
    device: torch.device = torch.device("cpu")


class EdgeLogic:
    """The edge half. ``step`` runs under ``torch.inference_mode`` on a model whose parameters never require grad."""

    def configure(self, model: nn.Module) -> nn.Module:
        """Prepare the edge model once (module modes, normalisation layers); may return a replacement module."""
        return model

    def step(self, model: nn.Module, x: torch.Tensor) -> EdgeDecision:
        raise NotImplementedError

    def receive(self, model: nn.Module, download: Download) -> None:
        """Apply a download; the default loads the named tensors into the model's state."""
        model.load_state_dict(download, strict=False)


class CloudLogic:
    """The cloud half: called once per edge batch (also when nothing was uploaded), with full autograd."""

    def step(self, upload: Upload) -> Download | CloudReply | None:
        raise NotImplementedError


class Method:
    """Base class of a method plugin: hyper-parameters in ``Options`` (a dataclass), and a factory for each half."""

    name: ClassVar[str]
    paper: ClassVar[str]
    mapping: ClassVar[CloudEdgeMapping]
    # Optional: declare ``version = "..."`` on a method class to key stored results by it instead of by the source
    # of the method's modules (bump it whenever a change to the code changes numbers).
    version: ClassVar[str | None] = None

    @dataclass
    class Options:
        pass

    def __init__(self, **options):
        self.options = parse_options(self.Options, options, f"method {self.name!r}")
        self.validate()

    @classmethod
    def derive_options(cls, options: dict, references: list[dict]) -> dict:
        """The options of a run unit that depends on other units (a spec's ``match_uploads_of``), from the result
        records of those units (``{"unit": ..., "results": [DomainResult.to_dict(), ...]}``). The default ignores
        them; a method that copies something from its reference (e.g. its upload rate) overrides this."""
        return options

    def validate(self) -> None:
        """Raise :class:`UserError` for option values that are invalid together or out of range."""

    def edge(self, num_classes: int) -> EdgeLogic:
        raise NotImplementedError

    def cloud(self, resources: CloudResources) -> CloudLogic | None:
        """The cloud half, or None for edge-only methods."""
        return None


def parse_options(options_class: type, values: dict, owner: str):
    """Build an options dataclass, rejecting unknown names and values of the wrong type with a clear message."""
    fields = {f.name: f for f in dataclasses.fields(options_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{owner} has no option {', '.join(map(repr, unknown))}; valid options: "
                        f"{', '.join(fields) or '(none)'}")
    hints = typing.get_type_hints(options_class)
    values = dict(values)
    for name, value in values.items():
        if typing.get_origin(hints[name]) is tuple:
            item = typing.get_args(hints[name])[0]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, item) for v in value):
                raise UserError(f"{owner}: option {name!r} must be a list of {item.__name__}, got {value!r}")
            values[name] = tuple(value)
            continue
        allowed = typing.get_args(hints[name]) or (hints[name],)
        allowed = tuple(float if t is float else t for t in allowed)
        ok = any(
            value is None if t is type(None)
            else (isinstance(value, (int, float)) and not isinstance(value, bool)) if t is float
            else isinstance(value, t) and not (t is int and isinstance(value, bool))
            for t in allowed
        )
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise UserError(f"{owner}: option {name!r} must be {names}, got {value!r}")
    return options_class(**values)
