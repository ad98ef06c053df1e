"""The harness's floor on the miniature: what a guarded edge step costs when parts of the guard are taken out, each
variant a copy of the ``cemabench`` package with edits that must apply (or this script stops), imported in a process
of its own (the C++ meter of a variant builds once under its own name, about 40 s):

- ``shipped``: cemabench as it is;
- ``no-thread-callback``: the C++ meter without the RecordFunction callback that sees every thread's ops while a
  guard is entered (what it guarantees: a backward kernel, an optimizer kernel or a write into an edge parameter
  from another thread, or from code that took the meter's key off, is refused);
- ``empty-thread-callback``: that callback registered (PyTorch boxes every op's inputs for it) but returning at once;
- ``redispatch-only``: the empty callback, and a fallback that only runs each op below itself (no FLOP counted, no
  op checked): what a boxed fallback and a RecordFunction callback cost together, the least a guard built this way
  costs;
- ``redispatch-only-unsealed``: that, and an edge step without the seal's checks after the logic (the module walk,
  the parameters' identities and values): the harness with its per-op and per-step guard at their floor.

No variant is a harness anyone should run; each measures what a part of the shipped one costs. Per variant, in rounds
that alternate them:

- the guarded torchvision ResNet-18 forward on 2x3x16x16 against the bare one, microseconds an op over its 71 aten
  ops (as benchmarks/guard_cost.py; the fastest of the repetitions);
- the guarded miniature edge forward (the fog domain, batches of 64, one thread) against the bare one, milliseconds
  a unit (the fastest);
- ``run_unit`` of ``source`` on that domain against the bare loop over the same batches (as
  benchmarks/unit_overhead.py; the median of the repetitions' ratios).

Medians over the rounds:

    python benchmarks/guard_floor.py [--rounds 3] [--reps 200]

It prints a Markdown table (the README's, *The guard's floor on the miniature*). The variants' builds stay in the
extensions folder beside the shipped meter's (native.py says where), as ``cemabench_meter_<digest>.so`` files (about
0.4 MB each) with their ``.lock`` files, reused by later runs; delete them when done.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

METER = "protocol/native_meter.cpp"
CALLBACK = "std::unique_ptr<at::ObserverContext> on_any_thread(const at::RecordFunction& fn) {\n"
FALLBACK = "void fallback(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {\n"
REDISPATCH = ("  {\n    c10::impl::ExcludeDispatchKeyGuard hide(kKey);\n"
              "    op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kKey), stack);\n"
              "    return;\n  }\n")
SEAL = ("        params, buffers = self._named()\n        changed = self._changed(values=False, params=params)\n"
        "        if changed:\n            raise ForwardOnlyViolation(self._outside_download(changed))\n"
        "        for names, flags in self._value_flags(params):\n")
REDISPATCH_ONLY = [(METER, CALLBACK, CALLBACK + "  return nullptr;\n"), (METER, FALLBACK, FALLBACK + REDISPATCH)]
VARIANTS: dict[str, list[tuple[str, str, str]]] = {  # (file in the package, text, its replacement)
    "shipped": [],
    "no-thread-callback": [(METER, "if (m->guard && thread_callback == 0)", "if (false)")],
    "empty-thread-callback": [(METER, CALLBACK, CALLBACK + "  return nullptr;\n")],
    "redispatch-only": REDISPATCH_ONLY,
    "redispatch-only-unsealed": REDISPATCH_ONLY + [
        ("protocol/edge.py", SEAL, "        buffers = {}\n        for names, flags in ():\n")],
}
OPS = 71  # aten ops of the ResNet-18 forward, as benchmarks/per_op.py counts them


def package(variant: str, folder: Path) -> Path:
    """A copy of the installed ``cemabench`` package with the variant's edits, under ``folder``."""
    import cemabench

    shipped = Path(cemabench.__file__).parent
    copy = folder / "cemabench"
    shutil.copytree(shipped, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for name, old, new in VARIANTS[variant]:
        path = copy / name
        text = path.read_text()
        if text.count(old) != 1:
            sys.exit(f"guard_floor: the variant {variant} no longer applies to {shipped / name}: {old.strip()!r}")
        path.write_text(text.replace(old, new))
    return folder


def measure(reps: int) -> dict:
    """In this process (which imports the variant): the three measures of the module docstring."""
    import copy
    import time

    import torch

    import cemabench
    from cemabench.datasets import miniature
    from cemabench.models.mini import load_model
    from cemabench.protocol import Execution, Models, Protocol, native, run_unit
    from cemabench.protocol.edge import ForwardOnlyEdge
    from cemabench.protocol.execution import warm_allocator
    from cemabench.protocol.stream import domain_order
    from cemabench.registry import build_method, build_model

    assert Path(cemabench.__file__).parent.parent == Path(os.environ["GUARD_FLOOR_PACKAGE"])
    assert native.kind() == "native", "the C++ meter did not build"
    torch.manual_seed(0)
    torch.set_num_threads(1)
    warm_allocator()
    domain = miniature.dataset(domains=["fog"]).domains[0]
    order = domain_order(0, domain.name, len(domain))
    batches = list(domain.batches(order, 64))
    mini = load_model("edge").eval()
    fastest: dict[str, float] = {}
    for name, model, inputs, classes, repeat in (
            ("resnet18", build_model("torchvision:resnet18@none"), [torch.rand(2, 3, 16, 16)], 1000, reps),
            ("miniature", mini, batches, 10, max(3, reps // 40))):
        edge = ForwardOnlyEdge(copy.deepcopy(model), build_method("source").edge(classes))
        for rep in range(repeat + 2):  # two to warm
            for guarded in (False, True):
                start = time.thread_time()
                with torch.inference_mode():
                    for x in inputs:
                        if guarded:
                            with edge.meter:
                                edge.model(x)
                        else:
                            edge.model(x)
                key = f"{name} {'guarded' if guarded else 'bare'}"
                if rep >= 2:
                    fastest[key] = min(fastest.get(key, float("inf")), time.thread_time() - start)
    state = tuple(mini.state_dict())
    ratios = []
    for _ in range(max(3, reps // 40)):
        edge = copy.deepcopy(mini)
        models = Models(edge=lambda e=edge: e, foundation=lambda: copy.deepcopy(mini), _state=state)
        start = time.process_time()
        (result,) = run_unit(build_method("source"), [domain], models, 10, None, Protocol(batch_size=64), 0,
                             Execution("cpu"))
        unit = time.process_time() - start
        assert result.status == "ok", result.message
        start = time.process_time()
        with torch.inference_mode():
            for x in domain.batches(order, 64):
                mini(x).argmax(1)
        ratios.append(unit / (time.process_time() - start))
    return {"per_op": (fastest["resnet18 guarded"] - fastest["resnet18 bare"]) * 1e6 / OPS,
            "forward": (fastest["miniature guarded"] - fastest["miniature bare"]) * 1e3,
            "bare": fastest["miniature bare"] * 1e3, "unit": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.reps)))
        return
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as scratch:
        folders = {v: package(v, Path(scratch) / v) for v in VARIANTS}
        for round_ in range(args.rounds):
            for variant, folder in folders.items():
                print(f"guard_floor: round {round_ + 1} of {args.rounds}, {variant}", file=sys.stderr, flush=True)
                environ = dict(os.environ, PYTHONPATH=str(folder), GUARD_FLOOR_PACKAGE=str(folder))
                out = subprocess.run([sys.executable, __file__, "--child", "--reps", str(args.reps)], env=environ,
                                     check=True, capture_output=True, text=True).stdout
                results[variant].append(json.loads(out.splitlines()[-1]))
    print("| variant | guard, us an op (ResNet-18) | guard, ms a miniature unit | of the bare forward "
          "| `source` unit / bare loop |\n|---|---:|---:|---:|---:|")
    for variant, rounds in results.items():
        median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        print(f"| {variant} | {median['per_op']:.1f} | {median['forward']:.1f} | "
              f"{median['forward'] / median['bare']:.1%} | {median['unit']:.3f}x |".replace("%", " %"))


if __name__ == "__main__":
    main()
