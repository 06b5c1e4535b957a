"""Does overlapping groups pay? ml_core.tta with and without `overlap`, alternated in one process.

`MultiTransformPredictor(overlap=True)` (CUDA, fast path) launches each group's backbone passes on
a stream of their own while the group before finishes on a second stream; `overlap=False`
completes each group before the next starts. The GPU suite times the two once each, one after
the other, and two H200 runs disagreed for Keypoint R-CNN (-7 % and +9 %, each time in favour of
whichever ran second), so this alternates them: warm-up both, then `--rounds` x (on, off) or
(off, on) in turn, each over the same `--images` files through run_inference, and prints the
median images/s of each and their ratio. Inputs: the GPU suite's (random-weights R50-FPN
detectors, 640x480 noise JPEGs, shorter sides 400/600/800/1000 x flip, groups of 8).
Result (H200, benchmarks/results/overlap_ab_h200.json): x0.986 and x0.970, so overlap was removed
in the next commit; this script runs only at this commit.

Run on a GPU machine: python benchmarks/overlap_ab.py [--arch fasterrcnn_resnet50_fpn
keypointrcnn_resnet50_fpn] [--rounds 4] [--images 64] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import COCO_FLIP, _write_jpegs, environment  # noqa: E402  (the suite's own inputs)

from ml_core.data import load_image  # noqa: E402
from ml_core.models import build_model  # noqa: E402
from ml_core.transforms import TransformSet  # noqa: E402
from ml_core.tta import EnsembleOptions, MultiTransformPredictor, run_inference  # noqa: E402


def images_per_s(predictor, paths: list[str], group: int, workers: int, sync) -> float:
    sync()
    t = time.perf_counter()
    for _i, pred, err in run_inference(predictor, paths, group_size=group, num_workers=workers):
        if pred is None:
            raise RuntimeError(err)
    sync()
    return len(paths) / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["fasterrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scales = [400, 600, 800, 1000] if device.type == "cuda" else [48, 64]
    size = (640, 480) if device.type == "cuda" else (80, 64)
    report = {"benchmark": "overlap_ab", "environment": environment(device), "rounds": a.rounds,
              "images": a.images, "group": a.group, "scales": scales, "image_size": size, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_jpegs(Path(tmp), a.images, size)
        for arch in a.arch:
            nk = 17 if arch.startswith("keypoint") else 0
            torch.manual_seed(0)
            model, _ = build_model(arch, 2 if nk else 4, nk, min_size=scales[0], max_size=2000)
            model.to(device).eval()
            ts = TransformSet(scales, flip=True, max_size=2000)
            opts = EnsembleOptions(keypoint_scales="all")
            preds = {on: MultiTransformPredictor(model, ts, flip_inds=COCO_FLIP if nk else None, device=device,
                                                 options=opts, overlap=on if device.type == "cuda" else False)
                     for on in (True, False)}
            for p in preds.values():                                  # warm-up: every scale's shapes
                p.predict([load_image(x) for x in paths[:a.group]])
            runs = {True: [], False: []}
            for r in range(a.rounds):
                for on in ((True, False) if r % 2 == 0 else (False, True)):
                    runs[on].append(images_per_s(preds[on], paths, a.group, a.workers, sync))
                    print(f"{arch} round {r} overlap={on}: {runs[on][-1]:.2f} images/s", flush=True)
            med = {on: statistics.median(v) for on, v in runs.items()}
            report["models"][arch] = {"overlap_images_per_s": [round(x, 3) for x in runs[True]],
                                      "sequential_images_per_s": [round(x, 3) for x in runs[False]],
                                      "median_overlap": round(med[True], 3), "median_sequential": round(med[False], 3),
                                      "ratio": round(med[True] / med[False], 3)}
            print(f"{arch}: overlap {med[True]:.2f} images/s, sequential {med[False]:.2f} (median of {a.rounds}); "
                  f"ratio {med[True] / med[False]:.3f}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
