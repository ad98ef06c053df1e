"""The protocol's fields, in one table: each field's type, default, bounds, meaning and command-line flag.

:class:`Protocol` is that table. Table specs (``[protocol]``), the command line (``run``'s link and stream flags,
``reproduce``'s stream flags) and the engine all read its fields from here, and one function validates them, so a
field is added in one place. Torch-free: a spec can be read and checked without the engine.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from cemabench.config.bounds import Bounds, coerce
from cemabench.config.codecs import INPUT_CODECS, parse_input_codec
from cemabench.config.presets import DEVICES, PRESETS, REGIMES, preset_values
from cemabench.config.settings import CCC, DEVICE_STREAMS, SETTINGS, parse_setting
from cemabench.errors import UserError

DEFAULT_TOLERANCE = 0.5  # percentage points within which `check` and the slow tier hold a table's numbers
DEFAULT_METRICS = ("accuracy", "upload_ratio")  # what `check` compares by default, and what `run` prints
TASK_METRICS = ("map", "map50", "ar100")  # detection's scores, in percent: COCO mAP@[.5:.95], mAP@.5, AR@100


@dataclass(frozen=True)
class Rule:
    """How one protocol field is checked and offered on the command line."""

    help: str
    low: float | None = None  # the smallest allowed value (with ``above``: values must exceed it)
    above: bool = False
    unset: str = ""  # what None means, for a field that may be unset ("no limit")
    choices: tuple[str, ...] = ()
    flag: str = ""  # the command-line flag, when it is not --the-field-name
    # a property of the stream or of how it crosses the link: also a flag of reproduce and status (a table under it)
    stream: bool = False

    @property
    def bounds(self) -> Bounds:
        return Bounds(low=self.low, above=self.above, choices=self.choices)


def _field(default, help: str, **rule):
    return field(default=default, metadata={"rule": Rule(help, **rule)})


@dataclass(frozen=True)
class Protocol:
    """The rules of one table's game: batching, the stream setting, the link (budget, delay, timing) and how many
    edges share the cloud. Every value is checked when the object is made; a bad one is a one-line user error."""

    batch_size: int = _field(64, "edge batch size", low=1)
    setting: str = _field("per-domain", "stream setting (README: Stream settings)", choices=SETTINGS, stream=True)
    rounds: int = _field(1, "times the stream repeats (settings without reset)", low=1, stream=True)
    concentration: float = _field(0.1, "Dirichlet concentration of +correlated (smaller: longer runs of one class)",
                                  low=0, above=True, stream=True)
    delivery_delay: int = _field(0, "download delivery delay in batches", low=0, flag="--delay")
    upload_budget: int | None = _field(None, "most samples uploaded per run unit", low=0, unset="no limit")
    upload_budget_bytes: int | None = _field(None, "most bytes up per run unit (inputs, payload, tensors)", low=0,
                                             unset="no limit")
    # the link model: unset bandwidth and zero latency make a link that only counts (transfers take no time)
    bandwidth: float | None = _field(None, "link bandwidth, bytes per second: the uplink's, and the downlink's "
                                     "unless bandwidth_down is set", low=0, above=True,
                                     unset="transfers take no time")
    latency: float = _field(0.0, "link latency in seconds per transfer, each direction", low=0)
    batch_interval: float = _field(1.0, "seconds between edge batches (how transfer time becomes batches of delay)",
                                   low=0, above=True)
    answer_deadline: float | None = _field(None, "seconds after a batch's arrival within which an offloaded answer "
                                           "must be back", low=0, unset="no deadline")
    # many edges on one cloud: N devices in lockstep, each with its own stream, link and counters
    devices: int = _field(1, "edge devices sharing one cloud (needs a setting without reset)", low=1, stream=True)
    device_streams: str = _field("partition", "partition: each device its own domains; rotate: each its own domain "
                                 "order", choices=DEVICE_STREAMS, stream=True)
    cloud_capacity: int | None = _field(None, "uploaded samples the cloud accepts per step over all devices", low=1,
                                        unset="no limit", stream=True)
    # what an uploaded input costs: its uint8 pixels (raw), or the length of a real bitstream (the cloud decodes it)
    input_codec: str = _field("raw", f"how an uploaded input crosses the link, charged at its encoded length, the "
                              f"cloud receiving the decoded image: {', '.join(INPUT_CODECS)} (Q: quality 1-100)",
                              stream=True)
    # modelled compute time: with either throughput set, a batch's counted FLOPs take time on its side (the time model)
    edge_flops_per_s: float | None = _field(None, "edge throughput in FLOP/s: the edge step takes its counted FLOPs / "
                                            "this (the time model)", low=0, above=True, unset="no compute time")
    cloud_flops_per_s: float | None = _field(None, "cloud throughput in FLOP/s: a cloud step takes its counted FLOPs / "
                                             "this, one step at a time (edges sharing the cloud in the loop's "
                                             "device order; the time model)", low=0, above=True,
                                             unset="no compute time")
    # periodic reset: a property of the stream that one entry may set for itself (link = {...}; README: Periodic reset)
    reset_every: int | None = _field(None, "restore the halves to their source state before every N-th batch of the "
                                     "unit (each device's, multi-edge), the counts going on", low=1,
                                     unset="no reset within a run unit", stream=True)
    # the ccc setting's stream (README: Stream settings): Press et al.'s published streams are 7,500,000 images at
    # 1,000, 2,000 or 5,000 images a step, calibrated to 40, 20 or 0 % (CCC-Easy, -Medium, -Hard)
    ccc_difficulty: float = _field(40.0, "ccc: the source edge model's target accuracy over the stream, percent",
                                   low=0, stream=True)
    ccc_speed: int = _field(100, "ccc: images per severity step of a transition", low=1, stream=True)
    ccc_length: int = _field(5000, "ccc: images in the stream", low=1, stream=True)
    # active test-time adaptation: the cloud may ask the harness's oracle annotator for the labels of chosen uploaded
    # samples (``CloudLogic.labels_wanted``); with both unset no label is ever delivered
    label_budget: int | None = _field(None, "labels the cloud may ask the annotator for per edge batch and device "
                                      "(active TTA)", low=0, unset="no per-batch limit; no labels at all unless "
                                      "label_budget_total is set")
    label_budget_total: int | None = _field(None, "labels the cloud may ask the annotator for per run unit and device "
                                            "(active TTA)", low=0, unset="no per-unit limit; no labels at all unless "
                                            "label_budget is set")
    # a link whose directions differ (cellular uplinks are a fraction of their downlinks): the downlink's own rate
    bandwidth_down: float | None = _field(None, "downlink bandwidth, bytes per second (answers and downloads)", low=0,
                                          above=True, unset="the same as bandwidth")
    # named presets of the time model with cited numbers (cemabench/config/presets.py): each stands for the numeric
    # fields it sets, which then keep the preset's values
    regime: str | None = _field(None, "a named link regime: sets bandwidth, bandwidth_down and latency from a cited "
                                "source", choices=tuple(REGIMES), unset="the numbers given", stream=True)
    edge_device: str | None = _field(None, "a named device profile for the edge: sets edge_flops_per_s (peak FP32) "
                                     "from a cited source", choices=tuple(DEVICES), unset="the number given",
                                     stream=True)
    cloud_device: str | None = _field(None, "a named device profile for the cloud: sets cloud_flops_per_s (peak "
                                      "FP32) from a cited source", choices=tuple(DEVICES), unset="the number given",
                                      stream=True)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_field(f.name, getattr(self, f.name)))
        for preset in PRESETS:  # a preset's numbers, in fields left at their defaults (or given as the same)
            name = getattr(self, preset)
            for target, value in ({} if name is None else preset_values(preset, name)).items():
                given = getattr(self, target)
                if given not in (FIELDS[target].default, value):
                    raise UserError(f"protocol {preset} {name} sets {target} = {value:g}; give either {preset} or "
                                    f"{target}, not both (got {target} = {given:g})")
                object.__setattr__(self, target, value)
        base, modifiers = parse_setting(self.setting)
        parse_input_codec(self.input_codec)
        timed = (self.bandwidth or self.bandwidth_down or self.latency or self.edge_flops_per_s
                 or self.cloud_flops_per_s)
        if self.answer_deadline is not None and not timed:
            raise UserError("protocol answer_deadline needs time to pass: set a link model (bandwidth, latency) or the "
                            "time model (edge_flops_per_s, cloud_flops_per_s); without them every answer is instant")
        if self.rounds > 1 and base == "per-domain":
            raise UserError("protocol rounds > 1 repeats a stream without reset: use setting continual, gradual or "
                            "mixed-domains")
        if self.devices > 1 and base == "per-domain":
            raise UserError("protocol devices > 1 share one cloud over a stream without reset: use setting continual, "
                            "gradual or mixed-domains")
        ccc = [f for f in ("ccc_difficulty", "ccc_speed", "ccc_length") if getattr(self, f) != FIELDS[f].default]
        if ccc and base != CCC:
            raise UserError(f"protocol {', '.join(ccc)} apply to setting ccc, not {self.setting}")
        if base == CCC and (self.rounds > 1 or self.devices > 1 or self.ccc_difficulty > 100):
            raise UserError(f"setting ccc is one generated stream on one device (rounds 1, devices 1; its length is "
                            f"ccc_length) with ccc_difficulty at most 100 %, got rounds {self.rounds}, devices "
                            f"{self.devices}, ccc_difficulty {self.ccc_difficulty:g}")
        if self.concentration != 0.1 and "correlated" not in modifiers:
            raise UserError(f"protocol concentration applies to the +correlated settings; setting {self.setting} has "
                            f"no correlated order (use {base}+correlated)")

    @property
    def annotation(self) -> bool:
        """Whether the cloud may ask the oracle annotator for labels (either label budget set)."""
        return self.label_budget is not None or self.label_budget_total is not None

    def transfer_seconds(self, nbytes: int, down: bool = False) -> float:
        """How long ``nbytes`` take over the link, up (or ``down``): latency + bytes / that direction's bandwidth."""
        rate = self.bandwidth_down if down and self.bandwidth_down else self.bandwidth
        return self.latency + (nbytes / rate if rate else 0.0)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Protocol)}
