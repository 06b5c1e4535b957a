"""Where the pre-NMS union's box ensembling spends its time, on the GPU suite's own inputs.

The GPU suite's TTA step (random-weights Faster R-CNN R50-FPN, 640x480 noise images, shorter sides
400/600/800/1000 x flip, up to 1,000 boxes per view before NMS) times box ensembling at 5.5 ms per
image on an H200, where union-sized synthetic inputs take 0.7. This builds that union for a few
images and reports what the padded path (ml_core.ensemble.ensemble_boxes_flat) works on: the
(image, class) group sizes, the chunks they are padded into, the fixed-point NMS steps per chunk,
and the time of each part (IoU matrices, overlap mask, fixed point, box voting), each between
device synchronisations, against the whole ensembling call.

Run: python benchmarks/union_groups.py [--images 1] [--device cpu|cuda] [--out FILE.json]
(on the CPU, one image takes about a minute and a half, most of it the eight views' forward pass).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import _write_jpegs  # noqa: E402  (the suite's own images)

from ml_core import ensemble, nms  # noqa: E402
from ml_core.data import load_image  # noqa: E402
from ml_core.models import build_model  # noqa: E402
from ml_core.transforms import TransformSet  # noqa: E402
from ml_core.tta import EnsembleOptions, MultiTransformPredictor  # noqa: E402


def capture_union(images: int, device: str, folder: Path) -> tuple:
    """The arguments MultiTransformPredictor passes to ensemble_boxes_flat for `images` images."""
    torch.manual_seed(0)
    model, _ = build_model("fasterrcnn_resnet50_fpn", 4, 0, min_size=400, max_size=2000)
    model.to(device).eval()
    paths = _write_jpegs(folder, images, (640, 480))
    captured = {}
    real = ensemble.ensemble_boxes_flat

    def grab(B, S, L, img, n, **kw):
        captured["args"] = (B.clone(), S.clone(), L.clone(), img.clone(), n, kw)
        return real(B, S, L, img, n, **kw)
    ensemble.ensemble_boxes_flat = grab
    try:
        predictor = MultiTransformPredictor(model, TransformSet([400, 600, 800, 1000], flip=True, max_size=2000),
                                            device=device, amp=device == "cuda", fast=True,
                                            options=EnsembleOptions(union_per_view=1000))
        predictor.predict([load_image(p) for p in paths])
    finally:
        ensemble.ensemble_boxes_flat = real
    return captured["args"]


def timed(sync, fn, *args, **kwargs):
    sync()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return out, (time.perf_counter() - t) * 1000


def parts(B, S, L, img, n, kw, sync) -> dict:
    """ensemble_boxes_flat's per-chunk work, one part at a time."""
    keep = S >= kw["score_thresh"]
    B, S, L, img = B[keep].float(), S[keep].float(), L[keep].long(), img[keep]
    n_lab = int(L.max()) + 1
    order, counts, starts = nms.grouped_rows(img * n_lab + L, S, n * n_lab)
    ms = {"iou": 0.0, "overlap_mask": 0.0, "fixed_point": 0.0, "vote": 0.0}
    chunks = []
    for groups, width in nms.size_chunks(counts, ensemble.CHUNK_ELEMENTS):
        rows, valid = nms.chunk_rows(order, counts, starts, groups, width)
        b, s = B[rows], S[rows]
        iou, t = timed(sync, nms.batched_iou, b, b)
        ms["iou"] += t
        over, t = timed(sync, nms.suppressors, iou, kw["nms_thresh"], valid)
        ms["overlap_mask"] += t
        stats = {}
        _, t = timed(sync, nms.suppression_fixed_point, over, valid, stats)
        ms["fixed_point"] += t
        _, t = timed(sync, ensemble._vote, iou, b, s, s, kw["vote_thresh"], kw["vote_scoring"], valid)
        ms["vote"] += t
        chunks.append({"groups": len(groups), "width": width, "elements": len(groups) * width * width,
                       "fixed_point_steps": stats["steps"]})
    return {"rows": len(B), "groups": [c for c in counts if c], "chunks": chunks,
            "ms_per_image": {k: round(v / n, 2) for k, v in ms.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the figures to this JSON file too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    folder = Path("/tmp/distill-union-groups")
    folder.mkdir(exist_ok=True)
    B, S, L, img, n, kw = capture_union(args.images, args.device, folder)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "images": n, "settings": kw}
    report.update(parts(B, S, L, img, n, kw, sync))
    _, t = timed(sync, ensemble.ensemble_boxes_flat, B, S, L, img, n, **kw)
    report["ms_per_image"]["whole ensemble_boxes_flat"] = round(t / n, 2)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
