"""Hostile and malformed input: every one of these answered 500 (or an HTML page) once. Each must
be a 4xx with a JSON `message` that names what is wrong."""
import io
import json

import pytest

from distill_app.models import Dataset, Image, InferenceRun, Job, ModelCheckpoint, Project
from tests.conftest import png_bytes

BIG = 100000000000000000000  # beyond 64 bits
CATS = [{"id": 1, "name": "square"}]


def assert_bad(r, *words, status=400):
    assert r.status_code == status, (r.status_code, r.content[:300])
    assert r["Content-Type"].startswith("application/json"), r["Content-Type"]
    msg = r.json()["message"]
    for w in words:
        assert w in msg, (w, msg)
    return msg


def deep(n=100000):
    return "[" * n + "]" * n


@pytest.fixture
def labeled(as_alice):
    """A labeled dataset holding one 64x48 image named a.png; its project has no categories yet."""
    p = as_alice.post("/api/projects/", {"name": "p", "task": "detection"}, format="json").json()
    ds = as_alice.post("/api/datasets/", {"project": p["id"], "name": "l", "role": "labeled"}, format="json").json()
    f = io.BytesIO(png_bytes())
    f.name = "a.png"
    r = as_alice.post(f"/api/datasets/{ds['id']}/upload/", {"files": [f]}, format="multipart")
    assert r.json()["counts"]["accepted"] == 1
    return ds


def coco(**over):
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}],
           "categories": CATS}
    doc.update(over)
    return doc


def coco_file(text: str | bytes, name="ann.json"):
    f = io.BytesIO(text.encode() if isinstance(text, str) else text)
    f.name = name
    return f


# --- import-coco -------------------------------------------------------------------------------

def test_coco_file_with_nan_in_a_bbox(as_alice, labeled):
    text = json.dumps(coco()).replace("[1, 2, 10, 10]", "[1, 2, NaN, 10]")
    r = as_alice.post(f"/api/datasets/{labeled['id']}/import-coco/", {"file": coco_file(text)}, format="multipart")
    assert_bad(r, "NaN")
    assert not Project.objects.get(pk=labeled["project"]).categories


def test_coco_number_overflowing_to_infinity(as_alice, labeled):
    text = json.dumps(coco()).replace("[1, 2, 10, 10]", "[1, 2, 1e999, 10]")
    r = as_alice.post(f"/api/datasets/{labeled['id']}/import-coco/", {"file": coco_file(text)}, format="multipart")
    assert_bad(r, "finite")
    r = as_alice.post(f"/api/datasets/{labeled['id']}/import-coco/", data=text, content_type="application/json")
    assert_bad(r, "finite")


def test_deeply_nested_json_as_file_and_as_body(as_alice, labeled):
    url = f"/api/datasets/{labeled['id']}/import-coco/"
    assert_bad(as_alice.post(url, {"file": coco_file(deep())}, format="multipart"), "nested")
    assert_bad(as_alice.post(url, data=deep(), content_type="application/json"), "nested")
    # nesting the parser survives but nothing needs: refused too
    doc = coco(info=json.loads(deep(200)))
    assert_bad(as_alice.post(url, {"file": coco_file(json.dumps(doc))}, format="multipart"), "nested")
    assert_bad(as_alice.post(url, data=json.dumps(doc), content_type="application/json"), "nested")
    # and on any other JSON route
    assert_bad(as_alice.post("/api/projects/", data=deep(), content_type="application/json"), "nested")


@pytest.mark.parametrize("body", ["[1,2]", "null", "[null]", '"text"', "3"])
def test_import_coco_body_that_is_not_an_object(as_alice, labeled, body):
    r = as_alice.post(f"/api/datasets/{labeled['id']}/import-coco/", data=body, content_type="application/json")
    assert_bad(r, "COCO JSON")


@pytest.mark.parametrize("image, words", [
    ({"id": [1], "file_name": "a.png", "width": 64, "height": 48}, ("images[0]", "id")),
    ({"id": 1, "file_name": {"a": 1}, "width": 64, "height": 48}, ("images[0]", "file_name")),
    ({"id": BIG, "file_name": "a.png", "width": 64, "height": 48}, ("images[0]", "id")),
    ("a.png", ("images[0]",)),
])
def test_coco_image_entries_of_the_wrong_type(as_alice, labeled, image, words):
    url = f"/api/datasets/{labeled['id']}/import-coco/"
    assert_bad(as_alice.post(url, coco(images=[image]), format="json"), *words)
    assert_bad(as_alice.post(url, {"file": coco_file(json.dumps(coco(images=[image])))}, format="multipart"), *words)


