"""The bytes of a step between the loop and a half (``--isolate``): plain values and dense tensors, without pickle.

A message is ``MAGIC``, the length of a JSON header, the header, then every tensor's bytes, each starting at the next
multiple of :data:`ALIGN` bytes (zeros between). The header holds a tree of JSON scalars (None, bools, ints, floats,
strings) and lists whose first item names what they stand for (``["l", ...]`` a list, ``["t", ...]`` a tuple,
``["d", key, value, ...]`` a dict with str or int keys, ``["T", i]`` the i-th tensor, ``["b", i]`` the i-th bytes), and
one entry per tensor: its dtype, shape, memory format and length in bytes. Reading a message parses JSON (no object of
any class is built from what the sender chose) and gives each tensor its own span of the message and nothing more (a
storage of exactly its declared elements): copied out of it, or, where the message is a buffer of the reader's own
(one read from a line, :func:`cemabench.protocol.messages.receive`), that span of it.

A message is written in parts (:func:`encode_parts`): the header, then each tensor's bytes as they are in its memory,
so that a batch of ImageNet images is copied once into the line and once out of it, and not into a message first.

This is what each batch's calls carry both ways (the batch, the upload, the downloads, the decision, the reply, the
random state); it costs tens of microseconds where ``torch.save`` and a ``weights_only`` load cost milliseconds. What
it cannot carry (a tensor subclass, a sparse tensor, a NumPy scalar, an object) raises :class:`NotPlain` in the
sender, which then falls back to ``torch.save`` bytes, read in the loop with ``weights_only`` as before.
"""
from __future__ import annotations

import json
import struct

import torch

from cemabench.protocol.plain import DTYPES, PLAIN_TYPES, NotPlain, check_plain

MAGIC = b"CBW1"
_LENGTH = struct.Struct("<Q")
_DTYPES = {str(d).removeprefix("torch."): d for d in DTYPES}
_NAMES = {d: n for n, d in _DTYPES.items()}
_SCALARS = (type(None), bool, int, float, str)
MAX_DEPTH = 64  # nesting of containers (a reply is a few levels deep)
ALIGN = 16  # where each tensor's bytes start, from the message's start: any dtype's elements aligned when shared


def encode_parts(value) -> list:
    """The message for ``value`` as parts to write one after the other (bytes, and each tensor's bytes where they
    are: a NumPy view of a contiguous copy on the host, made only where the tensor is not one already), or
    :class:`NotPlain` naming what it cannot carry."""
    tensors: list[tuple] = []
    blobs: list = []
    tree = _tree(value, tensors, blobs, 0)
    header = json.dumps({"v": tree, "t": tensors}, separators=(",", ":")).encode()
    parts = [MAGIC + _LENGTH.pack(len(header)) + header]
    offset = len(parts[0])
    for blob in blobs:
        if offset % ALIGN and len(blob):
            parts.append(bytes(-offset % ALIGN))
            offset += len(parts[-1])
        parts.append(blob)
        offset += len(blob)
    return parts


def encode(value) -> bytes:
    """The message for ``value`` as one bytes object (:func:`encode_parts`)."""
    return b"".join(memoryview(part) for part in encode_parts(value))


def _tree(value, tensors: list, blobs: list, depth: int):
    if depth > MAX_DEPTH:
        raise NotPlain(f"a message nests more than {MAX_DEPTH} containers")
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind in (list, tuple):
        if all(type(v) in _SCALARS for v in value):  # a random state's 625 words, say: no call per item
            return ["l" if kind is list else "t", *value]
        return ["l" if kind is list else "t", *(_tree(v, tensors, blobs, depth + 1) for v in value)]
    if kind is dict:
        out = ["d"]
        for key, item in value.items():
            if type(key) not in (str, int):
                raise NotPlain(f"a message's dict keys are str or int, got {type(key).__qualname__}")
            out += [key, _tree(item, tensors, blobs, depth + 1)]
        return out
    if kind is bytes:
        tensors.append(["bytes", [len(value)], "", len(value)])
        blobs.append(value)
        return ["b", len(tensors) - 1]
    if kind in PLAIN_TYPES:
        check_plain(value, "a message's tensor")  # what the link takes, refused as the link refuses it
        t = value.detach().cpu()
        layout = ""
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            layout, t = "channels_last", t.permute(0, 2, 3, 1)  # its bytes in their own order; read back as they were
        t = t.contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""  # its memory, not a copy
        tensors.append([_NAMES[value.dtype], list(value.shape), layout, len(data)])
        blobs.append(data)
        return ["T", len(tensors) - 1]
    raise NotPlain(f"a message carries no {kind.__module__}.{kind.__qualname__}")


