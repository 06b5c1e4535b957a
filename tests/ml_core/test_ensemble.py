import pytest
import torch

from ml_core import ensemble
from ml_core.ensemble import agreement, box_voting, ensemble_boxes, weighted_box_fusion


def T(x):
    return torch.tensor(x, dtype=torch.float32)


def test_nms_keeps_the_best_box_per_overlapping_group_and_class():
    boxes = T([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]])
    scores = T([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([1, 1, 2, 1])
    b, s, lab = ensemble_boxes(boxes, scores, labels, method="nms")
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert lab.tolist() == [1, 2, 1]


def test_box_voting_is_the_score_weighted_mean_of_boxes_above_the_vote_iou():
    # kept box [0,0,10,10] (0.9); voter [0,0,10,11] (IoU 0.909, 0.3); [0,0,10,14] (IoU 0.71 < 0.8) does not vote
    kept_b, kept_s, kept_l = T([[0, 0, 10, 10]]), T([0.9]), torch.tensor([1])
    all_b = T([[0, 0, 10, 10], [0, 0, 10, 11], [0, 0, 10, 14], [0, 0, 10, 11]])
    all_s = T([0.9, 0.3, 0.8, 0.5])
    all_l = torch.tensor([1, 1, 1, 2])  # the last one is another class
    b, s = box_voting(kept_b, kept_s, kept_l, all_b, all_s, all_l, vote_thresh=0.8, scoring="id")
    expected_y2 = (0.9 * 10 + 0.3 * 11) / 1.2
    assert b[0].tolist() == pytest.approx([0, 0, 10, expected_y2])
    assert s.tolist() == pytest.approx([0.9])
    _, s_avg = box_voting(kept_b, kept_s, kept_l, all_b, all_s, all_l, 0.8, "avg")
    assert s_avg.tolist() == pytest.approx([0.6])


def test_low_scores_are_dropped_before_nms_and_top_k_kept():
    boxes = T([[i * 20, 0, i * 20 + 10, 10] for i in range(5)])
    scores = T([0.04, 0.5, 0.6, 0.7, 0.8])
    b, s, _ = ensemble_boxes(boxes, scores, torch.ones(5, dtype=torch.long), detections_per_img=2)
    assert s.tolist() == pytest.approx([0.8, 0.7])


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="nms_vote, nms, wbf"):
        ensemble_boxes(T([[0, 0, 1, 1]]), T([1.0]), torch.tensor([1]), method="mean")


def test_wbf_fuses_agreeing_views_and_downweights_lonely_boxes():
    boxes = T([[0, 0, 10, 10], [0, 0, 10, 12], [50, 50, 60, 60]])
    scores = T([0.8, 0.6, 0.9])
    labels = torch.tensor([1, 1, 1])
    b, s, lab = weighted_box_fusion(boxes, scores, labels, num_views=2)
    order = s.argsort(descending=True)
    b, s = b[order], s[order]
    assert s.tolist() == pytest.approx([0.7, 0.45])
    assert b[0].tolist() == pytest.approx([0, 0, 10, (0.8 * 10 + 0.6 * 12) / 1.4])


def test_agreement_is_one_for_identical_views_and_drops_when_views_disagree():
    ens_b, ens_l = T([[0, 0, 10, 10]]), torch.tensor([1])
    same = [T([[0, 0, 10, 10]])] * 4
    assert agreement(same, [ens_l] * 4, ens_b, ens_l) == pytest.approx(1.0)
    half = [T([[0, 0, 10, 10]]), T([[0, 0, 10, 10]]), T([[0, 0, 0.5, 0.5]]).reshape(-1, 4)[:0], T([[0, 0, 10, 10]])]
    assert agreement(half, [ens_l] * 4, ens_b, ens_l) == pytest.approx(0.75)
    assert agreement([T([]).reshape(0, 4)], [torch.tensor([], dtype=torch.long)], T([]).reshape(0, 4),
                     torch.tensor([], dtype=torch.long)) == 1.0


@pytest.mark.parametrize("method, scoring", [("nms", "id"), ("nms_vote", "id"), ("nms_vote", "avg"), ("nms_vote", "iou_avg")])
def test_batched_ensembling_equals_one_image_at_a_time(method, scoring):
    from ml_core.ensemble import ensemble_boxes_batch
    g = torch.Generator().manual_seed(0)
    boxes, scores, labels = [], [], []
    for n in (40, 0, 25, 60):
        xy = torch.rand(n, 2, generator=g) * 80
        wh = torch.rand(n, 2, generator=g) * 30 + 2
        base = torch.cat([xy, xy + wh], 1)
        boxes.append(torch.cat([base, base + torch.randn(n, 4, generator=g)]))  # two views
        scores.append(torch.rand(2 * n, generator=g))
        labels.append(torch.randint(1, 4, (2 * n,), generator=g))
    batched = ensemble_boxes_batch(boxes, scores, labels, num_views=2, method=method, vote_scoring=scoring,
                                   detections_per_img=30, padded=True)
    for (bb, bs, bl), b, s, lab in zip(batched, boxes, scores, labels):
        eb, es, el = ensemble_boxes(b, s, lab, num_views=2, method=method, vote_scoring=scoring, detections_per_img=30)
        assert torch.allclose(bb, eb, atol=1e-4) and torch.allclose(bs, es, atol=1e-6) and torch.equal(bl, el)


def test_heatmap_views_auto_all_and_named():
    assert ensemble.heatmap_views("auto", [64, 96, 128, 160], 96) == [True, True, False, False]
    assert ensemble.heatmap_views("auto", [64, 64, 96, 96, 128, 128], 100) == [True] * 4 + [False] * 2
    # every view up-scaled: the smallest is the nearest to the model's size
    assert ensemble.heatmap_views("auto", [128, 160, 128], 96) == [True, False, True]
    assert ensemble.heatmap_views("all", [64, 160], 96) == [True, True]
    assert ensemble.heatmap_views(" 160, 64 ", [64, 96, 160], 96) == [True, False, True]
    for bad, msg in (("most", "must be"), ("0", "between 1 and"), ("64,200", "200 not among")):
        with pytest.raises(ValueError, match=msg):
            ensemble.heatmap_views(bad, [64, 96], 96)


def test_size_dependence_drops_down_scaled_views_for_small_boxes_and_up_scaled_for_large():
    from ml_core.ensemble import size_dependent_views
    boxes = T([[0, 0, 10, 10], [0, 0, 200, 200]])                   # areas 100 and 40,000
    keep = size_dependent_views(boxes, [400, 400, 800, 800, 1200], base_scale=800, area_thresh=150 ** 2)
    assert keep[:, 0].tolist() == [False, False, True, True, True]  # small: no down-scaled views
    assert keep[:, 1].tolist() == [True, True, True, True, False]   # large: no up-scaled views
    only_down = size_dependent_views(boxes[:1], [400, 600], base_scale=800)
    assert only_down[:, 0].tolist() == [True, True]                 # never left without a view


def test_heatmaps_merge_only_the_views_a_box_keeps():
    from ml_core.ensemble import ensemble_heatmaps
    a, b = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2) * 4
    keep = torch.tensor([[True, True], [False, True]])             # box 0 drops view 1
    mean = ensemble_heatmaps([a, b], [False, False], None, "mean", keep)
    assert mean[0].unique().tolist() == [0.0] and mean[1].unique().tolist() == [2.0]
    top = ensemble_heatmaps([b, a], [False, False], None, "max", keep.flip(0))
    assert top[0].unique().tolist() == [0.0] and top[1].unique().tolist() == [4.0]
    with pytest.raises(ValueError, match="does not match"):
        ensemble_heatmaps([a, b], [False, False], None, "mean", keep[:, :1])

