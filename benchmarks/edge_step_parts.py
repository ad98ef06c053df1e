"""Where a guarded miniature edge step's time goes, part by part, against the bare forward (one thread, the fog
domain in batches of 64): the logic's forward under the guarding meter, then each check the forward-only edge makes
after it (the module walk, the parameters' identities, their values, the decision's plain copy and validation, the
buffers' snapshot, reading the checks). Milliseconds per unit (17 batches), medians of the rounds.

    python benchmarks/edge_step_parts.py [--rounds 15]

The parts are the private steps of ``ForwardOnlyEdge.step`` (cemabench/protocol/edge.py), called here in its order.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict

import torch

from cemabench.datasets import miniature
from cemabench.models.mini import load_model
from cemabench.protocol.checks import Checks
from cemabench.protocol.edge import validate_decision
from cemabench.protocol.execution import warm_allocator
from cemabench.protocol.halves import build_edges
from cemabench.protocol.plain import plain_decision
from cemabench.protocol.stream import domain_order
from cemabench.protocol.tasks import Classification
from cemabench.registry import build_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warm_allocator()
    domain = miniature.dataset(domains=["fog"]).domains[0]
    model = load_model("edge").eval()
    batches = list(domain.batches(domain_order(0, domain.name, len(domain)), 64))
    (edge,) = build_edges(build_method("source"), lambda: copy.deepcopy(model), 10, 1, torch.device("cpu"),
                          torch.preserve_format)
    clock = time.perf_counter
    rounds: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        parts: dict[str, float] = defaultdict(float)
        for x in batches:
            checks = Checks()
            start = clock()
            with torch.inference_mode(), edge.meter:
                decision = edge.logic.step(edge.model, x)
            parts["forward, guarded"] += clock() - start
            start = clock()
            params, buffers = edge._named()
            parts["module walk"] += clock() - start
            start = clock()
            edge._changed(values=False, params=params)
            parts["identities"] += clock() - start
            start = clock()
            for _, flags in edge._value_flags(params):
                checks.add(flags, lambda bad: None)
            parts["values"] += clock() - start
            start = clock()
            decision = plain_decision(decision)
            parts["plain copy"] += clock() - start
            start = clock()
            validate_decision(decision, len(x), Classification(10), checks)
            parts["validation"] += clock() - start
            start = clock()
            edge._buffers_now = edge._buffer_state(buffers)
            parts["buffers"] += clock() - start
            start = clock()
            checks.read()
            parts["reading the checks"] += clock() - start
        edge.meter.take()
        start = clock()
        with torch.inference_mode():
            for x in batches:
                model(x).argmax(1)
        parts["forward, bare"] = clock() - start
        for name, seconds in parts.items():
            rounds[name].append(seconds)
    for name, seconds in rounds.items():
        print(f"{name:20s} {statistics.median(seconds) * 1e3:8.2f} ms a unit")


if __name__ == "__main__":
    main()
