"""The experiment that shows data distillation works, on seeded synthetic data.

For detection and keypoints: a teacher on the labeled split, trained until its validation AP
converges (plateau schedule, best weights kept); a student on single-view pseudo-labels; a student
on multi-transform ensembled pseudo-labels (both at the paper's automatic threshold); the control
(the teacher continued on labels alone for the student's iterations); optionally an oracle student
on the unlabeled split's true labels and further rounds. Students retrain from the teacher's
initialisation, mixing labeled:pseudo 6:4, with the same validation rule and a bound sized to
their data (engine.default_iterations). A gain counts against the better of teacher and control.

Presets:
  cpu: tiny backbones, 96 px images, 60 labeled / 200 unlabeled / 60 val (240 for keypoints), batch 4
  gpu: ResNet-50 FPN models, 512 px images, 500 labeled / 4000 unlabeled / 500 val, batch 16
Run: python benchmarks/distillation_gain.py --preset cpu [--tasks detection,keypoints] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ml_core.engine import Hook, TrainConfig
from ml_core.evaluation import format_table
from ml_core.pipeline import ROUND_TEACHERS, PipelineOptions, run_pipeline
from ml_core.synth import SynthConfig, generate
from ml_core.transforms import TransformSet

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "cpu": {"size": 96, "labeled": 60, "unlabeled": 200, "val": {"detection": 60, "keypoints": 240}, "iterations": None, "student": None, "batch": 4,
            "scales": [64, 96, 128, 160], "arch": {"detection": "fasterrcnn_tiny", "keypoints": "keypointrcnn_tiny"}},
    "gpu": {"size": 512, "labeled": 500, "unlabeled": 4000, "val": {"detection": 500, "keypoints": 500}, "iterations": None, "student": None, "batch": 16,
            "scales": [400, 500, 600, 700, 800], "arch": {"detection": "fasterrcnn_resnet50_fpn",
                                                          "keypoints": "keypointrcnn_resnet50_fpn"}},
}


class ValidationLog(Hook):
    """One line per validation, so a long run shows where each model stands."""

    def __init__(self, label: str):
        self.label, self.seen = label, 0

    def after_step(self, state):
        if len(state.val_history) > self.seen:
            self.seen = len(state.val_history)
            v, best = state.val_history[-1], state.best or {}
            print(f"[{self.label}] {state.iteration}/{state.config.iterations} val AP {v['AP']:.2f} "
                  f"(best {best.get('AP', v['AP']):.2f}) lr {v.get('lr', 0):.4g} {time.strftime('%H:%M:%S')}",
                  flush=True)

    def after_train(self, state):
        print(f"[{self.label}] done at {state.iteration}/{state.config.iterations}: {state.stopped or 'bound'}",
              flush=True)


def run_task(task: str, p: dict, out: Path, seed: int, oracle: bool = True, rounds: int = 1,
             device: str | None = None, round_teacher: str = "auto") -> dict:
    data = out / f"data_{task}"
    generate(data, SynthConfig(kind=task, image_size=p["size"], labeled=p["labeled"], unlabeled=p["unlabeled"],
                               val=p["val"][task], seed=seed))
    # a checkpoint every 500 iterations: a run stopped (a session's end, a killed process) continues
    # from there when started again on the same --out, and every model that finished stands
    teacher_cfg = TrainConfig(batch_size=p["batch"], lr=0.02, warmup_iters=50, seed=seed,
                              checkpoint_every=500)
    student_cfg = TrainConfig(batch_size=p["batch"], lr=0.02, warmup_iters=50, ratio="6:4", seed=seed,
                              checkpoint_every=500)
    t = time.time()
    r = run_pipeline(PipelineOptions(data=str(data), out=str(out / f"run_{task}"), arch=p["arch"][task],
                                     transforms=TransformSet(p["scales"], flip=True), teacher_config=teacher_cfg,
                                     student_config=student_cfg, threshold="auto", baselines=True,
                                     min_size=p["size"], teacher_iterations=p["iterations"],
                                     student_iterations=p["student"], oracle=oracle, rounds=rounds, device=device,
                                     round_teacher=round_teacher),
                     hooks_for=lambda name: [ValidationLog(f"{task} seed {seed} {name}")])
    return task_result(task, r, minutes=round((time.time() - t) / 60, 1))


def task_result(task: str, r: dict, minutes: float | None = None) -> dict:
    key = "keypoints" if task == "keypoints" else "bbox"
    return {"metric": key, "ap": {k: v[key] for k, v in r["results"].items()}, "thresholds": r["thresholds"],
            "pseudo_label_quality": r["pseudo_label_quality"], "val_images": r["val_images"], "minutes": minutes,
            "training": {k: {f: t[f] for f in ("iterations", "bound", "best", "stopped")}
                         for k, t in r.get("training", {}).items()}}


def gain_line(table: dict) -> str:
    """The student against the better of teacher and control (the issue's honest comparison)."""
    base = max(("teacher", "control (teacher + labels only)"), key=lambda k: table.get(k, {}).get("AP", -1))
    s = table.get("student (ensembled)", {}).get("AP")
    if s is None or base not in table:
        return ""
    line = f"ensembled student vs {base}: {s - table[base]['AP']:+.2f} AP"
    if "student (single view)" in table:
        line += f"; vs single-view student: {s - table['student (single view)']['AP']:+.2f} AP"
    return line


def finished_run(task: str, out: Path, seed: int) -> dict | None:
    """A run of an earlier invocation, from the report run_pipeline wrote when it finished."""
    path = out / f"seed{seed}" / f"run_{task}" / "report.json"
    return task_result(task, json.loads(path.read_text())) if path.is_file() else None


def mean_table(runs: list[dict], field: str) -> dict:
    rows = runs[0][field]
    return {name: {k: round(sum(r[field][name][k] for r in runs) / len(runs), 2) for k in rows[name]} for name in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tasks", default="detection,keypoints")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "distillation_gain"))
    ap.add_argument("--seeds", default="0", help="comma-separated; each seed generates its own data and "
                                                 "initialisation, and the tables show the mean")
    ap.add_argument("--oracle", action="store_true", help="also train the oracle student (true labels)")
    ap.add_argument("--rounds", type=int, default=1, help="distillation rounds (each student teaches the next)")
    ap.add_argument("--round-teacher", choices=ROUND_TEACHERS, default="auto",
                    help="who labels for round 2 on: the previous student alone, with the model that taught it, "
                         "or auto: whichever labels the validation images better")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available); the preset's "
                                                   "schedule bounds follow the device (engine.default_iterations)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of this process (default: torch's choice); several seeds run side by side "
                         "with one thread each get more done on a small CPU than one after another")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: print the tables of the runs already finished under --out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p = PRESETS[args.preset]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out) / args.preset
    report = {"preset": args.preset, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "seeds": seeds, "tasks": {}}
    for task in args.tasks.split(","):
        if args.report_only:
            found = {seed: finished_run(task, out, seed) for seed in seeds}
            task_seeds = [seed for seed, r in found.items() if r is not None]
            runs = [found[seed] for seed in task_seeds]
            if not runs:
                print(f"\n{task}: no finished run under {out}")
                continue
        else:
            task_seeds = seeds
            runs = [run_task(task, p, out / f"seed{seed}", seed, args.oracle, args.rounds, args.device,
                             args.round_teacher) for seed in seeds]
        key = runs[0]["metric"]
        table, quality = mean_table(runs, "ap"), mean_table(runs, "pseudo_label_quality")
        minutes = [r["minutes"] for r in runs if r["minutes"] is not None]
        report["tasks"][task] = {"metric": key, "ap": table, "pseudo_label_quality": quality, "seeds": task_seeds,
                                 "per_seed": dict(zip(map(str, task_seeds), runs)),
                                 "minutes": round(sum(minutes), 1) if minutes else None}
        mean = f"mean of seeds {', '.join(map(str, task_seeds))}" if len(runs) > 1 else f"seed {task_seeds[0]}"
        print(f"\n{task}: {key} AP on {runs[0]['val_images']} validation images ({args.preset} preset, "
              f"{report['device']}, {mean})")
        print(format_table(table))
        if len(runs) > 1:
            for name in table:
                print(f"  {name}: " + ", ".join(f"{r['ap'][name]['AP']:.2f}" for r in runs))
        print(gain_line(table))
        for seed, r in zip(task_seeds, runs):
            for name, t in r.get("training", {}).items():
                if t.get("best"):
                    print(f"  seed {seed} {name}: {t['iterations']}/{t['bound']} iterations, best val AP "
                          f"{t['best']['AP']:.2f} at {t['best']['iteration']}; {t['stopped']}")
        print("pseudo-labels against the unlabeled split's truth (precision/recall at IoU 0.5, AP of the kept set):")
        print(format_table(quality, keys=tuple(k for k in ("precision", "recall", "bbox_AP", "keypoints_AP")
                                               if k in next(iter(quality.values())))))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out / 'report.json'}")


if __name__ == "__main__":
    main()
