"""Hostile methods that send data up through what the link does not charge (issue 22: a hostile review of issue 19
sent the miniature's whole batch this way for 0 bytes under ``--upload-budget-bytes 0``). Each edge uploads every
sample without its input or payload (so the byte budget never stops it) and awaits the cloud's answers; its cloud
answers with the foundation model on the batch it rebuilds from what reached it, or, for the order of the upload
index, with a code book. With ``smuggle = false`` the edge sends nothing through the channel, and the cloud answers
what it can without it: the gain is the channel's.

Measured on the miniature, fog, ``--upload-budget-bytes 0``, before the link closed these channels (commit 8c66221;
``PYTHONPATH=tests/plugins cemabench run --method NAME --option smuggle=true --domains fog --upload-budget-bytes 0``),
against ``smuggle=false``, all at 0 bytes up:

- ``names-smuggler``: 61.0 % (without: 9.9 %), the whole batch (grey, 32 x 32, 8 bits) as about 680 names of 199
  characters, 64 kB a batch;
- ``shape-smuggler``: 57.3 % (9.9 %), the batch at 8 x 8 pixels and 16 grey levels (2 kB a batch) in the shapes of
  about 290 empty tensors, under names the edge model has;
- ``order-smuggler``: 19.6 % (9.9 %), 4 bits a sample in the order of the upload index (log2 64! = 296 bits a
  batch): which of each image's quadrants are brighter than its mean, which the cloud's code book maps to a class.

Now each one's cell is an error that names the rule (tests/test_hostile.py, tests/test_isolation.py)."""
from dataclasses import dataclass
from math import factorial

import torch
import torch.nn.functional as F

from cemabench.method import CloudLogic, CloudReply, EdgeDecision, EdgeLogic, Method


def _everything(x: torch.Tensor, **fields) -> EdgeDecision:
    return EdgeDecision(logits=None, upload=torch.arange(len(x)), send_input=False, await_answers=True, **fields)


class _Smuggling(EdgeLogic):
    def __init__(self, smuggle: bool):
        self.smuggle = smuggle


class _Channel(Method):
    """A smuggler: its edge and cloud classes, and whether the edge uses the channel."""

    edge_class: type
    cloud_class: type

    @dataclass
    class Options:
        smuggle: bool = True

    def edge(self, num_classes):
        return self.edge_class(self.options.smuggle)

    def cloud(self, resources):
        return self.cloud_class(resources)


class _Answering(CloudLogic):
    """Answers with the foundation model on the batch that ``rebuild`` makes of the upload (class 0 without one)."""

    def __init__(self, resources):
        self.model = resources.foundation().eval()

    def rebuild(self, upload) -> torch.Tensor | None:
        raise NotImplementedError

    def step(self, upload):
        n = len(upload)
        batch = self.rebuild(upload)
        with torch.no_grad():
            answers = torch.zeros(n, 10) if batch is None else self.model(batch)
        return CloudReply(answers=answers)


def _grey(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x.mean(1, keepdim=True), size)


