"""Choosing which ensembled predictions become pseudo-labels, and the statistics a reviewer
needs to choose: score histograms, kept instances per image against the threshold, the paper's
automatic threshold, and precision/recall on the validation split."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou


def check_threshold(t: float, what: str = "threshold") -> float:
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"{what} must lie in [0, 1], got {t}")
    return t


def thresholds_for(labels, thresholds: float | dict) -> np.ndarray:
    """Per-instance threshold: one global value, or a {label: value} dict with an optional 'default'."""
    labels = np.asarray(labels)
    if isinstance(thresholds, dict):
        default = check_threshold(thresholds.get("default", 0.5), "default threshold")
        out = np.full(labels.shape, default, dtype=np.float64)
        for k, v in thresholds.items():
            if k != "default":
                out[labels == int(k)] = check_threshold(v, f"threshold of class {k}")
        return out
    return np.full(labels.shape, check_threshold(thresholds), dtype=np.float64)


def select(instances: list[dict], thresholds: float | dict) -> list[dict]:
    """Keep the instances whose score is at or above their class's threshold."""
    if not instances:
        return []
    labels = [d["label"] for d in instances]
    t = thresholds_for(labels, thresholds)
    return [d for d, ti in zip(instances, t) if d["score"] >= ti]


def auto_threshold(scores, num_images: int, target_per_image: float) -> float:
    """The paper's rule: the threshold at which the mean number of kept instances per unlabeled
    image equals the mean number of annotated instances per labeled image (as near as the
    scores allow). With too few predictions to reach the target, every prediction is kept."""
    if num_images <= 0:
        raise ValueError("the automatic threshold needs at least one unlabeled image")
    if target_per_image < 0:
        raise ValueError("target instances per image must be non-negative")
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    k = int(round(target_per_image * num_images))
    if k <= 0:
        return 1.0
    if k >= len(s):
        return float(s[-1]) if len(s) else 0.0
    return float(s[k - 1])


def keypoint_auto_threshold(keypoint_scores, labeled_fraction: float | None) -> float | None:
    """The paper's rule carried over to keypoints: the heatmap score at which the kept instances
    keep, on average, the fraction of their keypoints that the labeled set annotates (COCO leaves a
    keypoint unlabeled when it is out of frame or cannot be placed; a pseudo-label should leave out
    the ones its teacher is least sure of). None, keep every keypoint, when the labeled set
    annotates them all or there are no scores.

    keypoint_scores: every keypoint score of the kept instances (the heatmap logit at the decoded
    keypoint, torchvision's keypoints_scores).
    """
    s = np.sort(np.asarray(keypoint_scores, dtype=np.float64).ravel())[::-1]
    if labeled_fraction is None or labeled_fraction >= 1.0 or len(s) == 0:
        return None
    if labeled_fraction < 0:
        raise ValueError("the labeled keypoint fraction must be non-negative")
    k = int(round(labeled_fraction * len(s)))
    return float(s[k - 1]) if k > 0 else float("inf")


def keypoint_threshold_for(rule, keypoint_scores, fraction: float | None) -> float | None:
    """A pseudo-label set's keypoint threshold from its rule: 'auto' (keypoint_auto_threshold over the
    kept instances' keypoint scores and the labeled set's annotated fraction), None (keep every
    keypoint) or a finite number."""
    if rule is None:
        return None
    if rule == "auto":
        return keypoint_auto_threshold(keypoint_scores, fraction)
    t = float(rule)
    if not np.isfinite(t):
        raise ValueError(f"keypoint threshold must be a finite number, 'auto' or none, got {rule!r}")
    return t


def annotated_keypoint_fraction(keypoint_lists) -> float | None:
    """The share of keypoints annotated (v > 0) over flat COCO keypoint lists of the instances with
    at least one annotated keypoint; None without any. An instance with none (COCO's num_keypoints 0:
    a person too small or too hidden to place any) says nothing of how many keypoints an annotator
    leaves out of one that can be placed, which is what a kept pseudo-label is."""
    shown = total = 0
    for kps in keypoint_lists:
        vis = kps[2::3] if kps else []
        n = sum(1 for v in vis if v > 0)
        if n:
            shown, total = shown + n, total + len(vis)
    return shown / total if total else None


