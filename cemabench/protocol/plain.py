"""What crosses the link is plain data: dense strided tensors, copied into storage the harness owns.

A tensor that method code hands over is code as much as data: a ``torch.Tensor`` subclass can report a length or a
shape of 0 while it holds the batch, a view (``x[:0]``) or a narrow row carries its whole storage with it, and a
sparse or quantised tensor's bytes are not ``numel() * element_size()``. So every tensor that crosses (the upload
index and inputs, payload and per-batch tensors, answers, downloads) and the edge's scored logits pass through
:func:`plain`: an exact ``torch.Tensor`` (or ``nn.Parameter``) of a plain dtype, strided, not quantised, nested or on
the meta device, which is copied, contiguous, before the other side sees it, and charged at the bytes of that copy.
Decision and reply objects must be exactly :class:`~cemabench.method.EdgeDecision` /
:class:`~cemabench.method.CloudReply` and are read once, field by field, into new harness-owned objects.

What is not charged must not carry data either (issue 22: names, the shapes of empty tensors and the order of
entries): a tensor's name is a dotted identifier of at most ``MAX_KEY`` characters, a tensor has at most ``MAX_DIMS``
dimensions, and a map's entries cross in the order of their names, whatever order method code built them in. Which
names a unit may use, and empty tensors, are the link's to bound (:class:`cemabench.protocol.link.Vocabulary`).
"""
from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict

import torch
from torch import nn

from cemabench.method import CloudReply, EdgeDecision

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool)
PLAIN_TYPES = (torch.Tensor, nn.Parameter)  # exactly these: a subclass may answer len() and shape as it likes
MAPS = (dict, OrderedDict)  # a state_dict() is an OrderedDict
MAX_KEY = 200  # characters of a tensor's name (a parameter's, say)
# a state_dict name: dotted identifiers and indices, an index first too (an nn.Sequential's "1.weight")
NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*|[0-9]+)(\.[A-Za-z0-9_]+)*")
MAX_DIMS = 8  # dimensions of a tensor in a map that crosses (a shape of ones would carry its length uncharged)
INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)  # class labels and predictions


class NotPlain(TypeError):
    """Method code handed something other than plain tensor data to cross the link."""


def plain(t, what: str) -> torch.Tensor:
    """A contiguous copy of ``t`` that shares no storage with what method code holds, or :class:`NotPlain`."""
    check_plain(t, what)
    return t.detach().clone(memory_format=torch.contiguous_format)


def check_plain(t, what: str) -> None:
    """:class:`NotPlain` unless ``t`` is an exact tensor, dense and strided, of one of :data:`DTYPES`."""
    if type(t) not in PLAIN_TYPES:
        raise NotPlain(f"{what} must be a plain torch.Tensor, got {type(t).__module__}.{type(t).__qualname__}")
    if t.layout is not torch.strided or t.is_quantized or t.is_nested or t.is_meta:
        kind = ("quantised" if t.is_quantized else "nested" if t.is_nested else "meta" if t.is_meta
                else str(t.layout).removeprefix("torch."))
        raise NotPlain(f"{what} must be a dense strided tensor, got a {kind} one")
    if t.dtype not in DTYPES:
        raise NotPlain(f"{what} has dtype {t.dtype}; what crosses the link is one of "
                       f"{', '.join(str(d).removeprefix('torch.') for d in DTYPES)}")