def _image(grey: torch.Tensor) -> torch.Tensor:
    return F.interpolate(grey, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


# -- names: the batch as the names of empty per-batch tensors ---------------------------------------------------------

HEX = 194  # hex digits of data per name: "n", a 4-digit sequence number and these make 199 characters


class _NamesEdge(_Smuggling):
    def step(self, model, x):
        if not self.smuggle:
            return _everything(x)
        data = (_grey(x, 32) * 255).round().to(torch.uint8).flatten().tolist()
        text = bytes(data).hex()
        names = {f"n{i:04x}{text[start:start + HEX]}": torch.empty(0)
                 for i, start in enumerate(range(0, len(text), HEX))}
        return _everything(x, tensors=names)


class _NamesCloud(_Answering):
    def rebuild(self, upload):
        if not upload.tensors:
            return None
        text = "".join(name[5:] for name in sorted(upload.tensors, key=lambda k: int(k[1:5], 16)))
        grey = torch.tensor(list(bytes.fromhex(text)), dtype=torch.float32) / 255
        return _image(grey.reshape(len(upload), 1, 32, 32))


class NamesSmuggler(_Channel):
    name = "names-smuggler"
    edge_class, cloud_class = _NamesEdge, _NamesCloud


# -- shapes: the batch as the shapes of empty per-batch tensors under the edge model's own names ---------------------

DIMS = 7  # after the leading 0: one byte each (a size of byte + 1), 56 bits a tensor, whose strides do not overflow


def _names(model) -> list[str]:
    """Names the edge model has (its state names, and module paths with a word of its state): both halves list them."""
    state = list(model.state_dict())
    paths = {".".join(n.split(".")[:i]) for n in state for i in range(1, len(n.split(".")))} | set(state)
    words = {n.split(".")[-1] for n in state}
    return sorted(set(state) | {f"{p}.{w}" for p in paths for w in words})


class _ShapeEdge(_Smuggling):
    def step(self, model, x):
        if not self.smuggle:
            return _everything(x)
        levels = (_grey(x, 8) * 15).round().to(torch.int64).flatten().tolist()  # 4 bits a pixel
        number = sum(v << (4 * i) for i, v in enumerate(levels))
        data = number.to_bytes((4 * len(levels) + 7) // 8, "little")
        chunks = [data[i:i + DIMS].ljust(DIMS, b"\0") for i in range(0, len(data), DIMS)]
        names = _names(model)
        return _everything(x, tensors={names[i]: torch.empty((0, *(b + 1 for b in chunk)))
                                       for i, chunk in enumerate(chunks)})


class _ShapeCloud(_Answering):
    def __init__(self, resources):
        super().__init__(resources)
        self.names = _names(resources.edge_replica())

    def rebuild(self, upload):
        if not upload.tensors:
            return None
        data = b"".join(bytes(d - 1 for d in upload.tensors[name].shape[1:])
                        for name in self.names if name in upload.tensors)
        number, count = int.from_bytes(data, "little"), len(upload) * 64
        levels = torch.tensor([(number >> (4 * i)) & 15 for i in range(count)], dtype=torch.float32) / 15
        return _image(levels.reshape(len(upload), 1, 8, 8))


class ShapeSmuggler(_Channel):
    name = "shape-smuggler"
    edge_class, cloud_class = _ShapeEdge, _ShapeCloud


# -- order: 4 bits a sample in the order of the upload index --------------------------------------------------------

def _codes(x: torch.Tensor) -> torch.Tensor:
    """Which of an image's quadrants are brighter than its mean: a 4-bit code per image."""
    quadrants = _grey(x, 2).flatten(1)
    return ((quadrants > quadrants.mean(1, keepdim=True)).long() * torch.tensor([1, 2, 4, 8])).sum(1)


def _bits(n: int) -> int:
    return min(4, (factorial(n).bit_length() - 1) // max(n, 1))


class _OrderEdge(_Smuggling):
    def step(self, model, x):
        n, bits = len(x), _bits(len(x))
        if not self.smuggle or not bits:
            return _everything(x)
        number = sum(int(c) >> (4 - bits) << (bits * i) for i, c in enumerate(_codes(x).tolist()))
        left, order = list(range(n)), []
        for base in range(n, 0, -1):  # the number in the factorial base: each digit picks one of those left
            number, digit = divmod(number, base)
            order.append(left.pop(digit))
        return EdgeDecision(logits=None, upload=torch.tensor(order), send_input=False, await_answers=True)


class _OrderCloud(CloudLogic):
    """Maps each sample's code to the class the foundation model gives most clean images with that code."""

    def __init__(self, resources):
        model = resources.foundation().eval()
        clean = resources.clean_images(10_000)
        with torch.no_grad():
            classes = model(clean).argmax(1)
        codes = _codes(clean)
        self.book = {bits: torch.stack([classes[codes >> (4 - bits) == c].bincount(minlength=10).argmax()
                                        for c in range(2 ** bits)]) for bits in range(1, 5)}

    def step(self, upload):
        n, bits = len(upload), _bits(len(upload))
        if not bits:
            return CloudReply(answers=torch.zeros(n, 10))
        left, number, scale = list(range(n)), 0, 1
        for base, sample in zip(range(n, 0, -1), upload.index.tolist()):
            digit = left.index(sample)
            left.pop(digit)
            number, scale = number + digit * scale, scale * base
        codes = torch.tensor([(number >> (bits * i)) & (2 ** bits - 1) for i in range(n)])
        return CloudReply(answers=F.one_hot(self.book[bits][codes[upload.index]], 10).float())


class OrderSmuggler(_Channel):
    name = "order-smuggler"
    edge_class, cloud_class = _OrderEdge, _OrderCloud
