"""A keypoint project through the API: COCO keypoints in, a Keypoint R-CNN teacher, inference with
flipped views (the flip map comes from the left_/right_ names), keypoints in the pseudo-labels."""
import json

import pytest

from ml_core.synth import SynthConfig, generate
from tests.app.conftest import TINY_TRAIN, build_project


@pytest.fixture(scope="module")
def synth_kp(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_kp")
    generate(out, SynthConfig(kind="keypoints", image_size=64, labeled=6, unlabeled=4, val=3, seed=2))
    return out


def test_keypoint_workflow(as_alice, synth_kp):
    ids = build_project(as_alice, synth_kp, task="keypoints")
    project = as_alice.get(f"/api/projects/{ids['project']}/").json()
    assert project["categories"][0]["keypoints"][1] == "warm_shoulder"
    assert project["categories"][0]["flip_map"] == list(range(9))
    r = as_alice.post("/api/training-runs/", {"project": ids["project"], "arch": "keypointrcnn_tiny", "labeled": ids["labeled"],
                                              "validation": ids["validation"], "config": TINY_TRAIN}, format="json")
    run = as_alice.get(f"/api/training-runs/{r.json()['id']}/").json()
    assert run["job"]["state"] == "succeeded", run["job"]["error"]
    evals = as_alice.get(f"/api/evaluations/?checkpoint={run['checkpoint']}").json()["results"]
    assert set(evals[0]["stats"]) == {"bbox", "keypoints"}
    r = as_alice.post("/api/inference-runs/", {"project": ids["project"], "checkpoint": run["checkpoint"], "dataset": ids["unlabeled"],
                                               "transforms": {"scales": [48, 64], "flip": True, "max_size": 200},
                                               "options": {"keypoint_size_dependence": True}}, format="json")
    inf = as_alice.get(f"/api/inference-runs/{r.json()['id']}/").json()
    assert inf["job"]["state"] == "succeeded", inf["job"]["error"]
    assert inf["options"]["keypoint_size_dependence"] is True and inf["options"]["keypoint_area_thresh"] == 22500
    assert inf["options"]["keypoint_scales"] == "auto"
    pred = as_alice.get(f"/api/inference-runs/{inf['id']}/predictions/").json()["results"][0]
    assert len(pred["ensembled"][0]["keypoints"]) == 27 and len(pred["views"]["s48-flip"][0]["keypoints"]) == 27
    assert len(pred["ensembled"][0]["keypoint_scores"]) == 9
    # by default the set leaves out the keypoints its teacher is least sure of, as many per instance as
    # the labeled set leaves unannotated (out of frame); the reviewer's own keypoints always stay
    pls = as_alice.post("/api/pseudo-label-sets/", {"run": inf["id"], "thresholds": 0.0}, format="json").json()
    assert pls["keypoint_threshold"] == "auto"
    pls = as_alice.get(f"/api/pseudo-label-sets/{pls['id']}/").json()
    doc = json.loads(b"".join(as_alice.get(f"/api/pseudo-label-sets/{pls['id']}/export/").streaming_content))
    assert doc["annotations"] and all(len(a["keypoints"]) == 27 for a in doc["annotations"])
    shown = sum(a["num_keypoints"] for a in doc["annotations"])
    labeled = [a["keypoints"] for a in as_alice.get(f"/api/datasets/{ids['labeled']}/export/").json()["annotations"]]
    fraction = sum(v > 0 for k in labeled for v in k[2::3]) / sum(len(k) // 3 for k in labeled)
    assert fraction < 1 and shown == pytest.approx(fraction * 9 * len(doc["annotations"]), rel=0.01)  # ties aside
    assert pls["counts"]["keypoints_hidden"] == 9 * len(doc["annotations"]) - shown > 0
    assert pls["counts"]["keypoint_threshold"] is not None
    # the review screen learns the same cut before any set is written: threshold-stats at the same
    # thresholds, and each compact row carries its keypoint scores to draw the left-out ones hollow
    cur = as_alice.get(f"/api/inference-runs/{inf['id']}/threshold-stats/?threshold=0").json()["current"]
    assert cur["keypoint_threshold_auto"] == pytest.approx(pls["counts"]["keypoint_threshold"], abs=1e-3)
    assert cur["keypoints_hidden_auto"] == pls["counts"]["keypoints_hidden"] and cur["keypoints_kept"] == 9 * len(doc["annotations"])
    row = as_alice.get(f"/api/inference-runs/{inf['id']}/predictions/?compact=1&views=false").json()["results"][0]
    assert len(row["ensembled"][0]) == 8 and len(row["ensembled"][0][7]) == 9
    every = as_alice.post("/api/pseudo-label-sets/", {"run": inf["id"], "thresholds": 0.0, "keypoint_threshold": None},
                          format="json").json()
    doc = json.loads(b"".join(as_alice.get(f"/api/pseudo-label-sets/{every['id']}/export/").streaming_content))
    assert all(a["num_keypoints"] == 9 for a in doc["annotations"])
    for bad in ("most", True, [1]):
        r = as_alice.post("/api/pseudo-label-sets/", {"run": inf["id"], "thresholds": 0.0, "keypoint_threshold": bad},
                          format="json")
        assert r.status_code == 400 and "keypoint_threshold" in r.json()["message"], r.json()


def test_bad_keypoint_area_is_a_clear_error(as_alice, det_project, teacher):
    r = as_alice.post("/api/inference-runs/", {"project": det_project["project"], "checkpoint": teacher["checkpoint"],
                                               "dataset": det_project["unlabeled"],
                                               "options": {"keypoint_area_thresh": 0}}, format="json")
    assert r.status_code == 400 and "keypoint_area_thresh must be positive" in r.json()["message"]


def test_bad_keypoint_scales_are_a_clear_error(as_alice, det_project, teacher):
    for scales, message in (("most", 'keypoint_scales must be "auto", "all" or scales'),
                            ("64,999", "keypoint_scales 999 not among the views' scales (64, 96)")):
        r = as_alice.post("/api/inference-runs/", {"project": det_project["project"], "checkpoint": teacher["checkpoint"],
                                                   "dataset": det_project["unlabeled"],
                                                   "transforms": {"scales": [64, 96]},
                                                   "options": {"keypoint_scales": scales}}, format="json")
        assert r.status_code == 400 and message in r.json()["message"], r.json()


def test_keypoint_project_refuses_detection_data(as_alice, synth_kp):
    from tests.app.conftest import upload_split
    p = as_alice.post("/api/projects/", {"name": "k", "task": "keypoints"}, format="json").json()
    ds = as_alice.post("/api/datasets/", {"project": p["id"], "name": "l", "role": "labeled"}, format="json").json()
    _, doc = upload_split(as_alice, ds["id"], synth_kp, "labeled")
    doc = {**doc, "categories": [{"id": 1, "name": "figure"}],
           "annotations": [{k: v for k, v in a.items() if k != "keypoints"} for a in doc["annotations"]]}
    r = as_alice.post(f"/api/datasets/{ds['id']}/import-coco/", doc, format="json")
    assert r.status_code == 400 and "declare no 'keypoints'" in r.json()["message"]
