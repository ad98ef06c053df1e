"""The stream of a run unit: which samples its edge sees, in which order, batched how, and counted toward which cell.

A setting is a property of the stream, not of a method. Its name follows one grammar (:mod:`cemabench.config.settings`):
a base setting, optionally ``+correlated``:

- ``per-domain`` (CEMA's protocol): each domain alone in its own run unit; models and method state are rebuilt
  between domains. The order inside a domain is a permutation from (seed, domain).
- ``continual``: all domains in the spec's order in one run unit, no reset; with ``rounds = R`` the whole ordered
  stream is repeated R times (CoTTA's 10-round continual ImageNet-C), each round in the same sample order
  (``rounds`` applies to every setting but ``per-domain``).
- ``gradual``: continual, and inside each domain the severity ramps 1, 2, 3, 4, 5, 4, 3, 2, 1 (the schedule of
  CoTTA's gradual setting as mariodoebler/test-time-adaptation runs it): each step is the whole domain at that
  severity, so the shift between domains happens at severity 1.
- ``mixed-domains``: the samples of every domain shuffled into one stream, in one run unit; accuracy is also
  reported per domain.
- ``+correlated``: inside each stretch of the stream (a domain, a severity step, or the mixed stream), samples are
  ordered by label with a Dirichlet process over classes (NOTE's non-i.i.d. order, as mariodoebler's ``correlated``):
  each class's samples are split over K = number of classes chunks with proportions drawn from Dirichlet(delta * 1),
  a chunk stops taking samples once it holds N / K, and the chunks follow each other, classes in a random order
  inside each. Small ``concentration`` (delta) puts each class in few chunks (long runs of one class); large
  spreads every class over every chunk (each chunk still lists its classes one after another, as NOTE's does).

Batches never cross a block (a domain, a severity step, a round's domain); in ``mixed-domains`` the whole stream is
one block. Every order is derived from the seed alone, so a setting is deterministic.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cemabench.config.settings import GRADUAL_SEVERITIES, MIXED, parse_setting
from cemabench.data import DomainData
from cemabench.errors import UserError


@dataclass
class Block:
    """A stretch of the stream that is batched on its own and counted toward the result named ``result``.

    ``order[i]`` is the index, inside source ``which[i]`` (or the only source), of the i-th sample of the block."""

    result: str  # the result (a leaderboard cell) it counts toward: a domain, or "mixed-domains"
    segment: str  # its name in the result's per-segment breakdown: "fog", "fog@3", "fog (round 2)"
    sources: tuple[DomainData, ...]
    order: np.ndarray
    which: np.ndarray | None = None  # the source of each position when there are several
    round: int = 1  # which repetition of the stream it belongs to
    severity: int | None = None  # its severity, where the setting varies it (gradual)

    def __len__(self) -> int:
        return len(self.order)

    @property
    def sample_nbytes(self) -> int:
        sizes = {s.sample_nbytes for s in self.sources}
        if len(sizes) != 1:
            raise ValueError(f"the domains of block {self.segment!r} have samples of different sizes: {sorted(sizes)}")
        return sizes.pop()

    def batches(self, batch_size: int, pin_memory: bool = False) -> Iterator[torch.Tensor]:
        if self.which is None:
            yield from self.sources[0].batches(self.order, batch_size, pin_memory)
            return
        for start in range(0, len(self.order), batch_size):
            which, index = self.which[start:start + batch_size], self.order[start:start + batch_size]
            parts = {s: self.sources[s].images(index[which == s]) for s in np.unique(which)}
            first = next(iter(parts.values()))
            batch = torch.empty((len(index), *first.shape[1:]), dtype=first.dtype)
            for s, images in parts.items():
                batch[torch.from_numpy(np.flatnonzero(which == s))] = images
            yield batch

    def labels(self) -> np.ndarray:
        """The label of every position, read from storage now (the harness calls this after the block ran)."""
        if self.which is None:
            return np.asarray(self.sources[0].labels())[self.order]
        out = np.empty(len(self.order), dtype=np.int64)
        for s, source in enumerate(self.sources):
            mine = self.which == s
            out[mine] = np.asarray(source.labels())[self.order[mine]]
        return out

    def labels_at(self, positions: np.ndarray) -> np.ndarray:
        """The labels of the given positions of the block only, read from storage now (the annotator's: the labels
        read beside them are dropped before it returns)."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty(len(positions), dtype=np.int64)
        if len(positions) == 0:
            return out
        index = self.order[positions]
        which = np.zeros(len(positions), dtype=np.int64) if self.which is None else self.which[positions]
        for s in np.unique(which):
            every = np.asarray(self.sources[s].labels())
            out[which == s] = every[index[which == s]]
            del every
        return out

    def domain_of(self) -> np.ndarray | None:
        """The domain name of every position, when the block mixes domains."""
        return None if self.which is None else np.array([s.name for s in self.sources])[self.which]


