"""Schema-driven fuzzing: schemathesis generates requests for every operation of the OpenAPI schema
(valid and invalid ones), sends them as a logged-in user, and no answer may be a 5xx.

Bounded for CI: a few examples per operation and generation mode, no shrinking, a fixed seed
(derandomized), so the run is the same each time; DISTILL_FUZZ_EXAMPLES raises the count locally.
Each operation runs twice where it takes an {id}: once with generated ids, once with the id of a
real object of the user's, so that the handlers behind the 404 are reached too. Every request runs
in a savepoint that is rolled back, so deletions do not starve the operations after them, and
background tasks are not started (on_commit does nothing here)."""
import io
import json
import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from distill_app.models import Dataset, Image, InferenceRun, Job, ModelCheckpoint, Review  # noqa: E402
from tests.conftest import png_bytes  # noqa: E402

EXAMPLES = int(os.environ.get("DISTILL_FUZZ_EXAMPLES", "4"))


@pytest.fixture
def wsgi_app(objects):
    """Django's WSGI application inside the test transaction: the per-request connection checks
    would close the test's connection, so they are off, as in Django's own test client (which
    turns them back on after each of its requests: hence after `objects`)."""
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield WSGIHandler()
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def objects(as_alice, alice, settings):
    """One object of each kind, alice's: the ids the second pass puts into {id}."""
    from pathlib import Path
    p = as_alice.post("/api/projects/", {"name": "fuzz", "task": "detection"}, format="json").json()
    ids = {"projects": p["id"]}
    for role in ("labeled", "unlabeled", "validation"):
        ds = as_alice.post("/api/datasets/", {"project": p["id"], "name": role, "role": role}, format="json").json()
        f = io.BytesIO(png_bytes(color=(10, 20, 30) if role == "labeled" else (40, 50, 60)))
        f.name = "a.png"
        assert as_alice.post(f"/api/datasets/{ds['id']}/upload/", {"files": [f]}, format="multipart").status_code == 200
        ids[role] = ds["id"]
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}],
           "categories": [{"id": 1, "name": "square"}]}
    assert as_alice.post(f"/api/datasets/{ids['labeled']}/import-coco/", doc, format="json").status_code == 200
    ids["datasets"] = ids["labeled"]
    unl = Dataset.objects.get(pk=ids["unlabeled"])
    img = Image.objects.get(dataset=unl)
    ids["images"] = img.pk
    ckpt_file = Path("projects") / str(p["id"]) / "checkpoints" / "t.pt"
    (Path(settings.MEDIA_ROOT) / ckpt_file).parent.mkdir(parents=True, exist_ok=True)
    (Path(settings.MEDIA_ROOT) / ckpt_file).write_bytes(b"not a checkpoint")
    ckpt = ModelCheckpoint.objects.create(project_id=p["id"], name="t", role="teacher", arch="fasterrcnn_tiny",
                                          file=str(ckpt_file), meta={"categories": doc["categories"]})
    ids["models"] = ckpt.pk
    job = Job.objects.create(project_id=p["id"], owner=alice, kind="infer", state=Job.SUCCEEDED)
    run = InferenceRun.objects.create(project_id=p["id"], checkpoint=ckpt, dataset=unl, job=job, auto_threshold=0.5)
    ids["inference-runs"] = run.pk
    ids["jobs"] = job.pk
    ids["reviews"] = Review.objects.create(run=run, image=img, state="accepted", user=alice).pk
    return ids


def test_no_server_error_on_any_operation(wsgi_app, objects, alice, monkeypatch):
    from django.db import transaction
    from rest_framework.authtoken.models import Token
    monkeypatch.setattr(transaction, "on_commit", lambda fn, using=None, robust=False: None)
    auth = {"Authorization": f"Token {Token.objects.create(user=alice).key}"}
    schema = schemathesis.openapi.from_wsgi("/api/schema/", wsgi_app)
    failures: list[str] = []
    ran = 0

    def run(operation, mode, path_parameters=None):
        nonlocal ran

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
        def check(case):
            nonlocal ran
            ran += 1
            with transaction.atomic():
                response = case.call(headers=auth)
                transaction.set_rollback(True)
            if response.status_code >= 500 and len(failures) < 50:
                failures.append(f"{case.method} {case.formatted_path} query={case.query!r} "
                                f"body={_short(case.body)} -> {response.status_code} {response.text[:300]}")

        try:
            check()
        except Unsatisfiable:  # e.g. nothing left to make invalid once the id is fixed
            pass

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run(operation, mode)
            if "{id}" in operation.path:
                kind = operation.path.split("/")[2]
                if kind in objects:
                    run(operation, mode, {"id": objects[kind]})
    assert ran > 100
    assert not failures, "server errors:\n" + "\n".join(failures)


def _short(body) -> str:
    try:
        text = json.dumps(body)
    except (TypeError, ValueError):
        text = repr(body)
    return text[:200]
