"""Does torch.compile speed up the TTA backbone, and what does compiling cost?

The backbone is the largest single cost of multi-transform inference on a GPU (GPU suite, steps
1-2). This times the fast path's backbone copy (ml_core.inference_backbone: batch norms
folded, channels_last, fp16 autocast, cudnn.benchmark) over every view of a group of images, eager
against torch.compile (inductor, static shapes: one graph per scale), and reports the compile time
of each shape separately, not hidden in a warm-up. Stops compiling when its time budget is spent.

Presets: gpu (R50-FPN, 8 images of 640x480, shorter sides 400/600/800/1000 x flip) and cpu (tiny
sizes, to check that the script runs). Run: python benchmarks/backbone_compile.py --preset gpu
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ml_core.inference_backbone import cudnn_autotuned, inference_backbone
from ml_core.models import build_model

PRESETS = {
    "gpu": dict(arch="fasterrcnn_resnet50_fpn", size=(480, 640), scales=[400, 600, 800, 1000], group=8, reps=5),
    "cpu": dict(arch="fasterrcnn_resnet18_fpn", size=(48, 64), scales=[48, 64], group=2, reps=2),
}


def _batches(model, p, device):
    """The transformed batch of every scale: the group and its mirror images, resized and padded."""
    t = model.transform
    images = [torch.rand(3, *p["size"], device=device) for _ in range(p["group"])]
    batch = images + [im.flip(-1) for im in images]
    out = []
    for s in p["scales"]:
        t.min_size, t.max_size = (s,), 2000
        out.append(t(batch)[0].tensors.contiguous(memory_format=torch.channels_last))
    return out


def _time(fn, xs, reps, device) -> float:
    """Seconds per group (all scales), mean over reps after one warm-up."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for x in xs:
        fn(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        for x in xs:
            fn(x)
    sync()
    return (time.perf_counter() - t0) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, default=240.0, help="compiling stops once this has passed")
    ap.add_argument("--mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    p = PRESETS[args.preset]
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    torch.manual_seed(0)
    model, _ = build_model(p["arch"], 4, min_size=p["scales"][0], max_size=2000)
    model.to(device).eval()
    cuda = device.type == "cuda"
    bb = inference_backbone(model.backbone, fold=True, channels_last=True)
    amp = torch.autocast("cuda", dtype=torch.float16) if cuda else torch.autocast("cpu", enabled=False)
    views = 2 * p["group"]

    @torch.inference_mode()
    def eager(x):
        with amp, cudnn_autotuned(cuda):
            return bb(x)

    with torch.inference_mode():
        xs = _batches(model, p, device)
    eager_s = _time(eager, xs, p["reps"], device)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "preset": args.preset,
              "settings": {k: v for k, v in p.items()}, "mode": args.mode, "views_per_group": views,
              "eager": {"s_per_group": round(eager_s, 4), "images_per_s": round(p["group"] / eager_s, 2)}}
    print(f"eager: {report['eager']['images_per_s']} images/s (backbone over {views} views x {len(xs)} scales)", flush=True)

    compiled = torch.compile(bb, mode=args.mode, dynamic=False)

    @torch.inference_mode()
    def comp(x):
        with amp, cudnn_autotuned(cuda):
            return compiled(x)

    compile_s, done = [], []
    for s, x in zip(p["scales"], xs):
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget spent: scale {s} not compiled", flush=True)
            break
        t0 = time.perf_counter()
        comp(x)
        if cuda:
            torch.cuda.synchronize()
        compile_s.append(round(time.perf_counter() - t0, 1))
        done.append(x)
        print(f"compiled scale {s} in {compile_s[-1]} s", flush=True)
    report["compile_s_per_scale"] = dict(zip(map(str, p["scales"]), compile_s))
    if len(done) == len(xs):
        comp_s = _time(comp, xs, p["reps"], device)
        report["compiled"] = {"s_per_group": round(comp_s, 4), "images_per_s": round(p["group"] / comp_s, 2),
                              "speedup": round(eager_s / comp_s, 3)}
        out = [eager(x) for x in xs[:1]], [comp(x) for x in xs[:1]]
        a, b = out[0][0], out[1][0]
        report["max_abs_difference_first_scale"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        print(f"compiled: {report['compiled']['images_per_s']} images/s (x{report['compiled']['speedup']})", flush=True)
    elif not done:
        report["compiled"] = None
        print("nothing compiled within the budget", flush=True)
    else:
        # the scales compiled so far, eager against compiled
        e, c = _time(eager, done, p["reps"], device), _time(comp, done, p["reps"], device)
        report["compiled_scales_only"] = {"scales": p["scales"][:len(done)], "eager_s": round(e, 4),
                                          "compiled_s": round(c, 4), "speedup": round(e / c, 3)}
        print(f"compiled scales only: x{report['compiled_scales_only']['speedup']}", flush=True)
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return report


if __name__ == "__main__":
    main()
