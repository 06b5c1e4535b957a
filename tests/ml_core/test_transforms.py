import pytest
import torch

from ml_core.ensemble import ensemble_heatmaps
from ml_core.transforms import (RandomHorizontalFlip, TransformSet, View, boxes_to_view, flip_boxes, flip_heatmaps,
                                flip_keypoints)


def test_flip_boxes_uses_the_continuous_convention():
    b = torch.tensor([[10.0, 5.0, 30.0, 20.0]])
    assert flip_boxes(b, 100).tolist() == [[70.0, 5.0, 90.0, 20.0]]
    assert torch.equal(flip_boxes(flip_boxes(b, 100), 100), b)


def test_flip_keypoints_mirrors_and_swaps_left_right():
    kps = torch.tensor([[[50.0, 1, 1], [10.0, 2, 1], [90.0, 3, 1]]])  # nose, left, right
    out = flip_keypoints(kps, 100, [0, 2, 1])
    assert out[0, :, 0].tolist() == [50.0, 10.0, 90.0]  # the left keypoint is now where the right one was mirrored
    assert out[0, :, 1].tolist() == [1.0, 3.0, 2.0]


def test_flip_heatmaps_back_with_channel_swap():
    h = torch.zeros(1, 3, 4, 4)
    h[0, 1, 0, 0] = 1  # channel 1 (left) peaks at column 0 in the flipped view
    out = flip_heatmaps(h, [0, 2, 1])
    assert out[0, 2, 0, 3] == 1 and out.sum() == 1  # becomes the right channel at column 3


def test_flipped_view_heatmaps_ensemble_with_unflipped():
    orig = torch.zeros(2, 3, 8, 8)
    orig[:, 1, 2, 1] = 5
    flipped_view = flip_heatmaps(orig, [0, 2, 1])  # what a perfectly consistent flipped view would produce
    merged = ensemble_heatmaps([orig, flipped_view], [False, True], [0, 2, 1])
    assert torch.allclose(merged, orig)


def test_random_flip_moves_image_boxes_and_keypoints_together():
    img = torch.zeros(3, 10, 20)
    img[:, :, :5] = 1
    t = {"boxes": torch.tensor([[0.0, 0, 5, 10]]), "labels": torch.tensor([1]),
         "keypoints": torch.tensor([[[1.0, 1, 1], [4.0, 1, 1]]])}
    out_img, out_t = RandomHorizontalFlip(1.0, [1, 0])(img, t)
    assert out_img[:, :, 15:].all() and out_t["boxes"].tolist() == [[15.0, 0, 20, 10]]
    assert out_t["keypoints"][0, :, 0].tolist() == [16.0, 19.0]


def test_transform_set_views_and_validation():
    ts = TransformSet([600, 400], flip=True, max_size=1000)
    assert [v.name for v in ts.views] == ["s400", "s400-flip", "s600", "s600-flip"]
    with pytest.raises(ValueError):
        TransformSet([], True)
    with pytest.raises(ValueError, match="comma-separated"):
        TransformSet.parse("400,abc")
    with pytest.raises(ValueError, match="max_size"):
        TransformSet([800], max_size=500)


def test_boxes_to_view_scales_then_flips():
    b = torch.tensor([[10.0, 10, 20, 30]])
    out = boxes_to_view(b, View(200, True), (100, 50), (200, 100))
    assert out.tolist() == [[60.0, 20.0, 80.0, 60.0]]
