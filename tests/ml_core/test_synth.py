import hashlib
import json

import pytest

from ml_core.data import load_coco
from ml_core.synth import SynthConfig, generate


def _digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def test_same_seed_same_files(tmp_path):
    cfg = SynthConfig(kind="detection", image_size=48, labeled=3, unlabeled=2, val=2, seed=5)
    generate(tmp_path / "a", cfg)
    generate(tmp_path / "b", cfg)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    generate(tmp_path / "c", SynthConfig(kind="detection", image_size=48, labeled=3, unlabeled=2, val=2, seed=6))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_detection_splits_are_valid_coco(det_data):
    lab = load_coco(det_data / "labeled.json")
    assert len(lab.categories) >= 3 and lab.annotations
    assert json.loads((det_data / "unlabeled.json").read_text())["annotations"] == []
    assert load_coco(det_data / "unlabeled_gt.json").annotations


def _side_colours(image, kps, names):
    """Which colour family lies under each visible warm_/cool_ hand and foot: 'warm' or 'cool'."""
    out = {}
    h, w = image.shape[-2:]
    for k, name in enumerate(names):
        x, y, v = kps[k].tolist()
        if v > 0 and name.split("_")[-1] in ("hand", "foot"):
            r, _, b = image[:, min(int(y), h - 1), min(int(x), w - 1)].tolist()
            out[name] = "warm" if r > b + 0.3 else "cool" if b > r + 0.3 else "?"
    return out


def test_keypoint_labels_follow_the_figures_through_a_mirror_image(tmp_path):
    """Sides are told apart by colour, which a mirror keeps, so the declared flip map must keep every
    channel: flip augmentation with a left/right swap would teach the warm hand as the cool one."""
    from ml_core.data import load_image, target_from_annotations
    from ml_core.transforms import RandomHorizontalFlip

    generate(tmp_path, SynthConfig(kind="keypoints", image_size=96, labeled=12, unlabeled=1, val=1, seed=7, max_objects=1))
    lab = load_coco(tmp_path / "labeled.json")
    schema = lab.keypoint_schema()
    assert schema.flip_indices() == list(range(schema.num_keypoints))
    checked = 0
    for im in lab.images:
        anns = [a for a in lab.annotations if a["image_id"] == im["id"]]
        if not anns:
            continue
        image = load_image(tmp_path / "labeled" / im["file_name"])
        target = target_from_annotations(anns, {1: 1}, schema.num_keypoints)
        flipped, ftarget = RandomHorizontalFlip(1.0, schema.flip_indices())(image, target)
        for img, t in ((image, target), (flipped, ftarget)):
            for name, colour in _side_colours(img, t["keypoints"][0], schema.names).items():
                assert colour in (name.split("_")[0], "?"), (im["file_name"], name, colour)
                checked += colour != "?"
    assert checked >= 40
    # the swap a person's keypoints need would put every warm label on a cool limb here
    swapped = [0, 2, 1, 4, 3, 6, 5, 8, 7]
    first = lab.annotations[0]
    image = load_image(tmp_path / "labeled" / next(im["file_name"] for im in lab.images if im["id"] == first["image_id"]))
    target = target_from_annotations([first], {1: 1}, schema.num_keypoints)
    flipped, ftarget = RandomHorizontalFlip(1.0, swapped)(image, target)
    wrong = _side_colours(flipped, ftarget["keypoints"][0], schema.names)
    assert wrong and all(colour != name.split("_")[0] for name, colour in wrong.items() if colour != "?")


def test_bad_config():
    with pytest.raises(ValueError, match="detection, keypoints"):
        SynthConfig(kind="faces")
