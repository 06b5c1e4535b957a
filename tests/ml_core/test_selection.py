import numpy as np
import pytest

from ml_core.selection import (auto_threshold, hide_keypoints, keypoint_auto_threshold, kept_curves, match_predictions,
                               match_to_truth, precision_recall, score_histograms, select)


def test_auto_threshold_keeps_as_many_per_image_as_the_labeled_set_has():
    scores = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    t = auto_threshold(scores, num_images=4, target_per_image=1.5)  # keep 6 of 8
    assert t == pytest.approx(0.5)
    assert sum(s >= t for s in scores) / 4 == pytest.approx(1.5)


def test_auto_threshold_with_too_few_predictions_keeps_everything():
    assert auto_threshold([0.9, 0.2], num_images=10, target_per_image=3) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        auto_threshold([0.5], num_images=0, target_per_image=1)


def test_select_with_per_class_thresholds():
    items = [{"label": 1, "score": 0.6}, {"label": 2, "score": 0.6}, {"label": 2, "score": 0.9}]
    assert select(items, {"default": 0.5, "2": 0.8}) == [items[0], items[2]]
    with pytest.raises(ValueError, match="must lie in"):
        select(items, 1.5)


def test_histograms_and_kept_curves():
    h = score_histograms([0.05, 0.55, 0.56, 0.99], [1, 1, 2, 2], bins=10)
    assert h["all"] == [1, 0, 0, 0, 0, 2, 0, 0, 0, 1] and h["2"][5] == 1
    c = kept_curves([[0.9, 0.2], [], [0.6]], [0.0, 0.5, 0.95])
    assert c["instances_per_image"] == pytest.approx([1.0, 2 / 3, 0.0], abs=1e-4)
    assert c["images_with_labels"] == [2, 2, 0]


def test_greedy_matching_and_precision_recall():
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    preds = [[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [50, 50, 60, 60]]
    tp = match_predictions(preds, [0.9, 0.8, 0.7, 0.6], [1, 1, 1, 1], gt, [1, 1])
    assert tp.tolist() == [True, False, True, False]  # the duplicate does not match a taken ground truth
    pr = precision_recall([0.9, 0.8, 0.7, 0.6], tp, 2, [0.0, 0.75, 0.85, 1.0])
    assert pr["precision"] == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert pr["recall"] == pytest.approx([1.0, 0.5, 0.5, 0.0])
    # a wrong class never matches
    assert not match_predictions([[0, 0, 10, 10]], [0.9], [2], gt, [1, 1]).any()
    assert np.asarray(match_predictions([], [], [], gt, [1, 1])).size == 0


def test_match_to_truth_names_the_ground_truth():
    gt = [[20, 20, 30, 30], [0, 0, 10, 10]]
    m = match_to_truth([[0, 0, 10, 10], [0, 0, 10, 9], [21, 20, 30, 30]], [0.9, 0.8, 0.7], [1, 1, 1], gt, [1, 1])
    assert m.tolist() == [1, -1, 0]


def test_keypoint_auto_threshold_keeps_the_labeled_share_of_keypoints():
    scores = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    t = keypoint_auto_threshold(scores, 0.8)                  # keep 8 of 10
    assert t == pytest.approx(2.0)
    assert sum(s >= t for s in scores) == 8
    # a labeled set that annotates every keypoint, or nothing kept: keep them all
    assert keypoint_auto_threshold(scores, 1.0) is None
    assert keypoint_auto_threshold(scores, None) is None
    assert keypoint_auto_threshold([], 0.5) is None
    assert keypoint_auto_threshold(scores, 0.0) == float("inf")
    with pytest.raises(ValueError):
        keypoint_auto_threshold(scores, -0.1)


def test_hide_keypoints_marks_the_low_scored_ones_unlabeled_and_keeps_where_they_were():
    kps = [10, 11, 1, 20, 21, 1, 30, 31, 1]
    assert hide_keypoints(kps, [5.0, 0.5, 2.0], 2.0) == [10, 11, 1, 20, 21, 0, 30, 31, 1]
    assert hide_keypoints(kps, [5.0, 0.5, 2.0], None) == kps
    assert hide_keypoints(kps, None, 2.0) == kps       # predictions without scores stay as they are