def derive_seed(*parts) -> int:
    """A 31-bit seed from any printable parts, stable across processes and platforms."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2 ** 31)


@dataclass
class DeviceStreams:
    """One stream of blocks per edge device of a run unit; the devices share one cloud."""

    streams: list[list[Block]]


def domain_order(seed: int, domain: str, n: int) -> np.ndarray:
    """The sample order inside a domain: a permutation from (seed, domain), the same for every method."""
    return np.random.default_rng(derive_seed("order", seed, domain)).permutation(n)


def plain(domain: DomainData, seed: int) -> Block:
    """One domain in its per-domain order: the block of ``per-domain`` and ``continual`` streams."""
    return Block(domain.name, domain.name, (domain,), domain_order(seed, domain.name, len(domain)))


def dirichlet_chunks(labels: np.ndarray, concentration: float, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """NOTE's split: ``chunks[c][j]`` holds the positions of the j-th class (in class order) that went to chunk c."""
    n = len(labels)
    classes = np.unique(labels)
    chunks = len(classes)
    capacity = n / chunks
    members: list[list[np.ndarray]] = [[] for _ in range(chunks)]
    sizes = np.zeros(chunks, dtype=np.int64)
    for k in classes:
        idx = rng.permutation(np.flatnonzero(labels == k))
        proportions = rng.dirichlet(np.full(chunks, float(concentration)))
        proportions = np.where(sizes < capacity, proportions, 0.0)
        total = proportions.sum()
        proportions = proportions / total if total > 0 else (sizes < capacity) / max(1, (sizes < capacity).sum())
        cuts = (np.cumsum(proportions) * len(idx)).astype(np.int64)[:-1]
        for c, part in enumerate(np.split(idx, cuts)):
            members[c].append(part)
            sizes[c] += len(part)
    return members


def dirichlet_order(labels: np.ndarray, concentration: float, rng: np.random.Generator) -> np.ndarray:
    """Positions 0..N-1 reordered so that labels are temporally correlated (see the module docstring)."""
    out = []
    for chunk in dirichlet_chunks(labels, concentration, rng):
        for c in rng.permutation(len(chunk)):
            out.append(chunk[c])
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def build_blocks(setting: str, domains: Sequence[DomainData], seed: int, *, rounds: int = 1,
                 concentration: float = 0.1, at_severity: Callable[[int], Sequence[DomainData]] | None = None
                 ) -> list[Block]:
    """The blocks of one run unit's stream over ``domains`` (already the unit's domains, in order).

    ``at_severity(s)`` gives the same domains at severity s (needed by ``gradual``). Labels are read here only to
    order a correlated stream, and are dropped before any method code runs."""
    base, modifiers = parse_setting(setting)
    if base == MIXED:
        sizes = [len(d) for d in domains]
        which = np.repeat(np.arange(len(domains)), sizes)
        index = np.concatenate([np.arange(n) for n in sizes])
        shuffle = np.random.default_rng(derive_seed("order", seed, MIXED, *(d.name for d in domains))).permutation(
            len(index))
        blocks = [Block(MIXED, MIXED, tuple(domains), index[shuffle], which[shuffle])]
    elif base == "gradual":
        if at_severity is None:
            raise UserError("setting gradual needs the dataset at severities 1 to 5")
        by_severity = {s: {d.name: d for d in at_severity(s)} for s in sorted(set(GRADUAL_SEVERITIES))}
        blocks = []
        for d in domains:
            for step, s in enumerate(GRADUAL_SEVERITIES):
                source = by_severity[s][d.name]
                blocks.append(Block(d.name, f"{d.name}@{s}", (source,),
                                    domain_order(seed, f"{d.name}@{s}#{step}", len(source)), severity=s))
    else:
        blocks = [plain(d, seed) for d in domains]
    if "correlated" in modifiers:
        for position, block in enumerate(blocks):  # position: gradual's up and down ramps differ
            labels = block.labels()
            rng = np.random.default_rng(derive_seed("correlated", seed, block.segment, position, float(concentration)))
            position = dirichlet_order(labels, concentration, rng)
            del labels
            block.order = block.order[position]
            if block.which is not None:
                block.which = block.which[position]
    if rounds > 1:  # the same stream again, in the same order
        blocks = [Block(b.result, f"{b.segment} (round {r})" if r > 1 else b.segment, b.sources, b.order, b.which,
                        r, b.severity) for r in range(1, rounds + 1) for b in blocks]
    return blocks

