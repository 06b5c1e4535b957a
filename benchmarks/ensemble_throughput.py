"""Box ensembling throughput: ml_core.ensemble against the `ensemble-boxes` library, same inputs.

Input: seeded synthetic detections, 8 views x 100 boxes x 3 classes per image (jittered copies of
~30 objects plus clutter), in pixel coordinates of a 640x480 image. Prints images/s of each
method and how closely the results agree where the methods coincide (NMS with NMS, WBF with
WBF). Run: python benchmarks/ensemble_throughput.py [--images 300] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from torchvision.ops import box_iou

from ml_core.ensemble import ensemble_boxes, ensemble_boxes_batch

W, H = 640, 480


def make_image(rng: np.random.Generator, views=8, per_view=100, classes=3):
    n_obj = 30
    cx, cy = rng.uniform(40, W - 40, n_obj), rng.uniform(40, H - 40, n_obj)
    w, h = rng.uniform(20, 120, n_obj), rng.uniform(20, 120, n_obj)
    cls = rng.integers(1, classes + 1, n_obj)
    quality = rng.uniform(0.3, 0.95, n_obj)
    boxes, scores, labels = [], [], []
    for _ in range(views):
        pick = rng.integers(0, n_obj, per_view)
        jitter = rng.normal(0, 3, (per_view, 4))
        b = np.stack([cx[pick] - w[pick] / 2, cy[pick] - h[pick] / 2, cx[pick] + w[pick] / 2, cy[pick] + h[pick] / 2], 1) + jitter
        clutter = rng.random(per_view) < 0.3
        b[clutter] = np.sort(rng.uniform(0, [W, H, W, H], (clutter.sum(), 4)).reshape(-1, 2, 2), axis=1).reshape(-1, 4)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 2)
        s = np.clip(quality[pick] + rng.normal(0, 0.05, per_view), 0.01, 1)
        s[clutter] = rng.uniform(0.01, 0.4, clutter.sum())
        boxes.append(np.clip(b, 0, [W, H, W, H]))
        scores.append(s)
        labels.append(cls[pick])
    return boxes, scores, labels


def agreement(a_boxes, a_scores, b_boxes, b_scores):
    """Fraction of A's boxes with a B box of IoU > 0.95 and score within 1e-3 (and vice versa)."""
    if len(a_boxes) == 0 and len(b_boxes) == 0:
        return 1.0
    if len(a_boxes) == 0 or len(b_boxes) == 0:
        return 0.0
    iou = box_iou(torch.as_tensor(a_boxes, dtype=torch.float32), torch.as_tensor(b_boxes, dtype=torch.float32)).numpy()
    sd = np.abs(np.asarray(a_scores)[:, None] - np.asarray(b_scores)[None, :]) < 1e-3
    m = (iou > 0.95) & sd
    return (m.any(1).sum() + m.any(0).sum()) / (len(a_boxes) + len(b_boxes))


