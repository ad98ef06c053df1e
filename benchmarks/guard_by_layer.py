"""What the C++ meter adds to one layer's forward, as a guard and as a counter alone, layer by layer: each layer run
1,000 times on a tiny input (so that the kernel's own work is small), the fastest of 15 interleaved rounds (thread
time), against the bare layer. Where benchmarks/guard_cost.py gives a whole network's cost per op, this says which
layers pay it: a convolution passes the dispatcher about 13 times (its composite and the kernels inside it), and
while a guard is entered every one of those calls passes PyTorch's RecordFunction callback.

    python benchmarks/guard_by_layer.py [--rounds 15]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cemabench.protocol.meter import ComputeMeter
from cemabench.protocol.native import kind

CALLS = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"meter: {kind()}")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.rand(1, 4, 4, 4)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).eval().requires_grad_(False)
    bn = torch.nn.BatchNorm2d(4).eval().requires_grad_(False)
    linear = torch.nn.Linear(4, 4).eval().requires_grad_(False)
    guard, count = ComputeMeter(guard=True), ComputeMeter()
    guard.protect({f"{name}.{n}": p for name, m in (("conv", conv), ("bn", bn), ("linear", linear))
                   for n, p in m.named_parameters()})
    layers = {"conv": lambda: conv(x), "batch norm": lambda: bn(x), "linear": lambda: linear(x),
              "relu": lambda: F.relu(x), "max pool": lambda: F.max_pool2d(x, 2),
              "adaptive avg pool": lambda: F.adaptive_avg_pool2d(x, 1), "flatten": lambda: torch.flatten(x, 1)}
    print(f"{'layer':18s} {'bare':>8s} {'guard adds':>11s} {'count adds':>11s}  (us a call)")
    for name, layer in layers.items():
        def run(meter, layer=layer):
            with torch.inference_mode():
                if meter is None:
                    for _ in range(CALLS):
                        layer()
                else:
                    with meter:
                        for _ in range(CALLS):
                            layer()

        fastest = {"bare": float("inf"), "guard": float("inf"), "count": float("inf")}
        for _ in range(args.rounds):
            for case, meter in (("bare", None), ("guard", guard), ("count", count)):
                start = time.thread_time()
                run(meter)
                fastest[case] = min(fastest[case], time.thread_time() - start)
        bare = fastest["bare"]
        print(f"{name:18s} {bare / CALLS * 1e6:8.2f} {(fastest['guard'] - bare) / CALLS * 1e6:11.2f} "
              f"{(fastest['count'] - bare) / CALLS * 1e6:11.2f}")


if __name__ == "__main__":
    main()
