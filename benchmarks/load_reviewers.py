"""Concurrent reviewers against `distill serve` (the embedded setup: gunicorn, SQLite, Redis and a
worker), on loopback only.

1. A throwaway data directory is seeded (benchmarks/_seed.py) with a finished inference run of
   --images images x --per-image instances, statistics built.
2. `distill serve --no-demo` starts on a free loopback port with that data directory.
3. --reviewers threads (default 50), each with its own keep-alive connection, act like reviewers
   for --seconds (default 30, at most 60) or until --max-requests in all: a page of predictions
   (random page and ordering), threshold statistics (random threshold), a review (accept, reject
   or edit a random image), with --think seconds between actions (uniform 0.5x-1.5x; 0 = none).
4. Prints p50/p95/p99 per kind and overall, throughput and every error (status >= 400, a reset
   connection, a timeout), then checks that every review the server accepted is stored, once.

Run: python benchmarks/load_reviewers.py [--reviewers 50] [--seconds 30] [--think 1.0]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _seed import ROOT, django_setup, pct, seed_run  # noqa: E402

HOST = "127.0.0.1"


class Client:
    """One reviewer's keep-alive connection; reconnects after a failure (counted as an error)."""

    def __init__(self, port: int, token: str, timeout: float):
        self.port, self.timeout = port, timeout
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json",
                        "Connection": "keep-alive"}
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=self.headers)
            resp = self.conn.getresponse()
            return resp.status, resp.read()
        except Exception:
            self.conn.close()
            self.conn = None
            raise


def start_serve(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DISTILL_TASKS_EAGER", "REDIS_URL", "CELERY_BROKER_URL",
                                                             "CELERY_RESULT_BACKEND", "DATABASE_URL")}
    env.update(DISTILL_DATA_DIR=str(data_dir), DISTILL_PORT=str(port), DISTILL_HOST=HOST, DISTILL_DEVICE="cpu")
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "distill_app.cli", "serve", "--no-demo"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"distill serve exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        if "open http://" in log_path.read_text(errors="replace"):
            return proc
        time.sleep(0.5)
    stop_serve(proc)
    raise SystemExit(f"distill serve did not come up in 180 s:\n{log_path.read_text()[-3000:]}")


def stop_serve(proc: subprocess.Popen):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: serve stops its children
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def warm_up(port: int, token: str, run: dict, proc: subprocess.Popen, timeout: float = 180):
    """Measure the steady state: every web process has loaded the app and answered, and the
    worker has started (its start-up would compete for the CPU)."""
    from distill_app.models import WorkerHeartbeat
    deadline = time.monotonic() + timeout
    client = Client(port, token, 30)
    answered = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status, _ = client.request("GET", f"/api/inference-runs/{run['id']}/threshold-stats/?threshold=0.5")
            answered = answered + 1 if status == 200 else 0
        except Exception:  # noqa: BLE001
            answered = 0
        if answered >= 20 and WorkerHeartbeat.objects.exists():
            return
        time.sleep(0.1)
    raise SystemExit("distill serve did not warm up")


