"""What the meter and the guard add per aten op, against a bare step and an empty Python dispatch mode: the C++
meter (the one cemabench uses where it builds) and the Python one (CEMABENCH_METER=python), side by side.

    python benchmarks/per_op.py [--device cuda] [--reps 15]

Tiny inputs (2x3x16x16) so that an op's own work is small: the cloud step is a torchvision ResNet-101 forward and
backward under a counting ComputeMeter; the edge step is a ResNet-18 forward under the guarding meter, through
the protocol runs it (the meter alone; the parameter seal's check is timed apart, in ms per step). Prints microseconds
per op (median of --reps repetitions, interleaved).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cemabench.protocol import native
from cemabench.protocol.checks import Checks
from cemabench.protocol.edge import ForwardOnlyEdge
from cemabench.protocol.meter import ComputeMeter
from cemabench.registry import build_method, build_model


class Empty(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device) -> float:
    """Wall time on a GPU (the queue included); on the CPU this thread's CPU time, which other processes on the
    machine disturb less."""
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16, device=device)

    cloud = build_model("torchvision:resnet101@none").to(device).train()

    def cloud_step(mode=None):
        def run():
            with mode if mode is not None else torch.enable_grad():
                loss = cloud(x).logsumexp(1).mean()
                loss.backward()
        return run

    edge = ForwardOnlyEdge(build_model("torchvision:resnet18@none").to(device), build_method("source").edge(1000))
    edge_model = edge.model

    def edge_bare():
        with torch.inference_mode():
            edge_model(x)

    def edge_empty():
        with torch.inference_mode(), Empty():
            edge_model(x)

    meters = {}
    for kind in ("C++", "python"):  # each meter, as the edge's guard and as the cloud's counter
        saved = dict(native._loaded)
        if kind == "python":
            native._loaded.update(module=None, why="per_op.py compares both")
        meters[kind] = ComputeMeter(guard=True), ComputeMeter()
        native._loaded.clear()
        native._loaded.update(saved)
    for guard, _ in meters.values():
        guard.protect(edge._parameters())

    def edge_guarded(meter):  # the guarding meter alone, as in the table; the seal is timed apart below
        def run():
            with torch.inference_mode(), meter:
                edge_model(x)
            meter.take()
        return run

    def seal():
        checks = Checks()
        for _, flags in edge._value_flags(edge._parameters()):
            checks.add(flags, RuntimeError)
        checks.read()

    cases = {
        "cloud": {"bare": cloud_step(), "empty mode": cloud_step(Empty()),
                  **{f"{k} meter": cloud_step(m[1]) for k, m in meters.items()}},
        "edge": {"bare": edge_bare, "empty mode": edge_empty, **{f"{k} meter": edge_guarded(m[0])
                                                                  for k, m in meters.items()}},
    }
    counts = {}
    for name in cases:
        counter = Count()
        if name == "cloud":
            cloud_step(counter)()
        else:
            with torch.inference_mode(), counter:
                edge_model(x)
        counts[name] = counter.ops
    table = {}
    for name, fns in cases.items():
        for fn in fns.values():  # warm-up: caches, allocator
            fn()
            fn()
        times = {k: [] for k in fns}
        for _ in range(args.reps):
            for k, fn in fns.items():
                times[k].append(_time(fn, device))
        median = {k: statistics.median(v) for k, v in times.items()}
        ops = counts[name]
        table[name] = {"aten ops": ops, "bare us/op": 1e6 * median["bare"] / ops}
        for k in fns:
            if k != "bare":
                table[name][f"{k} adds us/op"] = 1e6 * (median[k] - median["bare"]) / ops
        for k in meters:
            table[name][f"{k} meter ratio"] = median[f"{k} meter"] / median["bare"]
    for m in meters.values():
        m[1].take()
    seal()
    times = []
    for _ in range(args.reps):
        times.append(_time(seal, device))
    table["edge"]["seal ms per step"] = 1e3 * statistics.median(times)
    print(f"per-op cost on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{args.reps})")
    for name, row in table.items():
        print(f"  {name:5s}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()))
    return table


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
