"""Multi-transform inference throughput: ml_core.tta against the loop a user would write by hand.

Both read the same JPEG files from disk and produce the same views (every scale, flipped and not)
mapped back to the image and ensembled. The hand loop runs one image and one view at a time in
fp32; ml_core batches all views of a group of images per scale, decodes images in DataLoader
workers while the model runs, and uses fp16 autocast on CUDA.

Presets:
  gpu: Faster R-CNN R50-FPN, 640x480 images, shorter sides 400/600/800/1000 with flips, 64 images
  cpu: Faster R-CNN R18-FPN, 320x240 images, shorter sides 200/300/400/500 with flips, 6 images
Weights are random (nothing is downloaded); the number of boxes per view is then at its maximum
(100), the heaviest case for ensembling. Run: python benchmarks/tta_throughput.py --preset cpu
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ml_core.data import load_image
from ml_core.ensemble import ensemble_boxes
from ml_core.models import build_model
from ml_core.transforms import TransformSet, flip_boxes
from ml_core.tta import MultiTransformPredictor, run_inference

PRESETS = {
    "gpu": dict(arch="fasterrcnn_resnet50_fpn", size=(640, 480), scales=[400, 600, 800, 1000], images=64, group=8, workers=6),
    "cpu": dict(arch="fasterrcnn_resnet18_fpn", size=(320, 240), scales=[200, 300, 400, 500], images=6, group=2, workers=1),
}


def hand_loop(model, paths, scales, max_size, device):
    """One image, one view at a time, fp32: what one writes first."""
    out = []
    with torch.no_grad():
        for p in paths:
            img = load_image(p).to(device)
            w = img.shape[-1]
            boxes, scores, labels = [], [], []
            for s in scales:
                for flip in (False, True):
                    model.transform.min_size, model.transform.max_size = (s,), max_size
                    d = model([img.flip(-1) if flip else img])[0]
                    boxes.append(flip_boxes(d["boxes"], w) if flip else d["boxes"])
                    scores.append(d["scores"])
                    labels.append(d["labels"])
            out.append(ensemble_boxes(torch.cat(boxes), torch.cat(scores), torch.cat(labels), num_views=2 * len(scales)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = dict(PRESETS[args.preset])
    if args.images:
        cfg["images"] = args.images
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, _ = build_model(cfg["arch"], 4, min_size=cfg["scales"][0], max_size=2000)
    model.to(device).eval()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(cfg["images"]):
            arr = rng.integers(0, 255, (cfg["size"][1], cfg["size"][0], 3), dtype=np.uint8)
            p = Path(tmp) / f"{i}.jpg"
            Image.fromarray(arr).save(p, quality=90)
            paths.append(str(p))
        ts = TransformSet(cfg["scales"], flip=True, max_size=2000)
        # warm-up both paths (cuDNN autotuning, allocator)
        hand_loop(model, paths[:1], cfg["scales"], 2000, device)
        predictor = MultiTransformPredictor(model, ts, device=device, amp=True)
        list(run_inference(predictor, paths[: cfg["group"]], group_size=cfg["group"], num_workers=0))

        def clock(fn):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t

        t_hand = clock(lambda: hand_loop(model, paths, cfg["scales"], 2000, device))
        t_ours = clock(lambda: list(run_inference(predictor, paths, group_size=cfg["group"], num_workers=cfg["workers"])))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    report = {"preset": args.preset, "device": name, **{k: cfg[k] for k in ("arch", "size", "scales", "images")},
              "views_per_image": 2 * len(cfg["scales"]), "hand_loop_images_per_s": round(cfg["images"] / t_hand, 3),
              "distill_images_per_s": round(cfg["images"] / t_ours, 3), "speedup": round(t_hand / t_ours, 2)}
    print(f"multi-transform inference, {cfg['arch']}, {cfg['size'][0]}x{cfg['size'][1]}, scales {cfg['scales']} x flip, "
          f"{cfg['images']} images on {name}")
    print(f"  hand loop (1 image x 1 view, fp32): {report['hand_loop_images_per_s']:8.3f} images/s")
    print(f"  ml_core.tta (batched views{', fp16' if device.type == 'cuda' else ''}):  {report['distill_images_per_s']:8.3f} images/s")
    print(f"  speed-up: x{report['speedup']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