# what one method entry of a table may set for itself (``link = {...}``): how its traffic crosses and is timed, and
# its periodic reset (reset_every); never the stream that every entry of the table shares (its setting, devices, batch
# size)
SHARED_FIELDS = ("batch_size", "setting", "rounds", "concentration", "devices", "device_streams", "cloud_capacity",
                 "ccc_difficulty", "ccc_speed", "ccc_length")
LINK_FIELDS = tuple(name for name in FIELDS if name not in SHARED_FIELDS)


def check_presets_given(given: dict) -> None:
    """A preset and a number it sets, both given (a spec's [protocol], an entry's link, the command line), must
    agree, also where the number is its field's default (latency = 0 beside a regime is not "unset")."""
    for preset, (table, _) in PRESETS.items():
        name = given.get(preset)
        if not isinstance(name, str) or name not in table:
            continue  # no preset, or an unknown one: Protocol says so
        for target, value in preset_values(preset, name).items():
            if target in given and given[target] != value:
                raise UserError(f"protocol {preset} {name} sets {target} = {value:g}; give either {preset} or "
                                f"{target}, not both (got {target} = {given[target]!r})")


def override(protocol: Protocol, changes: dict) -> Protocol:
    """``protocol`` with ``changes`` in place of its values; a preset given replaces the numbers it sets, and a number
    given replaces the preset that set it (a table's regime under an entry's own bandwidth is no longer that
    regime)."""
    check_presets_given(changes)
    values = {f: getattr(protocol, f) for f in FIELDS}
    for preset, (_, sets) in PRESETS.items():
        if preset in changes:
            values.update({target: FIELDS[target].default for target in sets})
        elif any(target in changes for target in sets):
            values[preset] = None
    return Protocol(**{**values, **changes})


