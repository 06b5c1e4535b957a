"""Job state for Celery tasks: every task runs inside `running(job_id)`, which checks the row
before starting (so a redelivered message does not run twice), records progress, and ends the
row as succeeded, failed (with the reason) or cancelled."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from ml_core.engine import Cancelled, Hook

from .models import Job

log = logging.getLogger(__name__)


class Skip(Exception):
    """The job is already final (or cancelled before it started): nothing to do."""


def fail(job: Job, reason: str):
    Job.objects.filter(pk=job.pk).update(state=Job.FAILED, error=reason[:5000], finished=timezone.now())


def friendly_error(e: BaseException) -> str:
    if isinstance(e, (ValueError, FileNotFoundError)):
        return str(e)
    if e.__class__.__name__ == "OutOfMemoryError":
        return "the GPU ran out of memory; use a smaller batch size, fewer scales or a smaller model"
    return f"{e.__class__.__name__}: {e}"


@contextlib.contextmanager
def running(job_id: int, *, finish: bool = True):
    """Mark the job running for the duration of the block.

    finish=False leaves a successful job running (one chunk of many; the finaliser ends it).
    """
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job_id)
        if job.is_final:
            raise Skip()
        if job.cancel_requested:
            job.state, job.finished = Job.CANCELLED, timezone.now()
            job.save(update_fields=["state", "finished"])
            raise Skip()
        now = timezone.now()
        job.state, job.worker, job.heartbeat = Job.RUNNING, f"{socket.gethostname()}:{os.getpid()}", now
        job.started = job.started or now
        job.save(update_fields=["state", "worker", "heartbeat", "started"])
    try:
        yield job
    except Cancelled:
        Job.objects.filter(pk=job_id).update(state=Job.CANCELLED, finished=timezone.now(), message="cancelled")
        return
    except Skip:
        raise
    except Exception as e:  # recorded on the row; not re-raised so Celery does not retry a bad input
        log.exception("job %s failed", job_id)
        fail(job, friendly_error(e))
        return
    if finish:
        Job.objects.filter(pk=job_id).exclude(state__in=Job.FINAL).update(
            state=Job.SUCCEEDED, progress=1.0, finished=timezone.now(), heartbeat=timezone.now())


def check_cancel(job: Job):
    if Job.objects.filter(pk=job.pk, cancel_requested=True).exists():
        raise Cancelled()


class JobHook(Hook):
    """Training progress into the job row and the run's loss history; cancellation from the API."""

    def __init__(self, job: Job, run=None, every_seconds: float = 1.0, span: float = 1.0):
        self.job, self.run, self.every, self.last, self.span = job, run, every_seconds, 0.0, span

    def after_step(self, state):
        now = time.monotonic()
        if now - self.last < self.every and state.iteration < state.config.iterations:
            return
        self.last = now
        eta = state.eta_seconds()
        self.job.beat(progress=round(state.progress * self.span, 4),
                      message=f"iteration {state.iteration}/{state.config.iterations}, loss {state.losses.get('loss', 0):.3f}"
                      + (f", about {int(eta)} s left" if eta is not None else ""))
        if self.run is not None:
            type(self.run).objects.filter(pk=self.run.pk).update(history=state.history)
        check_cancel(self.job)


def progress_writer(job: Job, start: float = 0.0, span: float = 1.0, label: str = ""):
    last = [0.0]

    def update(done: int, total: int):
        now = time.monotonic()
        if now - last[0] < 1.0 and done < total:
            return
        last[0] = now
        job.beat(progress=round(start + span * done / max(total, 1), 4), message=f"{label}{done}/{total}")
    return update


def mark_stale_jobs(queryset=None) -> int:
    """Jobs whose worker stopped beating (killed, machine lost) become failed with the reason,
    instead of showing 'running' forever. Completed chunks and checkpoints are kept: retry resumes."""
    cutoff = timezone.now() - timedelta(seconds=settings.DISTILL_JOB_STALE_SECONDS)
    qs = (queryset if queryset is not None else Job.objects).filter(state=Job.RUNNING, heartbeat__lt=cutoff)
    return qs.update(state=Job.FAILED, finished=timezone.now(),
                     error="the worker stopped reporting (killed or lost); retry to resume from what was saved")
