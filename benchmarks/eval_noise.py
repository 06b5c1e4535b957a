"""How much of a validation AP is the validation set's sampling: bootstrap over its images.

For each checkpoint: COCO AP (box, or OKS keypoint AP for keypoint models) on the validation set,
single view as training tracks it, then the same predictions scored on `--resamples` bootstrap
resamples of the validation images (drawn with replacement, same size). The resamples' standard
deviation is the evaluation's own noise at this validation size; what a training curve moves
beyond it between evaluations is the model changing. Comparing the two says whether a larger
validation set would rank models any better.

Run: python benchmarks/eval_noise.py --val DATA/val.json --images DATA/val CKPT.pt [CKPT.pt ...]
     [--resamples 200] [--subset 60] [--out FILE.json]
(--subset N: also the noise of the first N validation images alone, e.g. the size the set had before)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from ml_core.checkpoint import load_model
from ml_core.data import load_coco
from ml_core.evaluation import COCOEvaluator
from ml_core.pipeline import predict_single_view
from ml_core.schema import KeypointSchema


def score(gt: dict, preds: dict[int, list[dict]], image_ids: list[int], metric: str, sigmas) -> float:
    """AP of the predictions on these images; a resample's repeated image gets a new id each time."""
    images, anns, ev_preds = [], [], []
    by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    info = {im["id"]: im for im in gt["images"]}
    for new_id, old in enumerate(image_ids, 1):
        images.append({**info[old], "id": new_id})
        anns += [{**a, "id": len(anns) + 1 + k, "image_id": new_id} for k, a in enumerate(by_image.get(old, []))]
        ev_preds.append((new_id, preds[old]))
    ev = COCOEvaluator({**gt, "images": images, "annotations": anns}, metric, sigmas)
    for i, p in ev_preds:
        ev.process(i, p)
    return ev.evaluate()["AP"]


def noise(gt: dict, preds: dict, ids: list[int], metric: str, sigmas, resamples: int, seed: int) -> dict:
    rng = random.Random(seed)
    draws = [score(gt, preds, [rng.choice(ids) for _ in ids], metric, sigmas) for _ in range(resamples)]
    return {"images": len(ids), "AP": round(score(gt, preds, ids, metric, sigmas), 2),
            "bootstrap_std": round(statistics.stdev(draws), 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--val", required=True, help="validation COCO JSON")
    ap.add_argument("--images", required=True, help="folder of the validation images")
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    val = load_coco(args.val)
    gt = val.to_dict()
    ids = [im["id"] for im in val.images]
    paths = [str(Path(args.images) / im["file_name"]) for im in val.images]
    report = {"val": args.val, "resamples": args.resamples, "checkpoints": {}}
    for ck in args.checkpoints:
        model, meta = load_model(ck)
        schema = KeypointSchema.from_dict(meta.get("keypoint_schema"))
        metric, sigmas = ("keypoints", schema.sigmas) if schema else ("bbox", None)
        preds = dict(zip(ids, predict_single_view(model, meta, paths, device="cpu")))
        r = {"metric": metric, "all": noise(gt, preds, ids, metric, sigmas, args.resamples, args.seed)}
        if args.subset:
            r["subset"] = noise(gt, preds, ids[:args.subset], metric, sigmas, args.resamples, args.seed)
        report["checkpoints"][ck] = r
        print(f"{ck}: {metric} AP {r['all']['AP']} ± {r['all']['bootstrap_std']} (bootstrap std, "
              f"{len(ids)} images)" + (f"; first {args.subset}: {r['subset']['AP']} ± {r['subset']['bootstrap_std']}"
                                       if args.subset else ""), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
