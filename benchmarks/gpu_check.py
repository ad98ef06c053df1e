"""The GPU check (issue 21): what the harness costs where users run it, side by side with bare loops, in fp32.

    python benchmarks/gpu_check.py [--batches 30] [--rounds 3] [--out FILE.json]

1. The per-op table (benchmarks/per_op.py) on the GPU: what an empty Python dispatch mode and cemabench's meter add
   per aten op, for a counting cloud step (ResNet-101 forward and backward) and a guarded edge step (ResNet-18).
2. ``source`` at ResNet-50, 224 px, batch 64 through the protocol, against the loop a user writes (forward, argmax).
3. CEMA's edge-cloud machinery (``random-upload`` at CEMA's published severity-5 rate, 28.9 %: random weights would
   make CEMA's entropy filter upload nothing) with a ResNet-18 edge and a ResNet-101 foundation through the
   protocol, against the method's own halves wired in a plain loop (edge step, upload, cloud step, download).
4. Host-device synchronisations per edge batch of the harness, counted with ``torch.cuda.set_sync_debug_mode``
   on a method whose own code never synchronises (tests/test_syncs.py).

Each pair runs interleaved (bare, protocol, bare, ...) after a warm-up; the ratio is bare time / protocol time of
the medians (>= 0.9 is the target).
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import per_op
import torch

from cemabench.data import ArrayDomain
from cemabench.method import CloudReply, CloudResources, Upload
from cemabench.protocol import Execution, Models, Protocol, run_unit
from cemabench.protocol.stream import domain_order
from cemabench.registry import build_method, build_model

CEMA_SEVERITY_5_UPLOAD_RATIO = 0.289  # the mean of reproduce/cema-upload-counts.csv at severity 5
BATCH = 64


def _domain(images: int, size: int) -> ArrayDomain:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, images)
    return ArrayDomain("noise", rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8), lambda: labels)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_source(_method, models: Models, domain, device) -> int:
    """What a user writes: the same order, batches of 64, eval-mode forward, argmax, scored afterwards."""
    model = models.edge().to(device)
    order = domain_order(0, domain.name, len(domain))
    predicted = []
    with torch.inference_mode():
        for x in domain.batches(order, BATCH):
            predicted.append(model(x.to(device, non_blocking=True)).argmax(1))
    made = torch.cat(predicted).cpu()
    return int((made == torch.from_numpy(domain.labels()[order])).sum())


def bare_method(fresh, models: Models, domain, device) -> int:
    """The method's own halves in a plain loop: edge step, the uploaded rows, cloud step, the download applied."""
    method = fresh()
    logic = method.edge(1000)
    model = logic.configure(models.edge().to(device))
    model.requires_grad_(False)
    cloud = method.cloud(CloudResources(1000, edge_replica=lambda: models.edge().to(device),
                                        foundation=lambda: models.foundation().to(device),
                                        clean_images=lambda n: torch.empty(0), device=device))
    order = domain_order(0, domain.name, len(domain))
    predicted, position = [], 0
    for i, x in enumerate(domain.batches(order, BATCH)):
        x = x.to(device, non_blocking=True)
        with torch.inference_mode():
            decision = logic.step(model, x)
        index = decision.upload if decision.upload is not None else torch.empty(0, dtype=torch.long, device=device)
        upload = Upload(samples=x[index], tensors={k: v.clone() for k, v in decision.tensors.items()},
                        batch_index=i, index=index, payload={k: v.clone() for k, v in decision.payload.items()},
                        sample_ids=index + position)
        reply = cloud.step(upload)
        download = reply.download if isinstance(reply, CloudReply) else reply
        if download:
            with torch.no_grad():
                logic.receive(model, {k: v.clone() for k, v in download.items()})
        predicted.append(decision.logits.argmax(1))
        position += len(x)
    made = torch.cat(predicted).cpu()
    return int((made == torch.from_numpy(domain.labels()[order])).sum())


def protocol(method, models: Models, domain, device) -> int:
    (result,) = run_unit(method, [domain], models, 1000, None, Protocol(batch_size=BATCH), 0, Execution(str(device)))
    if result.status != "ok":
        raise RuntimeError(result.message)
    return result.correct


