"""Greedy non-maximum suppression over many groups at once, without a kernel launch per group.

torchvision's `nms` runs one group per call and `batched_nms` either offsets coordinates (one call
over everything) or loops over the groups in Python; on a GPU, with hundreds of (view, class) or
(image, class) groups of a few hundred to a few thousand boxes, both spend their time in launches,
host synchronisations and the kernel's serial gathering of the kept set. Here groups are padded
into a [G, M] batch sorted by score and NMS is a fixed point over the batch of their overlap
matrices (`padded_nms`); groups of very different sizes are padded in chunks of similar size
(`size_chunks`) so that one large group does not inflate every other. Results equal torchvision's
(tests/ml_core/test_nms.py), up to the order of exactly tied scores.
"""
from __future__ import annotations

import torch

from .device import to_device


def batched_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[G, K, 4] x [G, N, 4] -> [G, K, N]. eps=0 divides exactly as torchvision's NMS kernels do
    (what the detector's own NMS must match); the default keeps empty boxes from dividing by 0."""
    # the same arithmetic as torchvision's kernels, in place on [G, K, N] matrices: these matrices are
    # the padded path's largest memory traffic (benchmarks/union_groups.py)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    inter = torch.minimum(a[:, :, None, 2], b[:, None, :, 2]).sub_(torch.maximum(a[:, :, None, 0], b[:, None, :, 0]))
    h = torch.minimum(a[:, :, None, 3], b[:, None, :, 3]).sub_(torch.maximum(a[:, :, None, 1], b[:, None, :, 1]))
    inter.clamp_min_(0).mul_(h.clamp_min_(0))
    union = (area_a[:, :, None] + area_b[:, None, :]).sub_(inter)
    return inter.div_(union.clamp_min_(eps) if eps else union)


def ranked_above(m: int, device) -> torch.Tensor:
    """[M, M] bool: entry (j, i) is True where rank j comes before rank i."""
    return torch.ones(m, m, dtype=torch.bool, device=device).triu_(1)


def suppressors(iou: torch.Tensor, iou_thresh: float, valid: torch.Tensor,
                above: torch.Tensor | None = None) -> torch.Tensor:
    """[G, M, M] bool, entry (g, j, i): box j of group g can suppress box i, being valid, ranked
    above it (`above`, ranked_above(M), if already made) and overlapping it by more than iou_thresh."""
    if above is None:
        above = ranked_above(iou.shape[-1], iou.device)
    return (iou > iou_thresh) & above & valid[:, :, None]


def suppression_fixed_point(over: torch.Tensor, valid: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
    """Greedy NMS from its overlap matrices: over[g, j, i] says box j ranks above box i in group g
    and overlaps it by more than the threshold (j valid). Greedy NMS keeps i iff no kept j
    suppresses it; iterating keep <- valid & not any_j(keep[j] & over[j, i]) from keep = valid
    reaches that unique fixed point (entry i depends only on the entries ranked above it, so after
    t steps the first t ranks are right; real suppression chains are a few boxes long). One host
    synchronisation per iteration (the convergence test). over is bool (made float16 on CUDA,
    where the products run on the tensor cores, float32 elsewhere) or already one of those.
    Returns keep [G, M] (bool); with `stats`, adds the steps taken to stats["steps"]."""
    if over.dtype == torch.bool:
        over = over.to(torch.float16 if over.is_cuda else torch.float32)
    dtype = over.dtype
    keep, step = valid, 0
    while step <= valid.shape[1]:
        step += 1
        hit = torch.bmm(keep.to(dtype)[:, None, :], over)[:, 0] > 0
        new = valid & ~hit
        if torch.equal(new, keep):
            break
        keep = new
    if stats is not None:
        stats["steps"] = stats.get("steps", 0) + step
    return keep


def padded_nms(boxes: torch.Tensor, valid: torch.Tensor, iou_thresh: float,
               max_elements: int = 2 ** 25) -> torch.Tensor:
    """Greedy NMS in every group of a padded batch at once: the same boxes as torchvision's nms.

    boxes [G, M, 4] are sorted by descending score inside each group; valid [G, M] marks real
    entries. Overlap is strictly above iou_thresh, with torchvision's exact division. The overlap
    matrices are built max_elements at a time; on CUDA they are held in float16 (half the memory,
    and the fixed point's products run on the tensor cores). Returns keep [G, M] (bool)."""
    G, M = valid.shape
    if G == 0 or M == 0:
        return valid.clone()
    dtype = torch.float16 if boxes.is_cuda else torch.float32
    over = torch.empty((G, M, M), dtype=dtype, device=boxes.device)
    above = ranked_above(M, boxes.device)
    step = max(1, max_elements // (M * M))
    for g in range(0, G, step):
        b = boxes[g:g + step].float()
        over[g:g + step] = suppressors(batched_iou(b, b, eps=0.0), iou_thresh, valid[g:g + step], above)
    return suppression_fixed_point(over, valid)


def sort_groups(scores: torch.Tensor, valid: torch.Tensor, *tensors: torch.Tensor):
    """Sort each row of [G, M] groups by descending score, invalid entries last; the tensors
    ([G, M] or [G, M, ...]) follow. Returns sorted scores (-inf where invalid), validity, order, tensors."""
    s = scores.float().masked_fill(~valid, float("-inf"))
    s, order = s.sort(dim=1, descending=True, stable=True)
    out = [t.gather(1, order.reshape(order.shape + (1,) * (t.dim() - 2)).expand_as(t)) if t.dim() > 2
           else t.gather(1, order) for t in tensors]
    return s, valid.gather(1, order), order, out


def size_chunks(counts: list[int], max_elements: int) -> list[tuple[list[int], int]]:
    """Groups (by index into counts) in chunks to pad together: by descending size, each chunk as
    many groups as fit chunk_size * width^2 <= max_elements, width its first (largest) group's
    size; a group larger than that alone is a chunk of its own. Empty groups are left out.
    Returns [(group indices, width)]."""
    order = sorted((g for g, c in enumerate(counts) if c), key=lambda g: -counts[g])
    chunks, i = [], 0
    while i < len(order):
        w = counts[order[i]]
        take = max(1, max_elements // (w * w))
        chunks.append((order[i:i + take], w))
        i += take
    return chunks


def grouped_rows(key: torch.Tensor, scores: torch.Tensor, num_groups: int):
    """Rows grouped by key, each group by descending score: (order, counts, starts) where
    order[starts[g]:starts[g] + counts[g]] are group g's rows (starts and counts on the host)."""
    by_score = scores.argsort(descending=True, stable=True)
    order = by_score[key[by_score].argsort(stable=True)]
    counts = torch.bincount(key, minlength=num_groups).tolist()
    starts, s = [], 0
    for c in counts:
        starts.append(s)
        s += c
    return order, counts, starts


def chunk_rows(order: torch.Tensor, counts: list[int], starts: list[int], groups: list[int], width: int):
    """The rows of some groups padded to [len(groups), width] (row indices, validity)."""
    dev = order.device
    st = to_device([starts[g] for g in groups], dev)
    ct = to_device([counts[g] for g in groups], dev)
    pos = torch.arange(width, device=dev)
    valid = pos[None, :] < ct[:, None]
    idx = (st[:, None] + pos[None, :]).clamp_(max=max(len(order) - 1, 0))
    return order[idx], valid
