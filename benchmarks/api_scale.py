"""API latency on large runs, through HTTP against the served application (gunicorn started with
`distill serve`'s own command, a real Redis), on SQLite and on PostgreSQL (Debian's package, in a
temporary folder on loopback), at 2 million and 10 million predictions (100,000 / 500,000 images x 20
ensembled instances).

Per database and size:
  * GET /threshold-stats/ at random global and per-class thresholds (p50/p95),
  * GET /predictions/ one page of 100 images, least agreement first, at random pages (p50/p95), as
    the review screen asks for its grid (views=false&compact=1) and in full (every field),
  * the same requests in-process (the DRF test client, no HTTP, no gunicorn) for comparison,
  * baseline in the same run: threshold statistics computed the direct way, by decoding every
    prediction row (what the precomputed score arrays replace), once,
  * optionally (--export) the pseudo-label set of the whole run (the COCO export), once.
Seeding: numpy-generated rows, COPY on PostgreSQL, prepared executemany in big transactions on SQLite.

Each (database, size) runs in its own process (one Django setup per database) with its own data
folder under var/bench/api_scale/, removed afterwards. A configuration that runs past
--max-minutes is stopped and reported as such.

Run: python benchmarks/api_scale.py [--images 100000,500000] [--databases sqlite,postgresql]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _seed import ROOT, pct  # noqa: E402

PEERS = {
    "fiftyone_mongodb_count_above_threshold_2M_ms": 1750,
    "fiftyone_mongodb_score_histogram_2M_ms": 10700,
    "label_studio_page_p95_10k_tasks_ms": 400,
}
TARGET_MS = 50


def _requests(rng: random.Random, base: str, n: int, pages: int) -> tuple[list[str], list[str], list[str]]:
    stats = [f"{base}/threshold-stats/?threshold={rng.random():.3f}" for _ in range(n // 2)]
    stats += [f"{base}/threshold-stats/?threshold={rng.random():.3f}&thresholds=" +
              urllib.parse.quote(json.dumps({"2": round(rng.random(), 3)})) for _ in range(n - n // 2)]
    numbers = [rng.randint(1, pages) for _ in range(n)]
    # as the review screen asks for its grid (compact rows, no per-view predictions), and in full
    screen = [f"{base}/predictions/?page={k}&page_size=100&ordering=agreement&views=false&compact=1" for k in numbers]
    full = [f"{base}/predictions/?ordering=agreement&page_size=100&page={k}" for k in numbers]
    return stats, screen, full


def _summary(ms: list[float]) -> dict:
    return {"p50": round(pct(ms, 50), 1), "p95": round(pct(ms, 95), 1), "max": round(max(ms), 1), "n": len(ms)}


def one(db: str, images: int, per_image: int, n_requests: int, export: bool, out: Path, keep: bool):
    """One configuration, in this process."""
    from _services import Served, postgres_server, postgres_url

    from _seed import django_setup, seed_run_bulk
    data_dir = ROOT / "var" / "bench" / "api_scale" / f"{db}-{images}x{per_image}"
    shutil.rmtree(data_dir, ignore_errors=True)
    pg = postgres_server() if db == "postgresql" else None
    if db == "postgresql" and pg is None:
        out.write_text(json.dumps({"database": db, "images": images, "skipped": "PostgreSQL is not installed"}))
        return
    report: dict = {"database": db, "images": images, "per_image": per_image, "predictions": images * per_image}
    try:
        url = postgres_url(pg) if pg else None
        django_setup(data_dir, url)
        from django.db import connection
        from rest_framework.authtoken.models import Token
        from rest_framework.test import APIClient

        from distill_app.models import Job, Prediction, PseudoLabelSet
        if pg:
            with connection.cursor() as cur:
                cur.execute("SHOW server_version")
                report["server"] = f"PostgreSQL {cur.fetchone()[0].split()[0]}"
        else:
            import sqlite3
            report["server"] = f"SQLite {sqlite3.sqlite_version}"
        t = time.perf_counter()

        def progress(done):
            if done % 100_000 == 0 or done == images:
                print(f"    [{db} {images:,}] seeded {done:,} images, {time.perf_counter() - t:.0f} s", flush=True)
        user, run, info = seed_run_bulk(images, per_image, progress=progress)
        report.update(info)
        print(f"    [{db} {images:,}] seeded in {info['seed_seconds']} s, statistics built in "
              f"{info['stats_build_seconds']} s", flush=True)
        token = Token.objects.create(user=user).key
        rng = random.Random(1)
        base = f"/api/inference-runs/{run.pk}"
        stats_paths, page_paths, full_paths = _requests(rng, base, n_requests, images // 100)

        # In-process (the DRF stack without HTTP), for comparison with the served figures.
        client = APIClient()
        client.force_authenticate(user)

        cpu_ms: dict[str, list[float]] = {}

        def local_ms(path, key=None):
            t, c = time.perf_counter(), time.thread_time()
            r = client.get(path)
            assert r.status_code == 200, r.content[:300]
            if key:  # this process's own CPU time: what the request costs without the machine's other load
                cpu_ms.setdefault(key, []).append((time.thread_time() - c) * 1000)
            return (time.perf_counter() - t) * 1000
        local_ms(stats_paths[0])  # loads the arrays once per process
        local_ms(page_paths[0])
        gc.collect()
        gc.freeze()  # as each web process does once loaded (distill_app/wsgi.py)
        report["in_process"] = {"threshold_stats_ms": _summary([local_ms(p, "threshold_stats_ms") for p in stats_paths]),
                                "page_of_100_ms": _summary([local_ms(p, "page_of_100_ms") for p in page_paths]),
                                "full_page_of_100_ms": _summary([local_ms(p, "full_page_of_100_ms") for p in full_paths])}
        report["in_process_cpu"] = {k: _summary(v) for k, v in cpu_ms.items()}
        connection.close()

        # Served: gunicorn as `distill serve` runs it, over HTTP with a kept-alive connection.
        with Served(data_dir, url) as app:
            http = app.client(token)
            t = time.perf_counter()
            for i in range(12):  # new connections spread over every gunicorn worker: each loads the arrays once
                app.client(token).get_ms(stats_paths[i % len(stats_paths)])
                app.client(token).get_ms(page_paths[i % len(page_paths)])
            report["served_warm_up_seconds"] = round(time.perf_counter() - t, 2)
            report["served"] = {"threshold_stats_ms": _summary([http.get_ms(p) for p in stats_paths]),
                                "page_of_100_ms": _summary([http.get_ms(p) for p in page_paths]),
                                "full_page_of_100_ms": _summary([http.get_ms(p) for p in full_paths])}
            report["served"]["response_bytes"] = {
                "threshold_stats": len(http.request("GET", stats_paths[0])[1]),
                "page_of_100": len(http.request("GET", page_paths[0])[1]),
                "full_page_of_100": len(http.request("GET", full_paths[0])[1])}
            report["web"] = " ".join(app_cmd_summary())

        # Baseline: the same statistics by decoding every row per request.
        t = time.perf_counter()
        kept = images_with = 0
        for ens in Prediction.objects.filter(run=run).values_list("ensembled", flat=True).iterator(chunk_size=5000):
            k = sum(1 for d in ens if d["score"] >= 0.5)
            kept += k
            images_with += k > 0
        report["baseline_stats_by_decoding_rows_ms"] = round((time.perf_counter() - t) * 1000, 1)

        if export:
            from distill_app.selection_apply import write_pseudo_label_set
            job = Job.objects.create(project=run.project, owner=user, kind="pseudo_labels")
            pls = PseudoLabelSet.objects.create(project=run.project, run=run, thresholds={"default": 0.5}, job=job)
            t = time.perf_counter()
            report["exported"] = write_pseudo_label_set(pls)
            report["pseudo_label_export_seconds"] = round(time.perf_counter() - t, 2)
        connection.close()
    finally:
        if pg is not None:
            pg.stop()
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    out.write_text(json.dumps(report, indent=2))


def app_cmd_summary() -> list[str]:
    from distill_app.serve import web_command
    cmd = web_command("127.0.0.1", 0)
    return ["gunicorn"] + cmd[cmd.index("--workers"):cmd.index("--workers") + 6]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="100000,500000", help="comma-separated image counts")
    ap.add_argument("--per-image", type=int, default=20)
    ap.add_argument("--databases", default="sqlite,postgresql")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--export", action="store_true", help="also time the pseudo-label set of the whole run")
    ap.add_argument("--max-minutes", type=float, default=40, help="per configuration; stopped and reported beyond")
    ap.add_argument("--keep", action="store_true", help="keep the data folders")
    ap.add_argument("--json", default=str(ROOT / "var" / "bench" / "api_scale.json"))
    ap.add_argument("--one", nargs=2, metavar=("DATABASE", "IMAGES"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]), args.per_image, args.requests, args.export, Path(args.out), args.keep)
        return

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_implementation()} {platform.python_version()}"
    try:
        machine += f", load average {os.getloadavg()[0]:.1f} at start"
    except OSError:
        pass
    results = []
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    for images in [int(x) for x in args.images.split(",")]:
        for db in args.databases.split(","):
            out = Path(args.json).with_suffix(f".{db}-{images}.json")
            out.unlink(missing_ok=True)
            print(f"== {db}, {images:,} images x {args.per_image} = {images * args.per_image:,} predictions", flush=True)
            cmd = [sys.executable, __file__, "--one", db, str(images), "--per-image", str(args.per_image),
                   "--requests", str(args.requests), "--out", str(out)] + (["--export"] if args.export else []) + \
                (["--keep"] if args.keep else [])
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, start_new_session=True)
            try:
                rc = proc.wait(timeout=args.max_minutes * 60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                rc = "timeout"
            if out.exists():
                r = json.loads(out.read_text())
            else:
                r = {"database": db, "images": images, "predictions": images * args.per_image,
                     "not_finished": f"stopped after {args.max_minutes:g} minutes" if rc == "timeout"
                     else f"exited with status {rc}"}
            r["wall_seconds"] = round(time.perf_counter() - t, 1)
            results.append(r)
            Path(args.json).write_text(json.dumps({"machine": machine, "peers": PEERS, "results": results}, indent=2))
    print()
    print(f"API at scale, through HTTP against gunicorn ({machine})")
    for r in results:
        head = f"{r['database']:<10} {r['images']:>9,} images x {args.per_image} = {r['predictions']:>11,} predictions"
        if "served" not in r:
            print(f"{head}: NOT MEASURED ({r.get('not_finished') or r.get('skipped')})")
            continue
        s, lp = r["served"], r["in_process"]
        print(f"{head} ({r['server']}; seeded in {r['seed_seconds']} s, statistics built in {r['stats_build_seconds']} s)")
        for key, label in (("threshold_stats_ms", "threshold statistics   "), ("page_of_100_ms", "page of 100 (screen's)"),
                           ("full_page_of_100_ms", "page of 100 (full)    ")):
            ok = "ok" if s[key]["p95"] < TARGET_MS else "MISSED"
            print(f"    {label}  served p50 {s[key]['p50']:7.1f} ms  p95 {s[key]['p95']:7.1f} ms  [{ok}: p95 < {TARGET_MS} ms]"
                  f"   in-process p50 {lp[key]['p50']:6.1f}  p95 {lp[key]['p95']:6.1f} ms"
                  f"   (its CPU time p50 {r['in_process_cpu'][key]['p50']:5.1f}  p95 {r['in_process_cpu'][key]['p95']:5.1f} ms)")
        print(f"    baseline: statistics by decoding every row: {r['baseline_stats_by_decoding_rows_ms']:,.0f} ms per request")
        if "pseudo_label_export_seconds" in r:
            print(f"    pseudo-label set of the whole run: {r['pseudo_label_export_seconds']} s")
    print("Peers: FiftyOne on MongoDB, 2 million predictions: 1,750 ms to count detections above a threshold, "
          "10,700 ms for a score histogram; Label Studio: 400 ms p95 for a page at 10,000 tasks.")
    print(f"(JSON: {args.json})")


if __name__ == "__main__":
    main()
