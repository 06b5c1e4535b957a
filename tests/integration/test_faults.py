"""Faults injected into real processes (issue 12): worker main processes killed with SIGKILL, Redis
stopped and started again empty, cancel and retry in quick succession, a message delivered twice,
a job wrongly marked failed under a live worker. Each job ends -- it finishes, or fails with its
true reason within a minute -- nothing runs twice, and no prediction is lost or duplicated.

A Redis and workers of this module's own (the session's worker and Redis are left alone), with
leases of STALE seconds so that the faults show within seconds.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.app.conftest import TINY_TRAIN, upload_split
from tests.conftest import use_broker, wait_for, worker_env

pytestmark = pytest.mark.django_db(transaction=True)

STALE = 5  # DISTILL_JOB_STALE_SECONDS here: holders and workers beat every second, faults show within ~5 s
FAST_VIEWS = {"scales": [48, 64], "flip": True, "max_size": 200}
SLOW_VIEWS = {"scales": [96, 128, 160, 192], "flip": True, "max_size": 400}


class Rig:
    """This module's Redis (not persistent: stopping it loses what it held) and workers."""

    def __init__(self, folder, media_root):
        from distill_app.services import RedisServer
        self.folder, self.media_root = folder, media_root
        self.redis = RedisServer(folder / "redis")
        self.workers: dict[str, object] = {}

    def worker(self, name: str):
        from distill_app.models import WorkerHeartbeat
        from distill_app.services import start_worker
        log_path = self.folder / f"{name}.log"
        env = {**worker_env(self.redis.url, self.media_root), "DISTILL_JOB_STALE_SECONDS": str(STALE),
               "DISTILL_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}
        proc = start_worker(env=env, log=open(log_path, "wb"), hostname=f"{name}@%h")
        proc.name, proc.log_path = name, log_path
        self.workers[name] = proc
        wait_for(lambda: proc.poll() is not None or WorkerHeartbeat.objects.filter(pid=proc.pid).exists(),
                 timeout=120, interval=0.2, what=f"worker {name} to announce itself")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        return proc

    def alive(self, n: int = 1) -> list:
        """n running workers: the live ones first, new ones started as needed."""
        live = [p for p in self.workers.values() if p.poll() is None]
        while len(live) < n:
            live.append(self.worker(f"w{len(self.workers) + 1}"))
        return live[:n]

    def kill(self, proc):
        """SIGKILL the worker's main process; its pool processes die with it (parent-death signal)."""
        from distill_app.jobs import pid_alive
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            pool = [int(p) for p in f.read().split()]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not any(pid_alive(p) for p in pool), timeout=10, interval=0.02, what="its pool processes to die")

    def log(self, proc) -> str:
        return proc.log_path.read_text(errors="replace")

    def holder(self, job_id: int):
        """The worker process that holds a job's lease now."""
        from distill_app.models import JobLease
        lease = JobLease.objects.filter(job_id=job_id, released=False).order_by("-expires").first()
        if lease is None:
            return None
        return next((p for p in self.workers.values() if lease.node.endswith(f":{p.pid}")), None)

    def stop(self):
        from distill_app.services import stop_processes
        stop_processes(list(self.workers.values()))
        self.redis.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory, django_db_setup, media_root):
    from distill_app.celery import app
    before = app.conf.broker_url
    r = Rig(tmp_path_factory.mktemp("faults"), media_root)
    r.redis.start()
    use_broker(r.redis.url)
    yield r
    r.stop()
    use_broker(before)


@pytest.fixture(autouse=True)
def _short_leases(settings):
    settings.DISTILL_JOB_STALE_SECONDS = STALE


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from ml_core.synth import SynthConfig, generate
    out = tmp_path_factory.mktemp("synth_faults")
    generate(out, SynthConfig(kind="detection", image_size=64, labeled=6, unlabeled=16, val=1, seed=5))
    return out


@pytest.fixture(scope="module")
def synth_many(tmp_path_factory):
    """40 unlabeled images: one chunk of them outlasts a lease even on a fast CPU."""
    from ml_core.synth import SynthConfig, generate
    out = tmp_path_factory.mktemp("synth_faults_many")
    generate(out, SynthConfig(kind="detection", image_size=64, labeled=1, unlabeled=40, val=1, seed=6))
    return out


