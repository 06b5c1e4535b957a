import json

from distill_app.models import Prediction


def _create(client, run, **body):
    r = client.post("/api/pseudo-label-sets/", {"run": run, **body}, format="json")
    assert r.status_code == 201, r.json()
    return client.get(f"/api/pseudo-label-sets/{r.json()['id']}/").json()


def test_thresholds_and_reviews_shape_the_export(as_alice, finished_run):
    rid = finished_run["id"]
    preds = list(Prediction.objects.filter(run_id=rid, image__dataset__role="unlabeled").order_by("image_id"))
    everything = _create(as_alice, rid, thresholds={"default": 0.0})
    assert everything["counts"]["instances"] == sum(p.num_instances for p in preds)
    rejected, edited = preds[0].image_id, preds[1].image_id
    as_alice.post("/api/reviews/", {"run": rid, "image": rejected, "state": "rejected"}, format="json")
    as_alice.post("/api/reviews/", {"run": rid, "image": edited, "state": "edited",
                                    "instances": [{"bbox": [1, 1, 5, 5], "category_id": 1}]}, format="json")
    s = _create(as_alice, rid, thresholds={"default": 1.0})  # nothing passes 1.0 except the human edit
    doc = json.loads(b"".join(as_alice.get(f"/api/pseudo-label-sets/{s['id']}/export/").streaming_content))
    assert [im["id"] for im in doc["images"]] == [edited]
    assert doc["annotations"][0]["bbox"] == [1, 1, 5, 5] and doc["annotations"][0]["score"] == 1.0
    assert s["counts"]["rejected"] == 1 and s["counts"]["edited"] == 1


def test_bad_thresholds(as_alice, finished_run):
    r = as_alice.post("/api/pseudo-label-sets/", {"run": finished_run["id"], "thresholds": {"default": -0.1}}, format="json")
    assert r.status_code == 400 and "[0, 1]" in r.json()["message"]
    r = as_alice.post("/api/pseudo-label-sets/", {"run": finished_run["id"], "thresholds": "high"}, format="json")
    assert r.status_code == 400
