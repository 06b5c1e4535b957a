"""Why a student does or does not beat its teacher: students varied one knob at a time.

Takes a finished `distillation_gain.py` run (its data, teacher and ensembled pseudo-labels) and
trains more students from the same teacher with the same schedule, changing one thing each:
  - threshold: a stricter score threshold (fewer, more precise pseudo-labels);
  - ratio: fewer pseudo-labeled images per minibatch (8:2 instead of 6:4);
  - init: fine-tune the teacher instead of retraining from its initialisation;
  - and, as the control for fine-tuning (which doubles the teacher's compute), the teacher
    trained the same number of iterations more on the labeled images alone.
With a run of the validation recipe (its report has "training"), each variant trains as the run's
students did: validation tracked, best weights kept, the same schedule rule and bound.
The teacher and the run's own students are evaluated again in the same run as the baselines;
variants already in the output JSON are kept unless named again with --variants.
Prints one AP table and the quality of each pseudo-label set against the hidden truth.

Run: python benchmarks/distillation_ablation.py [--run benchmarks/out/distillation_gain/cpu/seed0]
     [--task detection] [--threshold 0.97]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ml_core.checkpoint import read_checkpoint
from ml_core.engine import TrainConfig
from ml_core.evaluation import format_table
from ml_core.pipeline import evaluate, pseudo_label_quality, train, write_json
from ml_core.schema import KeypointSchema

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "benchmarks" / "out" / "distillation_gain" / "cpu" / "seed0"))
    ap.add_argument("--task", default="detection", choices=["detection", "keypoints"])
    ap.add_argument("--threshold", type=float, default=0.97, help="the stricter threshold to try")
    ap.add_argument("--variants", default="threshold,ratio,finetune,control",
                    help="which students to train (comma-separated)")
    args = ap.parse_args()
    data, run = Path(args.run) / f"data_{args.task}", Path(args.run) / f"run_{args.task}"
    report = json.loads((run / "report.json").read_text())
    key = "keypoints" if args.task == "keypoints" else "bbox"
    truth = json.loads((data / "unlabeled_gt.json").read_text())
    ensembled = json.loads((run / "pseudo_ensembled.json").read_text())
    if args.threshold <= report["thresholds"]["ensembled"]:
        raise SystemExit(f"--threshold must be above the run's automatic one ({report['thresholds']['ensembled']:.3f}): "
                         "the run's pseudo-label file holds only what that kept")
    strict = {**ensembled, "annotations": [a for a in ensembled["annotations"] if a["score"] >= args.threshold]}
    strict["images"] = [im for im in ensembled["images"] if any(a["image_id"] == im["id"] for a in strict["annotations"])]
    strict_path = write_json(run / f"pseudo_ensembled_{args.threshold}.json", strict)

    base = dict(report["student_config"])
    variants = {
        "threshold": (f"threshold {args.threshold} (auto {report['thresholds']['ensembled']:.3f})", strict_path, base,
                      "retrain"),
        "ratio": ("ratio 8:2 (6:4)", str(run / "pseudo_ensembled.json"), {**base, "ratio": "8:2"}, "retrain"),
        "finetune": ("fine-tuned from the teacher (instead of retrained)", str(run / "pseudo_ensembled.json"), base, "finetune"),
        "control": ("control: the teacher trained as long again, labeled only", None, base, "finetune"),
    }
    chosen = args.variants.split(",")
    unknown = set(chosen) - set(variants)
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(variants)}")
    teacher = str(run / "teacher.pt")
    meta = read_checkpoint(teacher)["meta"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"teacher": evaluate(teacher, str(data / "val.json"), str(data / "val"), device=device)[key],
               "student (ensembled), 6:4, retrained": evaluate(str(run / "student.pt"), str(data / "val.json"),
                                                                str(data / "val"), device=device)[key],
               "student (single view)": evaluate(str(run / "student_single.pt"), str(data / "val.json"),
                                                 str(data / "val"), device=device)[key]}
    out_path = Path(args.run) / f"ablation_{args.task}.json"
    earlier = json.loads(out_path.read_text())["ap"] if out_path.exists() else {}
    for key_, (name, pseudo, cfg, init) in variants.items():
        row = f"student, {name}" if pseudo else name
        if key_ not in chosen:
            if row in earlier:
                results[row] = earlier[row]
            continue
        ckpt = str(run / f"student_ablation_{key_}.pt")
        train(str(data / "labeled.json"), str(data / "labeled"), ckpt, arch=meta["arch"], config=TrainConfig.from_dict(cfg),
              pseudo_json=pseudo, pseudo_root=str(data / "unlabeled") if pseudo else None, teacher=teacher, init=init,
              role="student" if pseudo else "teacher", min_size=meta["min_size"], device=device, resume=False,
              **({"val_json": str(data / "val.json"), "val_root": str(data / "val")} if report.get("training") else {}))
        results[row] = evaluate(ckpt, str(data / "val.json"), str(data / "val"), device=device)[key]
    schema = KeypointSchema.from_dict(meta.get("keypoint_schema"))
    sigmas = schema.sigmas if schema else None
    quality = {f"auto ({report['thresholds']['ensembled']:.3f})": pseudo_label_quality(ensembled, truth, sigmas),
               f"{args.threshold}": pseudo_label_quality(strict, truth, sigmas)}
    print(f"\n{args.task}: {key} AP on {report['val_images']} validation images ({device}); one knob changed per student")
    print(format_table(results))
    print("ensembled pseudo-labels against the unlabeled split's truth:")
    print(format_table(quality, keys=tuple(k for k in ("instances", "precision", "recall", "bbox_AP", "keypoints_AP")
                                           if k in next(iter(quality.values())))))
    out = write_json(out_path, {"ap": results, "pseudo_label_quality": quality})
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
