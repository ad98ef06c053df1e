"""A split point chosen for the link, in the style of Neurosurgeon (Kang et al., "Neurosurgeon: Collaborative
Intelligence Between the Cloud and Mobile Edge", ASPLOS 2017): one network, the edge's, runs up to a cut on the
device and from there on in the cloud, which answers. The cut minimises the modelled end-to-end latency of a batch
under the unit's protocol: the edge's compute, the feature's transfer, the cloud's compute and the answer's
transfer.

What is ours, where the paper is silent or differs:

- Neurosurgeon predicts each layer's latency and energy from models fitted per layer type on the device. Here the
  time model is the protocol's (:mod:`cemabench.protocol.link`): compute time is counted FLOPs / throughput, a
  transfer is latency + bytes / bandwidth. The FLOPs per stage come from ``torch.utils.flop_counter``'s formulas,
  measured once on one clean image by the offline stage (``train``: the profile is its artefact), the same formulas
  the harness's meter counts with.
- Cut points are the network's stages (``cemabench.models.split``), not its layers; ``input`` sends the raw image
  (the same network, all in the cloud) and ``edge`` keeps everything on the device.
- The choice minimises one batch's latency at the protocol's batch size, from its arrival to its answers; it does
  not model the cloud's queue. Ties go to the cut that runs more on the edge. Energy is not modelled.
- Accuracy is the edge network's whatever the cut (head then tail computes what the whole network does, up to the
  payload's encoding): the method moves cost, not accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cemabench.config import Protocol
from cemabench.errors import UserError
from cemabench.method import CloudEdgeMapping, CloudLogic, CloudReply, EdgeDecision, EdgeLogic, Method, option
from cemabench.models.split import split, stage_names, stages

PAPER = "Kang et al., ASPLOS 2017: Neurosurgeon (Collaborative Intelligence Between the Cloud and Mobile Edge)"
ROW_BYTES = {"float32": 4, "float16": 2, "int8": 1}  # per value; int8 adds one float32 scale per row


def candidates(names: list[str]) -> list[str]:
    """The cuts in order of preference on a tie: all on the edge first, then later stages, then the raw input."""
    return ["edge", *reversed(names), "input"]


def batch_latency(profile: dict[str, tuple[float, float, float]], cut: str, protocol: Protocol, batch: int,
                  answer_bytes: int) -> float:
    """Modelled seconds from a batch's arrival to its predictions when the network is cut at ``cut``: edge FLOPs /
    edge throughput, then (unless all runs on the edge) the upload's transfer, cloud FLOPs / cloud throughput and the
    answers' transfer. ``profile[cut]`` is (edge FLOPs, cloud FLOPs, bytes up) per sample."""
    edge_flops, cloud_flops, up = profile[cut]

    def compute(flops: float, rate: float | None) -> float:
        return batch * flops / rate if rate else 0.0

    seconds = compute(edge_flops, protocol.edge_flops_per_s)
    if cut != "edge":  # the link's own transfer time (cemabench.config.Protocol.transfer_seconds)
        seconds += (protocol.transfer_seconds(batch * up) + compute(cloud_flops, protocol.cloud_flops_per_s)
                    + protocol.transfer_seconds(answer_bytes, down=True))
    return seconds


def choose(profile: dict, names: list[str], protocol: Protocol, batch: int, num_classes: int) -> str:
    """The cut with the least :func:`batch_latency` (answers: one float32 logit per class and sample)."""
    order = candidates(names)
    times = [batch_latency(profile, cut, protocol, batch, batch * num_classes * 4) for cut in order]
    return order[int(np.argmin(times))]  # the first minimum: the preferred cut on a tie


class _Edge(EdgeLogic):
    def __init__(self, cut: str, dtype: str):
        self.cut, self.dtype = cut, dtype

    def configure(self, model):
        model = model.eval()
        return model if self.cut in ("edge", "input") else split(model, self.cut)[0]

    def step(self, model, x):
        if self.cut == "edge":
            return EdgeDecision(logits=model(x))
        everything = torch.arange(len(x), device=x.device)
        if self.cut == "input":
            return EdgeDecision(logits=None, upload=everything, await_answers=True)
        return EdgeDecision(logits=None, upload=everything, payload={"feature": model(x)}, send_input=False,
                            payload_dtype=self.dtype, await_answers=True)


class _Cloud(CloudLogic):
    def __init__(self, model, cut: str):
        model = model.eval()
        self.cut, self.model = cut, model if cut in ("input", "edge") else split(model, cut)[1]

    @torch.no_grad()
    def step(self, upload):
        if self.cut == "edge":  # all on the edge: nothing comes up
            return None
        return CloudReply(answers=self.model(upload.samples if self.cut == "input" else upload.payload["feature"]))


