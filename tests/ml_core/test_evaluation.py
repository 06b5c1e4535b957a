import pytest

from ml_core.evaluation import COCOEvaluator

GT = {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40]},
                      {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 30, 30]},
                      {"id": 3, "image_id": 3, "category_id": 2, "bbox": [0, 0, 60, 60]}],
      "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def test_perfect_predictions_give_100_ap():
    ev = COCOEvaluator(GT, "bbox")
    for a in GT["annotations"]:
        ev.process(a["image_id"], [{"bbox": a["bbox"], "score": 0.9, "category_id": a["category_id"]}])
    stats = ev.evaluate()
    assert stats["AP"] == pytest.approx(100.0) and len(stats) == 12


def test_missing_and_wrong_predictions_lower_ap():
    ev = COCOEvaluator(GT, "bbox")
    ev.process(1, [{"bbox": [10, 10, 40, 40], "score": 0.9, "category_id": 1}])
    ev.process(3, [{"bbox": [0, 0, 60, 60], "score": 0.9, "category_id": 1}])  # wrong class
    stats = ev.evaluate()
    assert 0 < stats["AP"] < 100


def test_keypoint_ap_uses_the_schema_sigmas():
    cats = [{"id": 1, "name": "p", "keypoints": ["left_a", "right_a"], "skeleton": [[1, 2]]}]
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.jpg"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50],
                           "keypoints": [20, 20, 2, 40, 40, 2]}], "categories": cats}
    ev = COCOEvaluator(gt, "keypoints", [0.05, 0.05])
    ev.process(1, [{"bbox": [10, 10, 50, 50], "score": 0.9, "category_id": 1, "keypoints": [20, 20, 1, 40, 40, 1]}])
    assert ev.evaluate()["AP"] == pytest.approx(100.0)
    ev.reset()
    ev.process(1, [{"bbox": [10, 10, 50, 50], "score": 0.9, "category_id": 1, "keypoints": [40, 40, 1, 20, 20, 1]}])
    assert ev.evaluate()["AP"] < 50  # left and right swapped


def test_unknown_iou_type():
    with pytest.raises(ValueError, match="bbox, keypoints"):
        COCOEvaluator(GT, "segm")


def test_named_evaluator_scores_each_prediction_set_alone():
    from ml_core.evaluation import NamedEvaluator
    ev = NamedEvaluator(GT, ["perfect", "half", "none"])
    for a in GT["annotations"]:
        p = [{"bbox": a["bbox"], "score": 0.9, "category_id": a["category_id"]}]
        ev.process(a["image_id"], {"perfect": p, "half": p if a["category_id"] == 1 else []})
    out = ev.evaluate()
    assert out["perfect"]["bbox"]["AP"] == pytest.approx(100.0)
    assert out["half"]["bbox"]["AP"] == pytest.approx(50.0)   # class 2 missed entirely
    assert out["none"]["bbox"]["AP"] == 0.0 and list(out["none"]) == ["bbox"]
