"""Bob can neither read nor change anything of Alice's, through any route."""
import pytest

from distill_app.models import Image, Prediction, Review


@pytest.fixture
def alices(as_alice, det_project, finished_run, teacher):
    image = Prediction.objects.filter(run_id=finished_run["id"], image__dataset__role="unlabeled").first().image_id
    review = as_alice.post("/api/reviews/", {"run": finished_run["id"], "image": image, "state": "accepted"}, format="json").json()
    pls = as_alice.post("/api/pseudo-label-sets/", {"run": finished_run["id"], "thresholds": 0.0}, format="json").json()
    ev = as_alice.get("/api/evaluations/").json()["results"][0]
    return {"project": det_project["project"], "dataset": det_project["labeled"], "unlabeled": det_project["unlabeled"],
            "image": image, "model": teacher["checkpoint"], "run": finished_run["id"], "review": review["id"],
            "pls": pls["id"], "training": teacher["id"], "evaluation": ev["id"], "job": teacher["job"]["id"]}


READS = ["/api/projects/{project}/", "/api/projects/{project}/pipeline/", "/api/datasets/{dataset}/",
         "/api/datasets/{dataset}/export/", "/api/images/{image}/", "/api/images/{image}/file/",
         "/api/images/{image}/thumbnail/", "/api/models/{model}/", "/api/models/{model}/download/",
         "/api/inference-runs/{run}/", "/api/inference-runs/{run}/predictions/", "/api/inference-runs/{run}/threshold-stats/",
         "/api/inference-runs/{run}/scores/", "/api/reviews/{review}/", "/api/pseudo-label-sets/{pls}/",
         "/api/pseudo-label-sets/{pls}/export/", "/api/training-runs/{training}/", "/api/evaluations/{evaluation}/",
         "/api/jobs/{job}/"]
WRITES = [("post", "/api/datasets/{dataset}/upload/"), ("post", "/api/datasets/{dataset}/upload-zip/"),
          ("post", "/api/datasets/{dataset}/import-coco/"), ("delete", "/api/images/{image}/"),
          ("delete", "/api/models/{model}/"), ("post", "/api/inference-runs/{run}/cancel/"),
          ("post", "/api/inference-runs/{run}/retry/"), ("post", "/api/inference-runs/{run}/bulk-accept/"),
          ("post", "/api/reviews/{review}/undo/"), ("patch", "/api/reviews/{review}/"), ("delete", "/api/reviews/{review}/"),
          ("delete", "/api/pseudo-label-sets/{pls}/"), ("post", "/api/training-runs/{training}/cancel/"),
          ("post", "/api/training-runs/{training}/retry/"), ("post", "/api/jobs/{job}/cancel/"),
          ("patch", "/api/projects/{project}/"), ("delete", "/api/projects/{project}/"), ("delete", "/api/datasets/{dataset}/")]


@pytest.mark.parametrize("path", READS)
def test_bob_cannot_read(as_bob, alices, path):
    assert as_bob.get(path.format(**alices)).status_code == 404


@pytest.mark.parametrize("method, path", WRITES)
def test_bob_cannot_change(as_bob, alices, method, path):
    r = getattr(as_bob, method)(path.format(**alices), {}, format="json")
    assert r.status_code == 404, (path, r.status_code)


def test_bob_sees_empty_lists(as_bob, alices):
    for path in ["/api/projects/", "/api/datasets/", "/api/images/", "/api/models/", "/api/inference-runs/",
                 "/api/reviews/", "/api/pseudo-label-sets/", "/api/training-runs/", "/api/evaluations/", "/api/jobs/"]:
        assert as_bob.get(path).json()["count"] == 0, path


def test_bob_cannot_use_alices_objects_in_his_own_requests(as_bob, alices):
    mine = as_bob.post("/api/projects/", {"name": "bob's"}, format="json").json()
    r = as_bob.post("/api/datasets/", {"project": alices["project"], "name": "x", "role": "labeled"}, format="json")
    assert r.status_code == 400
    r = as_bob.post("/api/inference-runs/", {"project": mine["id"], "checkpoint": alices["model"], "dataset": alices["unlabeled"]}, format="json")
    assert r.status_code == 400 and "checkpoint" in r.json()["message"]
    r = as_bob.post("/api/reviews/", {"run": alices["run"], "image": alices["image"], "state": "rejected"}, format="json")
    assert r.status_code == 400
    r = as_bob.post("/api/pseudo-label-sets/", {"run": alices["run"], "thresholds": 0.5}, format="json")
    assert r.status_code == 400
    r = as_bob.post("/api/evaluations/", {"checkpoint": alices["model"], "dataset": alices["dataset"]}, format="json")
    assert r.status_code == 400
    r = as_bob.post("/api/models/upload/", {"project": alices["project"]}, format="multipart")
    assert r.status_code == 400
    assert Review.objects.get(pk=alices["review"]).state == "accepted"
    assert Image.objects.filter(dataset_id=alices["dataset"]).count() == 6


def test_pages_are_private(client, bob, alices):
    client.force_login(bob)
    assert client.get(f"/projects/{alices['project']}/").status_code == 404
    assert client.get(f"/runs/{alices['run']}/review/").status_code == 404
    assert client.get(f"/training/{alices['training']}/").status_code == 404