def with_link(protocol: Protocol, link) -> Protocol:
    """``protocol`` with an entry's link fields (a dict or sorted pairs) in place of the table's; a field outside
    :data:`LINK_FIELDS` or a bad value is a one-line UserError."""
    link = dict(link)
    if not link:
        return protocol
    shared = sorted(set(link) & set(SHARED_FIELDS))
    if shared:
        raise UserError(f"link cannot set {', '.join(shared)}: the stream is the table's; link may set "
                        f"{', '.join(LINK_FIELDS)}")
    unknown = sorted(set(link) - set(LINK_FIELDS))
    if unknown:
        raise UserError(f"link has no field {', '.join(unknown)}; it may set {', '.join(LINK_FIELDS)}")
    return override(protocol, link)
_HINTS = typing.get_type_hints(Protocol)


def kind(name: str) -> type:
    """The value type of a field (``int``, ``float`` or ``str``), whether or not it may be unset."""
    return next(t for t in typing.get_args(_HINTS[name]) or (_HINTS[name],) if t is not type(None))


def rule(name: str) -> Rule:
    return FIELDS[name].metadata["rule"]


def expected(name: str) -> str:
    """What a field's value must be, as a phrase: 'an integer >= 1 (or unset for no limit)'."""
    r = rule(name)
    return r.bounds.phrase(kind(name)) + (f" (or unset: {r.unset})" if r.unset else "")


def check_field(name: str, value):
    """The value of a protocol field, checked against its rule (floats as floats: 1 and 1.0 are one stored key); a
    bad one is a one-line :class:`UserError` that says what the field must be."""
    r, k = rule(name), kind(name)
    if value is None and r.unset:
        return None
    try:
        value, ok = coerce(value, k), True
    except ValueError:
        ok = False
    ok = ok and r.bounds.admits(value)
    if not ok:
        raise UserError(f"protocol {name} must be {expected(name)}, got {value!r}")
    return value
