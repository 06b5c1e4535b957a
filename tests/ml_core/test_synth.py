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


def test_keypoint_figures_have_left_right_pairs(kp_data):
    lab = load_coco(kp_data / "labeled.json")
    schema = lab.keypoint_schema()
    assert schema.num_keypoints >= 7
    assert schema.flip_indices() != list(range(schema.num_keypoints))


def test_bad_config():
    with pytest.raises(ValueError, match="detection, keypoints"):
        SynthConfig(kind="faces")
