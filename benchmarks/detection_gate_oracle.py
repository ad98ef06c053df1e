"""How far a gate can take ECC-D on the detection miniature (issue 18): per offload share, the mAP of the mix of edge
answers and ECC-A answers when the gate is the mean reported box score, the learned gate, or an oracle that offloads
exactly the images whose ECC-A answer gains most over the edge's (each image scored alone by COCOeval).

    python benchmarks/detection_gate_oracle.py [--table eccentric-detection] [--entry ecc-d-learned@0.01]

The adapter and the learned gate are those the table's entry trains (cached like the table's own), on the table's
domains and severity; cloud-only's mAP is printed beside. An analysis, not a feature: no cell or leaderboard uses it.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from cemabench.method import TrainingResources
from cemabench.models.minidet import load_model, nets
from cemabench.models.split import head_to, tail_from
from cemabench.protocol import Models
from cemabench.protocol.tasks.detection import Detections, score
from cemabench.protocol.training import run_training
from cemabench.registry import build_method, load
from cemabench.tables.spec import load_table
from cemabench_methods import eccentric_detection as D
from cemabench_methods.eccentric_blocks import entry_before, load_adapter, load_gate

SHARES = (0.4, 0.5, 0.6, 0.7)


def _detections(d: dict) -> Detections:
    return Detections(d["boxes"], d["scores"], d["labels"])


def _alone(truth: dict, ids: list, found: list, i: int) -> float:
    """One image's mAP, scored alone."""
    image = {**truth, "images": [truth["images"][i]],
             "annotations": [a for a in truth["annotations"] if a["image_id"] == ids[i]]}
    return score(image, [ids[i]], [_detections(found[i])])["map"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="eccentric-detection")
    parser.add_argument("--entry", default="ecc-d-learned@0.01", help="an ecc-dynamic entry with gate = learned")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spec = load_table(args.table)
    entry = next(e for e in spec.methods if (e.label or e.name) == args.entry)
    source = load("datasets", spec.miniature.dataset)(severity=spec.severity, domains=spec.domains)
    models = Models.copies_of(load_model("edge"), load_model("cloud"))
    method = build_method(entry.name, entry.options)
    method.task = "detection"
    run_training(method, TrainingResources(source.num_classes, models.edge, models.foundation, source.clean))
    o = method.options
    adapter, gate = load_adapter(method.artefacts, o.adapter_depth), load_gate(method.artefacts, D.GATE_SCORES)
    edge, cloud = load_model("edge"), load_model("cloud")
    head, tail = head_to(edge, o.edge_stage), tail_from(cloud, entry_before(cloud, o.cloud_stage))
    mixes: dict[str, dict[float, list[float]]] = {k: {p: [] for p in SHARES} for k in ("mean", "learned", "oracle")}
    alone = {"edge": [], "ecc-a": [], "cloud-only": []}
    for domain in source.domains:
        x = domain.images(np.arange(len(domain)))
        truth = domain.ground_truth()
        ids = [i["id"] for i in truth["images"]]
        with torch.no_grad():
            mine, adapted, theirs = edge(x), nets.decode(tail(adapter(head(x)))), cloud(x)
            objectives = D.Detection()
            gain = torch.tensor([_alone(truth, ids, adapted, i) - _alone(truth, ids, mine, i) for i in range(len(x))])
            order = {"mean": D.confidence(mine).argsort(), "learned": objectives.stands(mine, gate).argsort(),
                     "oracle": gain.argsort(descending=True)}
        for name, found in (("edge", mine), ("ecc-a", adapted), ("cloud-only", theirs)):
            alone[name].append(score(truth, ids, [_detections(d) for d in found])["map"])
        for gate_name, ranking in order.items():
            for share in SHARES:
                up = set(ranking[:round(share * len(x))].tolist())
                mix = [_detections(adapted[i] if i in up else mine[i]) for i in range(len(x))]
                mixes[gate_name][share].append(score(truth, ids, mix)["map"])
    cloud_map = float(np.mean(alone["cloud-only"]))
    print(f"{args.table}, {args.entry}: mean mAP over {', '.join(spec.domains)} at severity {spec.severity}")
    print(" | ".join(f"{k} {np.mean(v):.1f}" for k, v in alone.items()))
    for gate_name, by_share in mixes.items():
        cells = [f"{share:.0%} up: {np.mean(v):.1f} ({np.mean(v) / cloud_map:.2f})" for share, v in by_share.items()]
        print(f"{gate_name:8s}", " | ".join(cells))


if __name__ == "__main__":
    main()
