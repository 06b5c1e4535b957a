import json

import pytest

from ml_core.synth import SynthConfig, generate


@pytest.fixture(scope="session")
def synth_det(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_det")
    generate(out, SynthConfig(kind="detection", image_size=64, labeled=6, unlabeled=6, val=4, seed=11))
    return out


def upload_split(client, dataset_id, folder, split):
    doc = json.loads((folder / f"{split}.json").read_text())
    files = [open(folder / split / im["file_name"], "rb") for im in doc["images"]]
    try:
        r = client.post(f"/api/datasets/{dataset_id}/upload/", {"files": files}, format="multipart")
    finally:
        for f in files:
            f.close()
    assert r.status_code == 200, r.json()
    return r.json(), doc


def build_project(client, folder, task="detection"):
    p = client.post("/api/projects/", {"name": "shapes", "task": task}, format="json").json()
    ids = {"project": p["id"]}
    for split, role in (("labeled", "labeled"), ("unlabeled", "unlabeled"), ("val", "validation")):
        ds = client.post("/api/datasets/", {"project": p["id"], "name": split, "role": role}, format="json").json()
        ids[role] = ds["id"]
        _, doc = upload_split(client, ds["id"], folder, split)
        if role != "unlabeled":
            r = client.post(f"/api/datasets/{ds['id']}/import-coco/", doc, format="json")
            assert r.status_code == 200, r.json()
    return ids


@pytest.fixture
def det_project(as_alice, synth_det):
    return build_project(as_alice, synth_det)


TINY_TRAIN = {"iterations": 2, "batch_size": 2, "lr": 0.01, "warmup_iters": 1, "num_workers": 0, "log_every": 1}


def train_teacher(client, ids):
    r = client.post("/api/training-runs/", {"project": ids["project"], "arch": "fasterrcnn_tiny", "labeled": ids["labeled"],
                                            "validation": ids["validation"], "config": TINY_TRAIN}, format="json")
    assert r.status_code == 201, r.json()
    run = client.get(f"/api/training-runs/{r.json()['id']}/").json()
    assert run["job"]["state"] == "succeeded", run["job"]
    return run


def run_inference(client, ids, checkpoint, **extra):
    body = {"project": ids["project"], "checkpoint": checkpoint, "dataset": ids["unlabeled"],
            "validation": ids["validation"], "transforms": {"scales": [48, 64], "flip": True, "max_size": 200},
            "chunk_size": 4, **extra}
    r = client.post("/api/inference-runs/", body, format="json")
    assert r.status_code == 201, r.json()
    run = client.get(f"/api/inference-runs/{r.json()['id']}/").json()
    return run


@pytest.fixture
def teacher(as_alice, det_project):
    return train_teacher(as_alice, det_project)


@pytest.fixture
def finished_run(as_alice, det_project, teacher):
    run = run_inference(as_alice, det_project, teacher["checkpoint"])
    assert run["job"]["state"] == "succeeded", run["job"]
    return run
