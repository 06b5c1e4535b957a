"""Review-screen speed in real Chromium, measured by the browser's own clock.

Input: a seeded run of 10,000 images x 20 ensembled instances (embedded setup), opened at
3840x2160 so that about 200 images are on screen. Measures
  * slider -> finished redraw of every visible overlay and of the statistics (performance.now()
    from the input event to the end of the redraw frame), p50/p95 over 200 movements;
  * frames per second while scrolling through all 10,000 images;
Baseline in the same run: the same slider movement answered by the server (a fetch of
/threshold-stats/ per movement), which is what the in-browser statistics avoid.

Run: python benchmarks/review_ui.py [--images 10000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _seed import ROOT, django_setup, seed_run  # noqa: E402


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--per-image", type=int, default=20)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "review_ui.json"))
    args = ap.parse_args()
    data_dir = ROOT / "benchmarks" / "out" / "review_ui_data"
    shutil.rmtree(data_dir, ignore_errors=True)
    django_setup(data_dir)
    print(f"seeding {args.images:,} images x {args.per_image} instances ...", flush=True)
    user, run, _ = seed_run(args.images, args.per_image, with_views=True)
    from distill_app.services import free_port, stop_process, wait_for_port
    port = free_port()
    env = {**os.environ, "DISTILL_DATA_DIR": str(data_dir)}
    web = subprocess.Popen([sys.executable, "-m", "django", "runserver", "--noreload", f"127.0.0.1:{port}"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, 30, proc=web)
        report = drive(args, port, run.pk)
    finally:
        stop_process(web)
    report["machine"] = f"{platform.machine()}, Chromium headless (software rendering), 2 CPU cores"
    print(f"review screen, {args.images:,} images x {args.per_image} instances, {report['tiles_on_screen']} images on screen")
    print(f"  slider -> redraw (in browser)   p50 {report['slider_ms']['p50']:6.2f} ms  p95 {report['slider_ms']['p95']:6.2f} ms  (target p95 < 16 ms)")
    print(f"  baseline: server round trip     p50 {report['round_trip_ms']['p50']:6.2f} ms  p95 {report['round_trip_ms']['p95']:6.2f} ms")
    print(f"  scrolling through all images    {report['scroll_fps']:.1f} frames/s (p95 frame {report['scroll_frame_p95_ms']:.1f} ms)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))


def drive(args, port, run_id):
    from playwright.sync_api import sync_playwright
    base = f"http://127.0.0.1:{port}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-sync",
            "--disable-component-update", "--disable-dev-shm-usage"])
        page = browser.new_context(viewport={"width": 3840, "height": 2160}).new_page()
        page.goto(base + "/login/")
        page.fill("input[name=username]", "bench")
        page.fill("input[name=password]", "bench-password")
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        page.goto(f"{base}/runs/{run_id}/review/")
        page.wait_for_selector("#review[data-ready='1']", timeout=120000)
        page.wait_for_function("document.querySelectorAll('.tile').length > 150", timeout=120000)
        page.wait_for_timeout(1500)
        tiles = page.evaluate("document.querySelectorAll('.tile').length")
        slider = page.evaluate("""async () => {
            const el = document.getElementById('threshold');
            window.__distillTimings.length = 0;
            for (let i = 0; i < 200; i++) {
              el.value = ((i * 37) % 1000) / 1000;
              el.dispatchEvent(new Event('input'));
              await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
            }
            return window.__distillTimings.slice();
        }""")
        round_trip = page.evaluate(f"""async () => {{
            const out = [];
            for (let i = 0; i < 40; i++) {{
              const t = performance.now();
              const r = await fetch('/api/inference-runs/{run_id}/threshold-stats/?threshold=' + (i / 40));
              await r.json();
              out.push(performance.now() - t);
            }}
            return out;
        }}""")
        frames = page.evaluate("""async () => {
            const g = document.getElementById('grid');
            const total = g.scrollHeight - g.clientHeight;
            const frames = [];
            let last = performance.now();
            const t0 = last;
            while (g.scrollTop < total - 1 && performance.now() - t0 < 20000) {
              g.scrollTop = Math.min(total, g.scrollTop + 600);
              g.dispatchEvent(new Event('scroll'));
              await new Promise((r) => requestAnimationFrame(r));
              const now = performance.now();
              frames.push(now - last);
              last = now;
            }
            return {frames, reached: g.scrollTop / total};
        }""")
        browser.close()
    ft = frames["frames"]
    return {"tiles_on_screen": tiles, "images": args.images,
            "slider_ms": {"p50": round(pct(slider, 50), 2), "p95": round(pct(slider, 95), 2), "n": len(slider)},
            "round_trip_ms": {"p50": round(pct(round_trip, 50), 2), "p95": round(pct(round_trip, 95), 2)},
            "scroll_fps": round(1000 / (sum(ft) / len(ft)), 1), "scroll_frame_p95_ms": round(pct(ft, 95), 1),
            "scrolled_fraction": round(frames["reached"], 3)}


if __name__ == "__main__":
    main()
