import json

import pytest

from distill_app.models import Prediction


def test_run_covers_every_image_with_every_view(as_alice, det_project, finished_run):
    assert finished_run["chunks_total"] == 3  # 6 unlabeled + 4 validation, 4 per chunk
    assert finished_run["view_names"] == ["s48", "s48-flip", "s64", "s64-flip"]
    page = as_alice.get(f"/api/inference-runs/{finished_run['id']}/predictions/").json()
    assert page["count"] == 6
    p = page["results"][0]
    assert set(p["views"]) == set(finished_run["view_names"]) and "agreement" in p and p["review"] is None


def test_ordering_by_agreement_and_filters(as_alice, finished_run):
    rid = finished_run["id"]
    ag = [r["agreement"] for r in as_alice.get(f"/api/inference-runs/{rid}/predictions/?ordering=agreement&views=false").json()["results"]]
    assert ag == sorted(ag)
    r = as_alice.get(f"/api/inference-runs/{rid}/predictions/?ordering=sideways")
    assert r.status_code == 400 and "ordering must be one of" in r.json()["message"]
    r = as_alice.get(f"/api/inference-runs/{rid}/predictions/?category=99")
    assert r.status_code == 400


def test_stored_orderings_page_as_the_database_does(as_alice, finished_run):
    from distill_app import review_order
    from distill_app.models import InferenceRun
    run = InferenceRun.objects.get(pk=finished_run["id"])
    preds = Prediction.objects.filter(run=run, validation=False).order_by("id")
    preds.filter(id__in=list(preds.values_list("id", flat=True)[:3])).update(agreement=0.5, max_score=0.5)  # ties
    assert review_order.build(run) == 6

    def pages(ordering):
        return [[r["image"] for r in as_alice.get(f"/api/inference-runs/{run.pk}/predictions/?ordering={ordering}"
                                                  f"&views=false&page_size=4&page={k}").json()["results"]]
                for k in (1, 2)]
    orderings = ["image", "agreement", "-agreement", "max_score", "-max_score"]
    assert review_order.ordered_ids(run, "-agreement").count() == 6  # the stored path answers
    stored = {o: pages(o) for o in orderings}
    (run.folder / "order.npz").unlink()  # now every page is the database's ORDER BY ... OFFSET
    assert review_order.ordered_ids(run, "agreement") is None
    assert {o: pages(o) for o in orderings} == stored
    assert all(len(a) == 4 and len(b) == 2 for a, b in stored.values())


def test_compact_rows_are_the_full_rows_rounded(as_alice, finished_run):
    base = f"/api/inference-runs/{finished_run['id']}/predictions/?ordering=-max_score&views=false"
    full, compact = as_alice.get(base).json()["results"], as_alice.get(base + "&compact=1").json()["results"]
    assert [r["image"] for r in compact] == [r["image"] for r in full]
    assert sum(len(r["ensembled"]) for r in full) > 0
    for f, c in zip(full, compact):
        assert len(c["ensembled"]) == len(f["ensembled"]) and "url" not in c
        for d, row in zip(f["ensembled"], c["ensembled"]):
            assert row[:4] == pytest.approx(d["bbox"], abs=0.0501) and row[4] == pytest.approx(d["score"], abs=5e-6)
            assert row[5] == d["category_id"] and len(row) == 6


def test_threshold_stats(as_alice, finished_run):
    rid = finished_run["id"]
    lo = as_alice.get(f"/api/inference-runs/{rid}/threshold-stats/?threshold=0").json()
    hi = as_alice.get(f"/api/inference-runs/{rid}/threshold-stats/?threshold=1").json()
    assert lo["current"]["instances"] >= hi["current"]["instances"]
    assert lo["current"]["instances"] == sum(Prediction.objects.filter(run_id=rid, image__dataset__role="unlabeled")
                                             .values_list("num_instances", flat=True))
    assert hi["current"]["images_with_labels"] <= lo["current"]["images_with_labels"] <= 6
    assert "precision" in lo["current"] and lo["validation"]["ground_truth"] > 0
    assert set(lo["histograms"]) >= {"edges", "all"} and len(lo["curves"]["thresholds"]) == 51
    assert lo["labeled_instances_per_image"] > 0 and lo["auto_threshold"] is not None
    per_class = as_alice.get(f"/api/inference-runs/{rid}/threshold-stats/", {"threshold": 0, "thresholds": json.dumps({"1": 1.0})}).json()
    assert per_class["current"]["per_category"].get("1", 0) == 0


@pytest.mark.parametrize("query, message", [("threshold=1.5", "must lie in [0, 1]"), ("threshold=abc", "number"),
                                            ("thresholds=[1]", "JSON object"), ("thresholds={\"x\":0.5}", "not a category id")])
def test_bad_thresholds(as_alice, finished_run, query, message):
    r = as_alice.get(f"/api/inference-runs/{finished_run['id']}/threshold-stats/?{query}")
    assert r.status_code == 400 and message in r.json()["message"]


