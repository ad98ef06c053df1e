"""What the harness adds to a miniature unit, measured two ways in one process (one thread, as units run):

1. rounds that alternate a bare loop (the same order, batches of 64, an inference-mode forward, argmax, scored
   afterwards) with ``run_unit`` of ``source`` on the same images and model; the ratio of their medians, and the
   median of the round-by-round ratios (process time);
2. the harness's own seconds per unit, without the model: ``run_unit`` of an edge that returns the forward's
   logits computed beforehand, against a loop over the same batches that does nothing with them (the fastest of
   the rounds of each; the seal, the link, the checks and scoring still run on the edge model's parameters).

    python benchmarks/unit_overhead.py --rounds 40

The noise of a shared machine moves (1) by several percent between runs; (2) moves less, and divided by the bare
loop's time it says what the harness costs apart from the meter's per-op work (benchmarks/per_op.py).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from cemabench.datasets import miniature
from cemabench.method import CloudEdgeMapping, EdgeDecision, EdgeLogic, Method
from cemabench.models.mini import load_model
from cemabench.protocol import Execution, Models, Protocol, run_unit
from cemabench.protocol.execution import warm_allocator
from cemabench.protocol.stream import domain_order
from cemabench.registry import build_method


class _Replay(EdgeLogic):
    """Returns the logits computed beforehand, batch after batch."""

    def __init__(self, logits: list[torch.Tensor]):
        self.logits, self.at = logits, 0

    def step(self, model, x):
        self.at += 1
        return EdgeDecision(self.logits[self.at - 1], None)


class _ReplayMethod(Method):
    name = "replay"
    mapping = CloudEdgeMapping("-", "-", "-", "-")

    def __init__(self, logits):
        self.logits = logits

    def edge(self, num_classes):
        return _Replay(self.logits)

    def cloud(self, resources):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--domain", default="fog")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warm_allocator()  # the bare loop's allocator as the unit's (cemabench.protocol.execution)
    domain = miniature.dataset(domains=[args.domain]).domains[0]
    model = load_model("edge").eval()
    order = domain_order(0, domain.name, len(domain))
    labels = torch.from_numpy(domain.labels()[order])
    state = tuple(model.state_dict())

    def bare() -> int:
        predicted = []
        with torch.inference_mode():
            for x in domain.batches(order, 64):
                predicted.append(model(x).argmax(1))
        return int((torch.cat(predicted) == labels).sum())

    def unit(method: Method, edge: torch.nn.Module):
        models = Models(edge=lambda: edge, foundation=lambda: copy.deepcopy(model), _state=state)
        (result,) = run_unit(method, [domain], models, 10, None, Protocol(batch_size=64), 0, Execution("cpu"))
        assert result.status == "ok", result.message
        return result

    with torch.inference_mode():
        logits = [model(x).clone() for x in domain.batches(order, 64)]

    def batches_only() -> int:
        return sum(len(x) for x in domain.batches(order, 64))

    assert unit(build_method("source"), copy.deepcopy(model)).correct == bare()  # the same work, the same answer
    rounds: dict[str, list[float]] = {"bare": [], "unit": [], "batches": [], "replay": []}
    for _ in range(args.rounds):
        for name, run, clock in (("bare", bare, time.process_time),
                                 ("unit", lambda e: unit(build_method("source"), e), time.process_time),
                                 ("batches", batches_only, time.perf_counter),
                                 ("replay", lambda e: unit(_ReplayMethod(logits), e), time.perf_counter)):
            edge = copy.deepcopy(model) if name in ("unit", "replay") else None  # built before the clock runs
            start = clock()
            run(edge) if edge is not None else run()
            rounds[name].append(clock() - start)
    bare_s, unit_s = statistics.median(rounds["bare"]), statistics.median(rounds["unit"])
    pairwise = statistics.median(u / b for u, b in zip(rounds["unit"], rounds["bare"]))
    harness = min(rounds["replay"]) - min(rounds["batches"])
    print(f"source unit against the bare loop ({args.rounds} alternating rounds, process time): bare "
          f"{bare_s * 1e3:.1f} ms, unit {unit_s * 1e3:.1f} ms: {unit_s / bare_s:.3f}x the medians, {pairwise:.3f}x "
          f"the median round")
    print(f"the harness's own time per unit (no model): {harness * 1e3:.1f} ms, {harness / min(rounds['bare']):.3f} "
          f"of the fastest bare loop ({min(rounds['bare']) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
