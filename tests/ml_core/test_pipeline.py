import pytest

from ml_core.pipeline import pseudo_label_quality

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
