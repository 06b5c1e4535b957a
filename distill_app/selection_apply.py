"""Freezing a pseudo-label set: thresholds per class plus the reviews, written as COCO JSON.

The thresholding itself is ml_core.selection; this module decides per image what a review means:
rejected images contribute nothing, edited images contribute exactly the reviewer's instances,
accepted and unreviewed images contribute the ensembled instances above threshold. On those, the
keypoints the teacher is least sure of are left unlabeled (the set's keypoint threshold); a
reviewer's own keypoints always stay.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from django.conf import settings

from ml_core import selection

from .models import Annotation, Image, Prediction, PseudoLabelSet, Review


def thresholds_by_category(thresholds: dict) -> dict:
    """{'default': t, '<category id>': t} -> the same with checked values (ValueError names a bad one)."""
    out = {"default": selection.check_threshold(thresholds.get("default", 0.5), "default threshold")}
    for k, v in thresholds.items():
        if k == "default":
            continue
        try:
            int(k)
        except (TypeError, ValueError):
            raise ValueError(f"threshold key {k!r} is not a category id") from None
        out[str(int(k))] = selection.check_threshold(v, f"threshold of category {k}")
    return out


def _keep(instances: list[dict], thresholds: dict) -> list[dict]:
    items = [{**d, "label": d["category_id"]} for d in instances]
    return [{k: v for k, v in d.items() if k != "label"} for d in selection.select(items, thresholds)]


def labeled_keypoint_fraction(project) -> float | None:
    """The share of keypoints the project's labeled sets annotate (v > 0) on their instances with
    keypoints (selection.annotated_keypoint_fraction); None without keypoints."""
    rows = Annotation.objects.filter(image__dataset__project=project, image__dataset__role="labeled",
                                     keypoints__isnull=False).values_list("keypoints", flat=True)
    return selection.annotated_keypoint_fraction(rows.iterator(chunk_size=2000))


def _hide_keypoints(pls: PseudoLabelSet, anns: list[dict], scores: dict[int, list[float]]) -> dict:
    """Apply the set's keypoint threshold to the annotations whose keypoints came from the model
    (scores: annotation index -> keypoint scores). Returns what the counts say of it."""
    rule = pls.keypoint_threshold
    if not scores or rule is None:
        return {"keypoint_threshold": None, "keypoints_hidden": 0}
    t = selection.keypoint_threshold_for(rule, [v for ks in scores.values() for v in ks],
                                         labeled_keypoint_fraction(pls.project) if rule == "auto" else None)
    hidden = 0
    for i, ks in scores.items():
        a = anns[i]
        before = sum(1 for v in a["keypoints"][2::3] if v > 0)
        a["keypoints"] = selection.hide_keypoints(a["keypoints"], ks, t)
        hidden += before - sum(1 for v in a["keypoints"][2::3] if v > 0)
    return {"keypoint_threshold": None if t is None or t == float("inf") else round(t, 4), "keypoints_hidden": hidden}


def write_pseudo_label_set(pls: PseudoLabelSet, progress=None) -> dict:
    run = pls.run
    thresholds = thresholds_by_category(pls.thresholds)
    reviews = {r.image_id: r for r in Review.objects.filter(run=run).only("image_id", "state", "instances")}
    files = dict(Image.objects.filter(dataset=run.dataset).values_list("id", "file"))
    sizes = {i: (w, h) for i, w, h in Image.objects.filter(dataset=run.dataset).values_list("id", "width", "height")}
    images, anns = [], []
    counts = {"images": 0, "instances": 0, "rejected": 0, "edited": 0, "accepted": 0, "unreviewed_used": 0,
              "images_considered": 0}
    rows = (Prediction.objects.filter(run=run, validation=False).order_by("image_id")
            .values_list("image_id", "ensembled").iterator(chunk_size=2000))
    total = len(files)
    keypoint_scores: dict[int, list[float]] = {}   # annotation index -> the model's keypoint scores
    for n, (image_id, ensembled) in enumerate(rows):
        counts["images_considered"] += 1
        review = reviews.get(image_id) if pls.apply_reviews else None
        if review is not None and review.state == "rejected":
            counts["rejected"] += 1
            continue
        edited = review is not None and review.state == "edited"
        if edited:
            kept = [{**d, "score": d.get("score", 1.0)} for d in (review.instances or [])]
            counts["edited"] += 1
        elif review is not None:
            kept = _keep(ensembled, thresholds)
            counts["accepted"] += 1
        elif pls.include_unreviewed:
            kept = _keep(ensembled, thresholds)
            counts["unreviewed_used"] += bool(kept)
        else:
            continue
        if not kept:
            continue
        w, h = sizes[image_id]
        images.append({"id": image_id, "file_name": files[image_id], "width": w, "height": h})
        for d in kept:
            a = {"id": len(anns) + 1, "image_id": image_id, "category_id": d["category_id"], "bbox": d["bbox"],
                 "score": d["score"], "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0}
            if d.get("keypoints") is not None:
                a["keypoints"] = d["keypoints"]
                if not edited and d.get("keypoint_scores"):
                    keypoint_scores[len(anns)] = d["keypoint_scores"]
            anns.append(a)
        if progress and n % 1000 == 0:
            progress(n, total)
    counts["images"], counts["instances"] = len(images), len(anns)
    counts.update(_hide_keypoints(pls, anns, keypoint_scores))
    for a in anns:
        if "keypoints" in a:
            a["num_keypoints"] = sum(1 for v in a["keypoints"][2::3] if v > 0)
    doc = {"info": {"description": f"Distill pseudo-labels, run {run.pk}, thresholds {thresholds}"},
           "images": images, "annotations": anns, "categories": run.project.categories}
    path = run.project.folder / "pseudo_labels" / f"set{pls.pk}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    pls.file = str(path.relative_to(Path(settings.MEDIA_ROOT)))
    pls.counts = counts
    pls.thresholds = thresholds
    pls.save(update_fields=["file", "counts", "thresholds"])
    return counts
