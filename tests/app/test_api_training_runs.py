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


def test_cancel_a_queued_run_and_retry(as_alice, det_project, monkeypatch):
    import distill_app.tasks as tasks
    sent = []
    monkeypatch.setattr(tasks, "send_job", lambda job: sent.append((job.pk, job.attempt)))  # stays queued
    r = as_alice.post("/api/training-runs/", {"project": det_project["project"], "arch": "fasterrcnn_tiny",
                                              "labeled": det_project["labeled"], "config": TINY_TRAIN}, format="json")
    rid = r.json()["id"]
    c = as_alice.post(f"/api/training-runs/{rid}/cancel/").json()
    assert c["state"] == "cancelled"
    assert as_alice.post(f"/api/training-runs/{rid}/cancel/").status_code == 409
    again = as_alice.post(f"/api/training-runs/{rid}/retry/").json()
    assert again["state"] == "queued" and again["attempt"] == 2
    assert sent == [(c["id"], 1), (c["id"], 2)]


def _lease(job, *, node, expires_in, host="elsewhere", pid=1):
    from datetime import timedelta

    from django.utils import timezone

    from distill_app.models import JobLease
    return JobLease.objects.create(job=job, part="", attempt=job.attempt, owner="x", worker=f"{host}:{pid}", host=host,
                                   pid=pid, node=node, expires=timezone.now() + timedelta(seconds=expires_in))


def _worker(name, *, expires_in, broker_ok=True):
    from datetime import timedelta

    from django.utils import timezone

    from distill_app.models import WorkerHeartbeat
    now = timezone.now()
    return WorkerHeartbeat.objects.create(name=name, node=name.split(":")[0], host="elsewhere", pid=1, started=now,
                                          seen=now + timedelta(seconds=expires_in - 30),
                                          expires=now + timedelta(seconds=expires_in), broker_ok=broker_ok,
                                          broker_down_since=None if broker_ok else now)


def test_a_job_whose_worker_vanished_is_marked_failed_with_that_reason(as_alice, alice):
    job = Job.objects.create(owner=alice, kind="train", state=Job.RUNNING)
    _worker("gpu1@box:7", expires_in=-5)  # stopped announcing itself
    _lease(job, node="gpu1@box:7", expires_in=-1)
    got = as_alice.get(f"/api/jobs/{job.pk}/").json()
    assert got["state"] == "failed" and got["fault"] == "worker_gone"
    assert "gpu1@box:7" in got["error"] and "stopped announcing itself" in got["error"] and "broker" not in got["error"]


def test_a_job_whose_worker_lost_the_broker_too_says_so(as_alice, alice):
    job = Job.objects.create(owner=alice, kind="train", state=Job.RUNNING)
    _worker("gpu1@box:7", expires_in=-5, broker_ok=False)
    _lease(job, node="gpu1@box:7", expires_in=-1)
    got = as_alice.get(f"/api/jobs/{job.pk}/").json()
    assert got["fault"] == "worker_gone" and "lost the broker (Redis)" in got["error"]


def test_a_job_whose_worker_lives_stays_running(as_alice, alice):
    job = Job.objects.create(owner=alice, kind="train", state=Job.RUNNING)
    _worker("gpu1@box:7", expires_in=30)
    _lease(job, node="gpu1@box:7", expires_in=30)
    assert as_alice.get(f"/api/jobs/{job.pk}/").json()["state"] == "running"
    assert as_alice.post(f"/api/jobs/{job.pk}/cancel/").json()["state"] == "running"  # its holder stops it
    assert Job.objects.get(pk=job.pk).cancel_requested


