"""`distill` command line: synth, train, infer, select, evaluate, pipeline.

Every long step draws a progress bar. Run `distill COMMAND --help` for the options of each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

EPILOG = """A first run on the CPU, about five minutes:
  distill synth data/det --kind detection
  distill pipeline --data data/det --arch fasterrcnn_tiny --out runs/det
"""


class BarHook:
    """Training progress as a tqdm bar with the current loss."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def before_train(self, state):
        self.bar = tqdm(total=state.config.iterations, initial=state.iteration, desc=self.desc, unit="it")

    def after_step(self, state):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{state.losses.get('loss', 0):.3f}")

    def after_train(self, state):
        self.bar.close()


def _bar(desc: str, unit: str = "img"):
    bar = tqdm(desc=desc, unit=unit)

    def update(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
    return update


def _add_train_options(p: argparse.ArgumentParser):
    p.add_argument("--arch", default="fasterrcnn_resnet18_fpn", help="model architecture (see `distill models`)")
    p.add_argument("--iterations", type=_iterations, default="auto",
                   help="minibatches to train for at most; 'auto' sizes the bound from the data and the device")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.02, help="base learning rate")
    p.add_argument("--schedule", default="auto", choices=["auto", "steps", "plateau"],
                   help="steps: x0.1 at 70%% and 90%%; plateau: x0.1 when validation AP stops improving, then stop "
                        "(auto, with a validation set: the first decay at 70%%, the plateau rule after it)")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N iterations (0: about 10%% of the time)")
    p.add_argument("--patience", type=int, default=4, help="evaluations without a new best before the rate drops")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up iterations")
    p.add_argument("--ratio", default="6:4", help="labeled:pseudo images per minibatch (student only)")
    p.add_argument("--min-size", type=int, default=None, help="the model's shorter side (default: the data's median)")
    p.add_argument("--train-scales", type=_fractions, default=None,
                   help="shorter sides while training, as fractions of --min-size, e.g. 0.8,0.9,1 (default: "
                        "Detectron's 0.8-1.0 in six steps for keypoint models, 1 for box models)")
    p.add_argument("--weights", default=None, help="initial weights file (torchvision COCO/ImageNet or ours)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading processes for training (default: none on the CPU, 2 on CUDA) and "
                        "image-decoding threads for inference (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions separated by commas, got {text!r}") from None


def _iterations(text: str):
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of iterations or 'auto', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("iterations must be at least 1")
    return n


