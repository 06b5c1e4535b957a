import pytest

from distill_app.models import Prediction, Review


@pytest.fixture
def image_id(finished_run):
    return Prediction.objects.filter(run_id=finished_run["id"], image__dataset__role="unlabeled").order_by("image_id").first().image_id


def test_edit_keeps_raw_predictions_and_can_be_undone(as_alice, finished_run, image_id):
    raw = Prediction.objects.get(run_id=finished_run["id"], image_id=image_id).ensembled
    r = as_alice.post("/api/reviews/", {"run": finished_run["id"], "image": image_id, "state": "accepted"}, format="json")
    assert r.status_code == 201
    edit = [{"bbox": [1, 2, 10, 12], "category_id": 2}]
    r = as_alice.post("/api/reviews/", {"run": finished_run["id"], "image": image_id, "state": "edited", "instances": edit}, format="json")
    assert r.status_code == 200 and r.json()["state"] == "edited" and len(r.json()["history"]) == 2
    assert Prediction.objects.get(run_id=finished_run["id"], image_id=image_id).ensembled == raw
    rid = r.json()["id"]
    assert as_alice.post(f"/api/reviews/{rid}/undo/").json()["state"] == "accepted"
    assert as_alice.post(f"/api/reviews/{rid}/undo/").status_code == 204
    assert not Review.objects.exists()


def test_deleting_a_box_is_an_edit_found_through_the_api(as_alice, finished_run, image_id):
    pred = as_alice.get(f"/api/inference-runs/{finished_run['id']}/predictions/?image={image_id}").json()["results"][0]
    kept = pred["ensembled"][1:]
    as_alice.post("/api/reviews/", {"run": finished_run["id"], "image": image_id, "state": "edited", "instances": kept}, format="json")
    got = as_alice.get(f"/api/reviews/?run={finished_run['id']}").json()["results"]
    assert len(got) == 1 and len(got[0]["instances"]) == len(pred["ensembled"]) - 1
    page = as_alice.get(f"/api/inference-runs/{finished_run['id']}/predictions/?review=edited").json()
    assert [p["image"] for p in page["results"]] == [image_id]


@pytest.mark.parametrize("instances, message", [
    ([{"bbox": [0, 0, 0, 5], "category_id": 1}], "w, h > 0"),
    ([{"bbox": [0, 0, 5, 5], "category_id": 42}], "unknown category 42"),
    (None, "needs the list of instances"),
])
def test_bad_edits(as_alice, finished_run, image_id, instances, message):
    r = as_alice.post("/api/reviews/", {"run": finished_run["id"], "image": image_id, "state": "edited", "instances": instances}, format="json")
    assert r.status_code == 400 and message in r.json()["message"]


def test_reviews_only_for_images_of_the_run(as_alice, finished_run, det_project):
    from distill_app.models import Image
    val_image = Image.objects.filter(dataset_id=det_project["validation"]).first()
    r = as_alice.post("/api/reviews/", {"run": finished_run["id"], "image": val_image.pk, "state": "accepted"}, format="json")
    assert r.status_code == 400


def test_bulk_accept_above_threshold(as_alice, finished_run):
    r = as_alice.post(f"/api/inference-runs/{finished_run['id']}/bulk-accept/", {"threshold": 0.0}, format="json")
    n = r.json()["accepted"]
    assert n == Prediction.objects.filter(run_id=finished_run["id"], image__dataset__role="unlabeled", num_instances__gt=0).count()
    assert as_alice.post(f"/api/inference-runs/{finished_run['id']}/bulk-accept/", {"threshold": 0.0}, format="json").json()["accepted"] == 0
