"""API latency on a large run, embedded setup (SQLite): 100,000 images x 20 ensembled instances.

Measures, through the real DRF stack (test client, token-less forced auth):
  * GET /threshold-stats/ at random global and per-class thresholds (p50/p95),
  * GET /predictions/ one page of 100 images, least agreement first, at random pages (p50/p95),
  * creation of a pseudo-label set over the whole run (the COCO export), once.
Baseline in the same run: threshold statistics computed the direct way, by decoding every
prediction row per request (what the precomputed score arrays replace).

Run: python benchmarks/api_scale.py [--images 100000] [--per-image 20]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _seed import ROOT, django_setup, pct, seed_run  # noqa: E402



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--per-image", type=int, default=20)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "api_scale.json"))
    args = ap.parse_args()
    data_dir = ROOT / "benchmarks" / "out" / "api_scale_data"
    shutil.rmtree(data_dir, ignore_errors=True)
    django_setup(data_dir)
    from rest_framework.test import APIClient

    from distill_app.models import Job, Prediction, PseudoLabelSet
    from distill_app.selection_apply import write_pseudo_label_set

    print(f"seeding {args.images:,} images x {args.per_image} instances ...", flush=True)
    user, run, seed_info = seed_run(args.images, args.per_image)
    client = APIClient()
    client.force_authenticate(user)
    rng = random.Random(1)

    def timed(path):
        t = time.perf_counter()
        r = client.get(path)
        assert r.status_code == 200, r.content[:300]
        return (time.perf_counter() - t) * 1000

    base = f"/api/inference-runs/{run.pk}"
    timed(f"{base}/threshold-stats/?threshold=0.5")  # loads the arrays once (then cached per process)
    stats_ms = [timed(f"{base}/threshold-stats/?threshold={rng.random():.3f}") for _ in range(args.requests // 2)]
    stats_ms += [timed(f"{base}/threshold-stats/?threshold={rng.random():.3f}&thresholds=" +
                       json.dumps({"2": round(rng.random(), 3)})) for _ in range(args.requests // 2)]
    pages = args.images // 100
    page_ms = [timed(f"{base}/predictions/?ordering=agreement&page_size=100&page={rng.randint(1, pages)}")
               for _ in range(args.requests)]

    # Baseline: the same statistics by decoding every row per request.
    t = time.perf_counter()
    kept = images_with = 0
    for ens in Prediction.objects.filter(run=run).values_list("ensembled", flat=True).iterator(chunk_size=5000):
        k = sum(1 for d in ens if d["score"] >= 0.5)
        kept += k
        images_with += k > 0
    naive_ms = (time.perf_counter() - t) * 1000

    job = Job.objects.create(project=run.project, owner=user, kind="pseudo_labels")
    pls = PseudoLabelSet.objects.create(project=run.project, run=run, thresholds={"default": 0.5}, job=job)
    t = time.perf_counter()
    counts = write_pseudo_label_set(pls)
    export_s = time.perf_counter() - t

    report = {
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}, SQLite",
        "images": args.images, "instances": args.images * args.per_image, **seed_info,
        "threshold_stats_ms": {"p50": round(pct(stats_ms, 50), 1), "p95": round(pct(stats_ms, 95), 1)},
        "page_of_100_ms": {"p50": round(pct(page_ms, 50), 1), "p95": round(pct(page_ms, 95), 1)},
        "baseline_stats_by_decoding_rows_ms": round(naive_ms, 1),
        "pseudo_label_export_seconds": round(export_s, 2), "exported": counts,
    }
    print(f"{args.images:,} images x {args.per_image} = {args.images * args.per_image:,} predictions ({report['machine']})")
    print(f"  threshold statistics  p50 {report['threshold_stats_ms']['p50']:7.1f} ms   p95 {report['threshold_stats_ms']['p95']:7.1f} ms   (target p95 < 100 ms)")
    print(f"  page of 100 images    p50 {report['page_of_100_ms']['p50']:7.1f} ms   p95 {report['page_of_100_ms']['p95']:7.1f} ms   (target p95 < 100 ms)")
    print(f"  baseline: statistics by decoding every row: {naive_ms:,.0f} ms per request")
    print(f"  pseudo-label set of the whole run: {export_s:.1f} s (target < 30 s), {counts['instances']:,} instances kept")
    print(f"  (seeding {seed_info['seed_seconds']} s, statistics arrays built in {seed_info['stats_build_seconds']} s)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
