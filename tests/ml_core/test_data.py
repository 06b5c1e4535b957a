
import pytest
import torch

from ml_core.data import CocoDetection, CocoFormatError, MixedBatchSampler, load_coco, parse_ratio, validate_coco


def doc(**over):
    d = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}],
         "categories": [{"id": 1, "name": "disc"}]}
    d.update(over)
    return d


@pytest.mark.parametrize("change, message", [
    ({"annotations": [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]}]}, "missing image id 9"),
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1]}]}, "missing category id 7"),
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 5]}]}, "zero or negative size"),
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [90, 0, 50, 5]}]}, "outside the 100x80 image"),
    ({"annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}] * 2}, "duplicate annotation id"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "width": 100}]}, "missing field(s) height"),
    ({"images": [{"id": 1, "file_name": "../etc/passwd", "width": 1, "height": 1}], "annotations": []}, "leaves the image folder"),
    ({"categories": []}, "no categories"),
])
def test_bad_entries_are_named(change, message):
    with pytest.raises(CocoFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_coco(doc(**change))


def test_skip_invalid_reports_what_was_skipped():
    d = doc(annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                         {"id": 2, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20]}])
    data = validate_coco(d, skip_invalid=True)
    assert len(data.annotations) == 1 and "annotations[1] (id 2)" in data.skipped[0]


def test_keypoint_count_must_match_the_schema():
    cats = [{"id": 1, "name": "p", "keypoints": ["left_a", "right_a"], "skeleton": [[1, 2]]}]
    bad = doc(categories=cats, annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5],
                                             "keypoints": [1, 1, 2]}])
    with pytest.raises(CocoFormatError, match="expected 6 keypoint values"):
        validate_coco(bad)


def test_malformed_json_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{ not json")
    with pytest.raises(CocoFormatError, match="not valid JSON"):
        load_coco(p)


def test_dataset_yields_torchvision_targets(tmp_path):
    from PIL import Image
    Image.new("RGB", (100, 80), (10, 20, 30)).save(tmp_path / "a.jpg")
    ds = CocoDetection(validate_coco(doc()), tmp_path)
    img, t = ds[0]
    assert img.shape == (3, 80, 100) and img.dtype == torch.float32
    assert t["boxes"].tolist() == [[10, 10, 30, 30]] and t["labels"].tolist() == [1]


@pytest.mark.parametrize("ratio, per_batch", [("6:4", (6, 4)), ("1:1", (5, 5)), ("9:1", (9, 1)), ("1:0", (10, 0))])
def test_mixed_sampler_ratio_in_every_batch(ratio, per_batch):
    s = MixedBatchSampler(n_labeled=7, n_pseudo=13, batch_size=10, ratio=ratio, num_batches=20, seed=1)
    batches = list(s)
    assert len(batches) == 20
    for b in batches:
        assert (sum(i < 7 for i in b), sum(i >= 7 for i in b)) == per_batch
    # every labeled image is seen before any is repeated
    first = [i for b in batches for i in b if i < 7][:7]
    assert sorted(first) == list(range(7))


def test_sampler_keeps_both_kinds_in_small_batches_and_can_resume():
    s = MixedBatchSampler(5, 5, batch_size=2, ratio="9:1", num_batches=6)
    assert all(sum(i < 5 for i in b) == 1 for b in s)
    full = list(MixedBatchSampler(5, 5, 4, "1:1", 6, seed=3))
    r = MixedBatchSampler(5, 5, 4, "1:1", 6, seed=3)
    r.skip = 4
    assert list(r) == full[4:]


def test_ratio_parsing():
    assert parse_ratio("6:4") == (6, 4)
    with pytest.raises(ValueError, match="labeled:pseudo"):
        parse_ratio("six")
    with pytest.raises(ValueError):
        MixedBatchSampler(0, 5, 4, "1:1")
