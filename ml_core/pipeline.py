"""The four steps of data distillation as plain functions over files: train a teacher, run it on
every view of the unlabeled images, select pseudo-labels, train and evaluate a student.

The CLI and the web application's Celery tasks both call these; nothing here knows about either.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from . import selection
from .checkpoint import load_model, load_state, model_meta, read_checkpoint
from .data import CocoData, CocoDetection, load_coco, load_image, validate_coco
from .engine import Hook, TrainConfig, TrainState, default_train_scales, fit
from .evaluation import COCOEvaluator, NamedEvaluator
from .models import build_model, get_arch
from .schema import KeypointSchema
from .transforms import TransformSet, training_transform
from .tta import EnsembleOptions, MultiTransformPredictor, run_inference

ProgressFn = Callable[[int, int], None]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def task_of(data: CocoData) -> str:
    return "keypoints" if data.keypoint_schema() is not None else "detection"


def _with_annotations(data: CocoData) -> CocoData:
    """Detectron trains only on images that have at least one instance."""
    used = {a["image_id"] for a in data.annotations}
    return CocoData([im for im in data.images if im["id"] in used], data.annotations, data.categories, data.skipped)


def _digest(path: str | None) -> str | None:
    """sha256 of a file the training reads (a checkpoint says what it was trained from)."""
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _median_side(data: CocoData) -> int:
    return int(statistics.median(min(im["width"], im["height"]) for im in data.images)) if data.images else 800


def train(labeled_json: str, labeled_root: str, out_path: str, *, arch: str, config: TrainConfig,
          pseudo_json: str | None = None, pseudo_root: str | None = None, teacher: str | None = None,
          init: str = "retrain", weights: str | None = None, min_size: int | None = None, max_size: int | None = None,
          role: str = "teacher", hooks: Iterable[Hook] = (), device: str | None = None, skip_invalid: bool = False,
          flip: bool = True, resume: bool = True, val_json: str | None = None, val_root: str | None = None) -> TrainState:
    """Train a teacher (labeled only) or a student (labeled + pseudo-labels) and save a checkpoint.

    A student is retrained from the teacher's own initialisation (same weights file, or the same
    random seed) unless init='finetune', which starts from the teacher's trained weights. With a
    validation set, COCO AP is tracked during training, the best weights are saved, and the
    plateau schedule stops once AP has converged (engine.fit).
    """
    if init not in ("retrain", "finetune"):
        raise ValueError(f"unknown student init {init!r}; choose one of: retrain, finetune")
    device = device or default_device()
    labeled = load_coco(labeled_json, skip_invalid=skip_invalid)
    schema = labeled.keypoint_schema()
    task = task_of(labeled)
    a = get_arch(arch)
    if a.task != task:
        raise ValueError(f"{arch} is a {a.task} architecture but the labeled data is a {task} dataset")
    if config.train_scales is None:
        config = replace(config, train_scales=default_train_scales(task))
    flip_inds = schema.flip_indices() if (schema and flip) else None
    transform = training_transform(flip_inds, task, flip)
    min_size = min_size or _median_side(labeled)
    max_size = max_size or max(min_size, int(min_size * 1333 / 800))
    teacher_meta = None
    if teacher:
        teacher_meta = read_checkpoint(teacher)["meta"]
        if teacher_meta["arch"] != arch and init == "finetune":
            raise ValueError("fine-tuning needs the teacher's architecture")
        weights = weights or teacher_meta.get("init_weights")
        config.seed = teacher_meta.get("config", {}).get("seed", config.seed)
    torch.manual_seed(config.seed)
    model, init_desc = build_model(arch, len(labeled.categories) + 1, schema.num_keypoints if schema else 0,
                                   min_size, max_size, weights_path=weights)
    if teacher and init == "finetune":
        load_state(model, read_checkpoint(teacher), os.path.basename(teacher))
        init_desc = f"fine-tuned from teacher {os.path.basename(teacher)}"
    label_of = labeled.label_of()
    lab_ds = CocoDetection(_with_annotations(labeled), labeled_root, transform, label_of)
    pse_ds = None
    if pseudo_json:
        pseudo = load_coco(pseudo_json, skip_invalid=skip_invalid)
        if [c["id"] for c in pseudo.categories] != labeled.cat_ids:
            raise ValueError("pseudo-labels must use the labeled set's categories")
        pse_ds = CocoDetection(_with_annotations(pseudo), pseudo_root, transform, label_of)
        if len(pse_ds) == 0:
            raise ValueError("the pseudo-label set has no image with a kept instance; lower the threshold")
    meta = model_meta(arch, labeled.categories, schema, min_size, max_size, role=role, task=task,
                      init=init_desc, init_weights=weights, config=config.to_dict(),
                      student_init=init if role == "student" else None,
                      data={"labeled_images": len(lab_ds), "pseudo_images": len(pse_ds) if pse_ds else 0},
                      inputs={"labeled": _digest(labeled_json), "pseudo": _digest(pseudo_json),
                              "teacher": _digest(teacher), "weights": _digest(weights), "validation": _digest(val_json)})
    validate = validator(val_json, val_root, labeled.categories, schema, device) if val_json else None
    return fit(model, lab_ds, config, pseudo=pse_ds, hooks=list(hooks), device=device, checkpoint_path=out_path,
               meta=meta, resume=resume, validate=validate)


def validator(val_json: str, val_root: str, categories: list[dict], schema: KeypointSchema | None, device: str):
    """model -> COCO AP on the validation set (box AP, or OKS keypoint AP for keypoint models),
    single view at the model's own size: what training tracks to find its best weights."""
    val = load_coco(val_json)
    if [c["id"] for c in val.categories] != [c["id"] for c in categories]:
        raise ValueError("the validation set's categories differ from the labeled set's")
    if not val.images:
        raise ValueError("the validation set has no images")
    paths = [str(Path(val_root) / im["file_name"]) for im in val.images]
    gt, metric = val.to_dict(), ("keypoints" if schema else "bbox")

    def validate(model) -> float:
        ev = COCOEvaluator(gt, metric, schema.sigmas if schema else None)
        preds = predict_single_view(model, {"categories": categories}, paths, device=device)
        for im, p in zip(val.images, preds):
            ev.process(im["id"], p)
        return ev.evaluate()["AP"]
    return validate