@pytest.fixture(scope="module")
def teacher_file(synth, tmp_path_factory):
    from ml_core import pipeline
    from ml_core.engine import TrainConfig
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    pipeline.train(str(synth / "labeled.json"), str(synth / "labeled"), str(out), arch="fasterrcnn_tiny",
                   config=TrainConfig(iterations=1, batch_size=2, warmup_iters=1, num_workers=0), device="cpu")
    return out


def _project(client, synth, *, labeled=False, unlabeled=False, teacher=None) -> dict:
    p = client.post("/api/projects/", {"name": "faults"}, format="json").json()
    ids = {"project": p["id"]}
    for split, role, wanted in (("labeled", "labeled", labeled), ("unlabeled", "unlabeled", unlabeled)):
        if wanted:
            ds = client.post("/api/datasets/", {"project": p["id"], "name": split, "role": role}, format="json").json()
            ids[role] = ds["id"]
            _, doc = upload_split(client, ds["id"], synth, split)
            if role == "labeled":
                assert client.post(f"/api/datasets/{ds['id']}/import-coco/", doc, format="json").status_code == 200
    if teacher is not None:
        with open(teacher, "rb") as f:
            r = client.post("/api/models/upload/", {"project": p["id"], "file": f}, format="multipart")
        assert r.status_code == 201, r.json()
        ids["checkpoint"] = r.json()["id"]
    return ids


def _train(client, ids, **config):
    r = client.post("/api/training-runs/", {"project": ids["project"], "arch": "fasterrcnn_tiny", "labeled": ids["labeled"],
                                            "config": {**TINY_TRAIN, **config}}, format="json")
    assert r.status_code == 201, r.json()
    return r.json()


def _infer(client, ids, chunk_size, views=FAST_VIEWS):
    r = client.post("/api/inference-runs/", {"project": ids["project"], "checkpoint": ids["checkpoint"],
                                             "dataset": ids["unlabeled"], "chunk_size": chunk_size,
                                             "transforms": views}, format="json")
    assert r.status_code == 201, r.json()
    return r.json()


def _get(client, path):
    return client.get(path).json()


def _ends(client, path, timeout=90, states=("succeeded", "failed", "cancelled")):
    return wait_for(lambda: (x := _get(client, path))["job"]["state"] in states and x, timeout=timeout,
                    interval=0.25, what=f"{path} to end")


def _history_ok(run_id, iterations):
    from distill_app.models import TrainingRun
    its = [h["iteration"] for h in TrainingRun.objects.get(pk=run_id).history]
    assert its == sorted(set(its)) and its[-1] == iterations, its


def _predictions_ok(run_id, images):
    from django.db.models import Count

    from distill_app.models import Prediction
    rows = Prediction.objects.filter(run_id=run_id)
    assert rows.count() == images and rows.values("image").distinct().count() == images
    assert not rows.values("image").annotate(n=Count("id")).filter(n__gt=1).exists()
    assert not rows.exclude(error="").exists()


# --- 2 + 7: a worker killed mid-job ---------------------------------------------------------------

def test_a_killed_worker_fails_its_job_with_that_reason_and_a_retry_resumes_from_a_checkpoint(rig, as_alice, synth):
    from ml_core.checkpoint import read_checkpoint

    from distill_app.models import Job, TrainingRun
    [worker] = rig.alive(1)
    ids = _project(as_alice, synth, labeled=True)
    run = _train(as_alice, ids, iterations=30)  # no checkpoint_every given: the default checkpoints
    assert run["config"]["checkpoint_every"] == 3
    wait_for(lambda: Job.objects.get(pk=run["job"]["id"]).progress >= 0.3, timeout=120, interval=0.1,
             what="training to pass a checkpoint")
    rig.kill(worker)
    killed = time.monotonic()
    failed = _ends(as_alice, f"/api/training-runs/{run['id']}/", timeout=60)["job"]
    assert failed["state"] == "failed" and failed["fault"] == "worker_gone", failed
    assert f"{worker.name}@" in failed["error"] and "stopped announcing itself" in failed["error"]
    assert "broker" not in failed["error"]
    assert time.monotonic() - killed < 60
    saved = read_checkpoint(str(TrainingRun.objects.get(pk=run["id"]).folder / "model.pt"))
    assert saved["iteration"] >= 6 and "optimizer" in saved

    r = as_alice.post(f"/api/training-runs/{run['id']}/retry/")
    assert r.status_code == 202 and r.json()["attempt"] == 2
    [again] = rig.alive(1)
    done = _ends(as_alice, f"/api/training-runs/{run['id']}/", timeout=150)["job"]
    assert done["state"] == "succeeded", done
    _history_ok(run["id"], 30)
    assert f"job {run['job']['id']} attempt 2: started" in rig.log(again)


