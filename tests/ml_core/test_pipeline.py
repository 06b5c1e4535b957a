import pytest

from ml_core.data import CocoData
from ml_core.pipeline import labeled_keypoint_fraction, pseudo_label_doc, pseudo_label_quality
from ml_core.selection import keypoint_threshold_for

CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
TRUTH = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.jpg"},
                    {"id": 2, "width": 100, "height": 100, "file_name": "2.jpg"}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
                         {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0},
                         {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 0},
                         {"id": 4, "image_id": 2, "category_id": 2, "bbox": [60, 60, 20, 20], "area": 400, "iscrowd": 0}],
         "categories": CATS}


def test_pseudo_label_quality_counts_hits_misses_and_false_labels():
    pseudo = {"images": TRUTH["images"], "categories": CATS, "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [11, 10, 20, 20], "score": 0.9},   # hit
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 30, 30], "score": 0.8},   # wrong class
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40], "score": 0.7}]}    # hit
    q = pseudo_label_quality(pseudo, TRUTH)
    assert q["instances"] == 3
    assert q["precision"] == pytest.approx(100 * 2 / 3, abs=0.01) and q["recall"] == 50.0
    assert 0 < q["bbox_AP"] < 100 and "keypoints_AP" not in q
    assert pseudo_label_quality(TRUTH, TRUTH)["bbox_AP"] == pytest.approx(100.0)


KP_CATS = [{"id": 1, "name": "figure", "keypoints": ["a", "b", "c"], "skeleton": []}]


def test_pseudo_labels_leave_low_scored_keypoints_unlabeled_and_quality_counts_the_right_ones():
    images = [{"id": 1, "width": 100, "height": 100, "file_name": "1.jpg"}]
    preds = {1: [{"bbox": [10, 10, 40, 40], "score": 0.9, "label": 1, "category_id": 1,
                  "keypoints": [20, 20, 1, 30, 30, 1, 90, 90, 1], "keypoint_scores": [8.0, 5.0, 0.5]}]}
    truth = {"images": images, "categories": KP_CATS, "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0,
         "keypoints": [20, 20, 2, 31, 30, 2, 40, 40, 2], "num_keypoints": 3}]}
    every = pseudo_label_doc({"images": images}, preds, 0.5, KP_CATS)
    assert every["annotations"][0]["num_keypoints"] == 3
    hidden = pseudo_label_doc({"images": images}, preds, 0.5, KP_CATS, keypoint_threshold=2.0)
    a = hidden["annotations"][0]
    assert a["keypoints"] == [20, 20, 1, 30, 30, 1, 90, 90, 0] and a["num_keypoints"] == 2
    # the third keypoint is 50 px off: with it 2 of 3 taught keypoints are right, without it 2 of 2
    assert pseudo_label_quality(every, truth, [0.07] * 3)["keypoint_precision"] == pytest.approx(66.67)
    assert pseudo_label_quality(hidden, truth, [0.07] * 3)["keypoint_precision"] == 100.0
    assert "keypoint_precision" not in pseudo_label_quality(TRUTH, TRUTH)


def test_keypoint_threshold_rules():
    labeled = CocoData(images=[{"id": 1, "width": 9, "height": 9, "file_name": "x.jpg"}], categories=KP_CATS,
                       annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5],
                                     "keypoints": [1, 1, 2, 2, 2, 1, 0, 0, 0, 3, 3, 2], "num_keypoints": 3}])
    assert labeled_keypoint_fraction(labeled) == pytest.approx(0.75)
    # an instance with no keypoint placed (COCO's num_keypoints 0, a person too small) does not count
    labeled.annotations.append({"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2],
                                "keypoints": [0] * 12, "num_keypoints": 0})
    assert labeled_keypoint_fraction(labeled) == pytest.approx(0.75)
    kept = [4.0, 3.0, 2.0, 1.0]   # the kept instances' keypoint scores
    assert keypoint_threshold_for("auto", kept, 0.75) == 2.0
    assert keypoint_threshold_for(None, kept, 0.75) is None
    assert keypoint_threshold_for(1.5, kept, 0.75) == 1.5
    with pytest.raises(ValueError):
        keypoint_threshold_for(float("nan"), kept, 0.75)


def test_pipeline_options_name_a_bad_round_teacher(tmp_path):
    from ml_core.engine import TrainConfig
    from ml_core.pipeline import PipelineOptions
    from ml_core.transforms import TransformSet
    for name in ("labeled.json", "unlabeled.json", "val.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match="round_teacher must be one of auto, ensemble, student"):
        PipelineOptions(str(tmp_path), str(tmp_path / "out"), "fasterrcnn_tiny", TransformSet([64]), TrainConfig(),
                        TrainConfig(), round_teacher="teacher")


def test_an_ensemble_refuses_a_model_of_other_categories(tmp_path):
    import torch
    from ml_core.checkpoint import model_meta, save_checkpoint
    from ml_core.models import build_model
    from ml_core.pipeline import predictor_for
    from ml_core.transforms import TransformSet
    paths = []
    for k, cats in enumerate((CATS, CATS[:1])):
        torch.manual_seed(k)
        m, _ = build_model("fasterrcnn_tiny", len(cats) + 1, min_size=64, max_size=96)
        paths.append(str(tmp_path / f"m{k}.pt"))
        save_checkpoint(paths[-1], m, model_meta("fasterrcnn_tiny", cats, None, 64, 96))
    with pytest.raises(ValueError, match="m1.pt predicts other categories"):
        predictor_for(paths[0], TransformSet([64]), device="cpu", extra_checkpoints=[paths[1]])
