"""Inference throughput through the application, against ml_core's own rate, in the same run.

The application: the served app (gunicorn, as `distill serve` starts it), a real Celery worker on a
real Redis, SQLite (or --database postgresql: Debian's PostgreSQL in a temporary folder). Images
and the checkpoint go in over HTTP; the measured time runs from the POST that creates the
inference run to the moment its job has finished: every prediction stored and the run's
threshold statistics computed (the finaliser). The worker is started and ready beforehand.

The engine: ml_core.pipeline.infer on the same image files, the same checkpoint, transforms,
ensembling options and device, timed from the call (model load included, as in a worker's first
chunk) to the last prediction, with its default DataLoader workers and with none (as the worker
calls it); measured before and after the application's run, the faster of all is the reference.

Where the application's time goes is read from the worker's log (each task's received and
succeeded times): waiting for the worker, the chunks, the gaps between them, the finaliser.

Presets (weights random, nothing is downloaded; random weights keep 100 boxes per view, the
heaviest case for ensembling):
  cpu: fasterrcnn_tiny, 96x96 images, scales 64/96 with flips, 96 images, chunks of 64
  gpu: fasterrcnn_resnet50_fpn, 512x512 images, scales 400/600/800 with flips, 256 images, chunks of 64
Run: python benchmarks/app_throughput.py --preset cpu        (target: the app >= 90% of ml_core's rate)
     python benchmarks/app_throughput.py --preset gpu --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _seed import ROOT  # noqa: E402

PRESETS = {
    "cpu": dict(arch="fasterrcnn_tiny", size=96, scales=[64, 96], images=96, chunk_size=64, max_size=200),
    "gpu": dict(arch="fasterrcnn_resnet50_fpn", size=512, scales=[400, 600, 800], images=256, chunk_size=64,
                max_size=1400),
}
CATEGORIES = [{"id": 1, "name": "disc"}, {"id": 2, "name": "block"}, {"id": 3, "name": "triangle"}]
TARGET = 0.90


def make_inputs(folder: Path, n: int, size: int, arch: str, scales: list[int], max_size: int) -> tuple[list[Path], Path]:
    from ml_core.checkpoint import model_meta, save_checkpoint
    from ml_core.models import build_model
    from ml_core.synth import SynthConfig, generate
    generate(folder / "synth", SynthConfig(kind="detection", image_size=size, labeled=1, unlabeled=n, val=1, seed=3))
    paths = sorted((folder / "synth" / "unlabeled").glob("*.jpg"))
    import torch
    torch.manual_seed(0)
    model, _ = build_model(arch, len(CATEGORIES) + 1, min_size=min(scales), max_size=max_size)
    ckpt = folder / "teacher.pt"
    save_checkpoint(ckpt, model, model_meta(arch, CATEGORIES, None, min(scales), max_size, role="teacher"))
    return paths, ckpt


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process of a process group (the worker and its pool child)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def own_cpu_seconds() -> float:
    import resource
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def engine_seconds(ckpt: Path, paths: list[Path], scales, max_size, device: str, num_workers: int) -> tuple[float, float, int]:
    from ml_core import pipeline
    from ml_core.transforms import TransformSet
    from ml_core.tta import EnsembleOptions
    ts = TransformSet(scales=list(scales), flip=True, max_size=max_size)
    t, cpu = time.perf_counter(), own_cpu_seconds()
    n = 0
    for _i, pred, err in pipeline.infer(str(ckpt), [str(p) for p in paths], transforms=ts,
                                        options=EnsembleOptions.from_dict({}), device=device,
                                        num_workers=num_workers):
        assert pred is not None, err
        n += 1
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()
    return time.perf_counter() - t, own_cpu_seconds() - cpu, n


LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[^\]]*\] Task ([\w.]+)\[([\w-]+)\] (received|succeeded in ([\d.]+)s)")


def worker_timeline(log: Path) -> list[dict]:
    """Celery's INFO lines: every task's received time and its own run time."""
    tasks: dict[str, dict] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if not m:
            continue
        when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        t = tasks.setdefault(m.group(3), {"task": m.group(2).rsplit(".", 1)[-1]})
        if m.group(4) == "received":
            t["received"] = when
        else:
            t["succeeded"] = when
            t["seconds"] = float(m.group(5))
    return sorted((t for t in tasks.values() if "received" in t), key=lambda t: t["received"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int)
    ap.add_argument("--chunk-size", type=int)
    ap.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--keep", action="store_true", help="keep the data folder")
    ap.add_argument("--json", default=str(ROOT / "var" / "bench" / "app_throughput.json"))
    args = ap.parse_args()
    cfg = dict(PRESETS[args.preset])
    if args.images:
        cfg["images"] = args.images
    if args.chunk_size:
        cfg["chunk_size"] = args.chunk_size
    work = ROOT / "var" / "bench" / "app_throughput" / f"{args.preset}-{args.database}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pg = None
    from _services import Served, postgres_server, postgres_url
    try:
        if args.database == "postgresql":
            pg = postgres_server()
            if pg is None:
                raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
        url = postgres_url(pg) if pg else None
        paths, ckpt = make_inputs(work / "inputs", cfg["images"], cfg["size"], cfg["arch"], cfg["scales"], cfg["max_size"])
        print(f"{len(paths)} images {cfg['size']}x{cfg['size']}, {cfg['arch']}, scales {cfg['scales']} with flips, "
              f"device {args.device}", flush=True)

        engine, engine_cpu = {}, {}

        def run_engine(tag):
            for nw in (2, 0):
                s, cpu, n = engine_seconds(ckpt, paths, cfg["scales"], cfg["max_size"], args.device, nw)
                engine.setdefault(f"num_workers={nw}", []).append(round(s, 3))
                engine_cpu.setdefault(f"num_workers={nw}", []).append(round(cpu, 3))
                print(f"  ml_core pipeline.infer ({tag}, num_workers={nw}): {s:.2f} s, {n / s:.2f} images/s, "
                      f"{cpu:.1f} CPU s", flush=True)
        run_engine("before")

        # The application's database, a user and its token (not timed).
        from _seed import django_setup
        data = work / "data"
        django_setup(data, url)
        from django.contrib.auth import get_user_model
        from django.db import connection
        from rest_framework.authtoken.models import Token
        user = get_user_model().objects.create_user("bench", password="bench-password-123")
        token = Token.objects.create(user=user).key
        connection.close()

        with Served(data, url, with_worker=True, extra_env={"DISTILL_DEVICE": args.device}) as app:
            app.wait_worker_ready()
            c = app.client(token)
            p = c.ok("POST", "/api/projects/", {"name": "throughput", "task": "detection"})
            ds = c.ok("POST", "/api/datasets/", {"project": p["id"], "name": "unlabeled", "role": "unlabeled"})
            for i in range(0, len(paths), 50):
                up = c.ok("POST", f"/api/datasets/{ds['id']}/upload/",
                          files=[("files", (q.name, q.read_bytes())) for q in paths[i:i + 50]])
                assert up["counts"]["accepted"] == len(paths[i:i + 50]), up["counts"]
            m = c.ok("POST", "/api/models/upload/", files=[("file", ("teacher.pt", ckpt.read_bytes()))],
                     fields={"project": p["id"], "role": "teacher", "name": "teacher"})
            body = {"project": p["id"], "checkpoint": m["id"], "dataset": ds["id"], "chunk_size": cfg["chunk_size"],
                    "transforms": {"scales": cfg["scales"], "flip": True, "max_size": cfg["max_size"]}}
            worker_pgid = app.procs[-1].pid
            cpu0 = group_cpu_seconds(worker_pgid)
            t0 = time.time()
            run = c.ok("POST", "/api/inference-runs/", body)
            t_created = time.time()
            while True:
                time.sleep(0.25)
                r = c.ok("GET", f"/api/inference-runs/{run['id']}/")
                if r["job"]["state"] in ("succeeded", "failed", "cancelled"):
                    break
            t_seen = time.time()
            app_cpu = group_cpu_seconds(worker_pgid) - cpu0
            assert r["job"]["state"] == "succeeded", r["job"]
            finished = datetime.fromisoformat(r["job"]["finished"].replace("Z", "+00:00")).timestamp()
            app_seconds = finished - t0
            stats = c.ok("GET", f"/api/inference-runs/{run['id']}/threshold-stats/?threshold=0.5")
            assert stats["images"] == len(paths), stats["images"]
            preds = c.ok("GET", f"/api/inference-runs/{run['id']}/predictions/?page_size=500&views=false")
            assert preds["count"] == len(paths)
            timeline = worker_timeline(app.worker_log)
        run_engine("after")

        # the reference: the faster way of calling ml_core (mean of its runs before and after)
        ref_key, ref_s = min(((k, sum(v) / len(v)) for k, v in engine.items()), key=lambda kv: kv[1])
        best_s = min(min(v) for v in engine.values())
        ref_cpu = sum(engine_cpu[ref_key]) / len(engine_cpu[ref_key])
        n = len(paths)
        ratio = (n / app_seconds) / (n / ref_s)
        chunks = [t for t in timeline if t["task"] == "infer_chunk"]
        final = [t for t in timeline if t["task"] == "finalize_inference"]
        breakdown = {}
        if chunks and final and "seconds" in final[-1]:
            breakdown = {
                "request_to_first_chunk_received_s": round(chunks[0]["received"] - t0, 3),
                "chunks_run_s": round(sum(t.get("seconds", 0) for t in chunks), 3),
                "per_chunk_s": [t.get("seconds") for t in chunks],
                "finaliser_run_s": final[-1]["seconds"],
                "other_s (queue gaps, job bookkeeping, clock rounding)": round(
                    app_seconds - (chunks[0]["received"] - t0) - sum(t.get("seconds", 0) for t in chunks)
                    - final[-1]["seconds"], 3),
            }
        report = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end",
            "device": args.device, "database": args.database, "preset": args.preset, **cfg,
            "engine_seconds": engine, "engine_reference": f"{ref_key}, {ref_s:.3f} s, {n / ref_s:.2f} images/s",
            "app_seconds_request_to_finished": round(app_seconds, 3),
            "app_images_per_second": round(n / app_seconds, 3),
            "engine_images_per_second": round(n / ref_s, 3),
            "app_over_engine": round(ratio, 3), "target": TARGET,
            "app_over_engine_best_run": round(best_s / app_seconds, 3),
            "cpu_seconds": {"app_worker": round(app_cpu, 2), "engine": engine_cpu,
                            "engine_over_app": round(ref_cpu / app_cpu, 3) if app_cpu else None},
            "post_request_seconds": round(t_created - t0, 3), "poll_overshoot_s": round(t_seen - finished, 3),
            "breakdown": breakdown,
        }
        print(f"through the application: {n} images in {app_seconds:.2f} s = {n / app_seconds:.2f} images/s "
              f"(request -> last prediction stored and statistics computed)")
        print(f"ml_core alone:           {ref_s:.2f} s = {n / ref_s:.2f} images/s ({ref_key}, mean of its runs "
              f"before and after; best single run {best_s:.2f} s)")
        print(f"application / engine:    {ratio:.1%}  [{'ok' if ratio >= TARGET else 'MISSED'}: >= {TARGET:.0%}]"
              f"   (against the best single engine run: {best_s / app_seconds:.1%})")
        print(f"CPU seconds (robust to the machine's other load): worker {app_cpu:.1f} s, ml_core {ref_cpu:.1f} s "
              f"-> {ref_cpu / app_cpu if app_cpu else float('nan'):.1%}")
        for k, v in breakdown.items():
            print(f"    {k}: {v}")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"(JSON: {args.json})")
    finally:
        if pg is not None:
            pg.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