def test_scores_payload_matches_stats(as_alice, finished_run):
    s = as_alice.get(f"/api/inference-runs/{finished_run['id']}/scores/").json()
    assert len(s["scores"]) == len(s["categories"]) == len(s["image_index"])
    assert len(s["image_ids"]) == 6


def test_bad_transform_options(as_alice, det_project, teacher):
    body = {"project": det_project["project"], "checkpoint": teacher["checkpoint"], "dataset": det_project["unlabeled"]}
    r = as_alice.post("/api/inference-runs/", {**body, "transforms": {"scales": []}}, format="json")
    assert r.status_code == 400 and "at least one scale" in r.json()["message"]
    r = as_alice.post("/api/inference-runs/", {**body, "options": {"method": "avg"}}, format="json")
    assert "nms_vote, nms, wbf" in r.json()["message"]
    r = as_alice.post("/api/inference-runs/", {**body, "dataset": det_project["labeled"]}, format="json")
    assert "unlabeled dataset" in r.json()["message"]


def test_an_ensemble_of_two_models_runs_both_models_views(as_alice, det_project, teacher):
    """A round's student labels together with the model that taught it: both models' views, one ensemble."""
    from .conftest import run_inference, train_teacher
    other = train_teacher(as_alice, det_project)
    run = run_inference(as_alice, det_project, other["checkpoint"], ensemble_with=teacher["checkpoint"])
    assert run["job"]["state"] == "succeeded", run["job"]
    assert run["ensemble_with"] == teacher["checkpoint"]
    one = ["s48", "s48-flip", "s64", "s64-flip"]
    assert run["view_names"] == [f"m1-{v}" for v in one] + [f"m2-{v}" for v in one]
    p = as_alice.get(f"/api/inference-runs/{run['id']}/predictions/").json()["results"][0]
    assert set(p["views"]) == set(run["view_names"])
    # a model an inference run ensembles with cannot be deleted from under it
    r = as_alice.delete(f"/api/models/{teacher['checkpoint']}/")
    assert r.status_code == 409 and "inference runs use this checkpoint" in r.json()["message"]


def test_bad_ensembles_are_refused_by_name(as_alice, det_project, teacher):
    body = {"project": det_project["project"], "checkpoint": teacher["checkpoint"], "dataset": det_project["unlabeled"]}
    r = as_alice.post("/api/inference-runs/", {**body, "ensemble_with": teacher["checkpoint"]}, format="json")
    assert r.status_code == 400 and "the checkpoint itself" in r.json()["message"]
    r = as_alice.post("/api/inference-runs/", {**body, "ensemble_with": 99999}, format="json")
    assert r.status_code == 400 and "ensemble_with" in r.json()["message"]


def test_retry_runs_only_missing_chunks(as_alice, finished_run, monkeypatch):
    from distill_app import tasks
    from distill_app.models import Job, InferenceRun
    run = InferenceRun.objects.get(pk=finished_run["id"])
    Prediction.objects.filter(run=run, chunk=1).delete()  # as if the worker died during chunk 1
    Job.objects.filter(pk=run.job_id).update(state=Job.FAILED, error="worker lost")
    calls = []
    real = tasks.infer_chunk.run
    monkeypatch.setattr(tasks.infer_chunk, "run", lambda run_id, chunk, attempt=None:
                        (calls.append((chunk, attempt)), real(run_id, chunk, attempt=attempt))[1])
    r = as_alice.post(f"/api/inference-runs/{run.pk}/retry/")
    assert r.status_code == 202
    assert calls == [(1, 2)]  # the missing chunk, as the job's second attempt
    assert as_alice.get(f"/api/inference-runs/{run.pk}/").json()["job"]["state"] == "succeeded"
    assert Prediction.objects.filter(run=run).count() == 10


def test_validation_ap_per_view_comes_from_pycocotools(as_alice, finished_run):
    """A view made equal to the truth scores AP 100, an empty one 0; the API shows the ensemble
    beside every view."""
    from distill_app import threshold_stats
    from distill_app.models import Annotation, InferenceRun
    run = InferenceRun.objects.get(pk=finished_run["id"])
    stats = as_alice.get(f"/api/inference-runs/{run.pk}/threshold-stats/").json()
    assert set(stats["validation"]["ap"]["bbox"]) == {"ensembled", *run.view_names}
    for p in Prediction.objects.filter(run=run, validation=True):
        truth = [{"bbox": a.bbox, "score": 1.0, "category_id": a.category_id} for a in Annotation.objects.filter(image=p.image)]
        p.views = {**p.views, "s48": truth, "s64": []}
        p.save()
    ap = threshold_stats.view_ap(run)["bbox"]
    assert ap["s48"]["AP"] == pytest.approx(100.0) and ap["s64"]["AP"] == 0.0
