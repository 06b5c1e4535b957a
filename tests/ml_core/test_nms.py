"""ml_core.nms: padded greedy NMS against torchvision's, and the chunked grouping around it."""
import pytest
import torch
from torchvision.ops import batched_nms, nms as tv_nms

from ml_core import nms
from ml_core.ensemble import ensemble_boxes, ensemble_boxes_batch


def _grouped_nms(boxes, scores, groups, num_groups, thresh, max_elements=2 ** 25):
    """Kept row indices by descending score, through grouped_rows / size_chunks / padded_nms."""
    order, counts, starts = nms.grouped_rows(groups, scores, num_groups)
    kept = []
    for gs, width in nms.size_chunks(counts, max_elements):
        rows, valid = nms.chunk_rows(order, counts, starts, gs, width)
        kept.append(rows[nms.padded_nms(boxes[rows], valid, thresh)])
    k = torch.cat(kept)
    return k[scores[k].argsort(descending=True, stable=True)]


def test_padded_nms_equals_greedy_nms_on_a_long_suppression_chain():
    """Each box overlaps its neighbours (IoU 0.54) but not the next-but-one (0.25): greedy NMS
    keeps every other box, which the fixed-point iteration must reproduce link by link."""
    n = 30
    x = torch.arange(n, dtype=torch.float32) * 3
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], 1)
    boxes = torch.cat([boxes, boxes + 100])                       # a second group, scores reversed
    scores = torch.cat([torch.linspace(1, 0.1, n), torch.linspace(0.1, 1, n)])
    groups = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    ours = _grouped_nms(boxes, scores, groups, 2, 0.5)
    assert ours.tolist() == batched_nms(boxes, scores, groups, 0.5).tolist()
    assert len(ours) == 30


def test_padded_nms_equals_torchvision():
    torch.manual_seed(0)
    boxes = torch.rand(6, 50, 2) * 100
    boxes = torch.cat([boxes, boxes + torch.rand(6, 50, 2) * 40], -1)
    scores = torch.rand(6, 50)
    valid = torch.rand(6, 50) > 0.2
    s, v, order, (b,) = nms.sort_groups(scores, valid, boxes)
    keep = nms.padded_nms(b, v, 0.5)
    for g in range(6):
        idx = valid[g].nonzero()[:, 0]
        ref = idx[tv_nms(boxes[g, idx], scores[g, idx], 0.5)]
        assert torch.equal(order[g][keep[g]], ref)


def test_size_chunks_pad_groups_of_similar_size_together_within_the_budget():
    counts = [3, 0, 100, 10, 9, 100, 1]
    chunks = nms.size_chunks(counts, max_elements=2 * 100 * 100)
    assert chunks[0] == ([2, 5], 100)                 # the two large groups together
    assert sorted(g for gs, _ in chunks for g in gs) == [0, 2, 3, 4, 5, 6]   # every non-empty group once
    for gs, width in chunks:
        assert width == max(counts[g] for g in gs)
        assert len(gs) == 1 or len(gs) * width ** 2 <= 2 * 100 * 100
    assert nms.size_chunks([500], max_elements=100) == [([0], 500)]   # too large alone: its own chunk


@pytest.mark.parametrize("budget", [2 ** 25, 3000])
def test_grouped_nms_of_groups_of_very_different_sizes_equals_torchvision(budget):
    g = torch.Generator().manual_seed(1)
    sizes = [400, 3, 0, 57, 120, 1, 250]
    groups = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    xy = torch.rand(len(groups), 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(len(groups), 2, generator=g) * 60 + 1], 1)
    scores = torch.rand(len(groups), generator=g)
    ours = _grouped_nms(boxes, scores, groups, len(sizes), 0.5, max_elements=budget)
    assert ours.tolist() == batched_nms(boxes, scores, groups, 0.5).tolist()


def test_the_ensembling_of_a_pre_nms_union_equals_one_image_at_a_time(monkeypatch):
    """A pre-NMS union's shape: thousands of boxes in few classes per image, so the padded path
    pads (image, class) groups in several chunks (budget cut here to force many)."""
    import ml_core.ensemble as ens
    monkeypatch.setattr(ens, "CHUNK_ELEMENTS", 200_000)
    g = torch.Generator().manual_seed(2)
    boxes, scores, labels = [], [], []
    for n in (1200, 300, 0, 2000):
        centres = torch.rand(25, 2, generator=g) * 300
        pick = torch.randint(0, 25, (n,), generator=g)
        ctr = centres[pick] + torch.randn(n, 2, generator=g) * 4
        half = torch.rand(n, 2, generator=g) * 20 + 5
        boxes.append(torch.cat([ctr - half, ctr + half], 1))
        scores.append(torch.rand(n, generator=g) * 0.9 + 0.05)
        labels.append(torch.randint(1, 4, (n,), generator=g))
    batched = ensemble_boxes_batch(boxes, scores, labels, num_views=8, padded=True)
    for (bb, bs, bl), b, s, lab in zip(batched, boxes, scores, labels):
        eb, es, el = ensemble_boxes(b, s, lab, num_views=8)
        assert len(bb) == len(eb)
        assert torch.allclose(bb, eb, atol=1e-3) and torch.allclose(bs, es) and torch.equal(bl, el)


def test_a_group_too_large_to_pad_goes_to_torchvision(monkeypatch):
    import ml_core.ensemble as ens
    monkeypatch.setattr(ens, "MAX_GROUP_ELEMENTS", 100 ** 2)
    monkeypatch.setattr(ens.nms, "size_chunks", lambda *a: pytest.fail("padded a group over the limit"))
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(150, 2, generator=g) * 100
    b = torch.cat([xy, xy + 20], 1)
    s = torch.rand(150, generator=g)
    lab = torch.ones(150, dtype=torch.long)
    (bb, bs, bl), = ensemble_boxes_batch([b], [s], [lab], num_views=2, padded=True)
    eb, es, el = ensemble_boxes(b, s, lab, num_views=2)
    assert torch.allclose(bb, eb, atol=1e-4) and torch.equal(bl, el)