def predictor_for(checkpoint: str, transforms: TransformSet, options: EnsembleOptions | None = None,
                  device: str | None = None, amp: bool = True, compile_backbone: bool = False,
                  extra_checkpoints: Sequence[str] = ()):
    """The checkpoint's model over every view; with extra_checkpoints, their models' views join the
    same ensemble (they must predict the same categories and keypoints)."""
    device = device or default_device()
    model, meta = load_model(checkpoint, device)
    extras = []
    for path in extra_checkpoints:
        m, other = load_model(path, device)
        if other["arch"] != meta["arch"] or other["categories"] != meta["categories"] or \
                other.get("keypoint_schema") != meta.get("keypoint_schema"):
            raise ValueError(f"{os.path.basename(str(path))} predicts other categories, keypoints or architecture "
                             f"than {os.path.basename(str(checkpoint))}: an ensemble needs the same")
        extras.append(m)
    schema = KeypointSchema.from_dict(meta.get("keypoint_schema"))
    flip_inds = schema.flip_indices() if (schema and transforms.flip) else None
    for m in [model] + extras:
        m.roi_heads.score_thresh = min(m.roi_heads.score_thresh, (options or EnsembleOptions()).score_thresh)
    return MultiTransformPredictor(model, transforms, flip_inds=flip_inds, options=options, device=device, amp=amp,
                                   compile_backbone=compile_backbone, extra_models=extras), meta


def _with_categories(items: list[dict], categories: list[dict]) -> list[dict]:
    for d in items:
        d["category_id"] = categories[d["label"] - 1]["id"]
    return items


