"""jobs.py without processes: acquiring a job (attempts, one holder at a time), a holder's lease
renewal, and the reaper's decisions against a broker view (distill_app.workers.BrokerView's
interface, faked). The same faults with real processes: tests/integration/test_faults.py."""
import subprocess
import sys
from datetime import timedelta

import pytest
from django.utils import timezone

from distill_app import jobs
from distill_app.models import Job, JobLease, WorkerHeartbeat


class Broker:
    """What the reaper asks of the broker."""

    def __init__(self, ok=True, down_for=0.0, parts=(), lost=None):
        self.ok, self.parts, self._lost = ok, set(parts), lost
        self.down_since = None if ok else timezone.now() - timedelta(seconds=down_for)

    def has_part(self, job_id, attempt, part, fresh_seconds):
        return (job_id, attempt, part) in self.parts

    def lost(self, candidates):
        return [j for j in candidates if self._lost is None or j.pk in self._lost]


@pytest.fixture
def job(alice):
    return Job.objects.create(owner=alice, kind="ping")


def _worker(name, expires_in):
    now = timezone.now()
    return WorkerHeartbeat.objects.create(name=name, node=name, host="box", pid=1, started=now, seen=now,
                                          expires=now + timedelta(seconds=expires_in))


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _held(job, *, expires_in, node="w@box:1", host="elsewhere", pid=1):
    Job.objects.filter(pk=job.pk).update(state=Job.RUNNING, heartbeat=timezone.now())
    job.refresh_from_db()
    return JobLease.objects.create(job=job, part="", attempt=job.attempt, owner="other", worker=f"{host}:{pid}",
                                   host=host, pid=pid, node=node, expires=timezone.now() + timedelta(seconds=expires_in))


def test_a_message_of_an_earlier_attempt_does_nothing(job):
    Job.objects.filter(pk=job.pk).update(attempt=3)
    with pytest.raises(jobs.Skip, match="attempt 2; the job is at attempt 3"):
        jobs.acquire(job.pk, attempt=2)
    assert Job.objects.get(pk=job.pk).state == Job.QUEUED


def test_a_second_copy_stops_while_the_holder_lives(job):
    _worker("w@box:1", 30)
    _held(job, expires_in=30)
    with pytest.raises(jobs.Skip, match="is held by elsewhere:1"):
        jobs.acquire(job.pk, attempt=1)


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(job):
    _worker("w@box:1", 30)
    _held(job, expires_in=30, host=jobs.SPACE, pid=_dead_pid())
    lease = jobs.acquire(job.pk, attempt=1)
    assert JobLease.objects.get(job=job, part="").owner == lease.owner
    lease.release()


def test_a_holder_takes_back_a_job_a_fault_failed_and_stops_when_it_is_retried(job):
    lease = jobs.acquire(job.pk)
    Job.objects.filter(pk=job.pk).update(state=Job.FAILED, fault=jobs.FAULT_WORKER_GONE, error="gone")
    lease.renew()
    got = Job.objects.get(pk=job.pk)
    assert lease.lost is None and got.state == Job.RUNNING and got.error == "" and got.fault == ""
    Job.objects.filter(pk=job.pk).update(state=Job.QUEUED, attempt=2)
    lease.renew()
    assert lease.lost == "the job was retried (attempt 2)"
    with pytest.raises(jobs.LeaseLost):
        jobs.check_cancel(lease.job)
    assert not lease.end(Job.SUCCEEDED) and Job.objects.get(pk=job.pk).state == Job.QUEUED  # writes nothing
    lease.release()


def test_a_worker_gone_fails_the_job_without_the_broker(job):
    _worker("w@box:1", -1)
    _held(job, expires_in=-1)
    assert jobs.reap() == 1
    got = Job.objects.get(pk=job.pk)
    assert got.state == Job.FAILED and got.fault == jobs.FAULT_WORKER_GONE and "w@box:1" in got.error


def test_a_dead_process_whose_message_was_requeued_is_waited_for(job):
    _worker("w@box:1", 30)  # the worker lives, the holder stopped renewing
    _held(job, expires_in=-1)
    assert jobs.reap() == 0  # the database alone cannot tell
    assert jobs.reap(broker=Broker(parts={(job.pk, 1, "")})) == 0
    assert Job.objects.get(pk=job.pk).state == Job.RUNNING
    assert jobs.reap(broker=Broker()) == 1
    got = Job.objects.get(pk=job.pk)
    assert got.fault == jobs.FAULT_PROCESS_DIED and "elsewhere:1" in got.error


def test_a_lost_queued_message_is_sent_again_once(job, monkeypatch):
    from distill_app import tasks
    sent = []
    monkeypatch.setattr(tasks, "send_job", lambda j: sent.append(j.pk))
    Job.objects.filter(pk=job.pk).update(dispatched=timezone.now() - timedelta(minutes=1))
    assert jobs.reap(broker=Broker(lost=set())) == 0  # still in the broker
    assert jobs.reap(broker=Broker()) == 1 and sent == [job.pk]
    assert jobs.reap(broker=Broker()) == 0 and sent == [job.pk]  # claimed: not again within a lease
    assert Job.objects.get(pk=job.pk).state == Job.QUEUED


def test_a_broker_down_longer_than_a_lease_fails_work_that_needs_it(job, settings):
    settings.DISTILL_JOB_STALE_SECONDS = 10
    Job.objects.filter(pk=job.pk).update(dispatched=timezone.now() - timedelta(minutes=1))
    assert jobs.reap(broker=Broker(ok=False, down_for=3)) == 0
    assert jobs.reap(broker=Broker(ok=False, down_for=30)) == 1
    got = Job.objects.get(pk=job.pk)
    assert got.fault == jobs.FAULT_BROKER_LOST and "Redis" in got.error


def test_cancel_and_retry_of_a_job_nobody_runs_any_more_work_at_once(job):
    _worker("w@box:1", 30)
    _held(job, expires_in=30, host=jobs.SPACE, pid=_dead_pid())
    assert jobs.cancel(job).state == Job.CANCELLED
    Job.objects.filter(pk=job.pk).update(state=Job.RUNNING)
    again = jobs.retry(job, lambda j: None)
    assert again.state == Job.QUEUED and again.attempt == 2 and not again.cancel_requested


def test_a_retry_the_broker_refuses_leaves_the_job_as_it_was(job):
    Job.objects.filter(pk=job.pk).update(state=Job.FAILED, error="boom")

    def refuse(j):
        raise ConnectionError("refused")
    with pytest.raises(jobs.BrokerUnavailable):
        jobs.retry(job, refuse)
    got = Job.objects.get(pk=job.pk)
    assert (got.state, got.attempt, got.error) == (Job.FAILED, 1, "boom")