# --- 4 (+ 2): cancel, then retry at once; cancel of a job whose worker is dead --------------------

def test_chunks_of_a_cancelled_attempt_do_nothing_after_a_quick_retry(rig, as_alice, synth, teacher_file):
    from distill_app.models import Job, Prediction
    [first] = rig.alive(1)
    ids = _project(as_alice, synth, unlabeled=True, teacher=teacher_file)
    run = _infer(as_alice, ids, chunk_size=1)
    path, job_id = f"/api/inference-runs/{run['id']}/", run["job"]["id"]
    assert run["chunks_total"] == 16
    wait_for(lambda: Prediction.objects.filter(run_id=run["id"]).exists(), timeout=120, interval=0.05,
             what="a first chunk")
    assert as_alice.post(f"{path}cancel/").status_code == 200
    wait_for(lambda: Job.objects.get(pk=job_id).state == "cancelled", timeout=30, interval=0.05, what="the cancel")
    assert Prediction.objects.filter(run_id=run["id"]).values("chunk").distinct().count() < 16
    assert as_alice.post(f"{path}retry/").status_code == 202  # at once: attempt 1's chunks are still queued

    # the worker dies under attempt 2: cancel ends it at once, and a retry is allowed at once
    done_before = Prediction.objects.filter(run_id=run["id"]).count()
    wait_for(lambda: Prediction.objects.filter(run_id=run["id"]).count() > done_before + 1, timeout=120,
             interval=0.05, what="attempt 2 to get going")
    rig.kill(first)
    c = as_alice.post(f"{path}cancel/").json()
    assert c["state"] == "cancelled" and c["attempt"] == 2, c
    r = as_alice.post(f"{path}retry/")
    assert r.status_code == 202 and r.json()["attempt"] == 3
    [second] = rig.alive(1)
    done = _ends(as_alice, path, timeout=150)["job"]
    assert done["state"] == "succeeded", done
    _predictions_ok(run["id"], 16)
    # the leftover messages of the earlier attempts reached the workers and did nothing
    assert "a message of attempt 1" in rig.log(first) or "is already cancelled" in rig.log(first)
    assert f"job {job_id}: a message of attempt 2; the job is at attempt 3" in rig.log(second)


# --- 3: Redis lost: 503 at once, the true reason, lost messages sent again -------------------------

def test_a_lost_broker_gives_503s_its_reason_and_lost_messages_are_sent_again(rig, as_alice, synth):
    from distill_app.models import Job, TrainingRun
    [worker] = rig.alive(1)
    ids = _project(as_alice, synth, labeled=True)
    long_run = _train(as_alice, ids, iterations=30)
    wait_for(lambda: Job.objects.get(pk=long_run["job"]["id"]).state == "running", timeout=120, interval=0.1,
             what="the long run to start")
    queued = _train(as_alice, ids)  # waits behind the long run
    path, job_id = f"/api/training-runs/{queued['id']}/", queued["job"]["id"]

    rig.redis.stop()  # what it held is gone with it
    jobs_before, runs_before = Job.objects.count(), TrainingRun.objects.count()
    t = time.monotonic()
    r = as_alice.post("/api/jobs/ping/")
    assert r.status_code == 503 and r["Content-Type"].startswith("application/json") and "Redis" in r.json()["message"]
    r = as_alice.post("/api/training-runs/", {"project": ids["project"], "arch": "fasterrcnn_tiny",
                                              "labeled": ids["labeled"], "config": TINY_TRAIN}, format="json")
    assert r.status_code == 503 and time.monotonic() - t < 10
    assert Job.objects.count() == jobs_before and TrainingRun.objects.count() == runs_before  # no orphan row
    lost = _ends(as_alice, path, timeout=60)["job"]
    assert lost["state"] == "failed" and lost["fault"] == "broker_lost", lost
    assert "Redis" in lost["error"] and "unreachable" in lost["error"]
    assert as_alice.post(f"{path}retry/").status_code == 503  # still down: nothing changes
    assert Job.objects.get(pk=job_id).attempt == 1
    assert Job.objects.get(pk=long_run["job"]["id"]).state != "failed"  # the running one goes on

    rig.redis.start()  # empty
    end = _ends(as_alice, f"/api/training-runs/{long_run['id']}/", timeout=120)["job"]
    assert end["state"] == "succeeded", end
    _history_ok(long_run["id"], 30)
    assert rig.log(worker).count(f"job {long_run['job']['id']} attempt 1: started") == 1

    rig.kill(worker)  # nobody takes the retried job's message before Redis loses it
    r = as_alice.post(f"{path}retry/")
    assert r.status_code == 202 and r.json()["attempt"] == 2
    rig.redis.stop()
    rig.redis.start()  # a quick restart: no fault, but the message is gone
    [again] = rig.alive(1)
    done = _ends(as_alice, path, timeout=120)["job"]
    assert done["state"] == "succeeded" and done["attempt"] == 2, done
    log = rig.log(again)
    assert f"job {job_id} attempt 2 (queued): its message is gone from the broker; sending it again" in log
    assert log.count(f"job {job_id} attempt 2: started") == 1 and f"job {job_id} attempt 1: started" not in log