def reviewer(n: int, client: Client, run: dict, stop_at: float, budget: list, think: float, out: dict,
             lock: threading.Lock):
    rng = random.Random(n)
    pages = max(1, run["images"] // 50)
    if think:
        time.sleep(rng.uniform(0, think))  # reviewers do not all click in the same millisecond
    while time.monotonic() < stop_at:
        with lock:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        kind = rng.choices(["page", "stats", "review"], weights=[2, 1, 2])[0]
        if kind == "page":
            order = rng.choice(["-agreement", "agreement", "-max_score", "image"])
            path = f"/api/inference-runs/{run['id']}/predictions/?ordering={order}&page={rng.randint(1, pages)}&views=false"
            method, body = "GET", None
        elif kind == "stats":
            path = f"/api/inference-runs/{run['id']}/threshold-stats/?threshold={rng.uniform(0.05, 0.95):.3f}"
            method, body = "GET", None
        else:
            image = rng.choice(run["image_ids"])
            state = rng.choice(["accepted", "rejected", "edited"])
            body = {"run": run["id"], "image": image, "state": state}
            if state == "edited":
                body["instances"] = [{"bbox": [10, 10, 40, 40], "score": 1.0, "category_id": 1}]
            method, path = "POST", "/api/reviews/"
        t = time.perf_counter()
        try:
            status, _ = client.request(method, path, body)
            error = None if status < 400 else f"HTTP {status}"
        except Exception as e:  # noqa: BLE001 -- a reset or a timeout is what is being measured
            status, error = None, f"{e.__class__.__name__}: {e}"
        ms = (time.perf_counter() - t) * 1000
        with lock:
            out["latency"][kind].append(ms)
            if ms > 1000:
                out["slow"].append((round(time.monotonic() - out["start"] - ms / 1000, 1), kind, round(ms)))
            if error:
                out["errors"][f"{kind}: {error}"] += 1
            elif kind == "review":
                out["reviewed"].add(body["image"])
        if think:
            time.sleep(rng.uniform(0.5, 1.5) * think)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reviewers", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the reviewers work (at most 60)")
    ap.add_argument("--max-requests", type=int, default=20000, help="requests in all, at most")
    ap.add_argument("--think", type=float, default=1.0, help="mean seconds between a reviewer's actions")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--per-image", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as failed")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "load_reviewers.json"))
    args = ap.parse_args()
    seconds = min(args.seconds, 60.0)

    data_dir = Path(tempfile.mkdtemp(prefix="distill-load-"))
    proc = None
    try:
        django_setup(data_dir)
        user, run, seeded = seed_run(args.images, args.per_image, seed=1)
        from rest_framework.authtoken.models import Token

        from distill_app.models import Image, Review
        token = Token.objects.get_or_create(user=user)[0].key
        info = {"id": run.pk, "images": args.images,
                "image_ids": list(Image.objects.filter(dataset=run.dataset).values_list("id", flat=True))}
        from distill_app.services import free_port
        port = free_port()
        print(f"seeded {args.images} images x {args.per_image} instances in {seeded['seed_seconds']} s; "
              f"starting distill serve on {HOST}:{port}", flush=True)
        t0 = time.monotonic()
        proc = start_serve(data_dir, port, data_dir / "serve.log")
        warm_up(port, token, info, proc)
        print(f"serve ready in {time.monotonic() - t0:.1f} s; {args.reviewers} reviewers for {seconds:.0f} s "
              f"(think {args.think} s)", flush=True)

        out = {"latency": defaultdict(list), "errors": Counter(), "reviewed": set(), "slow": [],
               "start": time.monotonic()}
        lock, budget = threading.Lock(), [args.max_requests]
        stop_at = time.monotonic() + seconds
        threads = [threading.Thread(target=reviewer, args=(i, Client(port, token, args.timeout), info, stop_at, budget,
                                                            args.think, out, lock), daemon=True)
                   for i in range(args.reviewers)]
        started = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(seconds + args.timeout + 10)
        elapsed = time.monotonic() - started

        # every review the server accepted is stored, once per image
        stored = Review.objects.filter(run=run).values_list("image_id", flat=True)
        lost = out["reviewed"] - set(stored)
        duplicated = len(stored) - len(set(stored))

        everything = [ms for xs in out["latency"].values() for ms in xs]
        rows = {}
        for kind in ("page", "stats", "review"):
            xs = out["latency"].get(kind) or [0.0]
            rows[kind] = {"requests": len(out["latency"].get(kind, [])), "p50_ms": round(pct(xs, 50), 1),
                          "p95_ms": round(pct(xs, 95), 1), "p99_ms": round(pct(xs, 99), 1), "max_ms": round(max(xs), 1)}
        total = {"requests": len(everything), "p50_ms": round(pct(everything or [0], 50), 1),
                 "p95_ms": round(pct(everything or [0], 95), 1), "p99_ms": round(pct(everything or [0], 99), 1),
                 "max_ms": round(max(everything or [0]), 1), "per_second": round(len(everything) / elapsed, 1)}
        print(f"\n{'kind':<8}{'requests':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}")
        for kind, r in {**rows, "all": total}.items():
            print(f"{kind:<8}{r['requests']:>10}{r['p50_ms']:>10}{r['p95_ms']:>10}{r['p99_ms']:>10}{r['max_ms']:>10}")
        if out["slow"]:
            starts = Counter(int(t) for t, _, _ in out["slow"])
            print("requests slower than 1 s, by the second they started in: "
                  + ", ".join(f"{t} s: {n}" for t, n in sorted(starts.items())))
        print(f"\n{total['per_second']} requests/s over {elapsed:.1f} s; errors: {sum(out['errors'].values())}")
        for what, n in out["errors"].most_common():
            print(f"  {n} x {what}")
        print(f"reviews accepted by the server for {len(out['reviewed'])} images: {len(lost)} lost, "
              f"{duplicated} duplicated")
        result = {"reviewers": args.reviewers, "seconds": round(elapsed, 1), "think_seconds": args.think,
                  "images": args.images, "per_image": args.per_image, "by_kind": rows, "all": total,
                  "errors": dict(out["errors"]), "reviews_lost": len(lost), "reviews_duplicated": duplicated,
                  "cpus": os.cpu_count()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
        return 1 if out["errors"] or lost or duplicated else 0
    finally:
        if proc is not None:
            stop_serve(proc)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
