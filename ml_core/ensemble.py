"""Merging the predictions of many views into one set of pseudo-labels.

Pure tensor functions, no model inside: they run on CPU or GPU and are tested and benchmarked
alone. Boxes follow Detectron's test-time-augmentation semantics (union, per-class NMS, box
voting); weighted box fusion is offered beside it. Keypoints average the keypoint head's heatmaps
over views on fixed boxes.
"""
from __future__ import annotations

import torch
from torchvision.ops import batched_nms, box_iou
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints

from .transforms import flip_heatmaps

BOX_METHODS = ("nms_vote", "nms", "wbf")
VOTE_SCORING = ("id", "avg", "iou_avg")
HEATMAP_METHODS = ("mean", "max")


def _check_choice(value, choices, what):
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


def box_voting(kept_boxes, kept_scores, kept_labels, all_boxes, all_scores, all_labels,
               vote_thresh: float = 0.8, scoring: str = "id"):
    """Detectron's box voting (utils/boxes.py: box_voting), vectorised.

    Each kept box becomes the score-weighted mean of the union boxes of its class whose IoU with it
    is >= vote_thresh (the kept box itself is among them). Scores: 'id' keeps the NMS score, 'avg'
    takes the mean score of the voters, 'iou_avg' their IoU-weighted mean.
    """
    _check_choice(scoring, VOTE_SCORING, "vote scoring")
    if kept_boxes.numel() == 0:
        return kept_boxes, kept_scores
    iou = box_iou(kept_boxes, all_boxes)                                     # (K, N)
    voters = (iou >= vote_thresh) & (kept_labels[:, None] == all_labels[None, :])
    w = voters.to(all_scores.dtype) * all_scores[None, :]
    boxes = (w @ all_boxes) / w.sum(1, keepdim=True).clamp_min(1e-12)
    if scoring == "id":
        scores = kept_scores
    elif scoring == "avg":
        v = voters.to(all_scores.dtype)
        scores = (v * all_scores[None, :]).sum(1) / v.sum(1).clamp_min(1)
    else:
        p = iou * voters
        scores = (p * all_scores[None, :]).sum(1) / p.sum(1).clamp_min(1e-12)
    return boxes, scores


def weighted_box_fusion(boxes, scores, labels, num_views: int, iou_thresh: float = 0.55):
    """Weighted box fusion (Solovyev et al. 2021) over the union of all views' boxes.

    Boxes are visited by descending score; each joins the first cluster of its class whose fused
    box overlaps it by more than iou_thresh, otherwise it starts a cluster. A cluster's box is the
    score-weighted mean of its members; its score the mean member score times
    min(members, num_views) / num_views, so boxes few views agree on are down-weighted.
    """
    order = scores.argsort(descending=True)
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    out_b, out_s, out_l = [], [], []
    for c in labels.unique():
        m = labels == c
        b, s = boxes[m], scores[m]
        fused_b: list[torch.Tensor] = []
        sums_w: list[torch.Tensor] = []
        sums_b: list[torch.Tensor] = []
        members: list[list[int]] = []
        for i in range(len(b)):
            j = -1
            if fused_b:
                ious = box_iou(b[i:i + 1], torch.stack(fused_b))[0]
                best = int(ious.argmax())
                if ious[best] > iou_thresh:
                    j = best
            if j < 0:
                fused_b.append(b[i].clone()); sums_w.append(s[i].clone()); sums_b.append(b[i] * s[i]); members.append([i])
            else:
                sums_w[j] = sums_w[j] + s[i]; sums_b[j] = sums_b[j] + b[i] * s[i]; members[j].append(i)
                fused_b[j] = sums_b[j] / sums_w[j]
        for j, mem in enumerate(members):
            ms = s[mem]
            out_b.append(fused_b[j])
            out_s.append(ms.mean() * min(len(mem), num_views) / num_views)
            out_l.append(c)
    if not out_b:
        return boxes[:0], scores[:0], labels[:0]
    return torch.stack(out_b), torch.stack(out_s), torch.stack(out_l)


