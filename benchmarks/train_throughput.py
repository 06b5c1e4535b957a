"""Student-training throughput: does the data pipeline keep the model busy?

The same training steps (mixed labeled:pseudo batches, SGD, flips) once through ml_core.engine.fit
with images decoded from JPEG by DataLoader workers, once on batches already in memory as tensors.
Target: the pipeline reaches at least 90% of the in-memory images/s.

Presets: cpu (tiny backbone, 96 px, batch 8) and gpu (R50-FPN, 512 px, batch 16, fp16).
Run: python benchmarks/train_throughput.py --preset cpu
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from ml_core.data import CocoDetection, collate, load_coco
from ml_core.engine import Cancelled, Hook, TrainConfig, fit
from ml_core.models import build_model
from ml_core.synth import SynthConfig, generate
from ml_core.transforms import training_transform

# workers None: fit()'s default (none on the CPU, 2 on CUDA)
PRESETS = {"cpu": dict(arch="fasterrcnn_tiny", size=96, batch=8, iterations=30, workers=None),
           "gpu": dict(arch="fasterrcnn_resnet50_fpn", size=512, batch=16, iterations=60, workers=8)}


class Clock(Hook):
    """Images/s after a warm-up of 5 iterations; with a deadline (time.perf_counter() value), stops
    fit() once it has passed (by raising Cancelled)."""

    def __init__(self, deadline: float | None = None):
        self.t = None
        self.images = 0
        self.deadline = deadline

    def after_step(self, state):
        if state.iteration == 5:
            self.t, self.images = time.perf_counter(), 0
        elif self.t is not None:
            self.images += state.config.batch_size
            if self.deadline is not None and time.perf_counter() > self.deadline:
                raise Cancelled(f"time budget reached after {state.iteration} iterations")

    def rate(self):
        if self.t is None or not self.images:
            raise RuntimeError("no iteration after the warm-up of 5 was timed")
        return self.images / (time.perf_counter() - self.t)


def measure(p: dict, device: torch.device, max_seconds: float | None = None, data_dir: str | None = None) -> dict:
    """fit() with DataLoader workers against the same steps on a batch in memory.

    p is a preset (arch, size, batch, iterations, workers; optional images, default 64 labeled and
    64 pseudo). max_seconds caps each of the two measurements at half of it (after warm-up, at
    least one timed iteration); data_dir may hold the synthetic data already generated.
    """
    half = None if max_seconds is None else max_seconds / 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(data_dir) if data_dir and (Path(data_dir) / "labeled.json").is_file() else Path(tmp)
        if root == Path(tmp):
            n = p.get("images", 64)
            generate(tmp, SynthConfig(kind="detection", image_size=p["size"], labeled=n, unlabeled=n, val=1, seed=0))
        lab = load_coco(root / "labeled.json")
        pse = load_coco(root / "unlabeled_gt.json")
        tf = training_transform(None, "detection")
        lab_ds = CocoDetection(lab, root / "labeled", tf)
        pse_ds = CocoDetection(pse, root / "unlabeled", tf)
        cfg = TrainConfig(iterations=p["iterations"], batch_size=p["batch"], lr=0.01, warmup_iters=5, ratio="6:4",
                          num_workers=p["workers"], log_every=1000)
        torch.manual_seed(0)
        model, _ = build_model(p["arch"], 4, min_size=p["size"], max_size=p["size"])
        t0 = time.perf_counter()
        clock = Clock(None if half is None else t0 + half)
        try:
            fit(model, lab_ds, cfg, pseudo=pse_ds, hooks=[clock], device=device)
        except Cancelled:
            pass
        pipeline_rate = clock.rate()
        pipeline_images = clock.images

        # the same steps on tensors already in memory (and on the device): the ceiling
        torch.manual_seed(0)
        model, _ = build_model(p["arch"], 4, min_size=p["size"], max_size=p["size"])
        model.to(device).train()
        batch = collate([lab_ds[i % len(lab_ds)] for i in range(p["batch"])])
        images = [im.to(device) for im in batch[0]]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in batch[1]]
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
        n, t = 0, None
        deadline = None if half is None else time.perf_counter() + half
        for it in range(p["iterations"]):
            if it == 5:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t, n = time.perf_counter(), 0
            with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                loss = sum(model(images, targets).values())
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            scaler.step(opt)
            scaler.update()
            n += p["batch"] if it >= 5 else 0
            if deadline is not None and n and time.perf_counter() > deadline:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        if not n:
            raise RuntimeError("no in-memory iteration after the warm-up of 5 was timed")
        memory_rate = n / (time.perf_counter() - t)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"device": name, **p, "pipeline_images_per_s": round(pipeline_rate, 2),
            "in_memory_images_per_s": round(memory_rate, 2), "ratio": round(pipeline_rate / memory_rate, 3),
            "timed_images": {"pipeline": pipeline_images, "in_memory": n}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    if args.workers is not None:
        p["workers"] = args.workers
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"preset": args.preset, **measure(p, device)}
    name, pipeline_rate, memory_rate = report["device"], report["pipeline_images_per_s"], report["in_memory_images_per_s"]
    print(f"student training, {p['arch']} at {p['size']} px, batch {p['batch']} (6:4), on {name}")
    workers = p["workers"] if p["workers"] is not None else f"default: {2 if device.type == 'cuda' else 0}"
    print(f"  fit() with DataLoader ({workers} workers): {pipeline_rate:7.2f} images/s")
    print(f"  same steps, batch in memory:          {memory_rate:7.2f} images/s")
    print(f"  pipeline / in-memory: {report['ratio']:.0%} (target >= 90%)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
