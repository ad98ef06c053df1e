"""The plugin API: what a cloud-edge method implements.

A method is two halves that talk only through the link: an :class:`EdgeLogic`, which runs forward-only on the edge
model, and a :class:`CloudLogic`, which trains whatever models the cloud holds. The harness builds both halves for
every run unit (a domain under the ``per-domain`` setting, the whole stream under the others), so method state never
leaks across a reset. Labels never reach either half.

Python cannot stop a plugin that shares objects between its halves on purpose; the harness enforces what it can
observe (no gradient through the edge, no edge parameter change outside a download, every byte that crosses counted).
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from cemabench.config import Protocol
from cemabench.config.bounds import Bounds, coerce
from cemabench.errors import UserError

Download = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CloudEdgeMapping:
    """How a method maps onto the cloud-edge setting, for the methods table."""

    selection: str
    uploads: str
    cloud: str
    download: str


PAYLOAD_DTYPES = ("float32", "float16", "int8", "int8+zstd")  # the link: cemabench.protocol.link.encode
# every payload encoding: the float ones, and ``entropy``: int32 symbols entropy-coded by the harness with the
# method's tables (:class:`EntropyTables`, :mod:`cemabench.protocol.bottleneck`)
PAYLOAD_ENCODINGS = (*PAYLOAD_DTYPES, "entropy")


@dataclass(frozen=True)
class EntropyTables:
    """A learned bottleneck's entropy model as deployed: fixed after the offline training stage, held by both halves
    (sent once, offline, with the model; never charged per sample), and handed to the harness, which entropy-codes
    every ``payload_dtype="entropy"`` payload with it (:mod:`cemabench.protocol.bottleneck`).

    Channel c of a payload row (n, C, ...) of int32 symbols is coded with row c: symbol value ``offsets[c] + k`` has
    probability proportional to ``frequencies[c, k]``, and any other value (out of the table's range, or of frequency
    0) is escaped: the escape symbol, of probability proportional to ``escape[c]``, then the value itself."""

    frequencies: torch.Tensor  # int64 (C, K), >= 0
    offsets: torch.Tensor  # int64 (C,): the value of column 0 in each channel
    escape: torch.Tensor  # int64 (C,), >= 1


@dataclass
class EdgeDecision:
    """What the edge decides for one batch: the scored prediction and what to send up.

    Per uploaded sample, the link carries its raw input (unless ``send_input`` is False) and one row of every
    ``payload`` tensor (rows aligned with ``upload``: intermediate features, teacher logits, ...), floating payload
    encoded as ``payload_dtype`` (``int8``: symmetric, one float32 scale per sample and tensor; ``int8+zstd``: the
    same, each row entropy-coded losslessly by Zstandard and charged at its frame's length; ``entropy``: int32
    symbols, each row entropy-coded by the harness with the method's :class:`EntropyTables` and charged at the
    length of that bitstream, the cloud getting what it decodes to). ``tensors`` are
    per-batch (normalisation statistics, ...): they cross whole, but never one row per sample of the batch. Every
    byte is charged to the counters and the budget; nothing per-sample travels for a sample that is not uploaded.
    What is not charged may carry nothing (:class:`cemabench.protocol.link.Vocabulary`): ``upload`` is in increasing
    order; ``tensors`` are named after the edge model's state (``layer1.0.bn1.running_mean``, or a module's path and
    a word of the method's own, at most 16 such words a run unit) and hold at least one value; ``payload`` is named
    by such words.
    """

    logits: torch.Tensor | None  # the scored prediction; None only when every sample awaits the cloud's answer
    upload: torch.Tensor | None = None  # indices into the batch of the samples to upload, in increasing order
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # per-batch named tensors to upload
    payload: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample tensors, rows aligned with upload
    send_input: bool = True  # whether each uploaded sample's raw input crosses (False: only its payload rows)
    # link encoding of floating payload tensors: float32 | float16 | int8 | int8+zstd; or "entropy": every payload
    # tensor is int32 symbols, entropy-coded by the harness with the method's EntropyTables (Method.entropy_tables)
    payload_dtype: str = "float32"
    await_answers: bool = False  # offloading: the cloud's answers replace the scored prediction of uploaded samples
    # detection datasets: the scored prediction instead of logits, one dict of boxes (n, 4: x1, y1, x2, y2 in input
    # pixels), scores (n,) and labels (n,: category ids) per image, as torchvision's detectors return them
    detections: list[dict[str, torch.Tensor]] | None = None

    @classmethod
    def predicting(cls, output, **fields) -> EdgeDecision:
        """A decision whose scored prediction is a model's output, whatever the task: a tensor is logits, a list
        of per-image dicts (a detector's) is detections."""
        if isinstance(output, list):
            return cls(logits=None, detections=output, **fields)
        return cls(logits=output, **fields)


@dataclass
class Upload:
    """What reaches the cloud for one edge batch, after the link applied the budget. May be empty.

    ``payload`` holds what the cloud decodes (int8/float16 payload comes back as float32, with its quantisation
    error). Answers, when the edge awaits them, are one row per uploaded sample in this order; ``sample_ids`` are
    the samples' positions in the run unit's stream, the keys under which the edge scores them."""

    samples: torch.Tensor  # raw inputs of the uploaded samples; zero rows when the edge sent no inputs
    tensors: dict[str, torch.Tensor]
    batch_index: int
    index: torch.Tensor | None = None  # positions of the samples in the edge batch
    payload: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_ids: torch.Tensor | None = None
    device: int = 0  # the edge device that sent it (several edges may share one cloud)
    # under an annotation budget: the rows of this upload whose labels the cloud asked for (``labels_wanted``), in
    # increasing order, and their labels in the same order (empty when it asked for none; None without a budget)
    labelled: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        """The number of uploaded samples."""
        return 0 if self.index is None else len(self.index)


@dataclass
class CloudReply:
    """A cloud step's full reply: a download for the edge, and/or answers (logits) for the uploaded samples of
    this batch when the edge awaits them. Answers arrive at once; downloads after the delivery delay."""

    download: Download | None = None
    answers: torch.Tensor | list[dict[str, torch.Tensor]] | None = None  # detection: one dict per uploaded image


@dataclass
class TrainingResources:
    """What a method's offline training stage may use: fresh source models and the labelled clean training split the
    cloud keeps (``clean.images(idx)``, ``clean.labels()``; training data, never the test stream). Runs on the cloud,
    before the stream; its compute is not charged to the online cells."""

    num_classes: int
    edge: Callable[[], nn.Module]
    foundation: Callable[[], nn.Module]
    clean: object  # a cemabench.data.DomainData, or None when the dataset has no clean split
    device: torch.device = torch.device("cpu")
    seed: int = 0


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
        """Predict the batch ``x`` (images in [0, 1]) with ``model`` and decide what to upload; forward passes only."""
        raise NotImplementedError

    def receive(self, model: nn.Module, download: Download) -> None:
        """Apply a download; the default loads the named tensors into the model's state (a name the model does
        not have is an error, not a silently ignored download)."""
        unknown = sorted(set(download) - set(model.state_dict()))
        if unknown:
            raise KeyError(f"the download names tensors the edge model does not have: {', '.join(unknown[:5])}"
                           f"{' ...' if len(unknown) > 5 else ''}")
        model.load_state_dict(download, strict=False)


class CloudLogic:
    """The cloud half: called once per edge batch (also when nothing was uploaded), with full autograd."""

    def step(self, upload: Upload) -> Download | CloudReply | None:
        """Work on one batch's upload (possibly empty); return a download for the edge, answers, or None."""
        raise NotImplementedError

    def labels_wanted(self, upload: Upload) -> torch.Tensor | None:
        """Active test-time adaptation: the rows of ``upload`` (int64 positions, strictly increasing, each below
        ``len(upload)``) whose labels the cloud asks the harness's oracle annotator for, or None. Called before
        ``step(upload)``, only when the protocol grants a label budget; ``step`` then finds the labels in
        ``upload.labels``. Asking beyond the budget, or for a row the upload lacks, fails the cell. The upload that
        ``step`` gets may be another object with the same contents (with ``--isolate`` each call crosses a process
        boundary): keep what this call computed for the step in the cloud's own state, not on the upload."""
        return None


CLOUD_REPLICAS = ("per-device", "shared")
REFERENCES = ("edge", "cloud")  # a reference point: everything on the edge, or everything in the cloud


def check_declared(cls) -> None:
    """What a method class declares about itself and the harness relies on, checked before any compute."""
    name = getattr(cls, "name", None) or cls.__qualname__
    if cls.cloud_replicas not in CLOUD_REPLICAS:
        raise UserError(f"method {name} declares cloud_replicas = {cls.cloud_replicas!r}; it must be "
                        f"{' or '.join(repr(c) for c in CLOUD_REPLICAS)}")
    if cls.reference is not None and cls.reference not in REFERENCES:
        raise UserError(f"method {name} declares reference = {cls.reference!r}; it must be None or "
                        f"{' or '.join(repr(r) for r in REFERENCES)}")


def check_labels(method, protocol) -> None:
    """A method that declares ``uses_labels`` runs only where the protocol grants the cloud a label budget: otherwise
    one line that says which fields grant it, before any compute."""
    cls = method if isinstance(method, type) else type(method)
    if cls.uses_labels is True and not protocol.annotation:
        name = getattr(cls, "name", None) or cls.__qualname__
        raise UserError(f"method {name} asks the annotator for labels (active test-time adaptation), and this protocol "
                        f"grants none: set label_budget (per batch) and/or label_budget_total (per run unit) in the "
                        f"table's [protocol], an entry's link, or with --label-budget / --label-budget-total")
    if not isinstance(cls.uses_labels, bool):
        name = getattr(cls, "name", None) or cls.__qualname__
        raise UserError(f"method {name} declares uses_labels = {cls.uses_labels!r}; it must be True or False")


def check_task(method, task: str) -> None:
    """A method runs only on the tasks it declares (``Method.tasks``): otherwise one line that says why, before any
    compute."""
    cls = method if isinstance(method, type) else type(method)
    name = getattr(cls, "name", None) or cls.__qualname__
    tasks = cls.tasks
    if not isinstance(tasks, tuple) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise UserError(f"method {name} declares tasks = {tasks!r}; it must be a non-empty tuple of task names")
    if task not in tasks:
        why = cls.task_reason or f"it declares tasks = {tasks!r}"
        raise UserError(f"method {name} cannot run on a {task} dataset: {why}. Methods for {task}: see `cemabench "
                        f"list methods`")
    if cls.uses_labels is True and task != "classification":  # the annotator's labels are classes
        raise UserError(f"method {name} asks the annotator for labels (active test-time adaptation), and a {task} "
                        f"dataset has no class label per sample to give: run it on a classification dataset")
    if not isinstance(method, type):
        method.check_task_options(task)


def check_clean(method, missing: str | None) -> None:
    """A method that needs the dataset's labelled clean split (:meth:`Method.needs_clean_split`) on a dataset without
    one (``missing``: :meth:`cemabench.data.DatasetSource.clean_missing`, None when it has one): one line that says
    what for and how the dataset gets one, before any compute."""
    why = method.needs_clean_split()
    if type(why) is not str or "\n" in why:
        raise UserError(f"method {method.name}'s needs_clean_split() must return a one-line str, got "
                        f"{type(why).__name__}{' with a line break' if isinstance(why, str) else ''}")
    if why and missing is not None:
        raise UserError(f"method {method.name} needs the dataset's labelled clean split ({why}), and {missing}")


def check_runnable(method, protocol, task: str, clean_missing: str | None = None) -> None:
    """What a run unit checks of the method it is given, before any compute, in this order: the built method's
    protocol (a method's own check may read its options), its declarations, its task and its label use, and its need
    of a clean split the dataset lacks (``clean_missing``, as :func:`check_clean` reads it)."""
    method.check_protocol(protocol)
    check_declared(method)
    check_task(method, task)
    check_clean(method, clean_missing)
    check_labels(method, protocol)


@dataclass
class MethodFacts:
    """A built method as plain data: what the loop's process needs of it to run a unit isolated (``--isolate``), where
    the halves build the method itself and the loop never imports its module. Read from the planner process's answer
    (:mod:`cemabench.protocol.planner`), which checked the method's declarations, protocol, task and labels first.
    ``task``, ``protocol`` and ``artefacts`` are set by the harness, as on a :class:`Method`."""

    name: str
    options: dict  # the parsed options, as ``dataclasses.asdict`` gives them
    online_options: tuple[str, ...]
    cloud_replicas: str
    trains: bool  # whether the class overrides Method.train
    training_code: dict  # the digest of the code its training depends on (cemabench.provenance.code_digest)
    task: str = "classification"
    protocol: Protocol | None = None
    artefacts: dict | None = None
    # the entry-point name that the halves build the method from, set by the loop (a class may name itself otherwise)
    entry: str | None = None

    @classmethod
    def read(cls, answer: dict) -> MethodFacts:
        """The facts in a planner's answer, each of its type, or ValueError."""
        try:
            facts = cls(name=answer["name"], options=answer["options"], online_options=tuple(answer["online_options"]),
                        cloud_replicas=answer["cloud_replicas"], trains=answer["trains"],
                        training_code=answer["training_code"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"a planner's facts are malformed ({error})") from None
        if not (type(facts.name) is str and type(facts.options) is dict and type(facts.trains) is bool
                and all(type(o) is str for o in facts.online_options) and facts.cloud_replicas in CLOUD_REPLICAS
                and type(facts.training_code) is dict):
            raise ValueError("a planner's facts are malformed")
        return facts


class Method:
    """Base class of a method plugin: hyper-parameters in ``Options`` (a dataclass), and a factory for each half.

    Only ``edge`` is required. ``name`` defaults to the entry-point name the registry loads the class under;
    ``paper`` and ``mapping`` only describe the method in `cemabench list methods`, and default to "-".
    """

    name: ClassVar[str]  # set by the registry to the entry-point name when the class does not set it
    paper: ClassVar[str] = "-"
    mapping: ClassVar[CloudEdgeMapping] = CloudEdgeMapping(selection="-", uploads="-", cloud="-", download="-")
    # Optional: declare ``version = "..."`` on a method class to key stored results by it instead of by the source
    # of the method's modules (bump it whenever a change to the code changes numbers).
    version: ClassVar[str | None] = None
    # A reference point of the trade-off plots and tables: "edge" (everything on the edge) or "cloud" (everything in
    # the cloud; the efficiency columns compare every method with it). A table spec may declare it per entry too.
    reference: ClassVar[str | None] = None

    @dataclass
    class Options:
        """The method's hyper-parameters: typed dataclass fields with defaults (those of the released code)."""

    # With several edge devices on one cloud: "per-device" builds one CloudLogic per device (each sees only its
    # device's uploads), "shared" one for all (it sees every device's uploads, tagged by ``Upload.device``).
    cloud_replicas: ClassVar[str] = "per-device"
    online_options: ClassVar[tuple[str, ...]] = ()  # options ``train`` never reads: left out of the training key
    # The smallest edge batch the method is defined for, and why, as a clause that completes "cannot run at batch
    # size 1: ...": a method whose computation needs several samples of one batch (a graph over the batch, say)
    # declares it, and the harness refuses a smaller batch before any compute instead of running something else.
    min_batch_size: ClassVar[int] = 1
    min_batch_reason: ClassVar[str] = ""
    artefacts: dict[str, torch.Tensor] | None = None  # what ``train`` returned, set by the harness before edge/cloud
    # The tasks the method runs on (cemabench.protocol.tasks), and why not on others, as a clause completing "cannot
    # run on a detection dataset: ...". The harness sets ``task`` to the dataset's before building the halves.
    # active test-time adaptation: the cloud asks the oracle annotator for labels (``CloudLogic.labels_wanted``), so
    # the method runs only under a protocol that grants a label budget
    uses_labels: ClassVar[bool] = False
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    task_reason: ClassVar[str] = ""
    task: str = "classification"
    # The protocol of the run unit (the link, its time model), set by the harness before the halves are built, for a
    # method whose choices depend on it (a split point chosen for the link's regime); None outside a unit.
    protocol: Protocol | None = None

    def __init__(self, **options):
        """Build the method with its options, checked against ``Options`` (names, types, declared bounds) and
        ``validate``."""
        if not getattr(self, "name", None):
            raise UserError(f"method class {type(self).__qualname__} has no name: set `name = \"...\"` on the class, "
                            f"or build it with cemabench.registry.build_method, which names it after its entry point")
        self.options = parse_options(self.Options, options, f"method {self.name!r}")
        self.validate()

    @classmethod
    def check_protocol(cls, protocol: Protocol) -> None:
        """Raise :class:`UserError` (one line) when the method cannot run under ``protocol``; the harness calls it
        before any compute, wherever a method meets a protocol (a table's plan, :func:`cemabench.protocol.run_unit`).
        The default refuses an edge batch below ``min_batch_size``."""
        name, minimum = getattr(cls, "name", None) or cls.__qualname__, cls.min_batch_size
        if not isinstance(minimum, int) or isinstance(minimum, bool) or minimum < 1:
            raise UserError(f"method {name} declares min_batch_size = {minimum!r}; it must be an integer >= 1")
        if protocol.batch_size < minimum:
            raise UserError(f"method {name} cannot run at batch size {protocol.batch_size}: "
                            f"{cls.min_batch_reason or 'it needs several samples per batch'}; "
                            f"use batch size >= {minimum}")

    @classmethod
    def derive_options(cls, options: dict, references: list[dict]) -> dict:
        """The options of a run unit that depends on other units (a spec's ``match_uploads_of``), from the result
        records of those units (``{"unit": ..., "results": [DomainResult.to_dict(), ...]}``). The default ignores
        them; a method that copies something from its reference (e.g. its upload rate) overrides this."""
        return options

    def train(self, resources: TrainingResources) -> dict[str, torch.Tensor] | None:
        """Offline training stage (adapters, gates, distilled edges), run by the harness before the halves are built;
        the returned tensors are cached by (method, options, models, data, code, seed) and handed back in
        ``self.artefacts``. The default trains nothing."""
        return None

    def validate(self) -> None:
        """Raise :class:`UserError` for option values that are invalid together (one option's bounds are declared
        with :func:`option`)."""

    def needs_clean_split(self) -> str:
        """What the method, with its options, does with the dataset's labelled clean split (``TrainingResources.clean``,
        ``CloudResources.clean_images``), as a clause ("distils the edge from the cloud on it"); "" when it runs
        without one. The harness refuses it before any compute on a dataset that has none. The default: ""."""
        return ""

    def check_task_options(self, task: str) -> None:
        """Raise :class:`UserError` (one line) when an option does not fit the dataset's task (a router defined for
        another task's outputs, say); called before any compute. The default checks nothing."""

    def check_models(self, edge: nn.Module, foundation: nn.Module) -> None:
        """Raise :class:`UserError` (one line) when an option names something the models lack (a stage, a layer).
        The harness calls it with a table's source models once they are built, before any compute; the models must
        not be changed. The default checks nothing."""

    def edge(self, num_classes: int) -> EdgeLogic:
        """The edge half, built anew for every run unit."""
        raise NotImplementedError(f"{type(self).__qualname__} does not implement edge(num_classes) -> EdgeLogic, "
                                  f"which every method needs")

    def edge_for(self, num_classes: int, device: int) -> EdgeLogic:
        """The edge half of edge device ``device`` (0, 1, ... when several edges share one cloud), built anew for
        every run unit. A method whose devices play different roles (some adapt through the cloud, others only
        forward) overrides this; the default is ``edge(num_classes)`` for every device."""
        return self.edge(num_classes)

    def cloud(self, resources: CloudResources) -> CloudLogic | None:
        """The cloud half, or None for edge-only methods."""
        return None

    def entropy_tables(self) -> EntropyTables | None:
        """The entropy model of a learned bottleneck (usually built from ``self.artefacts``), with which the harness
        codes the edge's ``payload_dtype="entropy"`` payloads; read once per run unit, after the training stage and
        before the stream, so that nothing online can change it. The default declares none."""
        return None


def option(default, *, low: float | None = None, above: bool = False, high: float | None = None, below: bool = False,
           choices: tuple = ()):
    """A field of a method's ``Options`` with declared bounds, checked with its type before any compute (the same
    check as a protocol field's, :class:`cemabench.config.bounds.Bounds`): ``low``/``high`` inclusive unless
    ``above``/``below``, ``choices`` the only values (each item's, for a tuple). A float option is always finite::

        lr: float = option(0.00025, low=0, above=True)       # > 0
        momentum: float = option(0.9, low=0, high=1, below=True)  # in [0, 1)
    """
    return field(default=default, metadata={"bounds": Bounds(low, above, high, below, tuple(choices))})


def _kind(hint) -> type:
    """The value type of an option's annotation (``float`` of ``float | None``, ``str`` of ``tuple[str, ...]``)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return args[0]
    return next((t for t in args if t is not type(None)), hint) if args else hint


def _check_type(name: str, hint, value, owner: str):
    """The value as the option stores it (a list as a tuple, an int given for a float as a float), or a one-line
    error naming the type it must have."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) is not tuple else (hint,)
    allowed = allowed or (hint,)
    for t in allowed:
        try:
            if typing.get_origin(t) is tuple:
                if not isinstance(value, (list, tuple)):
                    raise ValueError
                item = typing.get_args(t)[0]
                return tuple(coerce(v, item) for v in value)
            return coerce(value, t)
        except ValueError:
            continue
    names = " or ".join("null" if t is type(None) else f"a list of {typing.get_args(t)[0].__name__}"
                        if typing.get_origin(t) is tuple else t.__name__ for t in allowed)
    raise UserError(f"{owner}: option {name!r} must be {names}, got {value!r}")


def declared_bounds(options_class: type, name: str) -> Bounds:
    """An option's bounds: declared on its field, or else on the same field of the nearest base ``Options`` (a
    subclass that only changes a default, ``lr: float = 0.001``, keeps its base's bounds)."""
    for cls in options_class.__mro__:
        declared = getattr(cls, "__dataclass_fields__", {}).get(name)
        if declared is not None and "bounds" in declared.metadata:
            return declared.metadata["bounds"]
    return Bounds()


def parse_options(options_class: type, values: dict, owner: str):
    """Build an options dataclass, rejecting unknown names, values of the wrong type, floats that are not finite and
    values outside an option's declared bounds (:func:`option`) with a one-line message. The defaults are checked
    too: a plugin whose default breaks its own bounds fails when it is built, not halfway through a table."""
    fields = {f.name: f for f in dataclasses.fields(options_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{owner} has no option {', '.join(map(repr, unknown))}; valid options: "
                        f"{', '.join(fields) or '(none)'}")
    hints = typing.get_type_hints(options_class)
    given = values
    built = options_class(**{name: _check_type(name, hints[name], value, owner) for name, value in given.items()})
    for name in fields:
        value, bounds = getattr(built, name), declared_bounds(options_class, name)
        items = value if isinstance(value, tuple) else (value,)
        if value is not None and not all(bounds.admits(v) for v in items):
            shown = f"got {given[name]!r}" if name in given else f"its default {value!r}"  # as the user wrote it
            must = bounds.phrase(_kind(hints[name]))
            raise UserError(f"{owner}: option {name!r} must be "
                            f"{'a list of ' + must if isinstance(value, tuple) else must}, {shown}")
    return built
