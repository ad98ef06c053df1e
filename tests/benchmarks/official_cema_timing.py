"""Time cemabench's CEMA (the whole harness: protocol, link, FLOP meter, guard) against the released CEMA loop on the
same models and stream: ResNet-18 edge, ResNet-34 foundation (random weights), 64 px, batches of 64, one thread.

The released loop is run from a checkout of chenyaofo/CEMA at b9ae226 (``codebase/core/tta/cetta.py``; later commits
deleted modules that its package still imports), not copied here:

    git -C CEMA archive b9ae226 | tar -x -C /tmp/cema-official
    python tests/benchmarks/official_cema_timing.py --official /tmp/cema-official --batches 10 --reps 2

Every sample goes up on both sides (entropy bound 1.0 ln C, no redundancy filter: random weights would otherwise
upload nothing), so the cloud adapts on every batch. Its teacher is handed in (the released code builds it by name with
pretrained weights) and ``Tensor.cuda`` is a no-op (its replay path calls ``.cuda()``; this is a CPU run).
Not collected by pytest (no ``test_`` prefix): it needs the released code beside it.
"""
import argparse
import copy
import importlib.util
import random
import sys
import time
import types

import numpy as np
import torch

from cemabench.data import ArrayDomain
from cemabench.protocol import Execution, Models, Protocol, run_unit
from cemabench.protocol.execution import warm_allocator
from cemabench.protocol.stream import domain_order
from cemabench.registry import build_method, build_model


def package(name, path):
    """A package module without running its ``__init__`` (the released one imports CLIP and data pipelines)."""
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def released_cetta(root: str, foundation):
    package("codebase", root)
    for sub in ("torchutils", "criterion", "core", "core.tta"):
        package(f"codebase.{sub}", f"{root}/{sub.replace('.', '/')}")

    class Teacher:  # the released code builds its teacher by name with pretrained weights: here, the same foundation
        @staticmethod
        def build_from(cfg):
            return copy.deepcopy(foundation)

    models = types.ModuleType("codebase.models")
    models.MODEL = Teacher
    sys.modules["codebase.models"] = models
    for name in ("torchutils.register", "criterion.register", "criterion.tta", "criterion.distillation",
                 "core.bn_utils", "core.tta.base", "core.tta.tent", "core.tta.tbr", "core.tta.cotta"):
        load(f"codebase.{name}", f"{root}/{name.replace('.', '/')}.py")
    return load("codebase.core.tta.cetta", f"{root}/core/tta/cetta.py")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="a checkout of chenyaofo/CEMA at b9ae226")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    warm_allocator()  # for both loops: the allocator the harness sets for its own
    rng = np.random.default_rng(0)
    n = cli.batches * 64
    labels = rng.integers(0, 1000, n)
    domain = ArrayDomain("noise", rng.integers(0, 256, (n, cli.px, cli.px, 3), dtype=np.uint8), lambda: labels)
    torch.manual_seed(0)
    edge, foundation = (build_model("torchvision:resnet18@none").eval(),
                        build_model("torchvision:resnet34@none").eval())
    cetta = released_cetta(f"{cli.official}/codebase", foundation)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the released replay path calls .cuda(); this is a CPU run
    batches = list(domain.batches(domain_order(0, domain.name, len(domain)), 64))

    def released():
        random.seed(0)
        method = cetta.CETTA(model=copy.deepcopy(edge), ent_low_margin=None, ent_high_margin=1.0, d_margin=None,
                             warm_up_batch_size=None, ent_high_margin_coeff=0.6, teacher_model_name="foundation",
                             batch_size=32, alpha=3, beta=3, gamma=1, temperature=1, replay_buffer_size=10000,
                             s_tta_lr=0.0025, t_tta_lr=0.00025, n_class=1000, is_tbr=True)
        return [method.infer(x).argmax(1) for x in batches]

    def ours():
        models = Models(edge=lambda: copy.deepcopy(edge), foundation=lambda: copy.deepcopy(foundation))
        method = build_method("cema", {"entropy_max": 1.0, "redundancy_margin": None})
        (result,) = run_unit(method, [domain], models, 1000, None, Protocol(batch_size=64), 0, Execution("cpu"))
        assert result.status == "ok" and result.link.uploaded == n, (result.status, result.message)

    times = {"released": [], "cemabench": []}
    for _ in range(cli.reps):
        for name, run in (("released", released), ("cemabench", ours)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print({name: [round(t, 2) for t in ts] for name, ts in times.items()})
    best = {name: min(ts) for name, ts in times.items()}
    print(f"fastest: released {best['released']:.2f} s, cemabench {best['cemabench']:.2f} s, "
          f"ratio {best['cemabench'] / best['released']:.3f}")


if __name__ == "__main__":
    main()
