"""Which boxes should enter the multi-view union? Measured on the validation set.

Detectron's union (SCORE_HEUR: UNION) concatenates every view's per-class boxes of all proposals
above the score threshold *before* NMS and votes over all of them; torchvision's detectors apply
per-class NMS and keep the top 100 per view first, so box voting sees about one box per view per
object. This script runs one teacher over the validation images with each union, picks the
paper's automatic threshold for each, and reports the pseudo-labels' precision and recall (IoU
0.5), the AP of the kept set, and the COCO AP of the whole ensembled output, against the
validation set's own labels (the unlabeled split's truth is never used).

Run: python benchmarks/union_quality.py --teacher runs/det/teacher.pt --data data/det [--scales 64,96,128,160]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ml_core import pipeline, selection
from ml_core.data import load_coco
from ml_core.evaluation import COCOEvaluator, format_table
from ml_core.transforms import TransformSet
from ml_core.tta import EnsembleOptions


def measure(teacher: str, data: Path, scales: str, union: str, device: str) -> dict:
    val = load_coco(data / "val.json")
    labeled = load_coco(data / "labeled.json")
    doc = {"images": val.images, "categories": val.categories}
    paths = [str(data / "val" / im["file_name"]) for im in val.images]
    t0 = time.time()
    preds = {}
    for i, pred, err in pipeline.infer(teacher, paths, transforms=TransformSet.parse(scales),
                                       options=EnsembleOptions(union=union), device=device, num_workers=0):
        if err:
            raise ValueError(err)
        preds[val.images[i]["id"]] = pred["ensembled"]
    seconds = time.time() - t0
    ev = COCOEvaluator(val.to_dict(), "bbox")
    for image_id, items in preds.items():
        ev.process(image_id, items)
    scores = [p["score"] for items in preds.values() for p in items]
    t = selection.auto_threshold(scores, len(val.images), pipeline.annotated_per_image(labeled))
    kept = pipeline.pseudo_label_doc(doc, preds, t, val.categories)
    q = pipeline.pseudo_label_quality(kept, val.to_dict())
    return {"ensembled AP": round(ev.evaluate()["AP"], 2), "threshold": round(t, 3), "precision": q["precision"],
            "recall": q["recall"], "kept AP": q["bbox_AP"], "images/s": round(len(paths) / seconds, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True, help="folder with labeled.json, val.json and val/")
    ap.add_argument("--scales", default="64,96,128,160")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write the table as JSON here too")
    args = ap.parse_args()
    rows = {u: measure(args.teacher, Path(args.data), args.scales, u, args.device) for u in ("post_nms", "pre_nms")}
    print(f"union of views on {args.data}/val.json (teacher {args.teacher}, scales {args.scales} x flip, {args.device}):")
    print(format_table(rows, keys=("ensembled AP", "threshold", "precision", "recall", "kept AP", "images/s")))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