def infer(checkpoint: str, image_paths: list[str], *, transforms: TransformSet, options: EnsembleOptions | None = None,
          device: str | None = None, group_size: int = 4, num_workers: int = 2, progress: ProgressFn | None = None,
          predictor=None, compile_backbone: bool = False, extra_checkpoints: Sequence[str] = ()):
    """Multi-transform inference over files. Yields (index, prediction json | None, error | None).

    A prediction json holds 'ensembled' and 'views' (each a list of instances with bbox, score,
    label, category_id and keypoints for keypoint models) and the 'agreement' between views.
    extra_checkpoints: models whose views join the ensemble (model ensembling; predictor_for).
    """
    if predictor is None:
        predictor, meta = predictor_for(checkpoint, transforms, options, device, compile_backbone=compile_backbone,
                                        extra_checkpoints=extra_checkpoints)
    else:
        meta = read_checkpoint(checkpoint)["meta"]
    cats = meta["categories"]
    for i, pred, err in run_inference(predictor, image_paths, group_size=group_size, num_workers=num_workers,
                                      progress=progress):
        if pred is None:
            yield i, None, err
            continue
        j = pred.to_json()
        _with_categories(j["ensembled"], cats)
        for v in j["views"].values():
            _with_categories(v, cats)
        yield i, j, None


def pseudo_label_doc(unlabeled: dict, predictions: dict[int, list[dict]], thresholds: float | dict,
                     categories: list[dict], keep_empty: bool = False, keypoint_threshold: float | None = None) -> dict:
    """A COCO document of pseudo-labels: the instances at or above threshold, scores kept.

    predictions maps image id -> ensembled instances (with category_id and label). With a
    keypoint_threshold, keypoints scored below it are left unlabeled (v = 0): no training loss.
    """
    anns = []
    images = []
    for im in unlabeled["images"]:
        kept = selection.select(predictions.get(im["id"], []), thresholds)
        if not kept and not keep_empty:
            continue
        images.append(im)
        for d in kept:
            a = {"id": len(anns) + 1, "image_id": im["id"], "category_id": d["category_id"], "bbox": d["bbox"],
                 "score": d["score"], "area": round(d["bbox"][2] * d["bbox"][3], 2), "iscrowd": 0}
            if "keypoints" in d:
                a["keypoints"] = selection.hide_keypoints(d["keypoints"], d.get("keypoint_scores"), keypoint_threshold)
                a["num_keypoints"] = sum(1 for v in a["keypoints"][2::3] if v > 0)
            anns.append(a)
    return {"images": images, "annotations": anns, "categories": categories}


def _xyxy(b: list[float]) -> list[float]:
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def pseudo_label_quality(pseudo: dict, truth: dict, sigmas: list[float] | None = None) -> dict:
    """How good a pseudo-label set is, measured against the true labels of the same images.

    Precision and recall of its boxes at IoU 0.5 (same class), and COCO AP of the kept instances
    as if they were detections (bbox, and OKS keypoints where the truth has keypoints): the
    'why' behind a student's AP, available when the unlabeled split's truth is known (synthetic
    data, or a labeled set held out as unlabeled).
    """
    truth_by_image: dict[int, list[dict]] = {}
    for a in truth["annotations"]:
        truth_by_image.setdefault(a["image_id"], []).append(a)
    pseudo_by_image: dict[int, list[dict]] = {}
    for a in pseudo["annotations"]:
        pseudo_by_image.setdefault(a["image_id"], []).append(a)
    tp = 0
    kp_right = kp_labeled = 0
    for image_id, items in pseudo_by_image.items():
        items = sorted(items, key=lambda a: -a.get("score", 1.0))
        gt = truth_by_image.get(image_id, [])
        match = selection.match_to_truth([_xyxy(a["bbox"]) for a in items], [a.get("score", 1.0) for a in items],
                                         [a["category_id"] for a in items], [_xyxy(a["bbox"]) for a in gt],
                                         [a["category_id"] for a in gt])
        tp += int((match >= 0).sum())
        for a, j in zip(items, match):
            if a.get("keypoints") and j >= 0 and gt[j].get("keypoints"):
                right, labeled = keypoints_right(a["keypoints"], gt[j], sigmas)
                kp_right, kp_labeled = kp_right + right, kp_labeled + labeled
    kept, total = len(pseudo["annotations"]), len(truth["annotations"])
    out = {"instances": kept, "precision": round(100 * tp / kept, 2) if kept else 0.0,
           "recall": round(100 * tp / total, 2) if total else 0.0}
    if kp_labeled:
        # of the keypoints a student is taught on the true instances, the share that is right
        out["keypoint_precision"] = round(100 * kp_right / kp_labeled, 2)
    kinds = ["bbox"] + (["keypoints"] if any("keypoints" in a for a in truth["annotations"]) else [])
    for kind in kinds:
        ev = COCOEvaluator(truth, kind, sigmas)
        for image_id, items in pseudo_by_image.items():
            ev.process(image_id, [{**a, "score": a.get("score", 1.0)} for a in items])
        out[f"{kind}_AP"] = ev.evaluate()["AP"]
    return out