def pair(name: str, bare, method_name: str, options: dict, models: Models, domain, device, rounds: int) -> dict:
    def fresh():
        return build_method(method_name, options)

    runs = {"bare": lambda: bare(fresh, models, domain, device),
            "cemabench": lambda: protocol(fresh(), models, domain, device)}
    for fn in runs.values():  # warm-up: kernels, allocator, the meter's caches
        fn()
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    row = {"pair": name, "images": len(domain), "bare s": median["bare"], "cemabench s": median["cemabench"],
           "bare images/s": len(domain) / median["bare"], "cemabench images/s": len(domain) / median["cemabench"],
           "ratio (bare/cemabench)": median["bare"] / median["cemabench"], "rounds": times}
    print(f"{name}: bare {median['bare']:.3f} s, cemabench {median['cemabench']:.3f} s for {len(domain)} images; "
          f"cemabench at {row['ratio (bare/cemabench)']:.3f}x the bare loop's speed", flush=True)
    return row


def syncs_per_batch(device) -> dict:
    """Synchronisations of a continual unit over two domains, counted with the sync debug mode, at two stream
    lengths: the difference over the extra batches is what each batch costs (the rest is the unit's set-up and its
    blocks' ends); the lines that asked are listed for the longer run."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    import test_syncs

    from conftest import TinyNet, tiny_dataset

    out = {}
    for method in (test_syncs._SyncFree(), test_syncs._Offloading()):
        counts = {}
        for n in (64, 128):
            dataset = tiny_dataset(domains=("a", "b"), n=n)
            torch.manual_seed(0)
            models = Models.copies_of(TinyNet().eval(), TinyNet().eval())
            run_unit(method, dataset.domains[:1], models, 4, dataset.clean, Protocol(batch_size=16), 0,
                     Execution(str(device)))  # warm-up
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    results = run_unit(method, dataset.domains, models, 4, dataset.clean,
                                       Protocol(batch_size=16, setting="continual"), 0, Execution(str(device)))
            finally:
                torch.cuda.set_sync_debug_mode(0)
            syncs = [f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}" for w in caught
                     if "synchroniz" in str(w.message)]
            counts[n] = (sum(-(-r.seen // 16) for r in results), len(syncs), collections.Counter(syncs))
            assert all(r.status == "ok" for r in results), [r.message for r in results]
        (b1, s1, _), (b2, s2, where) = counts[64], counts[128]
        out[method.name] = {"batches": [b1, b2], "synchronisations": [s1, s2], "per batch": (s2 - s1) / (b2 - b1),
                            "where (longer run)": dict(where.most_common())}
        print(f"synchronisations, {method.name}: {s1} over {b1} edge batches, {s2} over {b2}: "
              f"{(s2 - s1) / (b2 - b1):.2f} per batch; by the line that asked: {dict(where.most_common())}",
              flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (no sync count)")
    parser.add_argument("--size", type=int, default=224, help="image size (smaller for a smoke test)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, fp32 (TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN "
          f"TF32 {torch.backends.cudnn.allow_tf32}), {args.size} px", flush=True)
    report = {"device": name, "torch": torch.__version__, "size": args.size}
    report["per op"] = per_op.main(["--device", args.device, "--reps", "15"])
    domain = _domain(args.batches * BATCH, args.size)
    torch.manual_seed(0)
    r50 = build_model("torchvision:resnet50@none")
    report["source"] = pair("source, ResNet-50, 224 px, batch 64", bare_source, "source", {},
                            Models.copies_of(r50, r50), domain, device, args.rounds)
    torch.manual_seed(0)
    r18, r101 = build_model("torchvision:resnet18@none"), build_model("torchvision:resnet101@none")
    report["cema"] = pair("CEMA machinery (random-upload 28.9 %), ResNet-18 edge, ResNet-101 foundation",
                          bare_method, "random-upload", {"upload_ratio": CEMA_SEVERITY_5_UPLOAD_RATIO},
                          Models(edge=lambda: copy.deepcopy(r18), foundation=lambda: copy.deepcopy(r101)), domain,
                          device, args.rounds)
    if device.type == "cuda":
        report["syncs"] = syncs_per_batch(device)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