def decode(data):
    """What :func:`encode` wrote (bytes, or any buffer of bytes); ValueError for anything else (a malformed header, a
    tensor that does not fill its span exactly, bytes between spans that are not the zeros of alignment, an unknown
    tag or dtype). Where ``data`` is writable (a buffer of the reader's own), each tensor shares its span of it; a
    read-only one (bytes) is copied from."""
    view = memoryview(data).cast("B")
    if len(view) < 4 + _LENGTH.size or view[:4] != MAGIC:
        raise ValueError("not a wire message")
    (length,) = _LENGTH.unpack_from(view, 4)
    start = 4 + _LENGTH.size
    if length > len(view) - start:
        raise ValueError("its header runs past its end")
    header = json.loads(bytes(view[start:start + length]))
    if type(header) is not dict or set(header) != {"v", "t"} or type(header["t"]) is not list:
        raise ValueError("a malformed header")
    values, offset = [], start + length
    for entry in header["t"]:
        value, offset = _read(entry, view, offset)
        values.append(value)
    if offset != len(view):
        raise ValueError("bytes left over after its tensors")
    return _value(header["v"], values, 0)


def _read(entry, data: memoryview, offset: int):
    if type(entry) is not list or len(entry) != 4:
        raise ValueError("a malformed tensor entry")
    dtype, shape, layout, size = entry
    if type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape) or type(size) is not int:
        raise ValueError("a malformed tensor shape")
    aligned = offset + (-offset % ALIGN if size else 0)
    if size < 0 or aligned + size > len(data) or any(data[offset:aligned]):
        raise ValueError("a tensor runs past the message's end, or what lies before it is not alignment's zeros")
    offset = aligned
    span = data[offset:offset + size]
    if dtype == "bytes":
        if shape != [size] or layout != "":
            raise ValueError("malformed bytes")
        return bytes(span), offset + size
    if dtype not in _DTYPES or layout not in ("", "channels_last") or (layout and len(shape) != 4):
        raise ValueError(f"an unknown tensor dtype or layout {str(dtype)[:20]!r}")
    target = _DTYPES[dtype]
    count = 1
    for n in shape:
        count *= n
    if count * target.itemsize != size:
        raise ValueError("a tensor's bytes do not match its shape")
    if not size:
        flat = torch.empty(0, dtype=torch.uint8)
    elif data.readonly:  # a copy of its own
        flat = torch.frombuffer(bytearray(span), dtype=torch.uint8)
    else:  # its span of the reader's own buffer, and no more (the storage ends where the span does)
        flat = torch.frombuffer(data, dtype=torch.uint8, count=size, offset=offset)
    t = flat.view(target)
    if layout:
        n, c, h, w = shape
        t = t.reshape(n, h, w, c).permute(0, 3, 1, 2)
    else:
        t = t.reshape(shape)
    return t, offset + size


def _value(node, values: list, depth: int):
    if depth > MAX_DEPTH:
        raise ValueError("nested too deep")
    if type(node) in _SCALARS:
        return node
    if type(node) is not list or not node or node[0] not in ("l", "t", "d", "T", "b"):
        raise ValueError("an unknown node")
    tag, items = node[0], node[1:]
    if tag in ("l", "t"):
        scalars = all(type(v) in _SCALARS for v in items)
        out = items if scalars else [_value(v, values, depth + 1) for v in items]
        return out if tag == "l" else tuple(out)
    if tag == "d":
        if len(items) % 2 or not all(type(k) in (str, int) for k in items[::2]):
            raise ValueError("a malformed dict")
        return {k: _value(v, values, depth + 1) for k, v in zip(items[::2], items[1::2], strict=True)}
    if len(items) != 1 or type(items[0]) is not int or not 0 <= items[0] < len(values):
        raise ValueError("a reference to no tensor")
    found = values[items[0]]
    if (tag == "b") != (type(found) is bytes):
        raise ValueError("a tensor read as bytes, or bytes as a tensor")
    return found