def _train_config(args, iterations: int | None = None, **over):
    """iterations=None leaves the bound to be sized from the data (pipeline._sized)."""
    from .engine import TrainConfig
    n = iterations or 1000
    return TrainConfig(iterations=n, batch_size=args.batch_size, lr=args.lr, ratio=args.ratio,
                       warmup_iters=args.warmup if iterations is None else min(args.warmup, max(1, n // 4)),
                       num_workers=args.workers, seed=args.seed, schedule=args.schedule, eval_every=args.eval_every,
                       patience=args.patience, train_scales=args.train_scales,
                       checkpoint_every=0 if iterations is None else max(50, n // 10), **over)


def cmd_models(args):
    from .models import ARCHITECTURES
    for a in ARCHITECTURES.values():
        print(f"{a.name:<36} {a.task:<10} {a.description}")


def cmd_synth(args):
    from .synth import SynthConfig, generate
    cfg = SynthConfig(kind=args.kind, image_size=args.size, labeled=args.labeled, unlabeled=args.unlabeled,
                      val=args.val, seed=args.seed)
    paths = generate(args.out, cfg, progress=_bar("synth"))
    for k, v in paths.items():
        print(f"{k:<13} {v}")


def _init_distributed(device: str | None) -> str | None:
    """Under torchrun (WORLD_SIZE > 1): join the process group, one GPU per process (gloo on
    the CPU). fit() then wraps the model in DistributedDataParallel and gives every rank its own
    batches; rank 0 writes the checkpoint."""
    import torch
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    use_cuda = torch.cuda.is_available() and device != "cpu"
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def cmd_train(args):
    from . import pipeline
    from .data import load_coco
    from .engine import default_iterations
    args.device = _init_distributed(args.device)
    iterations = args.iterations
    if iterations is None:
        n = len(load_coco(args.labeled).images) + (len(load_coco(args.pseudo).images) if args.pseudo else 0)
        iterations = default_iterations(n, args.batch_size, args.device or pipeline.default_device())
    cfg = _train_config(args, iterations)
    state = pipeline.train(args.labeled, args.images or str(Path(args.labeled).with_suffix("")), args.out,
                           arch=args.arch, config=cfg, pseudo_json=args.pseudo,
                           pseudo_root=args.pseudo_images or (str(Path(args.pseudo).parent / "unlabeled") if args.pseudo else None),
                           teacher=args.teacher, init=args.init, weights=args.weights, min_size=args.min_size,
                           role="student" if args.pseudo else "teacher", device=args.device,
                           hooks=[BarHook("train")] if os.environ.get("RANK", "0") == "0" else [],
                           skip_invalid=args.skip_invalid, flip=not args.no_flip, val_json=args.val,
                           val_root=args.val_images or (str(Path(args.val).with_suffix("")) if args.val else None))
    import torch
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank:
            return
    if state.already_trained:
        print(f"{args.out} already holds this training, finished with these settings after {state.iteration} "
              "iterations: kept as it is (delete it, or change a setting, to train again)")
    else:
        print(f"saved {args.out} after {state.iteration} iterations, final loss {state.losses.get('loss', float('nan')):.4f}")
    if state.best:
        print(f"validation AP: best {state.best['AP']:.2f} at iteration {state.best['iteration']} (saved); {state.stopped}")


def cmd_infer(args):
    from . import pipeline
    from .transforms import TransformSet
    from .tta import EnsembleOptions
    doc = pipeline.load_unlabeled(args.images_json)
    root = Path(args.images or Path(args.images_json).with_suffix(""))
    ts = TransformSet.parse(args.scales, flip=not args.no_flip, max_size=args.max_size)
    opts = EnsembleOptions(method=args.method, vote_thresh=args.vote_thresh, vote_scoring=args.vote_scoring,
                           heatmap_method=args.heatmap_method, keypoint_size_dependence=args.keypoint_size_dependence,
                           keypoint_area_thresh=args.keypoint_area, keypoint_scales=args.keypoint_scales,
                           union=args.union)
    results, errors, per_view = [], [], []
    paths = [str(root / im["file_name"]) for im in doc["images"]]
    for i, pred, err in pipeline.infer(args.checkpoint, paths, transforms=ts, options=opts, device=args.device,
                                       group_size=args.group_size, num_workers=args.workers,
                                       compile_backbone=args.compile_backbone, extra_checkpoints=args.extra,
                                       progress=_bar(f"infer x{len(ts.views) * (1 + len(args.extra))} views")):
        image_id = doc["images"][i]["id"]
        if err:
            errors.append(err)
            continue
        results += [{**d, "image_id": image_id} for d in pred["ensembled"]]
        for view, items in pred["views"].items():
            per_view += [{**d, "image_id": image_id, "view": view} for d in items]
    pipeline.write_json(args.out, results)
    if args.views_out:
        pipeline.write_json(args.views_out, per_view)
    print(f"{len(results)} ensembled instances on {len(paths) - len(errors)} images -> {args.out}")
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)


def cmd_select(args):
    from . import pipeline, selection
    from .data import load_coco
    doc = pipeline.load_unlabeled(args.images_json)
    results = json.loads(Path(args.predictions).read_text())
    by_image: dict[int, list] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    if args.threshold == "auto":
        if not args.labeled:
            raise ValueError("--threshold auto needs --labeled (annotated instances per labeled image)")
        target = pipeline.annotated_per_image(load_coco(args.labeled))
        t = selection.auto_threshold([r["score"] for r in results], len(doc["images"]), target)
        print(f"automatic threshold {t:.3f} (target {target:.2f} instances per image)")
    else:
        t = selection.check_threshold(args.threshold)
    kept = selection.select(results, t)
    kt = None
    if any("keypoint_scores" in d for d in kept):
        if args.keypoint_threshold == "auto" and not args.labeled:
            raise ValueError("--keypoint-threshold auto needs --labeled (the share of keypoints it annotates)")
        fraction = pipeline.labeled_keypoint_fraction(load_coco(args.labeled)) if args.labeled else None
        kt = selection.keypoint_threshold_for(args.keypoint_threshold, [s for d in kept for s in d["keypoint_scores"]],
                                              fraction)
        if kt is not None:
            print(f"keypoints scored below {kt:.3f} left unlabeled")
    out = pipeline.pseudo_label_doc(doc, by_image, t, doc["categories"], keypoint_threshold=kt)
    pipeline.write_json(args.out, out)
    print(f"{len(out['annotations'])} pseudo-labels on {len(out['images'])} images -> {args.out}")


def cmd_evaluate(args):
    from . import pipeline
    from .evaluation import format_table
    root = args.images or str(Path(args.val).with_suffix(""))
    if args.scales:
        from .transforms import TransformSet
        ts = TransformSet.parse(args.scales, flip=not args.no_flip, max_size=args.max_size)
        by_view = pipeline.evaluate_views(args.checkpoint, args.val, root, transforms=ts, device=args.device,
                                          progress=_bar(f"evaluate x{len(ts.views)} views"))
        if args.json:
            print(json.dumps(by_view, indent=2))
            return
        for kind in by_view["ensembled"]:
            print(f"[{kind}]")
            print(format_table({name: s[kind] for name, s in by_view.items()}))
        return
    stats = pipeline.evaluate(args.checkpoint, args.val, root, device=args.device, progress=_bar("evaluate"))
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for kind, s in stats.items():
            print(f"[{kind}]")
            print(format_table({Path(args.checkpoint).stem: s}, keys=tuple(s)[:6]))


def cmd_pipeline(args):
    from .pipeline import PipelineOptions, run_pipeline
    from .evaluation import format_table
    from .transforms import TransformSet
    from .tta import EnsembleOptions
    opts = PipelineOptions(data=args.data, out=args.out, arch=args.arch, transforms=TransformSet.parse(args.scales),
                           teacher_config=_train_config(args, args.iterations),
                           student_config=_train_config(args, args.student_iterations),
                           teacher_iterations=args.iterations, student_iterations=args.student_iterations,
                           threshold=args.threshold, init=args.init, device=args.device, min_size=args.min_size,
                           baselines=args.baselines, num_workers=2 if args.workers is None else args.workers,
                           validation=not args.no_validation,
                           control=not args.no_control, rounds=args.rounds, keypoint_threshold=args.keypoint_threshold,
                           round_teacher=args.round_teacher, options=EnsembleOptions(keypoint_scales=args.keypoint_scales))
    report = run_pipeline(opts, hooks_for=lambda name: [BarHook(name)], progress_for=lambda name: _bar(name))
    key = "keypoints" if "keypoints" in next(iter(report["results"].values())) else "bbox"
    print(f"\n{key} AP on the validation split ({report['val_images']} images):")
    print(format_table({k: v[key] for k, v in report["results"].items()}))
    for name, t in report["training"].items():
        if t["best"]:
            print(f"{name}: {t['iterations']} iterations, best validation AP {t['best']['AP']:.2f} at "
                  f"{t['best']['iteration']}; {t['stopped']}")
    print(f"pseudo-label threshold {report['threshold']:.3f}; report: {report['report_path']}")


def _keypoint_threshold(v: str):
    if v in ("auto", "none"):
        return None if v == "none" else v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or a heatmap score, got {v!r}") from None


def _add_keypoint_threshold(s):
    s.add_argument("--keypoint-threshold", type=_keypoint_threshold, default="auto", metavar="auto|none|T",
                   help="keypoints: leave those scored below T unlabeled (no training loss); auto: as many per "
                        "instance as the labeled set annotates; none: keep every keypoint (default auto)")


def _add_keypoint_scales(s):
    s.add_argument("--keypoint-scales", default="auto", metavar="auto|all|S,S",
                   help="keypoints: the views whose heatmaps vote (the boxes come from every view); auto: those "
                        "at or below the model's own test size; all; or scales among --scales (default auto)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Data distillation: teacher -> multi-transform "
                                "pseudo-labels -> student, on COCO-format data.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("models", help="list the architectures")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("synth", help="write a synthetic COCO dataset (labeled, unlabeled, val)")
    s.add_argument("out", help="output folder")
    s.add_argument("--kind", default="detection", choices=["detection", "keypoints"])
    s.add_argument("--size", type=int, default=96, help="image side in pixels")
    s.add_argument("--labeled", type=int, default=60)
    s.add_argument("--unlabeled", type=int, default=200)
    s.add_argument("--val", type=int, default=60)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("train", help="train a teacher, or a student with --pseudo")
    s.add_argument("labeled", help="labeled COCO JSON")
    s.add_argument("--images", help="labeled image folder (default: the JSON's name without .json)")
    s.add_argument("--pseudo", help="pseudo-label COCO JSON (trains a student)")
    s.add_argument("--pseudo-images", help="unlabeled image folder")
    s.add_argument("--teacher", help="teacher checkpoint (student: its initialisation, or --init finetune)")
    s.add_argument("--init", default="retrain", choices=["retrain", "finetune"])
    s.add_argument("--skip-invalid", action="store_true", help="skip bad COCO entries and report them")
    s.add_argument("--out", required=True, help="checkpoint to write (continued if it exists; kept as it is if it "
                   "finished with the same settings)")
    s.add_argument("--val", help="validation COCO JSON: track AP, keep the best weights, stop on a plateau")
    s.add_argument("--val-images", help="validation image folder (default: the JSON's name without .json)")
    _add_train_options(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("infer", help="multi-transform inference and ensembling over unlabeled images")
    s.add_argument("checkpoint")
    s.add_argument("images_json", help="COCO JSON listing the unlabeled images")
    s.add_argument("--with", dest="extra", action="append", default=[], metavar="CHECKPOINT",
                   help="another model whose views join the ensemble (model ensembling, e.g. a student with the "
                        "model that taught it; repeatable)")
    s.add_argument("--images", help="image folder (default: the JSON's name without .json)")
    s.add_argument("--scales", default="400,600,800,1000", help="shorter sides, comma-separated")
    s.add_argument("--no-flip", action="store_true")
    s.add_argument("--max-size", type=int, default=4000)
    s.add_argument("--method", default="nms_vote", choices=["nms_vote", "nms", "wbf"])
    s.add_argument("--vote-thresh", type=float, default=0.8)
    s.add_argument("--vote-scoring", default="id", choices=["id", "avg", "iou_avg"])
    s.add_argument("--heatmap-method", default="mean", choices=["mean", "max"])
    s.add_argument("--union", default="auto", choices=["auto", "post_nms", "pre_nms"],
                   help="which boxes of each view are ensembled: its NMS'd detections, or every box above the "
                        "score threshold before NMS (Detectron's union; boxes only); auto: pre_nms for box "
                        "models, post_nms for keypoint models")
    _add_keypoint_scales(s)
    s.add_argument("--keypoint-size-dependence", action="store_true",
                   help="keypoints: small boxes ignore down-scaled views, large ones up-scaled views")
    s.add_argument("--keypoint-area", type=float, default=150.0 ** 2, metavar="PX2",
                   help="box area (original pixels) that separates small from large (default 150^2)")
    s.add_argument("--group-size", type=int, default=4, help="images per batched group")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--device", default=None)
    s.add_argument("--compile-backbone", action="store_true",
                   help="CUDA: torch.compile the backbone: x2.1 on the backbone of R50-FPN on an H100, after "
                        "8-15 s of compiling per input shape; for many images of few sizes")
    s.add_argument("--out", required=True, help="COCO results JSON of the ensembled predictions")
    s.add_argument("--views-out", help="also write every single view's predictions here")
    s.set_defaults(func=cmd_infer)

    s = sub.add_parser("select", help="keep predictions above a threshold as pseudo-labels")
    s.add_argument("predictions", help="COCO results JSON from `distill infer`")
    s.add_argument("images_json", help="the unlabeled images' COCO JSON")
    s.add_argument("--threshold", default="auto", help="a score in [0, 1], or 'auto' (the paper's rule)")
    s.add_argument("--labeled", help="labeled COCO JSON (for --threshold auto and --keypoint-threshold auto)")
    _add_keypoint_threshold(s)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_select)

    s = sub.add_parser("evaluate", help="COCO AP of a checkpoint on a labeled split")
    s.add_argument("checkpoint")
    s.add_argument("val", help="validation COCO JSON")
    s.add_argument("--images")
    s.add_argument("--scales", help="evaluate multi-transform: these shorter sides (comma-separated), ensembled "
                                    "and each view alone (default: one view at the model's size)")
    s.add_argument("--no-flip", action="store_true", help="with --scales: no flipped views")
    s.add_argument("--max-size", type=int, default=4000)
    s.add_argument("--device", default=None)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("pipeline", help="teacher, inference, selection, student, evaluation in one go")
    s.add_argument("--data", required=True, help="folder written by `distill synth` (or with the same layout)")
    s.add_argument("--out", required=True, help="folder for checkpoints, predictions and the report")
    s.add_argument("--scales", default="64,96,128,160", help="inference shorter sides, comma-separated")
    s.add_argument("--threshold", default="auto")
    s.add_argument("--init", default="retrain", choices=["retrain", "finetune"])
    s.add_argument("--student-iterations", type=_iterations, default="auto",
                   help="student bound ('auto': sized from labeled + pseudo-labeled images)")
    s.add_argument("--baselines", action="store_true", help="also train single-view and oracle students")
    s.add_argument("--no-validation", action="store_true", help="no validation tracking (fixed step schedule)")
    s.add_argument("--no-control", action="store_true",
                   help="skip the control (the teacher trained on labels alone for the student's iterations)")
    s.add_argument("--rounds", type=int, default=1, help="each round's student teaches the next round")
    s.add_argument("--round-teacher", choices=("auto", "ensemble", "student"), default="auto",
                   help="who labels for round 2 on: the previous student alone, ensembled with the model that taught "
                        "it, or auto (default): whichever labels the validation images better")
    _add_keypoint_scales(s)
    _add_keypoint_threshold(s)
    _add_train_options(s)
    s.set_defaults(func=cmd_pipeline)
    return p


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"distill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
