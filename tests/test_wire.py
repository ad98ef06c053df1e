"""The bytes of each batch's calls between the loop and an isolated half (:mod:`cemabench.protocol.wire`): plain
values and dense tensors round-trip exactly, anything else is refused when it is written, and a message that does not
say exactly what it holds is refused when it is read."""
import json
import os
import socket
import struct
import threading
from multiprocessing.connection import Connection

import numpy as np
import pytest
import torch
from torch import nn

from cemabench.protocol import Execution, Models, Protocol, messages, run_unit, wire
from cemabench.protocol.plain import DTYPES, NotPlain
from cemabench.registry import build_method, build_model, dataset_factory


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (type(b) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
                and torch.equal(a, b) and not b.requires_grad)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    return type(a) is type(b) and (a == b or a != a)  # NaN is itself


def test_plain_values_and_every_dtype_round_trip_exactly():
    torch.manual_seed(0)
    value = {
        "tensors": [torch.randn(3, 4).to(d) if d.is_floating_point else (torch.rand(5) > 0.5 if d == torch.bool
                    else torch.randint(0, 100, (2, 3), dtype=d)) for d in DTYPES],
        "channels_last": torch.rand(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "empty": torch.empty(0, 3), "scalar": torch.tensor(2.5), "parameter": nn.Parameter(torch.ones(2)),
        "numbers": [0, -1, 2 ** 70, 1.5, float("inf"), float("nan"), -0.0, True, None, "é"], "pair": (1, (2, 3)),
        7: b"\x00bytes", "rng": messages.rng_state(torch.device("cpu")), "nested": {"a": [{"b": ()}]},
    }
    back = wire.decode(wire.encode(value))
    expected = {**value, "parameter": value["parameter"].detach()}
    assert _same(expected, back)
    assert back["channels_last"].is_contiguous(memory_format=torch.channels_last)
    view = torch.arange(10.0)[2:4]  # a view crosses as its own elements, not its storage
    assert wire.decode(wire.encode(view)).untyped_storage().nbytes() == 8


class Claims(torch.Tensor):
    pass


@pytest.mark.parametrize("value, named", [
    (torch.zeros(3).as_subclass(Claims), "Claims"), (torch.zeros(2, 2).to_sparse(), "dense strided"),
    (torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8), "dense strided"),
    (torch.zeros(2, dtype=torch.complex64), "complex64"), (np.float32(1), "numpy.float32"), ({1.5: 1}, "dict keys"),
    ({"a": object()}, "builtins.object"), (torch.empty(2, device="meta"), "dense strided"),
], ids=["subclass", "sparse", "quantised", "complex", "numpy-scalar", "float-key", "object", "meta"])
def test_what_is_not_plain_is_refused_when_written(value, named):
    with pytest.raises(NotPlain, match=named):
        wire.encode({"reply": [value]})