# --- 5: heartbeats inside a chunk; a live worker's results are kept -------------------------------

def test_a_long_chunk_beats_and_a_live_worker_keeps_a_run_marked_failed(rig, as_alice, synth_many, teacher_file):
    from django.utils import timezone

    from distill_app.models import Job, Prediction
    rig.alive(1)
    ids = _project(as_alice, synth_many, unlabeled=True, teacher=teacher_file)
    run = _infer(as_alice, ids, chunk_size=40, views=SLOW_VIEWS)  # one chunk, longer than a lease
    path, job_id = f"/api/inference-runs/{run['id']}/", run["job"]["id"]
    wait_for(lambda: Job.objects.get(pk=job_id).state == "running", timeout=120, interval=0.1, what="the chunk")
    started = time.monotonic()
    beats = set()
    while time.monotonic() - started < STALE + 2:
        job = _get(as_alice, path)["job"]  # the API's reaper runs on every read
        assert job["state"] == "running", job
        assert not Prediction.objects.filter(run_id=run["id"]).exists(), "the chunk ended within a lease: make it longer"
        beats.add(job["heartbeat"])
        time.sleep(0.3)
    assert len(beats) >= 3  # the heartbeat moved during the chunk
    # a stale check that wrongly fails it (a database stall delayed the renewals)
    assert Job.objects.filter(pk=job_id, state=Job.RUNNING).update(
        state=Job.FAILED, fault="worker_gone", error="its worker stopped announcing itself", finished=timezone.now())
    done = _ends(as_alice, path, timeout=120, states=("succeeded", "cancelled"))["job"]
    assert done["state"] == "succeeded" and done["error"] == "" and done["fault"] == "", done
    _predictions_ok(run["id"], 40)


# --- 6: one holder at a time ----------------------------------------------------------------------

def test_a_message_delivered_again_while_its_job_runs_stops_at_once(rig, as_alice, synth):
    import redis

    from distill_app.models import Job, JobLease
    rig.alive(2)
    ids = _project(as_alice, synth, labeled=True)
    run = _train(as_alice, ids, iterations=40)
    job_id = run["job"]["id"]
    wait_for(lambda: Job.objects.get(pk=job_id).progress > 0, timeout=120, interval=0.1, what="training")
    holder, lease = rig.holder(job_id), JobLease.objects.get(job_id=job_id, part="")
    other = next(p for p in rig.alive(2) if p is not holder)
    # What a visibility timeout does: the unacknowledged message goes back into its queue.
    client = redis.Redis.from_url(rig.redis.url)
    tag, raw = next((t, v) for t, v in client.hgetall("unacked").items()
                    if json.loads(v)[0]["headers"].get("distill_job") == job_id)
    client.rpush("gpu", json.dumps(json.loads(raw)[0]))
    wait_for(lambda: "is held by" in rig.log(other), timeout=30, interval=0.2, what="the second copy to stop")
    ping = as_alice.post("/api/jobs/ping/").json()  # the other worker is free at once
    pong = wait_for(lambda: (j := Job.objects.get(pk=ping["id"])).state == "succeeded" and j, timeout=30,
                    what="the other worker to answer")
    assert pong.worker != lease.worker
    done = _ends(as_alice, f"/api/training-runs/{run['id']}/", timeout=120)["job"]
    assert done["state"] == "succeeded", done
    assert pong.finished < Job.objects.get(pk=job_id).finished  # it was free while the run went on
    assert JobLease.objects.get(job_id=job_id, part="").owner == lease.owner  # never taken over
    assert rig.log(holder).count(f"job {job_id} attempt 1: started") == 1
    assert f"job {job_id} attempt 1: started" not in rig.log(other)
    _history_ok(run["id"], 40)
