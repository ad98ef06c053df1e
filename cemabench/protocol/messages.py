"""The line between the loop and an isolated half (:mod:`cemabench.protocol.isolation`): what crosses it, as bytes, both
ways, and the random state threaded through the halves.

A step's messages are wire messages (:mod:`cemabench.protocol.wire`: JSON and raw tensor bytes, no pickle); set-up
goes to a half as ``torch.save`` bytes (the models, the method's recipe), and what a half sends back that is not a wire
message is read with ``weights_only=True`` (:func:`unpack`), so that no object of a plugin's class is ever unpickled in
the loop's process.
"""
from __future__ import annotations

import dataclasses
import io
import os
import random
import struct
import zipfile
from multiprocessing.connection import Connection

import numpy as np
import torch

from cemabench.errors import HalfFailed
from cemabench.protocol import wire
from cemabench.protocol.plain import NotPlain


# -- bytes -------------------------------------------------------------------------------------------------------------
def pack(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


MAX_MESSAGE = 1 << 32  # bytes of one reply from a half (4 GiB: a batch of ImageNet feature maps fits many times)


def send(conn: Connection, value) -> None:
    """``value`` as a wire message where it is plain (a step's: :mod:`cemabench.protocol.wire`), else as
    ``torch.save`` bytes (set-up: the models, the method's recipe, a training stage's state)."""
    try:
        parts = wire.encode_parts(value)
    except NotPlain:
        parts = [pack(value)]
    views = [memoryview(part).cast("B") for part in parts]
    size = sum(len(view) for view in views)  # framed as Connection.send_bytes frames a message
    head = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
    fd = conn.fileno()
    for view in (memoryview(head), *views):  # each part from where it is: no copy into one message first
        while view:
            view = view[os.write(fd, view):]


def receive(conn: Connection, maxsize: int | None = None) -> memoryview:
    """A message sent by :func:`send` (or ``Connection.send_bytes``), read into a buffer of its own in one copy out
    of the line (``Connection.recv_bytes`` copies a large message several times), whose memory is taken as the
    bytes arrive. OSError for a message longer than ``maxsize``, EOFError where the line ends."""
    fd = conn.fileno()
    (size,) = struct.unpack("!i", _read(fd, memoryview(bytearray(4))))
    if size == -1:
        (size,) = struct.unpack("!Q", _read(fd, memoryview(bytearray(8))))
    if size < 0 or (maxsize is not None and size > maxsize):
        raise OSError("bad message length")
    return _read(fd, memoryview(np.empty(size, dtype=np.uint8)))


def _read(fd: int, buffer: memoryview) -> memoryview:
    view = buffer
    while view:
        n = os.readv(fd, [view])
        if n == 0:
            raise EOFError
        view = view[n:]
    return buffer


def unpack(data: bytes, role: str):
    """What a half sent: plain tensors, lists, dicts, numbers and strings only: a wire message, or ``torch.save``
    bytes read with ``weights_only`` (without the classes added to its list of allowed ones), in uncompressed records
    (no small message that expands in memory)."""
    try:
        if data[:len(wire.MAGIC)] == wire.MAGIC:
            return wire.decode(data)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            records = archive.infolist()
        if any(r.compress_type != zipfile.ZIP_STORED for r in records) or sum(r.file_size for r in records) > len(data):
            raise ValueError("compressed records")
        extra = torch.serialization.get_safe_globals()  # classes added to torch's allowed ones (torch adds some of
        torch.serialization.clear_safe_globals()        # its own as it imports; import-time plugin code could too)
        try:
            return torch.load(io.BytesIO(data), weights_only=True)
        finally:
            torch.serialization.add_safe_globals(extra)
    except Exception as error:  # noqa: BLE001 - anything else is refused, whatever it is
        raise HalfFailed(f"NotPlain: the {role} half sent what is not plain data ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})"[:500]) from None


def rng_state(device: torch.device) -> dict:
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # the words as a tensor: raw bytes on the wire, where 625 numbers in its JSON header took 0.3 ms to read
    python = torch.from_numpy(np.fromiter(words, dtype=np.int64, count=len(words)))
    state = {"python": [version, python, gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def replaying(state: dict, device: torch.device, build):
    """``build()`` in the random state ``state`` (halves built as at a unit's start); the state it found is put
    back, so that what draws after it draws as it would have."""
    now = rng_state(device)
    set_rng_state(state, device)
    try:
        return build()
    finally:
        set_rng_state(now, device)


def fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


ASK_CLEAN = "ask-clean"  # the key of a cloud half's request for the clean split, in place of its reply