def ensemble_boxes(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, *, num_views: int = 1,
                   method: str = "nms_vote", score_thresh: float = 0.05, nms_thresh: float = 0.5,
                   vote_thresh: float = 0.8, vote_scoring: str = "id", wbf_thresh: float = 0.55,
                   detections_per_img: int = 100):
    """The union of all views' detections of one image (original coordinates) -> one set.

    1. drop scores below score_thresh; 2. per-class NMS at nms_thresh; 3. box voting with
    vote_thresh (method 'nms_vote'; 'nms' skips it; 'wbf' replaces 2-3 by weighted box fusion);
    4. keep the top detections_per_img across classes.
    """
    _check_choice(method, BOX_METHODS, "box ensembling method")
    if not 0 <= score_thresh < 1:
        raise ValueError("score_thresh must lie in [0, 1)")
    keep = scores >= score_thresh
    boxes, scores, labels = boxes[keep].float(), scores[keep].float(), labels[keep]
    if method == "wbf":
        out_b, out_s, out_l = weighted_box_fusion(boxes, scores, labels, num_views, wbf_thresh)
    else:
        k = batched_nms(boxes, scores, labels, nms_thresh)
        out_b, out_s, out_l = boxes[k], scores[k], labels[k]
        if method == "nms_vote":
            out_b, out_s = box_voting(out_b, out_s, out_l, boxes, scores, labels, vote_thresh, vote_scoring)
    top = out_s.argsort(descending=True)[:detections_per_img]
    return out_b[top], out_s[top], out_l[top]


def ensemble_heatmaps(heatmaps: list[torch.Tensor], flipped: list[bool], flip_inds: list[int] | None,
                      method: str = "mean") -> torch.Tensor:
    """Per-view keypoint logits on the same boxes -> one heatmap per box and keypoint.

    heatmaps[v] is (N, K, H, W), computed by view v on the ensembled boxes mapped into that view.
    Flipped views are mirrored back with left/right channels swapped before merging.
    """
    _check_choice(method, HEATMAP_METHODS, "heatmap ensembling method")
    if not heatmaps:
        raise ValueError("no heatmaps to ensemble")
    aligned = []
    for h, f in zip(heatmaps, flipped):
        if f:
            if flip_inds is None:
                raise ValueError("a flipped view needs the keypoint flip map")
            h = flip_heatmaps(h, flip_inds)
        aligned.append(h.float())
    stack = torch.stack(aligned)
    return stack.mean(0) if method == "mean" else stack.amax(0)


def decode_heatmaps(heatmaps: torch.Tensor, boxes: torch.Tensor):
    """(N, K, H, W) logits on (N, 4) boxes -> keypoints (N, K, 3) with visibility 1, and scores (N, K)."""
    if boxes.numel() == 0:
        k = heatmaps.shape[1] if heatmaps.dim() == 4 else 0
        return boxes.new_zeros((0, k, 3)), boxes.new_zeros((0, k))
    kps, scores = heatmaps_to_keypoints(heatmaps, boxes)
    kps[..., 2] = 1
    return kps, scores


def agreement(view_boxes: list[torch.Tensor], view_labels: list[torch.Tensor], ens_boxes: torch.Tensor,
              ens_labels: torch.Tensor) -> float:
    """How much the single views agree with the ensemble, in [0, 1].

    For every ensembled box and every view, the best IoU with a same-class box of that view
    (0 if the view has none); the mean over all of them. 1.0 when nothing was detected anywhere,
    0.0 when views detected something but the ensemble kept nothing.
    """
    n_views = len(view_boxes)
    if ens_boxes.numel() == 0:
        return 1.0 if all(b.numel() == 0 for b in view_boxes) else 0.0
    if n_views == 0:
        return 0.0
    total = 0.0
    for b, l in zip(view_boxes, view_labels):
        if b.numel() == 0:
            continue
        iou = box_iou(ens_boxes, b.float()) * (ens_labels[:, None] == l[None, :])
        total += float(iou.amax(1).sum())
    return total / (n_views * len(ens_boxes))
