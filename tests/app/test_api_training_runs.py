from distill_app.models import Evaluation, Job, TrainingRun
from tests.app.conftest import TINY_TRAIN


def test_teacher_run_trains_saves_a_checkpoint_and_evaluates(as_alice, det_project, teacher):
    assert teacher["role"] == "teacher" and teacher["checkpoint"]
    assert [h["iteration"] for h in teacher["history"]] == [1, 2]
    ev = Evaluation.objects.get(checkpoint_id=teacher["checkpoint"])
    assert set(ev.stats["bbox"]) >= {"AP", "AP50", "AP75"}
    model = as_alice.get(f"/api/models/{teacher['checkpoint']}/").json()
    assert model["arch"] == "fasterrcnn_tiny" and model["meta"]["init"] == "random"


def test_same_request_key_starts_one_run(as_alice, det_project):
    body = {"project": det_project["project"], "arch": "fasterrcnn_tiny", "labeled": det_project["labeled"],
            "config": TINY_TRAIN, "request_key": "click-1"}
    a = as_alice.post("/api/training-runs/", body, format="json")
    b = as_alice.post("/api/training-runs/", body, format="json")
    assert a.status_code == 201 and b.status_code == 200 and a.json()["id"] == b.json()["id"]
    assert TrainingRun.objects.count() == 1


def test_bad_training_options(as_alice, det_project):
    base = {"project": det_project["project"], "labeled": det_project["labeled"]}
    r = as_alice.post("/api/training-runs/", {**base, "arch": "keypointrcnn_tiny"}, format="json")
    assert r.status_code == 400 and "keypoints model" in r.json()["message"]
    r = as_alice.post("/api/training-runs/", {**base, "arch": "fasterrcnn_tiny", "config": {"epochs": 2}}, format="json")
    assert "unknown training option" in r.json()["message"]
    r = as_alice.post("/api/training-runs/", {**base, "arch": "fasterrcnn_tiny", "labeled": det_project["unlabeled"]}, format="json")
    assert "labeled dataset" in r.json()["message"]


def test_cancel_a_queued_run_and_retry(as_alice, det_project):
    from distill_app.celery import app
    app.conf.task_always_eager = False  # keep it queued: no broker is asked because on_commit is patched
    try:
        import distill_app.tasks as tasks
        sent = []
        orig = tasks.train_model.delay
        tasks.train_model.delay = lambda *a: sent.append(a)
        r = as_alice.post("/api/training-runs/", {"project": det_project["project"], "arch": "fasterrcnn_tiny",
                                                  "labeled": det_project["labeled"], "config": TINY_TRAIN}, format="json")
        rid = r.json()["id"]
        c = as_alice.post(f"/api/training-runs/{rid}/cancel/").json()
        assert c["state"] == "cancelled"
        assert as_alice.post(f"/api/training-runs/{rid}/cancel/").status_code == 409
        assert as_alice.post(f"/api/training-runs/{rid}/retry/").json()["state"] == "queued"
        assert len(sent) == 2
    finally:
        tasks.train_model.delay = orig
        app.conf.task_always_eager = True


def test_a_job_whose_worker_vanished_is_marked_failed(as_alice, det_project, settings):
    from datetime import timedelta

    from django.utils import timezone
    job = Job.objects.create(owner=TrainingRun._meta.apps.get_model("auth", "User").objects.get(username="alice"),
                             kind="train", state=Job.RUNNING, heartbeat=timezone.now() - timedelta(hours=2))
    got = as_alice.get(f"/api/jobs/{job.pk}/").json()
    assert got["state"] == "failed" and "stopped reporting" in got["error"]


def test_student_needs_a_finished_pseudo_label_set(as_alice, det_project, finished_run):
    pls = as_alice.post("/api/pseudo-label-sets/", {"run": finished_run["id"], "thresholds": {"default": 0.0}}, format="json").json()
    Job.objects.filter(pk=pls["job"]["id"]).update(state=Job.RUNNING)  # as if still being written
    r = as_alice.post("/api/training-runs/", {"project": det_project["project"], "arch": "fasterrcnn_tiny",
                                              "labeled": det_project["labeled"], "pseudo_label_set": pls["id"],
                                              "config": TINY_TRAIN}, format="json")
    assert r.status_code == 400 and "still running" in r.json()["message"]


def test_student_run_end_to_end(as_alice, det_project, finished_run, teacher):
    pls = as_alice.post("/api/pseudo-label-sets/", {"run": finished_run["id"], "thresholds": {"default": 0.0}}, format="json").json()
    pls = as_alice.get(f"/api/pseudo-label-sets/{pls['id']}/").json()
    assert pls["job"]["state"] == "succeeded" and pls["counts"]["images"] > 0
    r = as_alice.post("/api/training-runs/", {"project": det_project["project"], "arch": "fasterrcnn_tiny",
                                              "labeled": det_project["labeled"], "validation": det_project["validation"],
                                              "pseudo_label_set": pls["id"], "config": {**TINY_TRAIN, "ratio": "1:1"}},
                      format="json")
    run = as_alice.get(f"/api/training-runs/{r.json()['id']}/").json()
    assert run["role"] == "student" and run["teacher"] == teacher["checkpoint"] and run["job"]["state"] == "succeeded"
    roles = {e["checkpoint_role"] for e in as_alice.get(f"/api/evaluations/?project={det_project['project']}").json()["results"]}
    assert roles == {"teacher", "student"}
