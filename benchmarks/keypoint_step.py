"""Training steps of keypointrcnn_tiny: its box head now against fasterrcnn_tiny's (the baseline).

keypointrcnn_tiny samples 32 RoIs per image for a box head of 256 features; before 2026-11-28 it
had fasterrcnn_tiny's 64 RoIs and 1,024 features (ml_core/models.py says why it changed). Both
models train the same SGD steps (batch 4, flips off, the model's own size) on the same minibatches
of the CPU benchmark's synthetic figures (96 px), taking turns in blocks so that a busy machine
slows both alike; the figure is steps per second after a warm-up.

Run: python benchmarks/keypoint_step.py [--threads 2] [--steps 30] [--out benchmarks/results/keypoint_step_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from ml_core.data import CocoDetection, collate, load_coco
from ml_core.models import build_model
from ml_core.synth import SynthConfig, generate


def heavier_box_head(model: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    """The baseline: fasterrcnn_tiny's box head (64 RoIs per image, 1,024 features) on the same model."""
    inputs = model.backbone.out_channels * 7 * 7
    model.roi_heads.box_head = TwoMLPHead(inputs, 1024)
    model.roi_heads.box_predictor = FastRCNNPredictor(1024, num_classes)
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 64
    return model


def trainer(model: torch.nn.Module):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(batch):
        images, targets = batch
        loss = sum(model(list(images), list(targets)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per model (after 5 of warm-up)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, SynthConfig(kind="keypoints", image_size=args.size, labeled=60, unlabeled=1, val=1, seed=0))
        coco = load_coco(Path(tmp) / "labeled.json")
        ds = CocoDetection(coco, Path(tmp) / "labeled")
        batches = [collate([ds[(i * 4 + j) % len(ds)] for j in range(4)]) for i in range(args.steps + 5)]
    nk = coco.keypoint_schema().num_keypoints
    steps, seconds = {}, {"current": 0.0, "baseline": 0.0}
    for name in seconds:
        torch.manual_seed(0)
        model, _ = build_model("keypointrcnn_tiny", 2, nk, min_size=args.size, max_size=args.size)
        if name == "baseline":
            heavier_box_head(model, 2)
        steps[name] = trainer(model)
        for b in batches[:5]:
            steps[name](b)
    block = 5
    for start in range(5, len(batches), block):  # alternate blocks: load on the machine hits both alike
        for name in seconds:
            t = time.perf_counter()
            for b in batches[start:start + block]:
                steps[name](b)
            seconds[name] += time.perf_counter() - t
    rate = {name: round(args.steps / s, 2) for name, s in seconds.items()}
    report = {"threads": args.threads, "size": args.size, "batch": 4, "steps": args.steps,
              "machine": platform.processor() or platform.machine(), "cpus": torch.get_num_threads(),
              "steps_per_s": {"keypointrcnn_tiny (32 RoIs, 256 features)": rate["current"],
                              "baseline: fasterrcnn_tiny's box head (64 RoIs, 1,024 features)": rate["baseline"]},
              "speedup": round(rate["current"] / rate["baseline"], 2)}
    print(f"keypointrcnn_tiny training steps, batch 4 at {args.size} px, {args.threads} thread(s):")
    for name, r in report["steps_per_s"].items():
        print(f"  {name}: {r} steps/s")
    print(f"  x{report['speedup']} the baseline")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