def keypoint_hits(keypoints: list[float], truth: dict, sigmas: list[float] | None) -> np.ndarray:
    """Per keypoint of one pseudo-label: labeled (v > 0) and right, that is the truth has it and the
    pair's keypoint similarity (OKS's per-keypoint term) is at least 0.5."""
    k = len(keypoints) // 3
    sig = np.asarray(sigmas if sigmas is not None else [0.07] * k, dtype=np.float64)
    p, g = np.asarray(keypoints, dtype=np.float64).reshape(k, 3), np.asarray(truth["keypoints"], np.float64).reshape(k, 3)
    area = max(float(truth.get("area") or truth["bbox"][2] * truth["bbox"][3]), 1.0)
    d2 = ((p[:, :2] - g[:, :2]) ** 2).sum(1)
    sim = np.exp(-d2 / (2 * area * (2 * sig) ** 2))
    return (p[:, 2] > 0) & (g[:, 2] > 0) & (sim >= 0.5)


def keypoints_right(keypoints: list[float], truth: dict, sigmas: list[float] | None) -> tuple[int, int]:
    """Of one pseudo-label's labeled keypoints (v > 0), how many are right (keypoint_hits).
    Returns (right, labeled)."""
    return int(keypoint_hits(keypoints, truth, sigmas).sum()), sum(1 for v in keypoints[2::3] if v > 0)


def annotated_per_image(labeled: CocoData) -> float:
    return len(labeled.annotations) / max(1, len(labeled.images))


def labeled_keypoint_fraction(labeled: CocoData) -> float | None:
    """The share of keypoints the labeled set annotates (v > 0) on its instances with keypoints;
    None without keypoints."""
    return selection.annotated_keypoint_fraction(a.get("keypoints") for a in labeled.annotations)


def evaluate(checkpoint: str, val_json: str, val_root: str, *, device: str | None = None,
             progress: ProgressFn | None = None, num_workers: int = 2) -> dict:
    """COCO AP of a checkpoint on a labeled split, single view at the model's own size.

    Returns {"bbox": {...}} and, for keypoint models, {"keypoints": {...}} too.
    """
    device = device or default_device()
    model, meta = load_model(checkpoint, device)
    val = load_coco(val_json)
    if [c["id"] for c in val.categories] != [c["id"] for c in meta["categories"]]:
        raise ValueError("the validation set's categories differ from the model's")
    schema = KeypointSchema.from_dict(meta.get("keypoint_schema"))
    evaluators = {"bbox": COCOEvaluator(val.to_dict(), "bbox")}
    if schema:
        evaluators["keypoints"] = COCOEvaluator(val.to_dict(), "keypoints", schema.sigmas)
    predictions = predict_single_view(model, meta, [Path(val_root) / im["file_name"] for im in val.images],
                                      device=device, progress=progress)
    for im, preds in zip(val.images, predictions):
        for ev in evaluators.values():
            ev.process(im["id"], preds)
    return {k: ev.evaluate() for k, ev in evaluators.items()}


