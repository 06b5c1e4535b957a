"""Merging the predictions of many views into one set of pseudo-labels.

Pure tensor functions, no model inside: they run on CPU or GPU and are tested and benchmarked
alone. Boxes follow Detectron's test-time-augmentation semantics (union, per-class NMS, box
voting); weighted box fusion is offered beside it. Keypoints average the keypoint head's heatmaps
over views on fixed boxes.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints

from . import nms
from .transforms import flip_heatmaps

# the padded path's budget: (image, class) groups are padded together in chunks of at most this
# many overlap-matrix entries (about 16 bytes each while a chunk is processed: IoU, overlaps, votes)
CHUNK_ELEMENTS = 2 ** 25
# a single group larger than this (sqrt: 11,585 boxes of one class in one image) goes to torchvision
MAX_GROUP_ELEMENTS = 2 ** 27

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
    classes = kept_labels.unique()
    if len(classes) == 1:
        same = all_labels == classes[0]
        return _vote(box_iou(kept_boxes, all_boxes[same]), all_boxes[same], all_scores[same], kept_scores,
                     vote_thresh, scoring)
    # class by class: only same-class boxes vote, so a (K, N) IoU over all classes is wasted work
    boxes, scores = kept_boxes.clone(), kept_scores.clone()
    for c in classes:
        k, same = kept_labels == c, all_labels == c
        boxes[k], scores[k] = _vote(box_iou(kept_boxes[k], all_boxes[same]), all_boxes[same], all_scores[same],
                                    kept_scores[k], vote_thresh, scoring)
    return boxes, scores


def _vote(iou, all_boxes, all_scores, kept_scores, vote_thresh: float, scoring: str, valid=None):
    """box_voting within one class, or within each group of a padded batch: iou [..., K, N] of the
    kept boxes with all boxes [..., N, 4] (scores [..., N]; valid [..., N] marks real ones)."""
    voters = iou >= vote_thresh
    if valid is not None:
        voters &= valid[..., None, :]
    w = torch.where(voters, all_scores[..., None, :], 0.0)
    boxes = (w @ all_boxes) / w.sum(-1, keepdim=True).clamp_min(1e-12)
    if scoring == "id":
        scores = kept_scores
    elif scoring == "avg":
        v = voters.to(all_scores.dtype)
        scores = (v * all_scores[..., None, :]).sum(-1) / v.sum(-1).clamp_min(1)
    else:
        p = iou * voters
        scores = (p * all_scores[..., None, :]).sum(-1) / p.sum(-1).clamp_min(1e-12)
    return boxes, scores


def weighted_box_fusion(boxes, scores, labels, num_views: int, iou_thresh: float = 0.55):
    """Weighted box fusion (Solovyev et al. 2021) over the union of all views' boxes.

    Boxes are visited by descending score; each joins the cluster of its class whose fused box
    overlaps it most, if by more than iou_thresh, otherwise it starts a cluster. A cluster's box is
    the score-weighted mean of its members; its score the mean member score times
    min(members, num_views) / num_views, so boxes few views agree on are down-weighted.

    The visit order makes this a sequential loop; it runs on NumPy arrays preallocated per class
    (a loop of tiny PyTorch calls costs several times more per step), then returns tensors on
    the input's device.
    """
    device, dtype = boxes.device, boxes.dtype
    b_all = boxes.detach().double().cpu().numpy()
    s_all = scores.detach().double().cpu().numpy()
    l_all = labels.detach().cpu().numpy()
    out_b, out_s, out_l = [], [], []
    for c in np.unique(l_all):
        idx = np.flatnonzero(l_all == c)
        idx = idx[np.argsort(-s_all[idx], kind="stable")]
        b, s = b_all[idx], s_all[idx]
        fused = np.empty_like(b)                    # fused box of each cluster so far
        area = np.empty(len(b))
        sum_wb = np.empty_like(b)
        sum_w = np.empty(len(b))
        count = np.zeros(len(b), dtype=np.int64)
        k = 0
        for i in range(len(b)):
            bi = b[i]
            j = -1
            if k:
                f = fused[:k]
                iw = np.minimum(f[:, 2], bi[2]) - np.maximum(f[:, 0], bi[0])
                ih = np.minimum(f[:, 3], bi[3]) - np.maximum(f[:, 1], bi[1])
                inter = np.maximum(iw, 0) * np.maximum(ih, 0)
                iou = inter / np.maximum(area[:k] + (bi[2] - bi[0]) * (bi[3] - bi[1]) - inter, 1e-12)
                best = int(iou.argmax())
                if iou[best] > iou_thresh:
                    j = best
            if j < 0:
                j, k = k, k + 1
                sum_wb[j], sum_w[j], count[j] = 0.0, 0.0, 0
            sum_wb[j] += bi * s[i]
            sum_w[j] += s[i]
            count[j] += 1
            fused[j] = sum_wb[j] / sum_w[j]
            area[j] = (fused[j, 2] - fused[j, 0]) * (fused[j, 3] - fused[j, 1])
        out_b.append(fused[:k])
        out_s.append(sum_w[:k] / count[:k] * np.minimum(count[:k], num_views) / num_views)
        out_l.append(np.full(k, c))
    if not out_b:
        return boxes[:0], scores[:0], labels[:0]
    return (torch.as_tensor(np.concatenate(out_b), dtype=dtype, device=device),
            torch.as_tensor(np.concatenate(out_s), dtype=scores.dtype, device=device),
            torch.as_tensor(np.concatenate(out_l), dtype=labels.dtype, device=device))


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


def ensemble_boxes_batch(boxes: list[torch.Tensor], scores: list[torch.Tensor], labels: list[torch.Tensor], *,
                         num_views: int = 1, method: str = "nms_vote", score_thresh: float = 0.05,
                         nms_thresh: float = 0.5, vote_thresh: float = 0.8, vote_scoring: str = "id",
                         wbf_thresh: float = 0.55, detections_per_img: int = 100, padded: bool | None = None):
    """`ensemble_boxes` for many images at once, with the same results.

    padded=True does it in a handful of tensor ops over every (image, class) group at once:
    NMS as a fixed point over a padded batch of IoU matrices (ml_core.nms), box voting on the same
    IoU matrices; groups of similar size are padded together, a chunk at a time (CHUNK_ELEMENTS).
    That is meant for a GPU, where per-image kernel launches dominate; on the CPU the padding costs
    more than it saves (benchmarks/ensemble_throughput.py), so the default (None) pads on CUDA
    only. WBF, being sequential, always goes one image at a time."""
    _check_choice(method, BOX_METHODS, "box ensembling method")
    _check_choice(vote_scoring, VOTE_SCORING, "vote scoring")
    n = len(boxes)
    kw = dict(num_views=num_views, method=method, score_thresh=score_thresh, nms_thresh=nms_thresh,
              vote_thresh=vote_thresh, vote_scoring=vote_scoring, wbf_thresh=wbf_thresh,
              detections_per_img=detections_per_img)
    if padded is None:
        padded = n > 0 and boxes[0].is_cuda
    if method == "wbf" or n == 0 or not padded:
        return [ensemble_boxes(b, s, lab, **kw) for b, s, lab in zip(boxes, scores, labels)]
    dev = boxes[0].device
    img = torch.cat([torch.full((len(b),), i, dtype=torch.long, device=dev) for i, b in enumerate(boxes)])
    return ensemble_boxes_flat(torch.cat(boxes), torch.cat(scores), torch.cat(labels), img, n, **kw)


def ensemble_boxes_flat(B: torch.Tensor, S: torch.Tensor, L: torch.Tensor, img: torch.Tensor, n: int, *,
                        num_views: int = 1, method: str = "nms_vote", score_thresh: float = 0.05,
                        nms_thresh: float = 0.5, vote_thresh: float = 0.8, vote_scoring: str = "id",
                        wbf_thresh: float = 0.55, detections_per_img: int = 100):
    """The padded path of `ensemble_boxes_batch` on the union of n images' boxes given flat, with
    img[i] the image of row i: a list of n (boxes, scores, labels), as ensemble_boxes gives."""
    if method == "wbf":
        return [ensemble_boxes(B[img == i], S[img == i], L[img == i], num_views=num_views, method=method,
                               score_thresh=score_thresh, wbf_thresh=wbf_thresh,
                               detections_per_img=detections_per_img) for i in range(n)]
    dev = B.device
    B, S, L = B.float(), S.float(), L.long()
    keep = S >= score_thresh
    B, S, L, img = B[keep], S[keep], L[keep], img[keep]
    n_lab = int(L.max()) + 1 if len(L) else 1
    key = img * n_lab + L
    order, counts, starts = nms.grouped_rows(key, S, n * n_lab)
    if max(counts, default=0) ** 2 > MAX_GROUP_ELEMENTS:
        # one (image, class) group too large to pad: torchvision's NMS, image by image
        return [ensemble_boxes(B[img == i], S[img == i], L[img == i], num_views=num_views, method=method,
                               score_thresh=score_thresh, nms_thresh=nms_thresh, vote_thresh=vote_thresh,
                               vote_scoring=vote_scoring, detections_per_img=detections_per_img)
                for i in range(n)]
    kept_rows, kept_b, kept_s = [], [], []
    for groups, width in nms.size_chunks(counts, CHUNK_ELEMENTS):
        rows, valid = nms.chunk_rows(order, counts, starts, groups, width)
        b, s = B[rows], S[rows]
        iou = nms.batched_iou(b, b)
        over = nms.suppressors(iou, nms_thresh, valid)
        k = nms.suppression_fixed_point(over, valid)
        if method == "nms_vote":          # every row voted on, only the kept ones used
            b, s = _vote(iou, b, s, s, vote_thresh, vote_scoring, valid)
        kept_rows.append(rows[k])
        kept_b.append(b[k])
        kept_s.append(s[k])
    if kept_rows:
        k = torch.cat(kept_rows)
        kb, ks, kl, kimg = torch.cat(kept_b), torch.cat(kept_s), L[k], img[k]
    else:
        kb, ks, kl, kimg = B[:0], S[:0], L[:0], img[:0]
    # top detections_per_img per image, by score
    by_score = ks.argsort(descending=True, stable=True)
    by_image = kimg[by_score].argsort(stable=True)
    order = by_score[by_image]
    counts = torch.bincount(kimg, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=dev) - starts[kimg[order]]
    order = order[rank < detections_per_img]
    out_img = kimg[order]
    sizes = torch.bincount(out_img, minlength=n).tolist()
    return list(zip(kb[order].split(sizes), ks[order].split(sizes), kl[order].split(sizes)))


def heatmap_views(keypoint_scales: str, view_scales: list[int], base_scale: int) -> list[bool]:
    """Which views' heatmaps vote on the keypoints, one flag per view (tta.EnsembleOptions.keypoint_scales).

    "all": every view; "auto": those at or below base_scale, the model's own test size (the
    smallest scale when all are larger); "64,96": the views of those scales, each of which must be
    one of view_scales. With no view_scales only the spelling is checked.
    """
    spec = str(keypoint_scales).strip().lower()
    if spec == "all":
        return [True] * len(view_scales)
    if spec == "auto":
        if not view_scales:
            return []
        limit = base_scale if min(view_scales) <= base_scale else min(view_scales)
        return [s <= limit for s in view_scales]
    try:
        chosen = {int(t) for t in spec.split(",")}
    except ValueError:
        raise ValueError(f'keypoint_scales must be "auto", "all" or scales such as "64,96", got {keypoint_scales!r}') \
            from None
    if not chosen or any(not 1 <= c <= 100_000 for c in chosen):
        raise ValueError(f"keypoint_scales must lie between 1 and 100000, got {keypoint_scales!r}")
    if view_scales and not chosen <= set(view_scales):
        missing = ", ".join(map(str, sorted(chosen - set(view_scales))))
        raise ValueError(f"keypoint_scales {missing} not among the views' scales "
                         f"({', '.join(map(str, sorted(set(view_scales))))})")
    return [s in chosen for s in view_scales]


def size_dependent_views(boxes: torch.Tensor, view_scales: list[int], base_scale: int,
                         area_thresh: float = 150.0 ** 2) -> torch.Tensor:
    """Detectron's keypoint scale-size dependence: which views may vote on which box.

    Small boxes (area < area_thresh, original pixels) ignore the down-scaled views (scale below
    base_scale, the model's own test size), large boxes the up-scaled ones: a small object shrunk
    further, or a large one blown past the receptive field, gives the worst heatmaps. Returns a
    (V, N) bool mask; a box that would be left with no view keeps them all.
    """
    scales = torch.as_tensor(view_scales, device=boxes.device)
    area = (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)
    small = area < area_thresh
    down, up = (scales < base_scale)[:, None], (scales > base_scale)[:, None]
    keep = ~((small[None, :] & down) | (~small[None, :] & up))
    return keep | ~keep.any(0, keepdim=True)


def ensemble_heatmaps(heatmaps: list[torch.Tensor], flipped: list[bool], flip_inds: list[int] | None,
                      method: str = "mean", keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-view keypoint logits on the same boxes -> one heatmap per box and keypoint.

    heatmaps[v] is (N, K, H, W), computed by view v on the ensembled boxes mapped into that view.
    Flipped views are mirrored back with left/right channels swapped before merging. keep, a
    (V, N) bool mask (see size_dependent_views), limits which views merge into which box.
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
    stack = torch.stack(aligned)                                               # (V, N, K, H, W)
    if keep is None:
        return stack.mean(0) if method == "mean" else stack.amax(0)
    if keep.shape != stack.shape[:2]:
        raise ValueError(f"keep mask of shape {tuple(keep.shape)} does not match {len(aligned)} views x "
                         f"{stack.shape[1]} boxes")
    m = keep.to(stack.dtype)[:, :, None, None, None]
    if method == "mean":
        return (stack * m).sum(0) / m.sum(0).clamp_min(1)
    return stack.masked_fill(m == 0, float("-inf")).amax(0)


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
    for b, lab in zip(view_boxes, view_labels):
        if b.numel() == 0:
            continue
        iou = box_iou(ens_boxes, b.float()) * (ens_labels[:, None] == lab[None, :])
        total += float(iou.amax(1).sum())
    return total / (n_views * len(ens_boxes))


def agreement_padded(view_boxes: torch.Tensor, view_labels: torch.Tensor, view_valid: torch.Tensor,
                     ens_boxes: torch.Tensor, ens_labels: torch.Tensor, ens_valid: torch.Tensor) -> list[float]:
    """`agreement` for n images at once, on padded tensors: view_* [n, V, D(, 4)], ens_* [n, E(, 4)]."""
    n, V, D = view_valid.shape
    E = ens_valid.shape[1]
    if E == 0 or D == 0:
        iou = view_boxes.new_zeros((n, E, V))
    else:
        iou = nms.batched_iou(ens_boxes.float(), view_boxes.float().reshape(n, V * D, 4), eps=0.0)
        same = (ens_labels[:, :, None] == view_labels.reshape(n, 1, V * D)) & view_valid.reshape(n, 1, V * D)
        iou = torch.where(same, iou, torch.zeros_like(iou)).reshape(n, E, V, D).amax(-1)   # [n, E, V]
    total = (iou * ens_valid[:, :, None]).sum((1, 2))
    n_ens = ens_valid.sum(1)
    any_view = view_valid.flatten(1).any(1)
    out = torch.where(n_ens > 0, total / (V * n_ens).clamp_min(1), (~any_view).float())
    return out.tolist()
