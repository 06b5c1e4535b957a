import pytest

from ml_core.schema import COCO_PERSON_KEYPOINTS, KeypointSchema, flip_map_from_names


def test_coco_person_flip_map_matches_torchvision():
    assert flip_map_from_names(COCO_PERSON_KEYPOINTS) == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


def test_names_without_pairs_refuse_flips():
    with pytest.raises(ValueError, match="no left_/right_ pairs"):
        KeypointSchema(["a", "b", "c"]).flip_indices()


def test_left_without_right_is_named():
    with pytest.raises(ValueError, match="left_hand"):
        flip_map_from_names(["head", "left_hand"])


def test_declared_flip_map_must_be_an_involution():
    with pytest.raises(ValueError, match="own inverse"):
        KeypointSchema(["a", "b", "c"], flip_map=[1, 2, 0])
    assert KeypointSchema(["a", "b", "c"], flip_map=[0, 2, 1]).flip_indices() == [0, 2, 1]


def test_coco_person_gets_coco_sigmas():
    assert KeypointSchema(COCO_PERSON_KEYPOINTS).sigmas[0] == 0.026