def test_cancel_and_retry_of_a_job_whose_holder_is_dead_work_at_once(as_alice, alice, det_project, monkeypatch):
    """The holder's process is gone (this machine's process table says so): no waiting for a lease to expire."""
    import subprocess
    import sys

    import distill_app.tasks as tasks
    from distill_app.jobs import SPACE
    from distill_app.models import JobLease
    monkeypatch.setattr(tasks, "send_job", lambda job: None)
    r = as_alice.post("/api/training-runs/", {"project": det_project["project"], "arch": "fasterrcnn_tiny",
                                              "labeled": det_project["labeled"], "config": TINY_TRAIN}, format="json")
    job = Job.objects.get(pk=r.json()["job"]["id"])
    Job.objects.filter(pk=job.pk).update(state=Job.RUNNING)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _worker("gpu1@box:7", expires_in=30)
    _lease(job, node="gpu1@box:7", expires_in=30, host=SPACE, pid=dead.pid)
    rid = r.json()["id"]
    assert as_alice.post(f"/api/training-runs/{rid}/retry/").status_code == 202  # a running job, but nobody runs it
    assert Job.objects.get(pk=job.pk).attempt == 2
    Job.objects.filter(pk=job.pk).update(state=Job.RUNNING)  # the new attempt's holder died too
    JobLease.objects.filter(job=job).update(attempt=2)
    assert as_alice.post(f"/api/training-runs/{rid}/cancel/").json()["state"] == "cancelled"


def test_a_new_run_checkpoints_by_default(as_alice, det_project, monkeypatch):
    import distill_app.tasks as tasks
    monkeypatch.setattr(tasks, "send_job", lambda job: None)
    r = as_alice.post("/api/training-runs/", {"project": det_project["project"], "arch": "fasterrcnn_tiny",
                                              "labeled": det_project["labeled"], "config": {"iterations": 500}},
                      format="json")
    assert r.json()["config"]["checkpoint_every"] == 50


def test_a_broker_that_is_down_is_a_503_at_once_and_leaves_no_row(as_alice, det_project, monkeypatch):
    import time

    import distill_app.tasks as tasks
    from distill_app.models import TrainingRun
    from distill_app.services import free_port

    def send(job):  # a publish to a port nobody listens on, with the settings' retry policy
        with tasks.app.connection_for_write(f"redis://127.0.0.1:{free_port()}/0") as conn:
            tasks.ping.apply_async((job.pk,), connection=conn)
    monkeypatch.setattr(tasks, "send_job", send)
    tasks.app.conf.task_always_eager = False  # the fixture puts it back
    t = time.monotonic()
    r = as_alice.post("/api/training-runs/", {"project": det_project["project"], "arch": "fasterrcnn_tiny",
                                              "labeled": det_project["labeled"], "config": TINY_TRAIN}, format="json")
    assert r.status_code == 503 and "Redis" in r.json()["message"] and time.monotonic() - t < 10
    assert not TrainingRun.objects.exists() and not Job.objects.exists()
    assert as_alice.post("/api/jobs/ping/").status_code == 503 and not Job.objects.exists()


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


def test_training_with_a_validation_set_reports_the_validation_curve(as_alice, det_project, teacher):
    v = teacher["job"]["result"]["validation"]
    assert [p["iteration"] for p in v["history"]] == [2] and v["best"]["iteration"] == 2
    assert v["stopped"].startswith("reached the iteration bound")


def test_iterations_left_out_are_sized_by_the_worker_from_the_data(as_alice, det_project):
    from distill_app.tasks import _sized_config
    from ml_core.engine import default_iterations
    body = {"project": det_project["project"], "arch": "fasterrcnn_tiny", "labeled": det_project["labeled"],
            "config": {"batch_size": 2}}
    serializer_cfg = None
    from distill_app.serializers import TrainingRunSerializer
    from rest_framework.test import APIRequestFactory
    request = APIRequestFactory().post("/")
    request.user = TrainingRun._meta.get_field("project").related_model.objects.get(pk=det_project["project"]).owner
    s = TrainingRunSerializer(data=body, context={"request": request})
    assert s.is_valid(), s.errors
    serializer_cfg = s.validated_data["config"]
    assert serializer_cfg["iterations"] is None  # auto until a worker knows its device
    run = TrainingRun(pk=None, arch="fasterrcnn_tiny", labeled_id=det_project["labeled"], config=serializer_cfg)
    cfg = _sized_config(run, None)
    assert cfg.iterations == default_iterations(6, 2, "cpu") and cfg.warmup_iters <= cfg.iterations // 4
    assert cfg.train_scales == (1.0,)  # the task's default training sizes, resolved beside the bound
    run.arch = "keypointrcnn_tiny"
    assert _sized_config(run, None).train_scales == (0.8, 0.84, 0.88, 0.92, 0.96, 1.0)