def owned(value, what: str, shape: tuple | None = None, numel: int | None = None, integers: bool = False,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor a harness process of its own sent (a model builder, a dataset reader), checked before anything is
    made of it: exact, dense and strided, owning exactly its bytes (a view of a few bytes made to stand for gigabytes,
    one value expanded, would be materialised here), of the shape or size expected, of integers (:data:`INTEGERS`),
    exactly ``dtype``, or else floats; :class:`NotPlain` naming ``what`` otherwise."""
    ok = (type(value) is torch.Tensor and value.layout is torch.strided and not value.is_quantized
          and value.is_contiguous() and value.storage_offset() == 0
          and value.untyped_storage().nbytes() == value.numel() * value.element_size()
          and (shape is None or tuple(value.shape) == tuple(shape)) and (numel is None or value.numel() == numel)
          and (value.dtype == dtype if dtype is not None else value.dtype in INTEGERS if integers
               else value.dtype.is_floating_point))
    if not ok:
        raise NotPlain(f"{what} is malformed")
    return value


def plain_map(tensors, what: str) -> dict[str, torch.Tensor]:
    """A dict of str -> tensor, each made :func:`plain` (a dict subclass or a non-str key is refused too)."""
    if type(tensors) not in MAPS:
        raise NotPlain(f"{what} must be a dict of name -> tensor, got {type(tensors).__qualname__}")
    out = {}
    for name, t in tensors.items():
        if type(name) is not str or len(name) > MAX_KEY or not NAME.fullmatch(name):  # a name is not charged
            shown = repr(name[:40]) + ("..." if len(name) > 40 else "") if isinstance(name, str) else "-"
            raise NotPlain(f"{what} keys must be names such as layer1.0.bn1.weight (letters, digits and _, dotted; "
                           f"at most {MAX_KEY} characters), got {type(name).__qualname__} {shown} of length "
                           f"{len(name) if isinstance(name, str) else '-'}")
        out[name] = plain(t, f"{what}[{name!r}]")
        if out[name].dim() > MAX_DIMS:
            raise NotPlain(f"{what}[{name!r}] has {out[name].dim()} dimensions; what crosses the link has at most "
                           f"{MAX_DIMS}")
    return {name: out[name] for name in sorted(out)}  # the order of entries is not charged: it carries nothing


DETECTION_KEYS = ("boxes", "scores", "labels")


def plain_detections(value, what: str) -> list[dict[str, torch.Tensor]]:
    """A list of per-image dicts of exactly boxes, scores and labels, each tensor made :func:`plain`."""
    if type(value) is not list:
        raise NotPlain(f"{what} must be a list with one dict of boxes, scores and labels per image, got "
                       f"{type(value).__qualname__}")
    out = []
    for i, d in enumerate(value):
        if type(d) not in MAPS or set(d) != set(DETECTION_KEYS):
            keys = sorted(map(str, d)) if type(d) in MAPS else type(d).__qualname__
            raise NotPlain(f"{what}[{i}] must be a dict of exactly {', '.join(DETECTION_KEYS)}, got {keys}")
        out.append({k: plain(d[k], f"{what}[{i}][{k!r}]") for k in DETECTION_KEYS})
    return out


def plain_decision(decision) -> EdgeDecision:
    """The edge's decision read once into a harness-owned EdgeDecision of plain copies."""
    if type(decision) is not EdgeDecision:
        raise NotPlain(f"EdgeLogic.step must return an EdgeDecision (not a subclass), got "
                       f"{type(decision).__module__}.{type(decision).__qualname__}")
    fields = {f.name: getattr(decision, f.name) for f in dataclasses.fields(EdgeDecision)}
    for flag in ("send_input", "await_answers"):
        if type(fields[flag]) is not bool:
            raise NotPlain(f"EdgeDecision.{flag} must be True or False, got {type(fields[flag]).__qualname__}")
    if fields["payload_dtype"] is not None and type(fields["payload_dtype"]) is not str:
        raise NotPlain(f"EdgeDecision.payload_dtype must be a str or None, got {fields['payload_dtype']!r}")
    return EdgeDecision(
        logits=None if fields["logits"] is None else plain(fields["logits"], "EdgeDecision.logits"),
        upload=None if fields["upload"] is None else plain(fields["upload"], "EdgeDecision.upload"),
        tensors=plain_map(fields["tensors"], "EdgeDecision.tensors"),
        payload=plain_map(fields["payload"], "EdgeDecision.payload"),
        send_input=fields["send_input"], payload_dtype=fields["payload_dtype"],
        await_answers=fields["await_answers"],
        detections=None if fields["detections"] is None else plain_detections(fields["detections"],
                                                                               "EdgeDecision.detections"))


def plain_reply(reply) -> CloudReply:
    """The cloud's reply (a CloudReply, a download dict, or None) read once into a CloudReply of plain copies."""
    if reply is None or type(reply) in MAPS:
        reply = CloudReply(download=reply)
    if type(reply) is not CloudReply:
        raise NotPlain(f"CloudLogic.step must return a CloudReply, a dict of tensors or None, got "
                       f"{type(reply).__module__}.{type(reply).__qualname__}")
    download, answers = reply.download, reply.answers
    return CloudReply(download=None if download is None else plain_map(download, "the download"),
                      answers=None if answers is None else plain_detections(answers, "CloudReply.answers")
                      if type(answers) is list else plain(answers, "CloudReply.answers"))
