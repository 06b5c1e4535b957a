"""Who should label round 2? Measured on the validation set, for boxes and keypoints alike.

For each run folder of benchmarks/distillation_gain.py (teacher.pt and the round-1 student.pt
beside data_<task>/), three labelers predict the validation images as inference does (every view,
ensembled): the teacher (round 1's labeler), the round-1 student alone, and the student and the
teacher in one ensemble (both models' views; pipeline.ROUND_TEACHERS "ensemble"), each scored by
pipeline.labeling_quality as pipeline.choose_labeler scores the last two: the instances the paper's
automatic threshold keeps on these images against the validation labels, precision and recall at
IoU 0.5 and the kept set's COCO AP (box, or OKS for keypoint models). The unlabeled split's truth
is never used.

Run: python benchmarks/round_labelers.py benchmarks/out/det_s0/cpu/seed0/run_detection ... [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ml_core import pipeline
from ml_core.transforms import TransformSet

LABELERS = {"teacher": ("teacher.pt", []), "student alone": ("student.pt", []),
            "student + teacher": ("student.pt", ["teacher.pt"])}


def measure(run: Path, scales: list[int], device: str) -> dict:
    data = next(run.parent.glob("data_*"))
    out = {"run": str(run)}
    for name, (ckpt, extra) in LABELERS.items():
        t0 = time.time()
        out[name] = {**pipeline.labeling_quality(str(run / ckpt), data, TransformSet(scales), device=device,
                                                 extra_checkpoints=[str(run / e) for e in extra]),
                     "seconds": round(time.time() - t0, 1)}
        print(name, out[name], flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (run_detection / run_keypoints of distillation_gain.py)")
    ap.add_argument("--scales", default="64,96,128,160", help="inference views (x flip), as the benchmark infers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", help="write the results as JSON here too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(Path(r), TransformSet.parse(args.scales).scales, args.device) for r in args.runs]
    names = list(LABELERS)
    key = "keypoints_AP" if "keypoints_AP" in results[0][names[0]] else "bbox_AP"
    print(f"\nmean over {len(results)} runs (precision, recall, kept-set {key}):")
    for name in names:
        m = [sum(r[name][k] for r in results) / len(results) for k in ("precision", "recall", key)]
        print(f"  {name:20s} {m[0]:6.2f} {m[1]:6.2f} {m[2]:6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