def measure(images: int = 300, device: str = "cpu", *, eb_nms=None, eb_wbf=None, max_seconds: float | None = None,
            batch: int = 64, per_view: int = 100, wbf: bool = True, detections_per_img: int = 10 ** 6) -> dict:
    """Images/s of every method on the same seeded inputs, agreement and speed-ups.

    eb_nms and eb_wbf are ensemble-boxes' nms and weighted_boxes_fusion; a method left None is left
    out (with its comparisons). max_seconds caps each method's timing: its images/s then come from
    the images it reached in that time, and agreement from the images both methods reached.
    """
    rng = np.random.default_rng(0)
    data = [make_image(rng) for _ in range(images)]
    dev = torch.device(device)
    tensors = [(torch.as_tensor(np.concatenate(b), dtype=torch.float32, device=dev),
                torch.as_tensor(np.concatenate(s), dtype=torch.float32, device=dev),
                torch.as_tensor(np.concatenate(lab), device=dev)) for b, s, lab in data]
    norm = np.array([W, H, W, H], dtype=np.float64)
    counted = {}

    def timed(fn):
        fn(0)  # warm-up
        fn.__dict__.get("cache", {}).clear()  # a batched method must not get its first batch free
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = []
        for i in range(images):
            out.append(fn(i))
            if max_seconds is not None and time.perf_counter() - t > max_seconds:
                break
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return len(out) / (time.perf_counter() - t), out

    def batched(method):
        """Images in batches of 64 (as ml_core.tta hands them over); per-image results."""
        cache = {}

        def fn(i):
            start = i - i % batch
            if start not in cache:
                cache.clear()
                group = tensors[start:start + batch]
                cache[start] = ensemble_boxes_batch([t[0] for t in group], [t[1] for t in group], [t[2] for t in group],
                                                    num_views=8, method=method, score_thresh=0.0,
                                                    detections_per_img=detections_per_img,
                                                    padded=True)
            return cache[start][i - start]
        fn.cache = cache
        return fn

    ours = {
        "distill nms, padded batch": batched("nms"),
        "distill nms+vote, padded batch": batched("nms_vote"),
        "distill nms": lambda i: ensemble_boxes(*tensors[i], num_views=8, method="nms", score_thresh=0.0,
                                                detections_per_img=detections_per_img),
        "distill nms+vote": lambda i: ensemble_boxes(*tensors[i], num_views=8, method="nms_vote", score_thresh=0.0,
                                                     detections_per_img=detections_per_img),
    }
    if wbf:
        ours["distill wbf"] = lambda i: ensemble_boxes(*tensors[i], num_views=8, method="wbf", score_thresh=0.0,
                                                       wbf_thresh=0.55, detections_per_img=detections_per_img)
    theirs = {}
    if eb_nms is not None:
        theirs["ensemble-boxes nms"] = lambda i: eb_nms([b / norm for b in data[i][0]], data[i][1], data[i][2], iou_thr=0.5)
    if eb_wbf is not None:
        theirs["ensemble-boxes wbf"] = lambda i: eb_wbf([b / norm for b in data[i][0]], data[i][1], data[i][2], iou_thr=0.55,
                                                        skip_box_thr=0.0)
    results, outputs = {}, {}
    for name, fn in {**ours, **theirs}.items():
        ips, out = timed(fn)
        results[name] = round(ips, 1)
        outputs[name] = out
        counted[name] = len(out)
    agree = {}
    for a, b in (("distill nms", "ensemble-boxes nms"), ("distill nms, padded batch", "ensemble-boxes nms"),
                 ("distill wbf", "ensemble-boxes wbf")):
        if b not in outputs:
            continue
        vals = []
        for x, y in zip(outputs[a], outputs[b]):
            vals.append(agreement(x[0].cpu().numpy(), x[1].cpu().numpy(), y[0] * norm, y[1]))
        agree[f"{a} vs {b}"] = round(float(np.mean(vals)), 4)
    speedup = {}
    for key, a, b, digits in (("nms", "distill nms", "ensemble-boxes nms", 1),
                              ("nms, padded batch", "distill nms, padded batch", "ensemble-boxes nms", 1),
                              ("nms+vote vs their nms", "distill nms+vote", "ensemble-boxes nms", 1),
                              ("nms+vote padded vs their nms", "distill nms+vote, padded batch", "ensemble-boxes nms", 1),
                              ("wbf", "distill wbf", "ensemble-boxes wbf", 1),
                              ("padded batch vs per image, nms", "distill nms, padded batch", "distill nms", 2),
                              ("padded batch vs per image, nms+vote", "distill nms+vote, padded batch", "distill nms+vote", 2)):
        if a in results and b in results:
            speedup[key] = round(results[a] / results[b], digits)
    return {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}",
            "images": images, "input": f"8 views x {per_view} boxes, 3 classes, 640x480",
            "detections_per_img": detections_per_img, "images_per_second": results,
            "images_timed": counted, "speedup": speedup, "agreement": agree}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    from ensemble_boxes import nms as eb_nms, weighted_boxes_fusion as eb_wbf

    report = measure(args.images, args.device, eb_nms=eb_nms, eb_wbf=eb_wbf)
    results, speedup, agree = report["images_per_second"], report["speedup"], report["agreement"]
    print(f"box ensembling, {args.images} images of 8 views x 100 boxes ({report['machine']})")
    for k, v in results.items():
        print(f"  {k:<22} {v:>9.1f} images/s")
    for k, v in speedup.items():
        print(f"  speed-up {k:<30} x{v}")
    for k, v in agree.items():
        print(f"  agreement {k:<40} {v:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
