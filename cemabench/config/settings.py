"""The stream-setting grammar: which settings exist, what each means, and which run units and cells a setting makes.

A setting is a property of the stream, not of a method, named by one grammar: a base setting, optionally
``+correlated``. The stream itself (blocks, orders, batches) is built by :mod:`cemabench.protocol.stream`; this
module is the vocabulary that specs, the CLI and the engine share, and it imports no torch.
"""
from __future__ import annotations

from collections.abc import Sequence

from cemabench.errors import UserError

BASES = ("per-domain", "continual", "gradual", "mixed-domains", "ccc")
MODIFIERS = ("correlated",)
CCC = "ccc"  # Continually Changing Corruptions: a generated stream whose order is its own (no modifier)
SETTINGS = BASES + tuple(f"{b}+{m}" for b in BASES if b != CCC for m in MODIFIERS)
GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)
MIXED = "mixed-domains"
DEVICE_STREAMS = ("partition", "rotate")

_DEFINITIONS = {
    "per-domain": "each domain alone, models and method state rebuilt between domains",
    "continual": "all domains in order in one stream, no reset",
    "gradual": "all domains in order, no reset, each domain's severity stepping 1, 2, 3, 4, 5, 4, 3, 2, 1",
    "mixed-domains": "the samples of all domains shuffled into one stream, no reset (accuracy also per domain)",
    CCC: "Continually Changing Corruptions (Press et al., NeurIPS 2023): one long stream of the clean test images "
         "under two of the domains' corruptions at once, their severities drifting from the first to the second and "
         "on to a new pair, on a path calibrated to the source edge model's target accuracy; no reset",
}


def parse_setting(setting: str) -> tuple[str, frozenset[str]]:
    """A setting name as (base, modifiers); a name outside the grammar is a one-line user error."""
    base, *modifiers = setting.split("+") if isinstance(setting, str) else [None]
    if (base not in BASES or any(m not in MODIFIERS for m in modifiers) or len(set(modifiers)) != len(modifiers)
            or (base == CCC and modifiers)):
        raise UserError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    return base, frozenset(modifiers)


def unit_groups(setting: str, domains: Sequence[str]) -> list[tuple[str, ...]]:
    """The domains each run unit covers: one each under ``per-domain``, all of them otherwise."""
    return [(d,) for d in domains] if parse_setting(setting)[0] == "per-domain" else [tuple(domains)]


def severities_needed(setting: str) -> tuple[int, ...]:
    """The severities a setting reads besides the table's own (gradual: all of 1 to 5)."""
    return tuple(sorted(set(GRADUAL_SEVERITIES))) if parse_setting(setting)[0] == "gradual" else ()


def device_domains(domains: Sequence[str], devices: int, mode: str) -> list[list[str]]:
    """Each device's domains: ``partition`` deals the domains out (device i gets domains i, i + N, ...: its own
    domains), ``rotate`` gives every device all domains in the order rotated by i (its own domain order)."""
    if mode not in DEVICE_STREAMS:
        raise UserError(f"device_streams must be one of {', '.join(DEVICE_STREAMS)}, got {mode!r}")
    if devices > len(domains):
        own = "domain" if mode == "partition" else "domain order (a rotation of the domains)"
        raise UserError(f"{devices} devices cannot each have their own {own} out of {len(domains)} domains: use at "
                        f"most {len(domains)} devices")
    if mode == "partition":
        return [list(domains[i::devices]) for i in range(devices)]
    return [list(domains[i % len(domains):]) + list(domains[:i % len(domains)]) for i in range(devices)]


def result_keys(protocol, domains: Sequence[str]) -> tuple[tuple[int, str], ...]:
    """The (device, result) cells a run unit over ``domains`` yields under ``protocol``, in run_unit's order."""
    base, _ = parse_setting(protocol.setting)
    streams = (device_domains(domains, protocol.devices, protocol.device_streams) if protocol.devices > 1
               else [list(domains)])
    return tuple((d, name) for d, names in enumerate(streams)
                 for name in ([base] if base in (MIXED, CCC) else names))


def describe(setting: str, rounds: int = 1, concentration: float = 0.1, protocol: dict | None = None) -> str:
    """The precise definition of a setting, for leaderboard headers (CCC's with its parameters from ``protocol``)."""
    base, modifiers = parse_setting(setting)
    text = f"`{setting}`: {_DEFINITIONS[base]}"
    if base == CCC and protocol is not None:
        text += (f" (target accuracy {protocol['ccc_difficulty']:g} %, {protocol['ccc_speed']:,} images per severity "
                 f"step, {protocol['ccc_length']:,} images)")
    if rounds > 1:
        text += f", the stream repeated {rounds} times in the same order"
    if "correlated" in modifiers:
        text += (f"; samples in label-correlated order (Dirichlet over classes, concentration {concentration:g}; "
                 f"smaller means longer runs of one class)")
    return text
