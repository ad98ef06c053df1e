"""A spec's ``[report]`` table: what the leaderboard adds that changes no number.

``[report.energy]`` is a linear energy model of the two sides: ``edge_joules_per_flop``, ``cloud_joules_per_flop``,
``edge_joules_per_byte_up`` (the edge's radio, sending) and ``edge_joules_per_byte_down`` (receiving), each at
least 0, unset ones 0. The leaderboard then gives each entry's joules per sample on the edge (its counted FLOPs and
the bytes it sent and received) and in the cloud (its counted FLOPs); they are computed from the cells' counts, so
they change no number and no unit's key.

``[report.hypervolume]`` declares the reference point of the trade-off hypervolume: ``score``, the worst primary
score that counts (top-1 accuracy or mAP, in %), and for each cost axis to summarise, the highest cost that counts.
Per cost axis, a sweep's hypervolume is the share of the reference box, costs from 0 to the reference cost times
scores from the reference score to 100, that its points dominate (:mod:`cemabench.report.hypervolume`)."""
from __future__ import annotations

from cemabench.errors import UserError

# the cost axes a hypervolume can be taken against: the efficiency points' columns, and how the leaderboard names them
HYPERVOLUME_AXES = {
    "bytes_per_sample": "bytes / sample (up + down)",
    "bytes_up_per_sample": "bytes up / sample",
    "gflops_per_sample": "GFLOPs / sample (edge + cloud)",
    "edge_gflops_per_sample": "edge GFLOPs / sample",
    "cloud_gflops_per_sample": "cloud GFLOPs / sample",
    "latency_p50": "modelled latency p50 (s)",
    "upload_percent": "upload %",
    "labels_per_1000": "labels / 1,000 samples",
    "edge_joules_per_sample": "edge J / sample",
    "cloud_joules_per_sample": "cloud J / sample",
    "joules_per_sample": "J / sample (edge + cloud)",
}
MAX_JOULES = 1.0  # per FLOP or byte: far above any device, and a sample's joules stay finite below it
ENERGY_KEYS = ("edge_joules_per_flop", "cloud_joules_per_flop", "edge_joules_per_byte_up", "edge_joules_per_byte_down")


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise UserError(f"{where} must be a number, got {value!r}")
    return float(value)


def parse_report(table: dict, where: str) -> dict:
    """The ``[report]`` table, checked: ``{"energy": {...}, "hypervolume": {"score": s, axis: cost, ...}}``, each part
    present when the spec declares it."""
    extra = sorted(set(table) - {"energy", "hypervolume"})
    if extra:
        raise UserError(f"{where}: unknown key(s) {', '.join(extra)}; valid: energy, hypervolume")
    out = {}
    if "energy" in table:
        out["energy"] = _energy(table["energy"], f"{where} energy")
    if "hypervolume" in table:
        out["hypervolume"] = _hypervolume(table["hypervolume"], f"{where} hypervolume")
    if "energy" not in out and any(k.endswith("joules_per_sample") for k in out.get("hypervolume", {})):
        raise UserError(f"{where} hypervolume: an energy axis needs [report.energy], the joules per FLOP and per byte")
    return out


def _energy(table, w: str) -> dict:
    if not isinstance(table, dict):
        raise UserError(f"{w} must be a table such as {{ edge_joules_per_flop = 1e-11 }}, got {table!r}")
    unknown = sorted(set(table) - set(ENERGY_KEYS))
    if unknown:
        raise UserError(f"{w}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(ENERGY_KEYS)}")
    if not table:
        raise UserError(f"{w} needs at least one of {', '.join(ENERGY_KEYS)}")
    out = {}
    for key in ENERGY_KEYS:
        value = _number(table.get(key, 0.0), f"{w} {key}")
        if not 0 <= value <= MAX_JOULES:  # above it, a sample's joules can overflow to inf
            raise UserError(f"{w} {key} must be a number from 0 to {MAX_JOULES:g} (joules per FLOP or byte), got "
                            f"{table[key]!r}")
        out[key] = value
    return out


def _hypervolume(hv, w: str) -> dict:
    if not isinstance(hv, dict):
        raise UserError(f"{w} must be a table such as {{ score = 50, bytes_per_sample = 4096 }}, got {hv!r}")
    unknown = sorted(set(hv) - {"score", *HYPERVOLUME_AXES})
    if unknown:
        raise UserError(f"{w}: unknown key(s) {', '.join(unknown)}; valid: score, {', '.join(HYPERVOLUME_AXES)}")
    if "score" not in hv:
        raise UserError(f"{w} needs score, the worst score (%) that counts, e.g. score = 50")
    score = _number(hv["score"], f"{w} score")
    if not 0 <= score < 100:
        raise UserError(f"{w} score must be at least 0 and below 100 (a score in %), got {hv['score']!r}")
    axes = [k for k in HYPERVOLUME_AXES if k in hv]
    if not axes:
        raise UserError(f"{w} needs at least one cost axis with its highest cost that counts; valid: "
                        f"{', '.join(HYPERVOLUME_AXES)}")
    out = {"score": score}
    for axis in axes:
        cost = _number(hv[axis], f"{w} {axis}")
        if not 0 < cost < float("inf"):
            raise UserError(f"{w} {axis} must be a finite number above 0 (the highest cost that counts), got "
                            f"{hv[axis]!r}")
        out[axis] = cost
    return out
