"""RoIAlign on the CPU: torchvision's kernel against ml_core.roi_align's matrix products.

Forward + backward of one training step's pooling (4 images, 64 sampled RoIs each, 48 channels,
sampling ratio 2), and the forward alone at inference (300 proposals per image), for the box head (7 x 7) and the keypoint head (14 x 14), on square maps of
growing side. The product form's cost grows with the map's area; this is where
ml_core.roi_align.SMALL_MAP (the largest map that takes it) comes from, and why it is used for
training only (at inference torchvision's forward is as fast or faster).

Run: python benchmarks/roi_align.py [--threads 1] [--out benchmarks/results/roi_align_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torchvision.ops import roi_align

from ml_core.roi_align import SMALL_MAP, roi_align_small


def timed(fn, repeat: int) -> float:
    """Median milliseconds of fn() over `repeat` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return sorted(times)[len(times) // 2]


def case(side: int, pooled: int, images: int = 4, rois: int = 64, channels: int = 48, stride: int = 8,
         repeat: int = 15) -> dict:
    g = torch.Generator().manual_seed(side)
    f = torch.randn(images, channels, side, side, generator=g, requires_grad=True)
    size = side * stride
    boxes = []
    for _ in range(images):
        xy = torch.rand(rois, 2, generator=g) * size * 0.8
        boxes.append(torch.cat([xy, xy + torch.rand(rois, 2, generator=g) * size * 0.5 + 2], 1))
    up = torch.randn(images * rois, channels, pooled, pooled, generator=g)

    def step(pool):
        def run():
            f.grad = None
            pool(f, boxes, (pooled, pooled), 1 / stride, 2).backward(up)
        return run
    def forward(pool):  # inference: 300 proposals per image, no gradient
        many = [torch.cat([b] * 5)[:300] for b in boxes]

        def run():
            with torch.no_grad():
                pool(f, many, (pooled, pooled), 1 / stride, 2)
        return run
    ours, theirs = timed(step(roi_align_small), repeat), timed(step(roi_align), repeat)
    ours_fwd, theirs_fwd = timed(forward(roi_align_small), repeat), timed(forward(roi_align), repeat)
    return {"map": f"{side}x{side}", "positions": side * side, "pooled": pooled,
            "train_torchvision_ms": round(theirs, 2), "train_products_ms": round(ours, 2),
            "train_speedup": round(theirs / ours, 2), "infer_torchvision_ms": round(theirs_fwd, 2),
            "infer_products_ms": round(ours_fwd, 2), "infer_speedup": round(theirs_fwd / ours_fwd, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [case(side, pooled) for pooled in (7, 14) for side in (12, 20, 32, 40, 48)]
    print(f"RoIAlign forward + backward, 4 images x 64 RoIs x 48 channels, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}; product form used up to {SMALL_MAP} positions")
    print("training: forward + backward, 64 RoIs per image; inference: forward, 300 RoIs per image (ms, median)")
    print(f"{'map':>7} {'pooled':>6} | {'torchvision':>11} {'products':>9} {'speedup':>8} | "
          f"{'torchvision':>11} {'products':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['map']:>7} {r['pooled']:>6} | {r['train_torchvision_ms']:>11} {r['train_products_ms']:>9} "
              f"{'x' + str(r['train_speedup']):>8} | {r['infer_torchvision_ms']:>11} {r['infer_products_ms']:>9} "
              f"{'x' + str(r['infer_speedup']):>8}")
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": args.threads, "small_map": SMALL_MAP,
                                              "torch": torch.__version__, "machine": platform.machine(),
                                              "cores": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