def evaluate_views(checkpoint: str, val_json: str, val_root: str, *, transforms: TransformSet,
                   options: EnsembleOptions | None = None, device: str | None = None,
                   progress: ProgressFn | None = None, num_workers: int = 2) -> dict:
    """Multi-transform evaluation: COCO AP of the ensembled predictions and of every single view.

    Returns {"ensembled": {"bbox": {...}, ...}, "s600": {...}, ...}; what ensembling buys on
    data with true labels, and which views are worth their cost.
    """
    device = device or default_device()
    meta = read_checkpoint(checkpoint)["meta"]
    val = load_coco(val_json)
    if [c["id"] for c in val.categories] != [c["id"] for c in meta["categories"]]:
        raise ValueError("the validation set's categories differ from the model's")
    schema = KeypointSchema.from_dict(meta.get("keypoint_schema"))
    ev = NamedEvaluator(val.to_dict(), ["ensembled"] + [v.name for v in transforms.views],
                        schema.sigmas if schema else None)
    paths = [str(Path(val_root) / im["file_name"]) for im in val.images]
    for i, pred, err in infer(checkpoint, paths, transforms=transforms, options=options, device=device,
                              num_workers=num_workers, progress=progress):
        if pred is None:
            raise ValueError(f"validation image unreadable: {err}")
        ev.process(val.images[i]["id"], {"ensembled": pred["ensembled"], **pred["views"]})
    return ev.evaluate()