class SplitPoint(Method):
    """The edge network cut where the modelled end-to-end latency under the unit's link and time model is least
    (Neurosurgeon's choice): the edge runs the head and sends the feature map; the cloud runs the tail on its replica
    of the edge network and answers. ``cut`` forces a cut instead of choosing."""

    name = "split-point"
    task_reason = (
        "it cuts a classifier by the time model, and its cuts of detectors are not described (use ecc-adaptive on "
        "detection)")
    cloud_replicas = "shared"  # one answering cloud serves every edge device
    paper = PAPER
    mapping = CloudEdgeMapping(selection="none: every sample, at the cut the time model makes fastest",
                               uploads="every sample's feature map at the cut, or its raw input (offloaded)",
                               cloud="runs the rest of the edge network on its replica and answers",
                               download="logits")
    online_options = ("cut", "payload_dtype")  # the offline profile reads neither

    @dataclass
    class Options:
        cut: str = "auto"  # auto: the fastest under the protocol; or edge, input, or a stage of the edge network
        payload_dtype: str = option("float32", choices=tuple(ROW_BYTES))

    @classmethod
    def check_protocol(cls, protocol):
        """Refused where its choice would be wrong or its predictions missing: it prices the raw image only (an input
        codec's lengths are not profiled), and an offloaded sample has no prediction but the cloud's, so a budget or
        a cloud capacity that turns samples away would leave them unanswered."""
        super().check_protocol(protocol)
        if protocol.input_codec != "raw":
            raise UserError(f"method {cls.name!r} prices the raw image of its input cut and cannot price input codec "
                            f"{protocol.input_codec}: run it with input_codec raw")
        limits = [f for f in ("upload_budget", "upload_budget_bytes", "cloud_capacity")
                  if getattr(protocol, f) is not None]
        if limits:
            raise UserError(f"method {cls.name!r} offloads every sample without a prediction of its own, so "
                            f"{', '.join(limits)} would leave samples unanswered: run it without")

    def check_models(self, edge, foundation):
        valid = ["auto", "edge", "input", *stage_names(edge)]
        if self.options.cut not in valid:
            raise UserError(f"method {self.name!r}: option cut={self.options.cut!r} is not a cut of the edge network; "
                            f"valid: {', '.join(valid)}")

    def needs_clean_split(self):
        return "it profiles the edge network on a clean image"

    def train(self, resources):
        """The profile: per stage of the edge network, its FLOPs on one clean image and its output's size."""
        model = resources.edge().eval()
        x = resources.clean.images(np.arange(1)).to(resources.device)
        flops, values = [], [float(x[0].numel())]
        with torch.no_grad():
            for _, modules in stages(model):
                with FlopCounterMode(display=False) as counter:
                    for module in modules:
                        x = module(x)
                flops.append(float(counter.get_total_flops()))
                values.append(float(x[0].numel()))
        return {"stage_flops": torch.tensor(flops, dtype=torch.float64),
                "stage_values": torch.tensor(values, dtype=torch.float64)}  # [input, after stage 1, ...]

    def profile(self, names: list[str]) -> dict[str, tuple[float, float, float]]:
        """Per cut, (edge FLOPs, cloud FLOPs, bytes up) per sample, from the offline profile."""
        flops = self.artefacts["stage_flops"].tolist()
        values = self.artefacts["stage_values"].tolist()
        if len(flops) != len(names) + 1:
            raise ValueError(f"the profile has {len(flops)} stages; the edge network has {len(names) + 1}")
        width = ROW_BYTES[self.options.payload_dtype]
        total = sum(flops)
        out = {"edge": (total, 0.0, 0.0), "input": (0.0, total, values[0])}  # the raw image: uint8 pixels
        for i, name in enumerate(names):
            head = sum(flops[:i + 1])
            scale = 4 if self.options.payload_dtype == "int8" else 0
            out[name] = (head, total - head, values[i + 1] * width + scale)
        return out

    def cut(self, model, num_classes: int) -> str:
        if self.options.cut != "auto":
            return self.options.cut
        names = stage_names(model)
        protocol = self.protocol or Protocol()
        return choose(self.profile(names), names, protocol, protocol.batch_size, num_classes)

    def edge(self, num_classes):
        return _ChoosingEdge(self, num_classes)

    def cloud(self, resources):
        model = resources.edge_replica()
        return _Cloud(model, self.cut(model, resources.num_classes))


class _ChoosingEdge(_Edge):
    """The edge half, which chooses its cut once it has the network (``configure``)."""

    def __init__(self, method: SplitPoint, num_classes: int):
        super().__init__("edge", method.options.payload_dtype)
        self.method, self.num_classes = method, num_classes

    def configure(self, model):
        self.cut = self.method.cut(model, self.num_classes)
        return super().configure(model)

