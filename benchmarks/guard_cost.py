"""What the C++ meter adds to the guarded edge forward, as a guard and as a counter alone, against the bare forward:
many interleaved repetitions in one process, the fastest of each (thread time), which a shared machine's noise
moves less than a median. Compare two versions of cemabench by running it in each, one after the other.

    python benchmarks/guard_cost.py [--reps 500]

The edge is a torchvision ResNet-18 (random weights) on a 2x3x16x16 input, as in benchmarks/per_op.py, whose table
divides by the 71 aten ops a Python dispatch mode sees in it.
"""
from __future__ import annotations

import argparse
import time

import torch

from cemabench.protocol.edge import ForwardOnlyEdge
from cemabench.protocol.execution import warm_allocator
from cemabench.protocol.meter import ComputeMeter
from cemabench.registry import build_method, build_model

OPS = 71  # aten ops of the forward, as benchmarks/per_op.py counts them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=500)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    warm_allocator()
    x = torch.rand(2, 3, 16, 16)
    edge = ForwardOnlyEdge(build_model("torchvision:resnet18@none"), build_method("source").edge(1000))
    guard, count = ComputeMeter(guard=True), ComputeMeter()
    guard.protect(edge._parameters())

    def run(meter):
        with torch.inference_mode():
            if meter is None:
                edge.model(x)
            else:
                with meter:
                    edge.model(x)

    cases = {"bare": None, "guard": guard, "count": count}
    fastest = dict.fromkeys(cases, float("inf"))
    for _ in range(2):
        for meter in cases.values():
            run(meter)
    for _ in range(args.reps):
        for name, meter in cases.items():
            start = time.thread_time()
            run(meter)
            fastest[name] = min(fastest[name], time.thread_time() - start)
    bare = fastest["bare"]
    added = {name: fastest[name] - bare for name in ("guard", "count")}
    print(f"bare forward {bare * 1e3:.3f} ms; " + "; ".join(
        f"the {name} adds {s * 1e3:.3f} ms ({s * 1e6 / OPS:.1f} us an op)" for name, s in added.items()))


if __name__ == "__main__":
    main()
