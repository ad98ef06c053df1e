"""The link between edge and cloud: everything that crosses is encoded, counted, budgeted and delayed here.

An upload carries, per uploaded sample, its input (raw uint8 pixels, or the bitstream of the protocol's input codec,
:mod:`cemabench.protocol.codecs`) and/or its payload rows (encoded as the edge asked), plus per-batch tensors; the
budget (samples and/or bytes) refuses what does not fit. Downloads wait for their delivery
delay, and with a link model (bandwidth, latency) for the round trip in batches; an offloaded answer that misses the
deadline does not count.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cemabench.config import Protocol
from cemabench.method import Download, EdgeDecision, Upload
from cemabench.protocol.bottleneck import EntropyCoder
from cemabench.protocol.codecs import InputCodec, unzstd_rows, zstd_rows


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Vocabulary:
    """The names a unit's link lets cross, and the shapes of its empty payload. A name, an empty tensor's shape and
    the order of entries are charged nothing, so they may carry next to nothing (issue 22: a hostile review sent the
    miniature's whole batch up as names, and as the shapes of empty tensors, for 0 bytes).

    A per-batch tensor or a download entry is named after the edge model's state: a name of its ``state_dict``, or a
    prefix of one (a module's path, or a state name) and a word, one of the state's last parts (``weight``,
    ``running_mean``, ...) or one of the unit's own words; a payload is named by one of the unit's own words. A unit's
    own words are the first ``OWN_WORDS`` distinct others it uses (BatchRenorm's ``initialized``, ``feature``,
    ``teacher_logits``), of at most ``WORD`` characters each. The edge model's names are those of the model the
    table built (not the plugin's), which both halves know before the stream. A per-batch tensor or a download entry
    holds at least one value, and so costs at least a byte; a payload row holds at least one value, and a payload of
    no rows crosses in the row shape and dtype that its name last crossed with in the unit (README: *Not yet built*
    says what these leave)."""

    OWN_WORDS = 16
    WORD = 64

    def __init__(self, state_names=()):
        self.state = frozenset(state_names)
        parts = [n.split(".") for n in self.state]
        self.paths = {".".join(p[:i]) for p in parts for i in range(1, len(p))} | self.state
        self.words = {p[-1] for p in parts}
        self.own: list[str] = []
        self.rows: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # each payload's last row shape, dtype

    def _own(self, word: str, where: str, name: str) -> None:
        if word in self.own:
            return
        if len(word) > self.WORD or len(self.own) >= self.OWN_WORDS:
            shown = name[:60] + ("..." if len(name) > 60 else "")
            raise ValueError(f"{where} names {shown!r} (of {len(name)} characters), whose word {len(word)} "
                             f"characters long is not one of the edge model's state: names are not charged, so a "
                             f"unit may use at most {self.OWN_WORDS} words of its own, of at most {self.WORD} "
                             f"characters each (it used {', '.join(self.own) or 'none'}); name tensors after the edge "
                             f"model's state (layer1.0.bn1.weight), or with fewer words")
        self.own.append(word)

    def named(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Per-batch tensors or a download: state names, or a state prefix and a word; none empty."""
        for name, t in tensors.items():
            if name not in self.state:
                tail = name
                for i in range(len(name) - 1, 0, -1):  # the longest prefix of the name that is a path of the model
                    if name[i] == "." and name[:i] in self.paths:
                        tail = name[i + 1:]
                        break
                if tail not in self.words:
                    self._own(tail, where, name)
            if t.numel() == 0:
                raise ValueError(f"{where}[{name!r}] has no values (shape {tuple(t.shape)}): the shape of an empty "
                                 f"tensor is charged nothing, so an entry that crosses holds at least one value; leave "
                                 f"it out")

    def payload(self, payload: dict[str, torch.Tensor]) -> None:
        """The edge's payload: named with the unit's own words, in rows of at least one value."""
        for name, rows in payload.items():
            self._own(name, "EdgeDecision.payload", name)
            if math.prod(rows.shape[1:]) == 0:
                raise ValueError(f"EdgeDecision.payload[{name!r}] has rows of no values (shape {tuple(rows.shape)}); "
                                 f"a payload row holds at least one value")

    def crossing(self, payload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The payload as it crosses, after the budget: where no row crosses, in the row shape and dtype that the
        name last crossed with (an empty tensor's shape is charged nothing: neither the edge's choice of it nor the
        rows the budget kept back tell the cloud anything), or as it is at the name's first crossing."""
        out = {}
        for name, rows in payload.items():
            row = (tuple(rows.shape[1:]), rows.dtype)
            last = self.rows.setdefault(name, row)
            if len(rows):
                self.rows[name] = row
            elif row != last:
                rows = rows.new_empty((0, *last[0]), dtype=last[1])
            out[name] = rows
        return out


@dataclass
class LinkCounters:
    uploaded: int = 0  # samples
    refused: int = 0  # samples the budget kept from crossing
    busy: int = 0  # samples the cloud had no capacity for in that step (many edges on one cloud)
    upload_bytes: int = 0  # inputs: raw uint8 pixels, or their encoded length under an input codec
    upload_payload_bytes: int = 0  # per-sample payload rows, as encoded
    upload_tensor_bytes: int = 0  # per-batch tensors
    refused_bytes: int = 0  # what the byte budget kept from crossing
    downloads: int = 0
    download_bytes: int = 0
    answers: int = 0
    answer_bytes: int = 0
    late_answers: int = 0  # answers that missed the deadline: the edge's own prediction stands for those samples
    download_delay_batches: int = 0  # summed over downloads: batches each arrived later than the next one

    @property
    def bytes_up(self) -> int:
        return self.upload_bytes + self.upload_payload_bytes + self.upload_tensor_bytes

    def add(self, other: LinkCounters) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def bytes_down(self) -> int:
        return self.download_bytes + self.answer_bytes


def encode(t: torch.Tensor, dtype: str | None) -> tuple[torch.Tensor, np.ndarray]:
    """A per-sample payload tensor as the cloud decodes it, and the bytes each of its rows costs on the link (int64,
    one per row). What it returns may share storage with ``t`` (the link copies what crosses, :func:`Link.send_up`).

    ``None`` sends it as produced; ``float32`` / ``float16`` cast floating tensors; ``int8`` quantises each row
    symmetrically, q = round(t / s) in [-127, 127] with s = max|row| / 127, and sends q plus s as one float32;
    ``int8+zstd`` sends each row's s and q as one Zstandard frame (:func:`cemabench.protocol.codecs.zstd_rows`), and
    the cloud gets what the frame decodes to."""
    row = t[0].numel() if len(t) else int(np.prod(t.shape[1:], dtype=np.int64))
    t = t.detach()

    def each(nbytes: int) -> np.ndarray:
        return np.full(len(t), nbytes, dtype=np.int64)

    if dtype is None or not t.is_floating_point():
        return t, each(row * t.element_size())
    if len(t) == 0 or row == 0:  # nothing to encode: no rows, or rows of no values (0 bytes, no scale)
        return t.float(), each(0)
    if dtype == "float32":
        return t.float(), each(row * 4)
    if dtype == "float16":
        return t.half().float(), each(row * 2)
    scale = t.abs().reshape(len(t), -1).amax(1).clamp_min(torch.finfo(torch.float32).tiny).float() / 127
    scale = scale.reshape((-1,) + (1,) * (t.dim() - 1))
    q = torch.round(t.float() / scale).clamp_(-127, 127).to(torch.int8)
    if dtype == "int8":
        return q.float() * scale, each(row + 4)
    frames = zstd_rows(q, scale)  # int8+zstd: the cloud's values come from the frames that crossed
    symbols, scales = unzstd_rows(frames, tuple(t.shape[1:]))
    decoded = symbols.float() * scales.reshape((-1,) + (1,) * (t.dim() - 1))
    return decoded.to(t.device), np.array([len(f) for f in frames], dtype=np.int64)


class CloudClock:
    """The cloud's time under the time model: when it is next free. Edges that share one cloud share one clock, so
    their steps queue one after another, in the order the loop runs them (each step, the devices in turn)."""

    def __init__(self):
        self.free_at = 0.0


class Link:
    """Everything that crosses between edge and cloud: encoded, counted, budgeted and delayed here.

    Under the time model (``edge_flops_per_s`` and/or ``cloud_flops_per_s``), batch t of a device arrives at
    t * ``batch_interval``; its edge step starts when the edge has finished the batch before and takes its counted
    FLOPs / edge throughput; its upload leaves when the step ends and the uplink is free, and takes
    ``transfer_seconds``; the cloud starts its step when the upload is in and the cloud is free (:class:`CloudClock`),
    and takes its counted FLOPs / cloud throughput; answers and downloads leave when the step ends and the downlink is
    free. A sample's latency is the time from its batch's arrival to its prediction: the edge step's, or for an
    answer that counts, the answer's arrival. Nothing here reads a clock: the numbers depend on counts only."""

    def __init__(self, budget: int | None, delay: int, budget_bytes: int | None = None,
                 protocol: Protocol | None = None, clock: CloudClock | None = None,
                 vocabulary: Vocabulary | None = None, coder: EntropyCoder | None = None):
        self.budget, self.budget_bytes, self.delay = budget, budget_bytes, delay
        self.coder = coder  # the method's entropy tables, for payload_dtype "entropy" (cemabench.protocol.bottleneck)
        self.vocabulary = vocabulary or Vocabulary()  # what is not charged: names, empty shapes
        self.protocol = protocol or Protocol()
        self._batch_up_bytes = 0  # what the current batch sent up: its answers and downloads wait for it to cross
        self.total_uploaded = 0
        self.total_bytes = 0
        self.counters = LinkCounters()
        self._in_flight: deque[tuple[int, Download]] = deque()
        self.codec = None if self.protocol.input_codec == "raw" else InputCodec(self.protocol.input_codec)
        self._input_sizes: list[int] = []  # under a codec: each uploaded input's encoded length, in this domain
        p = self.protocol
        self.timed = p.edge_flops_per_s is not None or p.cloud_flops_per_s is not None  # the time model is on
        self.clock = clock or CloudClock()
        self._arrival = self._edge_seconds = 0.0  # the current batch's arrival and its edge step's end, after arrival
        self._free = {"edge": 0.0, "up": 0.0, "down": 0.0}  # when this device's edge, uplink and downlink are next free
        self._cloud_done: float | None = None  # when the cloud's step on the current batch ended
        self._answered: tuple[int, float] = (0, 0.0)  # answers of the current batch that count, and their latency
        self._latencies: list[float] = []  # each sample's, in this domain (time model only)

    def _bytes_left(self) -> float:
        return float("inf") if self.budget_bytes is None else max(0, self.budget_bytes - self.total_bytes)

    def send_up(self, x: torch.Tensor, decision: EdgeDecision, sample_nbytes: int, batch_index: int,
                first_id: int = 0, capacity: int | None = None, device: int = 0) -> Upload:
        self.vocabulary.named(decision.tensors, "EdgeDecision.tensors")
        self.vocabulary.payload(decision.payload)
        if (not decision.tensors and not decision.payload and (decision.upload is None or not len(decision.upload))
                and not (decision.send_input and self.codec is not None)):
            # nothing crosses (an edge that keeps its batch): what the general path below computes for it, cheaply
            self._batch_up_bytes = 0
            index = torch.empty(0, dtype=torch.long, device=x.device)
            return Upload(samples=x.new_empty((0, *x.shape[1:])), tensors={}, batch_index=batch_index, index=index,
                          payload={}, sample_ids=index + first_id, device=device)
        index = decision.upload if decision.upload is not None else torch.empty(0, dtype=torch.long, device=x.device)
        if capacity is not None:  # the cloud's capacity left in this step: the rest does not cross
            self.counters.busy += max(0, len(index) - capacity)
            index = index[:capacity]
        wanted = len(index)
        tensors = dict(decision.tensors)  # plain copies the harness owns (cemabench.protocol.plain)
        tensor_bytes = _nbytes(tensors)
        if tensor_bytes > self._bytes_left():
            self.counters.refused_bytes += tensor_bytes
            tensors, tensor_bytes = {}, 0
        self.counters.upload_tensor_bytes += tensor_bytes
        self.total_bytes += tensor_bytes
        if self.budget is not None:
            index = index[:max(0, self.budget - self.total_uploaded)]
        payload, row_bytes = {}, np.zeros(len(index), dtype=np.int64)  # each uploaded sample's payload rows
        for name, rows in decision.payload.items():
            if decision.payload_dtype == "entropy":
                payload[name], nbytes = self._entropy_coded(rows[:len(index)], name)
            else:
                payload[name], nbytes = encode(rows[:len(index)], decision.payload_dtype)
            row_bytes = row_bytes + nbytes
        # the index's values are checked on the device and read with the next batch's checks: until then they are
        # kept in range, so that an invalid one fails its cell instead of the device
        index = index.to(x.device).clamp(0, max(0, len(x) - 1))
        coded = decision.send_input and self.codec is not None
        streams = self.codec.encode_batch(x[index]) if coded else []  # each input at the length of its bitstream
        input_sizes = [len(s) for s in streams] if coded else [sample_nbytes if decision.send_input else 0] * len(index)
        costs = np.asarray(input_sizes, dtype=np.int64) + row_bytes
        spent = np.cumsum(costs)
        fit = int(np.searchsorted(spent, self._bytes_left(), side="right"))  # the first samples that fit, in order
        if fit < len(index):
            self.counters.refused_bytes += int(spent[-1] - (spent[fit - 1] if fit else 0))
            index, payload = index[:fit], {k: v[:fit] for k, v in payload.items()}
        payload = self.vocabulary.crossing(payload)
        sent = int(spent[fit - 1]) if fit else 0
        self.counters.refused += wanted - len(index)
        self.total_uploaded += len(index)
        self.counters.uploaded += len(index)
        self.counters.upload_bytes += sum(input_sizes[:fit])
        self.counters.upload_payload_bytes += int(row_bytes[:fit].sum())
        self.total_bytes += sent
        self._batch_up_bytes = tensor_bytes + sent
        if coded:  # the cloud gets what the bitstreams that crossed decode to, and nothing of the others
            self._input_sizes += input_sizes[:fit]
            samples = self.codec.decode_batch(streams[:fit], like=x)
        elif decision.send_input:  # raw: charged as uint8 pixels, so the cloud gets uint8 pixels (round(255 x) / 255;
            # the very images for data decoded from uint8), not whatever float the edge step wrote into the batch
            samples = x[index]  # advanced indexing copies
            if samples.is_floating_point():
                samples = samples.mul_(255).round_().clamp_(0, 255).div_(255)
        else:  # no inputs: a new empty tensor, not a view that would carry the batch's storage
            samples = x.new_empty((0, *x.shape[1:]))
        # one copy of what crosses, and only its rows: the decision's own tensors are the harness's plain copies, but
        # encoding may return views of them (float32, other dtypes) that share storage with the rows the budget cut
        payload = {k: v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
                   for k, v in payload.items()}
        return Upload(samples=samples, tensors=tensors, batch_index=batch_index, index=index, payload=payload,
                      sample_ids=index + first_id, device=device)

    def _entropy_coded(self, rows: torch.Tensor, name: str) -> tuple[torch.Tensor, np.ndarray]:
        """Int32 symbols as the cloud gets them, decoded from the bitstreams the harness wrote with the method's
        tables, and each row's bitstream length (:mod:`cemabench.protocol.bottleneck`)."""
        what = f"EdgeDecision.payload[{name!r}]"
        if self.coder is None:
            raise ValueError(f"{what}: payload_dtype 'entropy' codes int32 symbols with the method's entropy tables "
                             f"(Method.entropy_tables), and this method declares none")
        streams = self.coder.encode_rows(rows, what)
        decoded = self.coder.decode_rows(streams, tuple(rows.shape[1:]))
        return decoded.to(rows.device), np.array([len(s) for s in streams], dtype=np.int64)

    def answer(self, count: int, nbytes: int) -> bool:
        """Charge ``count`` answers of ``nbytes`` in all (their encoding is the task's); whether they reach the edge
        before the deadline (the late ones are counted, and do not count)."""
        self.counters.answers += count
        self.counters.answer_bytes += nbytes
        deadline, round_trip = self.protocol.answer_deadline, self._round_trip(nbytes)
        if deadline is not None and round_trip > deadline:
            self.counters.late_answers += count
            return False
        self._answered = (count, round_trip)
        return True

    def edge_step(self, batch_index: int, flops: int) -> None:
        """A batch arrived and its edge step counted ``flops``: under the time model the step starts when the batch is
        in and the edge is done with the one before, and takes flops / edge throughput."""
        self._arrival = batch_index * self.protocol.batch_interval
        rate = self.protocol.edge_flops_per_s
        self._cloud_done, self._answered = None, (0, 0.0)
        if not self.timed:
            return
        done = max(self._arrival, self._free["edge"]) + (flops / rate if rate else 0.0)
        self._free["edge"] = done
        self._edge_seconds = done - self._arrival

    def _send(self, way: str, start: float, nbytes: int) -> float:
        """When ``nbytes`` that are ready at ``start`` have crossed: after what this direction is still sending."""
        done = max(start, self._free[way]) + self.protocol.transfer_seconds(nbytes, down=way == "down")
        self._free[way] = done
        return done

    def cloud_step(self, flops: int) -> None:
        """The cloud's step on this batch's upload counted ``flops``: under the time model it waits for the upload
        and for the cloud's earlier steps, then takes flops / cloud throughput."""
        if not self.timed:
            return
        rate = self.protocol.cloud_flops_per_s
        uploaded = self._send("up", self._arrival + self._edge_seconds, self._batch_up_bytes)
        start = max(uploaded, self.clock.free_at) if rate else uploaded
        self._cloud_done = start + (flops / rate if rate else 0.0)
        if rate:
            self.clock.free_at = self._cloud_done

    def _round_trip(self, down_bytes: int) -> float:
        """Seconds from the batch's arrival until ``down_bytes`` sent back for it reach the edge: the upload's and
        the download's transfers, and under the time model the edge step, the wait for the cloud and its step."""
        if not self.timed:
            return (self.protocol.transfer_seconds(self._batch_up_bytes)
                    + self.protocol.transfer_seconds(down_bytes, down=True))
        done = self._cloud_done
        if done is None:  # no cloud step on this batch
            done = self._send("up", self._arrival + self._edge_seconds, self._batch_up_bytes)
        return self._send("down", done, down_bytes) - self._arrival

    def finish_batch(self, samples: int, edge_predicted: bool) -> None:
        """The batch's predictions are made: under the time model, each sample's latency is its answer's round trip
        where an answer counted, else the edge step's where the edge predicted; a sample with no prediction has none
        (the cell counts it as unanswered)."""
        if self.timed:
            count, latency = self._answered
            self._latencies += [latency] * count + [self._edge_seconds] * (max(0, samples - count) * edge_predicted)

    def send_down(self, download: Download, batch_index: int) -> None:
        self.vocabulary.named(download, "the download")
        nbytes = _nbytes(download)
        self.counters.downloads += 1
        self.counters.download_bytes += nbytes
        late = max(0, math.ceil(self._round_trip(nbytes) / self.protocol.batch_interval) - 1)
        self.counters.download_delay_batches += self.delay + late
        due = batch_index + 1 + self.delay + late
        self._in_flight.append((due, dict(download)))  # plain copies the harness owns (cemabench.protocol.plain)

    def arrived(self, batch_index: int) -> list[Download]:
        out = []
        while self._in_flight and self._in_flight[0][0] <= batch_index:
            out.append(self._in_flight.popleft()[1])
        return out

    def drop_in_flight(self) -> None:
        """Forget the downloads not yet delivered (a periodic reset: the edge they were sent to is gone); what they
        cost stays counted."""
        self._in_flight.clear()

    def next_domain(self) -> tuple[LinkCounters, list[int] | None, list[float] | None]:
        """This domain's counters; under an input codec each uploaded input's encoded length, and under the time
        model each sample's latency (each None when off)."""
        done, self.counters = self.counters, LinkCounters()
        sizes, self._input_sizes = self._input_sizes, []
        latencies, self._latencies = self._latencies, []
        return done, (None if self.codec is None else sizes), (latencies if self.timed else None)