@torch.inference_mode()
def predict_single_view(model, meta: dict, paths: list, *, device: str, batch_size: int = 8,
                        progress: ProgressFn | None = None) -> list[list[dict]]:
    """Plain one-view inference (what evaluation and the 'single-view pseudo-label' baseline use)."""
    model.eval().to(device)
    cats = meta["categories"]
    out = []
    for s in range(0, len(paths), batch_size):
        images = [load_image(p).to(device) for p in paths[s:s + batch_size]]
        for d in model(images):
            items = []
            boxes, scores, labels = d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()
            kps = d["keypoints"].flatten(1).tolist() if "keypoints" in d else None
            kscores = d["keypoints_scores"].tolist() if "keypoints_scores" in d else None
            for i, (b, sc, lab) in enumerate(zip(boxes, scores, labels)):
                item = {"bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": sc, "label": lab,
                        "category_id": cats[lab - 1]["id"]}
                if kps is not None:
                    k = kps[i]
                    k[2::3] = [1] * (len(k) // 3)
                    item["keypoints"] = k
                if kscores is not None:
                    item["keypoint_scores"] = kscores[i]
                items.append(item)
            out.append(items)
        if progress:
            progress(min(s + batch_size, len(paths)), len(paths))
    return out


def write_json(path: str | Path, obj) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
    return str(path)


def load_unlabeled(json_path: str) -> dict:
    """Unlabeled split: a COCO document whose annotations (if any) are ignored."""
    with open(json_path) as f:
        doc = json.load(f)
    data = validate_coco({**doc, "annotations": []}, require_annotations=False)
    if not data.images:
        raise ValueError(f"{json_path}: the unlabeled set has no images")
    return {"images": data.images, "categories": data.categories}


class PipelineOptions:
    """Everything `run_pipeline` needs; data is a folder laid out as `distill synth` writes it.

    A config whose iterations is None takes its bound from the data and the device
    (engine.default_iterations): the teacher's from the labeled images, each student's from the
    labeled plus pseudo-labeled images. With validation (the default), every model tracks COCO AP
    on val.json, keeps its best weights and stops on a plateau.
    """

    def __init__(self, data: str, out: str, arch: str, transforms: TransformSet, teacher_config: TrainConfig,
                 student_config: TrainConfig, threshold: str | float = "auto", init: str = "retrain",
                 device: str | None = None, min_size: int | None = None, baselines: bool = False,
                 options: EnsembleOptions | None = None, num_workers: int = 2, teacher_iterations: int | None = None,
                 student_iterations: int | None = None, validation: bool = True, control: bool = True,
                 rounds: int = 1, oracle: bool = True, keypoint_threshold: str | float | None = "auto",
                 round_teacher: str = "auto"):
        self.data, self.out, self.arch, self.transforms = Path(data), Path(out), arch, transforms
        self.teacher_config, self.student_config = teacher_config, student_config
        self.teacher_iterations, self.student_iterations = teacher_iterations, student_iterations
        self.threshold, self.init, self.device, self.min_size = threshold, init, device, min_size
        self.baselines, self.options, self.num_workers = baselines, options or EnsembleOptions(), num_workers
        self.validation, self.control, self.rounds, self.oracle = validation, control, rounds, oracle
        self.keypoint_threshold = keypoint_threshold
        if round_teacher not in ROUND_TEACHERS:
            raise ValueError(f"round_teacher must be one of {', '.join(ROUND_TEACHERS)}, got {round_teacher!r}")
        self.round_teacher = round_teacher
        if rounds < 1:
            raise ValueError("rounds must be at least 1")
        for name in ("labeled.json", "unlabeled.json", "val.json"):
            if not (self.data / name).is_file():
                raise ValueError(f"{self.data} has no {name}; write one with `distill synth` or lay yours out alike")


# Who labels the unlabeled images for round r >= 2: the previous round's student alone, that
# student ensembled with the model that taught it (its views and theirs in one ensemble), or
# "auto": whichever of the two labels the validation images better (choose_labeler). Measured on
# validation (benchmarks/round_labelers.py): a student trained on ensembled pseudo-labels gains
# little from test-time views of its own; whether its teacher's views add to them depends on how far
# the student has moved past its teacher (README, "Rounds"), so each run measures it.
ROUND_TEACHERS = ("auto", "ensemble", "student")


def labeling_quality(checkpoint: str, data: Path, transforms: TransformSet, options: EnsembleOptions | None = None,
                     device: str | None = None, num_workers: int = 0, extra_checkpoints: Sequence[str] = ()) -> dict:
    """How well a model (with extra_checkpoints: an ensemble of models) would label, measured on the
    validation set: it predicts val.json's images as inference does (every view, ensembled), keeps
    what the paper's automatic threshold keeps on these images, and pseudo_label_quality scores that
    against their labels (the unlabeled split's truth is never used)."""
    val, labeled = load_coco(data / "val.json"), load_coco(data / "labeled.json")
    paths = [str(data / "val" / im["file_name"]) for im in val.images]
    schema = val.keypoint_schema()
    preds = {}
    for i, pred, _err in infer(checkpoint, paths, transforms=transforms, options=options, device=device,
                               num_workers=num_workers, extra_checkpoints=extra_checkpoints):
        if pred is not None:
            preds[val.images[i]["id"]] = pred["ensembled"]
    t = selection.auto_threshold([d["score"] for items in preds.values() for d in items], len(paths),
                                 annotated_per_image(labeled))
    doc = pseudo_label_doc({"images": val.images}, preds, t, val.categories)
    return {"threshold": round(t, 4), **pseudo_label_quality(doc, val.to_dict(), schema.sigmas if schema else None)}


def choose_labeler(student: str, taught_by: str, data: Path, transforms: TransformSet, options: EnsembleOptions,
                   device: str, num_workers: int = 0) -> dict:
    """Round r >= 2's labeler, chosen on the validation set (labeling_quality): the student alone, or
    the student and the model that taught it in one ensemble. The higher kept-set AP wins (OKS AP for
    keypoint models, box AP otherwise), the student alone on a tie.
    Returns {"chosen": "student" | "ensemble", "by": the AP's name, "student": quality, "ensemble": quality}."""
    out = {name: labeling_quality(student, data, transforms, options, device, num_workers, extra)
           for name, extra in (("student", []), ("ensemble", [taught_by]))}
    key = "keypoints_AP" if "keypoints_AP" in out["student"] else "bbox_AP"
    out["chosen"] = "ensemble" if out["ensemble"][key] > out["student"][key] else "student"
    out["by"] = key
    return out


def _sized(config: TrainConfig, iterations: int | None, num_images: int, device: str) -> TrainConfig:
    from .engine import default_iterations
    n = iterations or default_iterations(num_images, config.batch_size, device)
    return replace(config, iterations=n, warmup_iters=min(config.warmup_iters, max(1, n // 4)),
                   checkpoint_every=config.checkpoint_every or max(50, n // 10))


def _keypoint_scores(per_image: Iterable[list[dict]], threshold: float) -> list[float]:
    """Every keypoint score of the instances kept at threshold."""
    kept = selection.select([d for items in per_image for d in items], threshold)
    return [s for d in kept for s in d.get("keypoint_scores") or []]


def _choose_threshold(threshold, scores, num_images: int, target: float) -> float:
    if threshold == "auto":
        return selection.auto_threshold(scores, num_images, target)
    return selection.check_threshold(threshold)


def run_pipeline(o: PipelineOptions, hooks_for=lambda name: [], progress_for=lambda name: None) -> dict:
    """Teacher -> multi-transform pseudo-labels -> student, evaluated side by side on val.

    1. The teacher trains on the labeled images (with validation: until its AP converges).
    2. It predicts every view of the unlabeled images; the ensemble above the threshold (the
       paper's automatic rule by default) becomes the pseudo-labels.
    3. The student retrains from the teacher's initialisation on labeled + pseudo-labeled
       minibatches, its schedule sized to the larger data.
    4. The control continues the teacher on labels alone for as many iterations as the student
       got: a gain counts only against the better of teacher and control.
    5. With rounds > 1, each round's student is the next round's teacher: alone, or together with
       the model that taught it (round_teacher; "auto", the default, lets the validation set choose).
    With baselines, also a student on single-view pseudo-labels (same threshold rule) and an
    oracle student on the unlabeled split's true labels (needs unlabeled_gt.json).
    Run again on the same folders after a stop, it keeps every model that finished (with the same
    settings) and continues an interrupted one from its last checkpoint.
    """
    d, out = o.data, o.out
    out.mkdir(parents=True, exist_ok=True)
    device = o.device or default_device()
    labeled = load_coco(d / "labeled.json")
    unlabeled = load_unlabeled(str(d / "unlabeled.json"))
    target = annotated_per_image(labeled)
    kp_fraction = labeled_keypoint_fraction(labeled)
    n_labeled = len(_with_annotations(labeled).images)
    val = dict(val_json=str(d / "val.json"), val_root=str(d / "val")) if o.validation else {}
    common = dict(arch=o.arch, min_size=o.min_size, device=device, **val)
    states: dict[str, TrainState] = {}

    teacher = str(out / "teacher.pt")
    teacher_cfg = _sized(o.teacher_config, o.teacher_iterations, n_labeled, device)
    states["teacher"] = train(str(d / "labeled.json"), str(d / "labeled"), teacher, config=teacher_cfg,
                              hooks=hooks_for("teacher"), **common)

    paths = [str(d / "unlabeled" / im["file_name"]) for im in unlabeled["images"]]
    ids = [im["id"] for im in unlabeled["images"]]
    gt = json.loads((d / "unlabeled_gt.json").read_text()) if (d / "unlabeled_gt.json").is_file() else None
    schema = labeled.keypoint_schema()
    thresholds, quality, students, rounds = {}, {}, {}, []
    current, taught_by, choices = teacher, None, {}
    for r in range(1, o.rounds + 1):
        previous = []
        if taught_by is not None:
            choice = o.round_teacher
            if choice == "auto":
                # without a validation set there is nothing to choose by: the student alone
                choice = "student"
                if o.validation:
                    choices[r] = choose_labeler(current, taught_by, d, o.transforms, o.options, device, o.num_workers)
                    choice = choices[r]["chosen"]
            previous = [taught_by] if choice == "ensemble" else []
        tag = "" if r == 1 else f" round {r}"
        pseudo_file = "pseudo_ensembled.json" if r == 1 else f"pseudo_ensembled_r{r}.json"
        ensembled: dict[int, list[dict]] = {}
        labelers = 1 + len(previous)
        for i, pred, _err in infer(current, paths, transforms=o.transforms, options=o.options, device=device,
                                  num_workers=o.num_workers, extra_checkpoints=previous,
                                  progress=progress_for(f"infer x{labelers * len(o.transforms.views)} views")):
            if pred is not None:
                ensembled[ids[i]] = pred["ensembled"]
        scores = [p["score"] for items in ensembled.values() for p in items]
        t = _choose_threshold(o.threshold, scores, len(ids), target)
        kt = selection.keypoint_threshold_for(o.keypoint_threshold, _keypoint_scores(ensembled.values(), t), kp_fraction)
        doc = pseudo_label_doc(unlabeled, ensembled, t, labeled.categories, keypoint_threshold=kt)
        write_json(out / pseudo_file, doc)
        thresholds["ensembled" + tag] = t
        if kt is not None:
            thresholds["ensembled keypoints" + tag] = kt
        if gt is not None:
            quality["ensembled" + tag] = pseudo_label_quality(doc, gt, schema.sigmas if schema else None)
        n_pseudo = len({a["image_id"] for a in doc["annotations"]})
        student_cfg = _sized(o.student_config, o.student_iterations, n_labeled + n_pseudo, device)
        name = f"student (ensembled){tag}"
        ckpt = str(out / ("student.pt" if r == 1 else f"student_r{r}.pt"))
        round_students = {name: (pseudo_file, ckpt)}
        if r == 1 and o.baselines:
            model, meta = load_model(teacher, device)
            single = predict_single_view(model, meta, paths, device=device, progress=progress_for("infer x1 view"))
            ts = _choose_threshold(o.threshold, [p["score"] for items in single for p in items], len(ids), target)
            thresholds["single_view"] = ts
            kts = selection.keypoint_threshold_for(o.keypoint_threshold, _keypoint_scores(single, ts), kp_fraction)
            if kts is not None:
                thresholds["single_view keypoints"] = kts
            single_doc = pseudo_label_doc(unlabeled, dict(zip(ids, single)), ts, labeled.categories,
                                          keypoint_threshold=kts)
            write_json(out / "pseudo_single.json", single_doc)
            round_students["student (single view)"] = ("pseudo_single.json", str(out / "student_single.pt"))
            if gt is not None:
                quality["single view"] = pseudo_label_quality(single_doc, gt, schema.sigmas if schema else None)
                if o.oracle:
                    write_json(out / "pseudo_oracle.json", gt)
                    round_students["student (oracle labels)"] = ("pseudo_oracle.json", str(out / "student_oracle.pt"))
        for sname, (pseudo, sckpt) in round_students.items():
            states[sname] = train(str(d / "labeled.json"), str(d / "labeled"), sckpt, config=student_cfg,
                                  pseudo_json=str(out / pseudo), pseudo_root=str(d / "unlabeled"), teacher=teacher,
                                  init=o.init, role="student", hooks=hooks_for(sname), **common)
        students.update(round_students)
        if r == 1 and o.control:
            # The teacher continued on labels alone for the student's iterations: did the pseudo-labels
            # help, or would more training on the labels have done as well?
            control = str(out / "control.pt")
            states["control (teacher + labels only)"] = train(
                str(d / "labeled.json"), str(d / "labeled"), control, config=student_cfg, teacher=teacher,
                init="finetune", role="teacher", hooks=hooks_for("control"), **common)
            students["control (teacher + labels only)"] = (None, control)
        rounds.append({"round": r, "teacher": current, "ensembled_with": previous, "student": ckpt, "threshold": t,
                       "student_iterations": states[name].iteration, **({"labeler_choice": choices[r]} if r in choices else {})})
        current, taught_by = ckpt, current

    results = {"teacher": evaluate(teacher, str(d / "val.json"), str(d / "val"), device=device)}
    for name, (_, ckpt) in students.items():
        results[name] = evaluate(ckpt, str(d / "val.json"), str(d / "val"), device=device)
    training = {name: {"iterations": st.iteration, "bound": st.config.iterations, "best": st.best,
                       "stopped": st.stopped, "validation": st.val_history} for name, st in states.items()}
    report = {"arch": o.arch, "device": device, "transforms": o.transforms.to_dict(), "options": vars(o.options),
              "threshold": thresholds["ensembled"], "thresholds": thresholds, "target_per_image": target, "val_images": len(load_coco(d / "val.json").images),
              "teacher_config": teacher_cfg.to_dict(), "student_config": student_cfg.to_dict(),
              "student_init": o.init, "results": results, "pseudo_label_quality": quality, "training": training,
              "rounds": rounds}
    report["report_path"] = write_json(out / "report.json", report)
    return report