def hide_keypoints(keypoints: list[float], keypoint_scores: list[float] | None, threshold: float | None) -> list[float]:
    """Flat COCO keypoints with the ones scored below threshold marked unlabeled (v = 0; their x, y
    stay so that a reviewer still sees where they were). Training and COCO AP ignore v = 0."""
    if threshold is None or keypoint_scores is None:
        return list(keypoints)
    out = list(keypoints)
    for j, s in enumerate(keypoint_scores):
        if s < threshold:
            out[3 * j + 2] = 0
    return out


def score_histograms(scores, labels, bins: int = 20) -> dict:
    """Per class (and 'all'): counts of scores in `bins` equal bins over [0, 1]."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    edges = np.linspace(0, 1, bins + 1)
    out = {"edges": edges.round(6).tolist(), "all": np.histogram(scores, edges)[0].tolist()}
    for c in np.unique(labels):
        out[str(int(c))] = np.histogram(scores[labels == c], edges)[0].tolist()
    return out


def kept_curves(per_image_scores: list, grid) -> dict:
    """For each threshold of `grid`: mean kept instances per image and images with at least one."""
    grid = np.asarray(grid, dtype=np.float64)
    n = len(per_image_scores)
    if n == 0:
        return {"thresholds": grid.tolist(), "instances_per_image": [0.0] * len(grid), "images_with_labels": [0] * len(grid)}
    flat = np.sort(np.concatenate([np.asarray(s, dtype=np.float64) for s in per_image_scores] or [np.zeros(0)]))
    maxes = np.sort(np.array([max(s) if len(s) else -1.0 for s in per_image_scores]))
    kept = len(flat) - np.searchsorted(flat, grid, side="left")
    with_any = n - np.searchsorted(maxes, grid, side="left")
    return {"thresholds": grid.round(6).tolist(), "instances_per_image": (kept / n).round(4).tolist(),
            "images_with_labels": with_any.tolist()}


def match_predictions(pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, iou_thresh: float = 0.5) -> np.ndarray:
    """True-positive flag of each prediction of one image: greedy by descending score, one ground
    truth per prediction, same class, IoU >= iou_thresh (COCO's matching at one IoU).

    A prediction's flag depends only on higher-scored ones, so the flags hold at every threshold.
    """
    return match_to_truth(pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, iou_thresh) >= 0


def match_to_truth(pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, iou_thresh: float = 0.5) -> np.ndarray:
    """match_predictions' matching, as the index of each prediction's ground truth (-1: none)."""
    n = len(pred_scores)
    match = np.full(n, -1, dtype=np.int64)
    if n == 0 or len(gt_labels) == 0:
        return match
    iou = box_iou(torch.as_tensor(pred_boxes, dtype=torch.float32).reshape(-1, 4),
                  torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)).numpy()
    iou = iou * (np.asarray(pred_labels)[:, None] == np.asarray(gt_labels)[None, :])
    taken = np.zeros(len(gt_labels), dtype=bool)
    for i in np.argsort(-np.asarray(pred_scores), kind="stable"):
        cand = np.where(~taken, iou[i], -1)
        j = int(cand.argmax())
        if cand[j] >= iou_thresh:
            match[i] = j
            taken[j] = True
    return match


def precision_recall(scores, tp_flags, num_gt: int, grid) -> dict:
    """Precision and recall of predictions kept at each threshold of `grid`."""
    grid = np.asarray(grid, dtype=np.float64)
    scores, tp = np.asarray(scores, dtype=np.float64), np.asarray(tp_flags, dtype=bool)
    order = np.argsort(scores)
    s, t = scores[order], tp[order]
    cum_tp_from = np.concatenate([np.cumsum(t[::-1])[::-1], [0]])  # tp count with index >= i
    idx = np.searchsorted(s, grid, side="left")
    kept = len(s) - idx
    tps = cum_tp_from[idx]
    precision = np.where(kept > 0, tps / np.maximum(kept, 1), 1.0)
    recall = tps / num_gt if num_gt else np.zeros_like(grid)
    return {"thresholds": grid.round(6).tolist(), "precision": precision.round(4).tolist(),
            "recall": np.asarray(recall).round(4).tolist()}


def default_grid(step: float = 0.01) -> np.ndarray:
    return np.round(np.arange(0, 1 + step / 2, step), 6)
