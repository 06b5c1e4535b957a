"""Bytes of one page of 200 predictions as the review grid asks for it: the full objects
(`views=false`) against the compact rows the grid draws (`views=false&compact=1`), on a seeded run
(N images x K ensembled instances, 4 views). No model involved.

    .venv/bin/python benchmarks/review_page_size.py [--per-image 20]
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _seed import ROOT, django_setup, seed_run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--per-image", type=int, default=20)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "review_page_size.json"))
    args = ap.parse_args()
    django_setup(Path(tempfile.mkdtemp(prefix="distill-pagesize-")))
    from rest_framework.test import APIClient
    user, run, _ = seed_run(args.images, args.per_image, with_views=True)
    c = APIClient()
    c.force_authenticate(user)
    out = {"images": args.images, "per_image": args.per_image}
    for name, q in (("full", "views=false"), ("compact", "views=false&compact=1")):
        r = c.get(f"/api/inference-runs/{run.pk}/predictions/?page_size=200&ordering=agreement&{q}")
        assert r.status_code == 200, r.content[:200]
        body = r.content
        out[name] = {"bytes": len(body), "gzip_bytes": len(gzip.compress(body)), "results": len(json.loads(body)["results"])}
    out["reduction"] = round(1 - out["compact"]["bytes"] / out["full"]["bytes"], 3)
    print(json.dumps(out, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
