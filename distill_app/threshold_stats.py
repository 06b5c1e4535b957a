"""Statistics a reviewer needs to choose a threshold, for one inference run.

`build` runs once when a run finishes: it flattens every ensembled score into arrays (saved as
stats.npz beside the run) and precomputes the curves over a threshold grid. `at` answers a query
for any global or per-class thresholds from those arrays in a few milliseconds, so the API can
serve it on every slider release and the browser can compute the same live from /scores/.
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np

from ml_core import selection
from ml_core.evaluation import NamedEvaluator
from ml_core.schema import KeypointSchema

from .models import Annotation, Image, InferenceRun, Prediction

GRID = selection.default_grid(0.02)


def _paths(run: InferenceRun):
    return run.folder / "stats.npz", run.folder / "stats.json"


def labeled_instances_per_image(run: InferenceRun) -> float | None:
    labeled = run.project.datasets.filter(role="labeled")
    n_img = Image.objects.filter(dataset__in=labeled).count()
    if not n_img:
        return None
    return Annotation.objects.filter(image__dataset__in=labeled).count() / n_img


def run_image_ids(run: InferenceRun) -> list[int]:
    """The images the run predicted (not the unlabeled set as it is now: images added since are
    not the run's)."""
    return list(Prediction.objects.filter(run=run, validation=False).order_by("image_id")
                .values_list("image_id", flat=True))


def build(run: InferenceRun) -> dict:
    image_ids = run_image_ids(run)
    index = {i: n for n, i in enumerate(image_ids)}
    scores, cats, imgs, kps = [], [], [], []
    per_image_scores = [[] for _ in image_ids]
    rows = Prediction.objects.filter(run=run, validation=False).values_list("image_id", "ensembled")
    for image_id, ens in rows.iterator(chunk_size=2000):
        n = index[image_id]
        for d in ens:
            scores.append(d["score"])
            cats.append(d["category_id"])
            imgs.append(n)
            per_image_scores[n].append(d["score"])
            kps.append(d.get("keypoint_scores"))
    u_scores, u_cats, u_img = np.asarray(scores, np.float32), np.asarray(cats, np.int32), np.asarray(imgs, np.int32)
    # each instance's keypoint scores (keypoint runs; NaN where a run predates them), for the
    # keypoints the automatic keypoint threshold leaves out at any instance thresholds
    k = max((len(x) for x in kps if x), default=0)
    u_kps = np.full((len(kps), k), np.nan, np.float32)
    for i, x in enumerate(kps):
        if x:
            u_kps[i, :len(x)] = x
    from .selection_apply import labeled_keypoint_fraction
    kp_fraction = labeled_keypoint_fraction(run.project) if k else None

    v_scores, v_cats, v_tp, num_gt = np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, bool), {}
    if run.validation_id:
        gt: dict[int, list] = {}
        for image_id, cat, bbox in Annotation.objects.filter(image__dataset=run.validation).values_list(
                "image_id", "category_id", "bbox"):
            gt.setdefault(image_id, []).append((cat, bbox))
            num_gt[str(cat)] = num_gt.get(str(cat), 0) + 1
        vs, vc, vt = [], [], []
        for image_id, ens in Prediction.objects.filter(run=run, validation=True).values_list(
                "image_id", "ensembled").iterator(chunk_size=2000):
            g = gt.get(image_id, [])
            boxes = [[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (d["bbox"] for d in ens)]
            tp = selection.match_predictions(boxes, [d["score"] for d in ens], [d["category_id"] for d in ens],
                                             [[b[0], b[1], b[0] + b[2], b[1] + b[3]] for _, b in g], [c for c, _ in g])
            vs += [d["score"] for d in ens]
            vc += [d["category_id"] for d in ens]
            vt += tp.tolist()
        v_scores, v_cats, v_tp = np.asarray(vs, np.float32), np.asarray(vc, np.int32), np.asarray(vt, bool)

    target = labeled_instances_per_image(run)
    auto = selection.auto_threshold(u_scores, len(image_ids), target) if (target is not None and image_ids) else None
    summary = {
        "images": len(image_ids),
        "instances": int(len(u_scores)),
        "labeled_instances_per_image": None if target is None else round(target, 4),
        # the share of keypoints the labeled sets annotate, when the run finished
        "labeled_keypoint_fraction": None if kp_fraction is None else round(kp_fraction, 4),
        "auto_threshold": None if auto is None else round(auto, 4),
        "histograms": selection.score_histograms(u_scores, u_cats, bins=20),
        "curves": selection.kept_curves(per_image_scores, GRID),
        "validation": None,
    }
    if run.validation_id:
        summary["validation"] = {"images": Image.objects.filter(dataset=run.validation).count(),
                                 "ground_truth": int(sum(num_gt.values())),
                                 **selection.precision_recall(v_scores, v_tp, int(sum(num_gt.values())), GRID)}
        summary["validation"]["ap"] = view_ap(run)
    npz, js = _paths(run)
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(str(npz) + ".tmp.npz", u_scores=u_scores, u_cats=u_cats, u_img=u_img, n_images=len(image_ids),
             image_ids=np.asarray(image_ids, np.int64), u_kps=u_kps,
             v_scores=v_scores, v_cats=v_cats, v_tp=v_tp, num_gt=np.asarray(sum(num_gt.values())))
    os.replace(str(npz) + ".tmp.npz", npz)
    js.write_text(json.dumps(summary))
    InferenceRun.objects.filter(pk=run.pk).update(auto_threshold=auto, labeled_per_image=target)
    return {"images": summary["images"], "instances": summary["instances"], "auto_threshold": summary["auto_threshold"]}


def view_ap(run: InferenceRun) -> dict:
    """COCO AP (pycocotools) on the validation images of the ensembled predictions and of every
    single view alone: what ensembling the views buys, on data with true labels.

    {"bbox": {"ensembled": {AP, AP50, AP75}, "s600": {...}, ...}, "keypoints": {...}}; views and
    ensemble alike keep scores above the run's score threshold, at most 100 per image.
    """
    from .ingest import dataset_to_coco
    schema = KeypointSchema.from_dict(run.checkpoint.meta.get("keypoint_schema"))
    ev = NamedEvaluator(dataset_to_coco(run.validation), ["ensembled"] + list(run.view_names),
                        schema.sigmas if schema else None)
    for image_id, ens, views in Prediction.objects.filter(run=run, validation=True, error="").values_list(
            "image_id", "ensembled", "views").iterator(chunk_size=500):
        ev.process(image_id, {"ensembled": ens, **views})
    by_name = ev.evaluate()
    return {k: {n: {m: v for m, v in stats[k].items() if m in ("AP", "AP50", "AP75")} for n, stats in by_name.items()}
            for k in by_name["ensembled"]}


@functools.lru_cache(maxsize=8)
def _load(npz_path: str, json_path: str, mtime: float):
    with np.load(npz_path) as z:
        arrays = {k: z[k] for k in z.files}
    with open(json_path) as f:
        summary = json.load(f)
    arrays["_index"] = _index(arrays)
    return arrays, summary


def _index(a: dict) -> dict:
    """Derived once per loaded file, so that `at` costs O(images x classes), not O(instances): each
    class's scores sorted, and each image's best score per class (-1 where it has none)."""
    cats = np.unique(a["u_cats"])
    n = int(a["n_images"])
    sorted_scores, best = [], np.full((len(cats), n), -1.0, np.float32)
    for j, c in enumerate(cats):
        m = a["u_cats"] == c
        sorted_scores.append(np.sort(a["u_scores"][m]))
        np.maximum.at(best[j], a["u_img"][m], a["u_scores"][m])
    return {"cats": cats, "sorted": sorted_scores, "best": best}


def load(run: InferenceRun):
    npz, js = _paths(run)
    if not npz.exists():
        raise FileNotFoundError("statistics are computed when the run has finished")
    return _load(str(npz), str(js), os.path.getmtime(npz))


def _per_instance(cats: np.ndarray, thresholds: dict) -> np.ndarray:
    t = np.full(cats.shape, thresholds.get("default", 0.5), dtype=np.float32)
    for k, v in thresholds.items():
        if k != "default":
            t[cats == int(k)] = v
    return t


def at(run: InferenceRun, thresholds: dict) -> dict:
    """The precomputed summary plus what the given thresholds keep (and, on the validation
    split, their precision and recall at IoU 0.5)."""
    a, summary = load(run)
    n = int(a["n_images"])
    ix = a["_index"]
    by_cat = {int(k): v for k, v in thresholds.items() if k != "default"}
    t = np.asarray([by_cat.get(int(c), thresholds.get("default", 0.5)) for c in ix["cats"]], np.float32)
    # score >= threshold, as float32 like the scores: counted by binary search in each class's sorted scores
    per_cat = [len(s) - int(np.searchsorted(s, t[j], side="left")) for j, s in enumerate(ix["sorted"])]
    kept = sum(per_cat)
    with_labels = int((ix["best"] >= t[:, None]).any(axis=0).sum()) if n and len(t) else 0
    current = {"thresholds": thresholds, "instances": kept,
               "instances_per_image": round(float(kept) / n, 4) if n else 0.0,
               "images_with_labels": with_labels, "images": n,
               "per_category": {str(int(c)): per_cat[j] for j, c in enumerate(ix["cats"])}}
    fraction = summary.get("labeled_keypoint_fraction")
    if fraction is not None and a.get("u_kps") is not None and a["u_kps"].size:
        # what a pseudo-label set with keypoint threshold "auto" would leave out of these instances
        kept_kps = a["u_kps"][a["u_scores"] >= _per_instance(a["u_cats"], thresholds)].ravel()
        kept_kps = kept_kps[~np.isnan(kept_kps)]
        kt = selection.keypoint_auto_threshold(kept_kps, fraction)
        current["keypoint_threshold_auto"] = None if kt is None or not np.isfinite(kt) else round(float(kt), 4)
        current["keypoints_hidden_auto"] = int((kept_kps < kt).sum()) if kt is not None else 0
        current["keypoints_kept"] = int(kept_kps.size)
    if summary.get("validation"):
        vk = a["v_scores"] >= _per_instance(a["v_cats"], thresholds)
        tp = int((a["v_tp"] & vk).sum())
        ngt = int(a["num_gt"])
        current["precision"] = round(tp / int(vk.sum()), 4) if vk.sum() else 1.0
        current["recall"] = round(tp / ngt, 4) if ngt else 0.0
    return {**summary, "current": current}


def scores_payload(run: InferenceRun) -> dict:
    """Every ensembled score of the run as flat arrays, for live statistics in the browser."""
    a, summary = load(run)
    # the ids the arrays were built over (older files: the run's predicted images)
    image_ids = a["image_ids"].tolist() if "image_ids" in a else run_image_ids(run)[:int(a["n_images"])]
    return {"image_ids": image_ids, "scores": np.round(a["u_scores"], 5).tolist(), "categories": a["u_cats"].tolist(),
            "image_index": a["u_img"].tolist(),
            "validation": {"scores": np.round(a["v_scores"], 5).tolist(), "categories": a["v_cats"].tolist(),
                           "tp": a["v_tp"].astype(int).tolist(), "ground_truth": int(a["num_gt"])},
            "summary": summary}
