"""A real redis-server and a real Celery worker process: jobs travel through the broker, run in the
worker, and their results reach the database the API reads."""
import pytest

from tests.app.conftest import TINY_TRAIN, build_project
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _job(client, path):
    return client.get(path).json()


def test_a_task_goes_through_the_broker_into_the_worker_and_the_database(celery_worker_process, as_alice):
    from distill_app.models import Job
    job = as_alice.post("/api/jobs/ping/").json()
    done = wait_for(lambda: Job.objects.get(pk=job["id"]).state == "succeeded" and Job.objects.get(pk=job["id"]),
                    timeout=60, what="the ping job")
    assert done.result["pong"] is True
    import os
    assert done.result["pid"] == celery_worker_process.pid or done.result["pid"] != os.getpid()
    assert done.worker.endswith(f":{done.result['pid']}") and done.result["pid"] != os.getpid()


def test_whole_workflow_through_the_api(celery_worker_process, as_alice, synth_det_worker):
    ids = build_project(as_alice, synth_det_worker)
    # teacher
    r = as_alice.post("/api/training-runs/", {"project": ids["project"], "arch": "fasterrcnn_tiny", "labeled": ids["labeled"],
                                              "validation": ids["validation"], "config": TINY_TRAIN}, format="json")
    t = wait_for(lambda: (x := _job(as_alice, f"/api/training-runs/{r.json()['id']}/"))["job"]["state"] in
                 ("succeeded", "failed") and x, what="teacher training")
    assert t["job"]["state"] == "succeeded", t["job"]["error"]
    # multi-transform inference in chunks
    r = as_alice.post("/api/inference-runs/", {"project": ids["project"], "checkpoint": t["checkpoint"], "dataset": ids["unlabeled"],
                                               "validation": ids["validation"], "chunk_size": 3,
                                               "transforms": {"scales": [48, 64], "flip": True, "max_size": 200}}, format="json")
    run = wait_for(lambda: (x := _job(as_alice, f"/api/inference-runs/{r.json()['id']}/"))["job"]["state"] in
                   ("succeeded", "failed") and x, what="inference")
    assert run["job"]["state"] == "succeeded", run["job"]["error"]
    assert run["chunks_total"] == 4
    stats = as_alice.get(f"/api/inference-runs/{run['id']}/threshold-stats/?threshold=0").json()
    assert stats["images"] == 6
    # review one image, freeze a pseudo-label set, train and evaluate the student
    first = as_alice.get(f"/api/inference-runs/{run['id']}/predictions/").json()["results"][0]
    as_alice.post("/api/reviews/", {"run": run["id"], "image": first["image"], "state": "rejected"}, format="json")
    r = as_alice.post("/api/pseudo-label-sets/", {"run": run["id"], "thresholds": {"default": 0.0}}, format="json")
    pls = wait_for(lambda: (x := _job(as_alice, f"/api/pseudo-label-sets/{r.json()['id']}/"))["job"]["state"] in
                   ("succeeded", "failed") and x, what="pseudo-label set")
    assert pls["counts"]["rejected"] == 1
    r = as_alice.post("/api/training-runs/", {"project": ids["project"], "arch": "fasterrcnn_tiny", "labeled": ids["labeled"],
                                              "validation": ids["validation"], "pseudo_label_set": pls["id"],
                                              "config": {**TINY_TRAIN, "ratio": "6:4"}}, format="json")
    s = wait_for(lambda: (x := _job(as_alice, f"/api/training-runs/{r.json()['id']}/"))["job"]["state"] in
                 ("succeeded", "failed") and x, what="student training")
    assert s["job"]["state"] == "succeeded", s["job"]["error"]
    evals = as_alice.get(f"/api/evaluations/?project={ids['project']}&dataset={ids['validation']}").json()["results"]
    assert {e["checkpoint_role"] for e in evals} == {"teacher", "student"}
    assert all("AP" in e["stats"]["bbox"] for e in evals)


def test_a_worker_process_killed_mid_training_is_retried_and_resumes(celery_worker_process, as_alice, synth_det_worker):
    import os
    import signal

    from distill_app.models import Job, TrainingRun
    ids = build_project(as_alice, synth_det_worker)
    config = {**TINY_TRAIN, "iterations": 80, "checkpoint_every": 5}
    r = as_alice.post("/api/training-runs/", {"project": ids["project"], "arch": "fasterrcnn_tiny", "labeled": ids["labeled"],
                                              "config": config}, format="json")
    run_id = r.json()["id"]
    job = wait_for(lambda: (j := TrainingRun.objects.get(pk=run_id).job) and j.progress >= 0.2 and j, timeout=120,
                   interval=0.1, what="training to get going")
    pid = int(job.worker.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)  # the pool process dies mid-job; the message is redelivered (acks_late)
    done = wait_for(lambda: (j := Job.objects.get(pk=job.pk)).state in ("succeeded", "failed") and j, timeout=240,
                    what="the retried job")
    assert done.state == "succeeded", done.error
    assert int(done.worker.rsplit(":", 1)[1]) != pid
    history = TrainingRun.objects.get(pk=run_id).history
    iterations = [h["iteration"] for h in history]
    assert iterations[-1] == 80 and iterations == sorted(iterations)  # resumed from a checkpoint, not restarted


def test_a_chord_part_failing_outside_its_job_fails_the_job_at_once(celery_worker_process, alice):
    """The chord's errback, not the 15-minute staleness check, ends the job."""
    from celery import chord

    from distill_app.models import Job
    from distill_app.tasks import finalize_inference, infer_chunk, job_failed
    job = Job.objects.create(owner=alice, kind="infer", state=Job.RUNNING)
    missing_run = 10 ** 9  # infer_chunk fails before it reaches any job wrapper
    chord([infer_chunk.si(missing_run, 0)])(finalize_inference.si(missing_run).on_error(job_failed.s(job.pk)))
    failed = wait_for(lambda: Job.objects.get(pk=job.pk).state == "failed" and Job.objects.get(pk=job.pk),
                      timeout=60, what="the errback")
    assert "DoesNotExist" in failed.error and failed.finished is not None