@pytest.mark.parametrize("ann, words", [
    ({"id": 1, "image_id": [1], "category_id": 1, "bbox": [1, 2, 10, 10]}, ("annotations[0]", "image_id")),
    ({"id": {}, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}, ("annotations[0]", "id")),
    ({"id": 1, "image_id": 1, "category_id": BIG, "bbox": [1, 2, 10, 10]}, ("annotations[0]", "category_id")),
    ({"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, True, 10]}, ("annotations[0]", "bbox")),
    ({"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10], "keypoints": "x"}, ("annotations[0]", "keypoints")),
    (7, ("annotations[0]",)),
])
def test_coco_annotation_entries_of_the_wrong_type(as_alice, labeled, ann, words):
    r = as_alice.post(f"/api/datasets/{labeled['id']}/import-coco/", coco(annotations=[ann]), format="json")
    assert_bad(r, *words)


def test_skip_invalid_drops_entries_of_the_wrong_type(as_alice, labeled):
    anns = [{"id": [9], "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}]
    r = as_alice.post(f"/api/datasets/{labeled['id']}/import-coco/?skip_invalid=1", coco(annotations=anns), format="json")
    assert r.status_code == 200, r.json()
    assert r.json()["annotations"] == 1 and any("annotations[0]" in s for s in r.json()["skipped"])


@pytest.mark.parametrize("cat, words", [
    ({"id": 1, "name": "p", "keypoints": "nose"}, ("categories[0]", "keypoints")),
    ({"id": 1, "name": "p", "keypoints": ["left_eye", "right_eye"], "skeleton": 3}, ("categories[0]", "skeleton")),
    ({"id": 1, "name": "p", "keypoints": ["left_eye", "right_eye"], "skeleton": [[1, 9]]}, ("categories[0]", "skeleton")),
    ({"id": 1, "name": "p", "keypoints": ["left_eye", "right_eye"], "sigmas": ["x", 1]}, ("categories[0]", "sigmas")),
    ({"id": "a", "name": 3}, ("categories[0]", "id")),
    ({"id": 1, "name": 3}, ("categories[0]", "name")),
    ({"id": [1], "name": "x"}, ("categories[0]", "id")),
    ({"id": BIG, "name": "x"}, ("categories[0]", "id")),
    ("square", ("categories[0]",)),
])
def test_bad_categories_are_refused_on_every_path(as_alice, labeled, cat, words):
    url = f"/api/datasets/{labeled['id']}/import-coco/"
    assert_bad(as_alice.post(url, coco(categories=[cat]), format="json"), *words)
    empty = {"images": [], "annotations": [], "categories": [cat]}
    assert_bad(as_alice.post(url, empty, format="json"), *words)
    assert_bad(as_alice.post(url, {"file": coco_file(json.dumps(empty))}, format="multipart"), *words)
    assert_bad(as_alice.post("/api/projects/", {"name": "q", "categories": [cat]}, format="json"), *words)
    assert_bad(as_alice.patch(f"/api/projects/{labeled['project']}/", {"categories": [cat]}, format="json"), *words)
    assert not Project.objects.get(pk=labeled["project"]).categories


def test_empty_coco_with_bad_categories_does_not_poison_the_project(as_alice, labeled):
    url = f"/api/datasets/{labeled['id']}/import-coco/"
    r = as_alice.post(url, {"images": [], "annotations": [], "categories": [{"id": "a", "name": 3}]}, format="json")
    assert_bad(r, "categories[0]")
    r = as_alice.post(url, coco(), format="json")
    assert r.status_code == 200, r.json()
    assert Project.objects.get(pk=labeled["project"]).categories == CATS


# --- thresholds --------------------------------------------------------------------------------

@pytest.fixture
def done_run(alice, labeled):
    """A succeeded inference run (no predictions) built directly: enough for threshold routes."""
    project = Project.objects.get(pk=labeled["project"])
    project.categories = CATS
    project.save()
    unl = Dataset.objects.create(project=project, name="u", role="unlabeled")
    Image.objects.create(dataset=unl, file="x.png", file_name="x.png", sha256="0" * 64, width=8, height=8)
    ckpt = ModelCheckpoint.objects.create(project=project, name="t", role="teacher", arch="fasterrcnn_tiny", file="t.pt",
                                          meta={"categories": CATS})
    job = Job.objects.create(project=project, owner=alice, kind="infer", state=Job.SUCCEEDED)
    return InferenceRun.objects.create(project=project, checkpoint=ckpt, dataset=unl, job=job, auto_threshold=0.4)


@pytest.mark.parametrize("body, words", [
    ({"threshold": None}, ("threshold",)),
    ({"threshold": "high"}, ("threshold",)),
    ({"threshold": 2}, ("threshold",)),
    ({"thresholds": [1]}, ("thresholds",)),
    ({"thresholds": {"1": None}}, ("thresholds", "'1'")),
    ({"thresholds": {"cat": 0.5}}, ("thresholds", "cat")),
    ({"thresholds": {"1": [0.5]}}, ("thresholds",)),
])
def test_bulk_accept_bad_thresholds(as_alice, done_run, body, words):
    assert_bad(as_alice.post(f"/api/inference-runs/{done_run.pk}/bulk-accept/", body, format="json"), *words)


@pytest.mark.parametrize("body", [[1, 2], None, "x"])
def test_bulk_accept_body_that_is_not_an_object(as_alice, done_run, body):
    r = as_alice.post(f"/api/inference-runs/{done_run.pk}/bulk-accept/", data=json.dumps(body),
                      content_type="application/json")
    assert r.status_code == 200 and r.json()["accepted"] == 0


def test_bulk_accept_thresholds_as_form_fields(as_alice, done_run):
    url = f"/api/inference-runs/{done_run.pk}/bulk-accept/"
    r = as_alice.post(url, {"thresholds": "{}"}, format="multipart")  # a JSON object in a form field
    assert r.status_code == 200 and r.json()["accepted"] == 0
    r = as_alice.post(url, {"thresholds": '{"1": 0.7}', "threshold": "0.3"}, format="multipart")
    assert r.status_code == 200
    assert_bad(as_alice.post(url, {"thresholds": "{"}, format="multipart"), "thresholds")
    assert_bad(as_alice.post(url, {"thresholds": "[1]"}, format="multipart"), "thresholds")


@pytest.mark.parametrize("query, words", [
    ('thresholds={"1":null}', ("thresholds", "'1'")),
    ("thresholds=[1]", ("thresholds",)),
    ("thresholds={", ("thresholds",)),
    ('thresholds={"1":1e999}', ("thresholds",)),
    ("threshold=abc", ("threshold",)),
    ("threshold=nan", ("threshold",)),
])
def test_threshold_stats_bad_thresholds(as_alice, done_run, query, words):
    assert_bad(as_alice.get(f"/api/inference-runs/{done_run.pk}/threshold-stats/?{query}"), *words)


@pytest.mark.parametrize("thresholds, words", [
    ({"1": None}, ("thresholds", "'1'")),
    ([1], ("thresholds",)),
    ({"default": "x"}, ("thresholds",)),
    (None, ("thresholds",)),
])
def test_pseudo_label_set_bad_thresholds(as_alice, done_run, thresholds, words):
    r = as_alice.post("/api/pseudo-label-sets/", {"run": done_run.pk, "thresholds": thresholds}, format="json")
    assert_bad(r, *words)


# --- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, words", [
    ({"transforms": [1]}, ("transforms",)),
    ({"transforms": "s400"}, ("transforms",)),
    ({"transforms": {"scales": [1e300]}}, ("transforms", "scales")),
    ({"transforms": {"scales": 5}}, ("transforms", "scales")),
    ({"transforms": {"flip": "no"}}, ("transforms", "flip")),
    ({"options": [1]}, ("options",)),
    ({"options": {"nms_thresh": "x"}}, ("options", "nms_thresh")),
    ({"chunk_size": BIG}, ("chunk_size",)),
])
def test_inference_run_bad_options(as_alice, done_run, extra, words):
    body = {"project": done_run.project_id, "checkpoint": done_run.checkpoint_id, "dataset": done_run.dataset_id, **extra}
    assert_bad(as_alice.post("/api/inference-runs/", body, format="json"), *words)


def test_training_run_bad_config(as_alice, labeled):
    body = {"project": labeled["project"], "labeled": labeled["id"], "arch": "fasterrcnn_tiny"}
    from distill_app.models import Annotation
    as_alice.post(f"/api/datasets/{labeled['id']}/import-coco/", coco(), format="json")
    assert Annotation.objects.exists()
    for config, words in (([1], ("config",)), ({"iterations": "10"}, ("config", "iterations")),
                          ({"lr": "fast"}, ("config", "lr")),
                          ({"steps": [[0.5]]}, ("config", "steps"))):
        assert_bad(as_alice.post("/api/training-runs/", {**body, "config": config}, format="json"), *words)
    r = as_alice.post("/api/training-runs/", {**body, "config": "{\"iterations\": 1"}, format="multipart")
    assert_bad(r, "config")


# --- ids beyond 64 bits --------------------------------------------------------------------------

def test_ids_beyond_64_bits_in_bodies(as_alice, labeled, done_run):
    for body, word in (({"project": BIG, "arch": "fasterrcnn_tiny", "labeled": labeled["id"]}, "project"),
                       ({"project": labeled["project"], "arch": "fasterrcnn_tiny", "labeled": BIG}, "labeled"),
                       ({"project": str(BIG), "arch": "fasterrcnn_tiny", "labeled": labeled["id"], "request_key": "k"}, "project"),
                       ({"project": -1, "arch": "fasterrcnn_tiny", "labeled": labeled["id"]}, "project"),
                       ({"project": True, "arch": "fasterrcnn_tiny", "labeled": labeled["id"]}, "project"),
                       ({"project": [1], "arch": "fasterrcnn_tiny", "labeled": labeled["id"], "request_key": "k"}, "project")):
        assert_bad(as_alice.post("/api/training-runs/", body, format="json"), word)
    assert_bad(as_alice.post("/api/datasets/", {"project": BIG, "name": "x", "role": "labeled"}, format="json"), "project")
    assert_bad(as_alice.post("/api/reviews/", {"run": done_run.pk, "image": BIG, "state": "accepted"}, format="json"), "image")
    assert_bad(as_alice.post("/api/reviews/", {"run": BIG, "image": 1, "state": "accepted"}, format="json"), "run")
    assert_bad(as_alice.post("/api/evaluations/", {"checkpoint": BIG, "dataset": labeled["id"]}, format="json"), "checkpoint")


ID_FILTERS = [("/api/images/?dataset={}", "dataset"), ("/api/datasets/?project={}", "project"),
              ("/api/models/?project={}", "project"), ("/api/inference-runs/?project={}", "project"),
              ("/api/pseudo-label-sets/?project={}", "project"), ("/api/training-runs/?project={}", "project"),
              ("/api/evaluations/?dataset={}", "dataset"), ("/api/evaluations/?checkpoint={}", "checkpoint"),
              ("/api/evaluations/?project={}", "project"), ("/api/reviews/?image={}", "image"),
              ("/api/reviews/?run={}", "run")]


def test_id_filters_take_integer_ids_only(as_alice, db):
    for url, word in ID_FILTERS:
        for value in (BIG, "abc", "-1", "1.5"):
            assert_bad(as_alice.get(url.format(value)), word)
        assert as_alice.get(url.format(1)).status_code == 200


def test_predictions_image_filter(as_alice, done_run):
    assert_bad(as_alice.get(f"/api/inference-runs/{done_run.pk}/predictions/?image={BIG}"), "image")
    assert_bad(as_alice.get(f"/api/inference-runs/{done_run.pk}/predictions/?min_score=inf"), "min_score")
    assert as_alice.get(f"/api/inference-runs/{done_run.pk}/predictions/?image=1").status_code == 200


def test_url_ids_beyond_64_bits_are_not_found(as_alice, db):
    for path in ("/api/projects/{}/", "/api/datasets/{}/", "/api/images/{}/", "/api/models/{}/",
                 "/api/inference-runs/{}/", "/api/reviews/{}/", "/api/jobs/{}/", "/api/training-runs/{}/",
                 "/api/evaluations/{}/", "/api/pseudo-label-sets/{}/", "/api/datasets/{}/export/",
                 "/api/inference-runs/{}/threshold-stats/", "/api/images/{}/thumbnail/"):
        for value in (BIG, -1, "abc"):
            assert_bad(as_alice.get(path.format(value)), status=404)
    assert_bad(as_alice.delete(f"/api/projects/{BIG}/"), status=404)
    assert_bad(as_alice.post(f"/api/inference-runs/{BIG}/bulk-accept/", {}, format="json"), status=404)


# --- Django-level errors are JSON under /api/ ---------------------------------------------------

def test_1001_files_answer_json(as_alice, labeled):
    files = []
    for i in range(1001):
        f = io.BytesIO(b"x")
        f.name = f"{i}.png"
        files.append(f)
    r = as_alice.post(f"/api/datasets/{labeled['id']}/upload/", {"files": files}, format="multipart")
    assert_bad(r, "too many files", "1,000")
    assert Image.objects.filter(dataset_id=labeled["id"]).count() == 1


def test_too_many_fields_and_too_large_answer_json(as_alice, labeled, settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    form = "&".join(f"f{i}=1" for i in range(20))
    r = as_alice.post("/api/projects/", data=form, content_type="application/x-www-form-urlencoded")
    assert_bad(r, "too many form fields")
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    r = as_alice.post("/api/projects/", {"name": "x" * 2000}, format="json")
    assert_bad(r, "above the limit", status=413)


def test_unknown_routes_and_server_errors_answer_json_under_api(as_alice, client, db):
    from django.test import RequestFactory

    from distill_app import exceptions
    assert_bad(as_alice.get("/api/no-such-thing/"), "no such route", status=404)
    assert_bad(client.get("/api/projects/1/nothing/"), status=404)
    r = exceptions.server_error(RequestFactory().get("/api/projects/"))
    assert r.status_code == 500 and json.loads(r.content)["message"]
    # pages outside the API keep Django's HTML pages
    assert not client.get("/no-such-page/")["Content-Type"].startswith("application/json")


# --- deletions that protected links used to turn into 500s (found by the schema fuzzer) ---------

def _teacher_run(alice, done_run):
    from distill_app.models import TrainingRun
    job = Job.objects.create(project=done_run.project, owner=alice, kind="train", state=Job.SUCCEEDED)
    labeled = Dataset.objects.get(project=done_run.project, role="labeled")
    return TrainingRun.objects.create(project=done_run.project, role="teacher", arch="fasterrcnn_tiny", labeled=labeled,
                                      teacher=done_run.checkpoint, job=job)


def test_a_project_with_runs_can_be_deleted(as_alice, alice, done_run):
    from distill_app.models import PseudoLabelSet
    _teacher_run(alice, done_run)
    job = Job.objects.create(project=done_run.project, owner=alice, kind="pseudo_labels", state=Job.SUCCEEDED)
    PseudoLabelSet.objects.create(project=done_run.project, run=done_run, thresholds={"default": 0.5}, job=job)
    r = as_alice.delete(f"/api/projects/{done_run.project_id}/")
    assert r.status_code == 204, r.content
    assert not Project.objects.filter(pk=done_run.project_id).exists()
    assert not Job.objects.filter(project_id=done_run.project_id).exists()


def test_a_project_with_a_running_job_is_not_deleted(as_alice, alice, done_run):
    Job.objects.create(project=done_run.project, owner=alice, kind="train", state=Job.RUNNING)
    assert_bad(as_alice.delete(f"/api/projects/{done_run.project_id}/"), "running", status=409)


def test_objects_a_training_run_uses_are_not_deleted(as_alice, alice, done_run):
    run = _teacher_run(alice, done_run)
    assert_bad(as_alice.delete(f"/api/datasets/{run.labeled_id}/"), "training runs", status=409)
    done_run.pseudo_label_sets.all().delete()
    InferenceRun.objects.filter(pk=done_run.pk).delete()
    assert_bad(as_alice.delete(f"/api/models/{run.teacher_id}/"), "training runs", status=409)


def test_threshold_routes_of_a_run_whose_statistics_are_gone(as_alice, done_run):
    assert_bad(as_alice.get(f"/api/inference-runs/{done_run.pk}/threshold-stats/"), "statistics", status=409)
    assert_bad(as_alice.get(f"/api/inference-runs/{done_run.pk}/scores/"), "statistics", status=409)
