"""Which keypoints should a pseudo-label leave out? Measured on the validation set.

The teacher predicts the validation images as inference does (every view, ensembled); the paper's
automatic threshold keeps the instances a student would be taught. Each kept keypoint has a score,
the merged heatmap's logit where it was decoded. Against the validation set's own labels: of the
keypoints taught on true instances, how many are right (the truth has the keypoint and their
keypoint similarity, OKS's per-keypoint term, is at least 0.5), by score decile, and with the
keypoints below `selection.keypoint_auto_threshold` left unlabeled (as many per instance as the
labeled set annotates). The unlabeled split's truth is never used.

With --with, another model's views join the ensemble (model ensembling): how a round's student labels
alone and together with the model that taught it (pipeline.choose_labeler; benchmarks/round_labelers.py
measures both for box models too).

Run: python benchmarks/keypoint_confidence.py --teacher runs/kp/teacher.pt --data data/kp [--with runs/kp/student.pt]
     [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ml_core import pipeline, selection
from ml_core.checkpoint import read_checkpoint
from ml_core.data import load_coco
from ml_core.schema import KeypointSchema
from ml_core.transforms import TransformSet


def _xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def measure(teacher: str, data: Path, scales: list[int], device: str, extra: list[str] = ()) -> dict:
    val, labeled = load_coco(data / "val.json"), load_coco(data / "labeled.json")
    t0 = time.time()
    paths = [str(data / "val" / im["file_name"]) for im in val.images]
    preds = {}
    for i, pred, err in pipeline.infer(teacher, paths, transforms=TransformSet(scales), device=device, num_workers=0,
                                        extra_checkpoints=extra):
        if pred is None:
            raise ValueError(f"validation image unreadable: {err}")
        preds[val.images[i]["id"]] = pred["ensembled"]
    meta = read_checkpoint(teacher)["meta"]
    sigmas = KeypointSchema.from_dict(meta["keypoint_schema"]).sigmas
    scores = [d["score"] for items in preds.values() for d in items]
    t = selection.auto_threshold(scores, len(val.images), pipeline.annotated_per_image(labeled))
    kept = selection.select([d for items in preds.values() for d in items], t)
    fraction = pipeline.labeled_keypoint_fraction(labeled)
    kt = selection.keypoint_auto_threshold([s for d in kept for s in d["keypoint_scores"]], fraction)
    doc, truth = {"images": val.images}, val.to_dict()
    every = pipeline.pseudo_label_doc(doc, preds, t, val.categories)
    hidden = pipeline.pseudo_label_doc(doc, preds, t, val.categories, keypoint_threshold=kt)
    q_every, q_hidden = (pipeline.pseudo_label_quality(x, truth, sigmas) for x in (every, hidden))

    # every kept keypoint on a true instance: its score and whether it is right
    by_image: dict[int, list[dict]] = {}
    for a in truth["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    ks, right = [], []
    for image_id, items in preds.items():
        items = sorted(selection.select(items, t), key=lambda d: -d["score"])
        gt = by_image.get(image_id, [])
        match = selection.match_to_truth([_xyxy(d["bbox"]) for d in items], [d["score"] for d in items],
                                         [d["category_id"] for d in items], [_xyxy(a["bbox"]) for a in gt],
                                         [a["category_id"] for a in gt])
        for d, j in zip(items, match):
            if j < 0:
                continue
            ks += d["keypoint_scores"]
            right += pipeline.keypoint_hits(d["keypoints"], gt[j], sigmas).tolist()
    ks, right = np.asarray(ks), np.asarray(right, dtype=bool)
    edges = np.quantile(ks, np.linspace(0, 1, 11))
    deciles = [round(100 * float(right[(ks >= a) & ((ks < b) if i < 9 else (ks <= b))].mean()), 1)
               for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]
    return {"teacher": teacher, "ensembled_with": list(extra), "images": len(val.images), "threshold": round(t, 4),
            "labeled_keypoint_fraction": None if fraction is None else round(fraction, 4),
            "keypoint_threshold": None if kt is None else round(kt, 3),
            "keypoints_kept": f"{sum(a['num_keypoints'] for a in hidden['annotations'])} of "
                              f"{sum(a['num_keypoints'] for a in every['annotations'])}",
            "right_by_score_decile_lowest_first": deciles, "decile_edges": [round(float(e), 2) for e in edges],
            "every_keypoint": q_every, "keypoint_threshold_auto": q_hidden, "seconds": round(time.time() - t0, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--with", dest="extra", action="append", default=[],
                    help="another checkpoint whose views join the ensemble (model ensembling; repeatable)")
    ap.add_argument("--data", required=True, help="folder with labeled.json, val.json and val/")
    ap.add_argument("--scales", default="64,96,128,160", help="inference views (x flip), as the benchmark infers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", help="write the result as JSON here too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args.teacher, Path(args.data), TransformSet.parse(args.scales).scales, args.device,
                  args.extra)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
