"""Each model's validation curve in a distillation_gain.py log, read two ways.

- best: the highest evaluation, which is what the best checkpoint keeps and what the benchmark's
  table reports. At the base rate a small model's AP can move by several points from one
  evaluation to the next, so this is the largest of a handful of noisy readings.
- settled: the mean of the evaluations after the rate's first decay (lr below the base rate),
  where the curve has stopped swinging: the level the model trains to, not its luckiest reading.

Run: python benchmarks/curve_summary.py benchmarks/results/<run>.log [...]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict

LINE = re.compile(r"^\[(?P<label>[^\]]+)\] (?P<it>\d+)/(?P<bound>\d+) val AP (?P<ap>[-\d.]+) \(best (?P<best>[-\d.]+)\) "
                  r"lr (?P<lr>[-\d.e]+)")


def curves(path: str) -> dict[str, list[tuple[int, float, float, float]]]:
    """label -> [(iteration, AP, best so far, lr)] in the order logged."""
    out: dict[str, list[tuple[int, float, float, float]]] = defaultdict(list)
    with open(path) as f:
        for line in f:
            m = LINE.match(line.strip())
            if m:
                out[m["label"]].append((int(m["it"]), float(m["ap"]), float(m["best"]), float(m["lr"])))
    return dict(out)


def summary(points: list[tuple[int, float, float, float]]) -> dict:
    """The kept best (an evaluation counts as better only by engine's min_delta, so it is the
    logged best, not always the largest reading) and the settled level."""
    base = max(p[3] for p in points)
    best = points[-1][2]
    best_at = next(it for it, ap, _, _ in points if ap == best)
    settled = [ap for _, ap, _, lr in points if lr < base * 0.5]
    return {"best": best, "best_at": best_at, "settled": round(statistics.fmean(settled), 2) if settled else None,
            "settled_n": len(settled), "evaluations": len(points)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    result = {path: {label: summary(pts) for label, pts in curves(path).items()} for path in args.logs}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for path, models in result.items():
        print(path)
        print(f"  {'model':<48} {'best':>6} {'at':>6} {'settled':>8} {'n':>3}")
        for label, s in models.items():
            settled = f"{s['settled']:.2f}" if s["settled"] is not None else "-"
            print(f"  {label:<48} {s['best']:>6.2f} {s['best_at']:>6} {settled:>8} {s['settled_n']:>3}")


if __name__ == "__main__":
    main()