def _message(header: dict, blob: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return wire.MAGIC + struct.pack("<Q", len(raw)) + raw + blob


@pytest.mark.parametrize("data", [
    b"PK\x03\x04", wire.MAGIC + b"\x01",
    wire.MAGIC + struct.pack("<Q", 1 << 40) + b"{}",
    _message({"v": ["T", 0], "t": [["float32", [0], "", 400]]}, bytes(400)),  # a tensor that says it is empty
    _message({"v": ["T", 0], "t": [["float32", [100], "", 400]]}, bytes(399)),  # shorter than it says
    _message({"v": ["T", 0], "t": [["float32", [1], "", 4]]}, bytes(8)),  # bytes left over
    _message({"v": ["T", 1], "t": [["float32", [1], "", 4]]}, bytes(4)),  # a reference to no tensor
    _message({"v": ["b", 0], "t": [["float32", [1], "", 4]]}, bytes(4)),  # a tensor read as bytes
    _message({"v": ["X", 1], "t": []}), _message({"v": ["d", 1.5, 2], "t": []}), _message({"v": ["d", "a"], "t": []}),
    _message({"v": ["T", 0], "t": [["complex64", [1], "", 8]]}, bytes(8)),
    _message({"v": ["T", 0], "t": [["float32", [-1], "", 4]]}, bytes(4)),
    _message({"v": ["T", 0], "t": [["float32", [1], "channels_last", 4]]}, bytes(4)),
    _message({"v": 1, "t": [], "x": 2}), _message({"v": json.loads('["l",' * 100 + "1" + "]" * 100), "t": []}),
    wire.MAGIC + struct.pack("<Q", 2000) + b"[" * 1000 + b"]" * 1000,
], ids=["zip", "short", "header-past-end", "claims-empty", "short-tensor", "left-over", "no-tensor", "as-bytes",
        "tag", "dict-key", "dict-odd", "dtype", "negative", "layout", "header-keys", "nested", "deep"])
def test_a_message_that_does_not_hold_exactly_what_it_says_is_refused(data):
    with pytest.raises((ValueError, RecursionError)):
        wire.decode(data)


def test_a_half_that_sends_a_forged_wire_message_fails_its_cell_as_not_plain():
    forged = _message({"v": ["d", "decision", ["T", 0]], "t": [["float32", [0], "", 400]]}, bytes(400))
    with pytest.raises(Exception, match="NotPlain: the edge half sent what is not plain data"):
        messages.unpack(forged, "edge")


@pytest.mark.slow  # 8 s (a zygote and an isolated unit); kept out of the default tier's 5 minutes
def test_each_batchs_calls_cross_as_wire_messages(monkeypatch):
    """The pickle path (torch.save, a weights_only load) is the set-up's; a step's calls and replies are wire
    messages (the speed of isolation, README: Isolation, measured)."""
    data = dataset_factory("miniature-digits-c")(data_root=None, severity=5, domains=("fog",), n_examples=192)
    models = Models.copies_of(build_model("mini:edge"), build_model("mini:foundation"))
    sent, received = [], []  # the first bytes of each message this process sends a half and reads from one
    real_write, real_readv = os.write, os.readv
    heads: dict = {}  # (direction, fd) -> whether the last piece was a message's length (4 or 12 bytes)

    def body(direction: str, fd: int, data: bytes, into: list) -> None:
        if heads.get((direction, fd)) and data[:2] == b"PK" or data[:4] == wire.MAGIC:
            into.append(data[:4])
        heads[(direction, fd)] = len(data) in (4, 12)

    def write(fd, data):
        n = real_write(fd, data)
        body("out", fd, bytes(memoryview(data)[:n]), sent)
        return n

    def readv(fd, buffers):
        n = real_readv(fd, buffers)
        body("in", fd, bytes(memoryview(buffers[0])[:n]), received)
        return n
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "readv", readv)
    (result,) = run_unit(build_method("tent"), data.domains, models, data.num_classes, data.clean, Protocol(), 0,
                         Execution(), isolate=True)
    assert result.status == "ok" and result.seen == 192
    batches, pickles = 3, b"PK\x03\x04"  # torch.save's zip
    assert sent.count(wire.MAGIC) >= 2 * batches and received.count(wire.MAGIC) >= 2 * batches  # edge, cloud steps
    assert sent.count(pickles) <= 4 and received.count(pickles) <= 2  # set-up only: as many for 3 batches as for 300


def test_a_message_read_from_a_line_shares_its_buffer_each_tensor_exactly_its_span():
    """Read from a line (a buffer of the reader's own), each tensor is its span of the message, aligned, and
    nothing more: no copy, and no storage that reaches the bytes around it."""
    value = {"batch": torch.randn(64, 3, 32, 32), "index": torch.arange(5), "odd": torch.ones(3, dtype=torch.uint8),
             "half": torch.randn(7).half(), "bytes": b"abc", "empty": torch.empty(0, 2), "last": torch.randn(2, 2)}
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)  # the message crosses in many writes and reads
        sender, reader = Connection(ours.detach()), Connection(theirs.detach())
        writer = threading.Thread(target=messages.send, args=(sender, value))
        writer.start()
        data = messages.receive(reader)
        writer.join()
        back = wire.decode(data)
        assert _same(value, back)
        start = np.frombuffer(data, dtype=np.uint8).ctypes.data
        for name in ("batch", "index", "odd", "half", "last"):
            t = back[name]
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
            assert start <= t.data_ptr() < start + len(data) and (t.data_ptr() - start) % wire.ALIGN == 0
    for refused in (OSError, EOFError):  # longer than the reader takes; the line ended
        ours, theirs = socket.socketpair()
        sender, reader = Connection(ours.detach()), Connection(theirs.detach())
        messages.send(sender, {"x": torch.ones(300)})  # (within the line's buffer)
        if refused is EOFError:
            messages.receive(reader, maxsize=2000)
        sender.close()
        with pytest.raises(refused):
            messages.receive(reader, maxsize=1000)
        reader.close()


def test_the_bytes_between_spans_are_zeros():
    data = bytearray(wire.encode({"a": torch.ones(1, dtype=torch.uint8), "b": torch.ones(3)}))
    assert wire.decode(bytes(data))["b"].tolist() == [1.0, 1.0, 1.0]
    gap = data.rindex(bytes(torch.ones(3).numpy().tobytes())) - 1  # the alignment before b's span
    data[gap] = 1
    with pytest.raises(ValueError, match="alignment"):
        wire.decode(bytes(data))
