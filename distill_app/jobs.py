"""Job state for Celery tasks: who runs a job, for which attempt, and what ends it.

Every task runs inside `running(job_id, attempt=..., part=...)`:

1. acquire: with the job row locked, a message of an earlier attempt, a job already final, or a
   part held by a holder that still lives is skipped (Skip: another copy of the message stops at
   once); otherwise this execution takes the part's lease (JobLease: owner and expiry);
2. while the block runs, a thread renews the lease and the job's heartbeat every few seconds,
   whatever the work is doing (one long chunk included);
3. `check_cancel`, called between iterations and images, raises Cancelled when the user asked,
   and LeaseLost when this holder no longer owns the job (retried, or taken over);
4. the row ends succeeded, failed (with the reason) or cancelled -- only while this holder owns it.
   A job failed by a fault (below) while its holder still lived is taken back by that holder:
   its results are never thrown away.

Faults are found by the reaper, `reap()`: every worker's heartbeat thread runs it with a view of
the broker (distill_app.workers), the API runs its database-only part on reads (`mark_stale_jobs`).
- a job whose worker stopped announcing itself (killed, machine lost) fails: FAULT_WORKER_GONE;
- a job whose worker lives but whose process died, and whose message was not requeued: PROCESS_DIED;
- queued work whose message the broker lost (Redis restarted without its data, a web process that
  died between commit and publish) is sent again -- at most one holder runs it (the lease);
- while the broker stays unreachable, work that needs it fails: FAULT_BROKER_LOST.
All of this happens within LEASE seconds (DISTILL_JOB_STALE_SECONDS) plus one heartbeat.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from ml_core.engine import Cancelled, Hook, validation_summary

from .models import Job, JobLease, WorkerHeartbeat

log = logging.getLogger(__name__)

FAULT_WORKER_GONE, FAULT_PROCESS_DIED, FAULT_BROKER_LOST = "worker_gone", "process_died", "broker_lost"
FAULTS = (FAULT_WORKER_GONE, FAULT_PROCESS_DIED, FAULT_BROKER_LOST)
HOST = socket.gethostname()


def _process_space() -> str:
    """This machine and PID namespace: where a pid names the same process (containers that share
    a hostname, with host networking, still have PID namespaces of their own)."""
    try:
        return f"{HOST} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return HOST


SPACE = _process_space()
# The WorkerHeartbeat name of the worker this process belongs to ("" outside a worker); set by
# distill_app.workers when the worker starts, inherited by its pool processes.
WORKER_NODE = ""


class Skip(Exception):
    """Nothing to do: the job is final, the message is of an earlier attempt, or a live holder runs it."""


class LeaseLost(Exception):
    """This holder no longer owns its job: it was retried, cancelled, deleted or taken over."""


class BrokerUnavailable(Exception):
    """The broker did not take a job's message (the API answers 503; nothing was kept)."""


def lease_seconds() -> float:
    """How long a holder that stopped renewing keeps its job (and a worker its standing)."""
    return float(settings.DISTILL_JOB_STALE_SECONDS)


def beat_seconds() -> float:
    return max(1.0, min(10.0, lease_seconds() / 5))


def friendly_error(e: BaseException) -> str:
    if isinstance(e, (ValueError, FileNotFoundError)):
        return str(e)
    if e.__class__.__name__ == "OutOfMemoryError":
        return "the GPU ran out of memory; use a smaller batch size, fewer scales or a smaller model"
    return f"{e.__class__.__name__}: {e}"


# --- holders ---------------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """Whether a process of this machine runs (a zombie, killed but not yet reaped, does not)."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError):
            return False
        except (OSError, IndexError):
            pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _nodes(names, now) -> dict[str, WorkerHeartbeat | None]:
    """name -> that worker's WorkerHeartbeat row (None: no row, it stopped or never announced itself)."""
    wanted = {n for n in names if n}
    rows = {w.name: w for w in WorkerHeartbeat.objects.filter(name__in=wanted)}
    return {n: rows.get(n) for n in wanted}


def fate(lease: JobLease, now, nodes: dict, local: bool = True) -> str | None:
    """None while the lease's holder may still live; otherwise why it is known to be gone.

    nodes: _nodes() of the lease's worker. local: also trust this machine's process table (a
    holder on this host whose process is gone is dead at once). The reaper does not, so that a
    pool process killed mid-task first has its requeued message (acks_late + reject_on_worker_lost)
    taken by another pool process.
    """
    if lease.released:
        return "released"
    if lease.node:
        node = nodes.get(lease.node)
        if (node is not None and node.expires <= now) or (node is None and lease.expires <= now):
            return FAULT_WORKER_GONE
    if local and lease.host == SPACE and not pid_alive(lease.pid):
        return FAULT_PROCESS_DIED
    if lease.expires <= now:
        return FAULT_WORKER_GONE if not lease.node else FAULT_PROCESS_DIED
    return None


class Lease:
    """This execution's hold on a part of a job, renewed by a thread while the work goes on."""

    def __init__(self, job: Job, part: str, row: JobLease):
        self.job, self.part, self.id, self.owner, self.attempt = job, part, row.pk, row.owner, row.attempt
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self):
        """Renew from a thread -- unless the caller's transaction is open (a task run eagerly inside
        a test): the thread's writes would wait for it."""
        if connection.in_atomic_block:
            return
        self._thread = threading.Thread(target=self._loop, name=f"lease-job{self.job.pk}", daemon=True)
        self._thread.start()

    def _loop(self):
        try:
            while not self._stop.wait(beat_seconds()):
                try:
                    self.renew()
                except Exception:  # the database busy or gone for a moment: try again at the next beat
                    log.exception("job %s: could not renew the lease", self.job.pk)
        finally:
            connection.close()

    def renew(self):
        now = timezone.now()
        with transaction.atomic():
            if not JobLease.objects.filter(pk=self.id, owner=self.owner, released=False).update(
                    expires=now + timedelta(seconds=lease_seconds())):
                self.lost = "another worker took this job over"
                return
            jobs = Job.objects.filter(pk=self.job.pk, attempt=self.attempt)
            if jobs.filter(state=Job.RUNNING).update(heartbeat=now):
                return
            # Failed by a fault while this holder lived (its renewals were late): take it back.
            if jobs.filter(state=Job.FAILED, fault__in=FAULTS).update(
                    state=Job.RUNNING, fault="", error="", finished=None, heartbeat=now):
                log.warning("job %s was marked failed while its worker still ran it; it runs on", self.job.pk)
                return
        row = Job.objects.filter(pk=self.job.pk).values("state", "attempt").first()
        self.lost = ("the job was deleted" if row is None else
                     f"the job was retried (attempt {row['attempt']})" if row["attempt"] != self.attempt else
                     f"the job is {row['state']}")

    def end(self, state: str, **fields) -> bool:
        """Write the job's final state, if this holder still owns the job's current attempt."""
        now = timezone.now()
        with transaction.atomic():
            if not JobLease.objects.filter(pk=self.id, owner=self.owner, released=False).exists():
                return False
            return bool(Job.objects.filter(pk=self.job.pk, attempt=self.attempt)
                        .filter(Q(state=Job.RUNNING) | Q(state=Job.FAILED, fault__in=FAULTS))
                        .update(state=state, fault="", finished=now, heartbeat=now, **fields))

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        JobLease.objects.filter(pk=self.id, owner=self.owner).update(released=True, expires=timezone.now())


def acquire(job_id: int, attempt: int | None = None, part: str = "") -> Lease:
    """Take (a part of) the job for this execution, or raise Skip saying why not."""
    now = timezone.now()
    owner = uuid.uuid4().hex
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job_id)
        if attempt is not None and attempt != job.attempt:
            raise Skip(f"job {job_id}: a message of attempt {attempt}; the job is at attempt {job.attempt}")
        if job.is_final:
            raise Skip(f"job {job_id} is already {job.state}")
        if job.cancel_requested:
            job.state, job.finished = Job.CANCELLED, now
            job.save(update_fields=["state", "finished"])
            raise Skip(f"job {job_id} was cancelled before it started")
        held = JobLease.objects.filter(job=job, part=part).first()
        if held is not None and held.attempt == job.attempt:
            why = fate(held, now, _nodes([held.node], now))
            if why is None:
                raise Skip(f"job {job_id}{' ' + part if part else ''} is held by {held.worker} "
                           f"(lease until {held.expires:%H:%M:%S}); this copy stops")
            if why != "released":
                log.warning("job %s%s: its holder %s is gone (%s); taking it over", job_id,
                            " " + part if part else "", held.worker, why)
        row, _ = JobLease.objects.update_or_create(job=job, part=part, defaults=dict(
            attempt=job.attempt, owner=owner, worker=f"{HOST}:{os.getpid()}", host=SPACE, pid=os.getpid(),
            node=WORKER_NODE, expires=now + timedelta(seconds=lease_seconds()), released=False))
        job.state, job.worker, job.heartbeat = Job.RUNNING, f"{HOST}:{os.getpid()}", now
        job.started = job.started or now
        job.save(update_fields=["state", "worker", "heartbeat", "started"])
    log.info("job %s attempt %s%s: started", job_id, job.attempt, " " + part if part else "")
    return Lease(job, part, row)


@contextlib.contextmanager
def running(job_id: int, *, attempt: int | None = None, part: str = "", finish: bool = True):
    """Hold the job (or one part of it) for the duration of the block.

    finish=False leaves a successful job running (one chunk of many; the finaliser ends it).
    """
    lease = acquire(job_id, attempt, part)
    job = lease.job
    job.lease = lease
    lease.start()
    try:
        yield job
    except Cancelled:
        lease.end(Job.CANCELLED, message="cancelled")
    except Skip:
        raise
    except LeaseLost as e:
        log.warning("job %s attempt %s%s: %s; this holder stops", job_id, lease.attempt, " " + part if part else "", e)
    except Exception as e:  # recorded on the row; not re-raised so Celery does not retry a bad input
        log.exception("job %s failed", job_id)
        lease.end(Job.FAILED, error=friendly_error(e)[:5000], message="failed")
    else:
        if finish:
            lease.end(Job.SUCCEEDED, progress=1.0, message="done")
    finally:
        lease.release()


def check_cancel(job: Job):
    """Between units of work: Cancelled when the user asked, LeaseLost when the job is no longer ours."""
    lease = getattr(job, "lease", None)
    if lease is not None and lease.lost:
        raise LeaseLost(lease.lost)
    row = Job.objects.filter(pk=job.pk).values("cancel_requested", "attempt").first()
    if row is None:
        raise LeaseLost("the job was deleted")
    if row["attempt"] != job.attempt:
        raise LeaseLost(f"the job was retried (attempt {row['attempt']})")
    if row["cancel_requested"]:
        raise Cancelled()


class JobHook(Hook):
    """Training progress into the job row and the run's loss history; cancellation from the API."""

    def __init__(self, job: Job, run=None, every_seconds: float = 1.0, span: float = 1.0):
        self.job, self.run, self.every, self.last, self.span = job, run, every_seconds, 0.0, span
        self.evaluations = 0

    def after_step(self, state):
        now = time.monotonic()
        if now - self.last < self.every and state.iteration < state.config.iterations:
            return
        self.last = now
        check_cancel(self.job)  # first: a holder that lost the job writes nothing more
        eta = state.eta_seconds()
        self.job.beat(progress=round(state.progress * self.span, 4),
                      message=f"iteration {state.iteration}/{state.config.iterations}, loss {state.losses.get('loss', 0):.3f}"
                      + (f", about {int(eta)} s left" if eta is not None else ""))
        if self.run is not None:
            type(self.run).objects.filter(pk=self.run.pk, job__attempt=self.job.attempt).update(history=state.history)
        if state.val_history and len(state.val_history) != self.evaluations:
            # the validation curve, live: the training page draws it beside the loss
            self.evaluations = len(state.val_history)
            self.job.beat(result={"validation": validation_summary(state)})

    def after_train(self, state):
        if state.val_history:
            self.job.beat(result={"validation": validation_summary(state)})


def progress_writer(job: Job, start: float = 0.0, span: float = 1.0, label: str = ""):
    last = [0.0]

    def update(done: int, total: int):
        now = time.monotonic()
        if now - last[0] < 1.0 and done < total:
            return
        last[0] = now
        job.beat(progress=round(start + span * done / max(total, 1), 4), message=f"{label}{done}/{total}")
    return update


# --- sending: the API and the reaper ---------------------------------------------------------------

BROKER_ERRORS: tuple[type[BaseException], ...]


def _broker_errors():
    from kombu.exceptions import OperationalError
    errors: list[type[BaseException]] = [OperationalError, ConnectionError, TimeoutError]
    try:
        import redis.exceptions
        errors += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:
        pass
    return tuple(errors)


BROKER_ERRORS = _broker_errors()


def publish(job: Job, send, undo=None):
    """Hand a job's messages to the broker, after its rows are committed. A broker that does not
    take them within a couple of seconds runs `undo` (no orphan row) and raises BrokerUnavailable."""
    try:
        send()
    except BROKER_ERRORS as e:
        log.warning("job %s: the broker did not take its message (%s)", job.pk, e)
        if undo is not None:
            undo()
        raise BrokerUnavailable("the job queue (Redis) is unreachable, so nothing was started; "
                                "try again in a moment") from e
    Job.objects.filter(pk=job.pk, attempt=job.attempt).update(dispatched=timezone.now())


def cancel(job: Job) -> Job:
    """Queued: cancelled at once. Running: its holder stops at its next check; when no holder
    lives any more (its worker was killed), cancelled at once."""
    now = timezone.now()
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job.pk)
        if job.is_final:
            return job
        job.cancel_requested = True
        holders = list(JobLease.objects.filter(job=job, attempt=job.attempt, released=False))
        nodes = _nodes([h.node for h in holders], now)
        if job.state == Job.QUEUED or all(fate(h, now, nodes) is not None for h in holders):
            job.state, job.finished, job.message = Job.CANCELLED, now, "cancelled"
        job.save(update_fields=["cancel_requested", "state", "finished", "message"])
    return job


def retry(job: Job, send) -> Job:
    """A new attempt of a failed or cancelled job (or of a running one whose holders are all
    gone): the messages of earlier attempts do nothing any more. Raises ValueError when the job
    cannot be retried now, BrokerUnavailable when the broker is down (the job stays as it was)."""
    now = timezone.now()
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job.pk)
        before = {f: getattr(job, f) for f in ("state", "error", "fault", "cancel_requested", "finished", "message")}
        if job.state == Job.RUNNING:
            holders = list(JobLease.objects.filter(job=job, attempt=job.attempt, released=False))
            nodes = _nodes([h.node for h in holders], now)
            if not holders or any(fate(h, now, nodes) is None for h in holders):
                raise ValueError("only failed or cancelled jobs can be retried; this one is running")
        elif job.state not in (Job.FAILED, Job.CANCELLED):
            raise ValueError(f"only failed or cancelled jobs can be retried; this one is {job.state}")
        job.attempt += 1
        job.state, job.error, job.fault, job.cancel_requested, job.finished = Job.QUEUED, "", "", False, None
        job.message, job.dispatched = "retrying: resumes from what was saved", None
        job.save()

    def undo():
        Job.objects.filter(pk=job.pk, attempt=job.attempt, state=Job.QUEUED).update(attempt=job.attempt - 1, **before)
    publish(job, lambda: send(job), undo)
    job.refresh_from_db()
    return job


# --- the reaper --------------------------------------------------------------------------------

def _when(t) -> str:
    return f"{t:%H:%M:%S} UTC" if t else "an unknown time"


def _worker_gone_reason(lease: JobLease, node: WorkerHeartbeat | None) -> str:
    row = node or WorkerHeartbeat.objects.filter(name=lease.node).first()
    text = (f"its worker ({lease.node or lease.worker}) stopped announcing itself at {_when(row and row.seen)} "
            "(killed, crashed, or its machine lost)")
    if row is not None and not row.broker_ok:
        text += f"; that worker had also lost the broker (Redis) at {_when(row.broker_down_since)}"
    return text + "; retry resumes from what was saved"


def _fault(job: Job, fault: str, reason: str, state: str = Job.RUNNING) -> int:
    n = Job.objects.filter(pk=job.pk, attempt=job.attempt, state=state).update(
        state=Job.FAILED, fault=fault, error=reason[:5000], finished=timezone.now())
    if n:
        log.warning("job %s attempt %s failed: %s", job.pk, job.attempt, reason)
    return n


def reap(queryset=None, broker=None) -> int:
    """End what faults left behind; returns how many jobs changed.

    broker: a view of what the broker holds (workers.BrokerView) -- None for the database-only part.
    """
    now = timezone.now()
    grace = timedelta(seconds=lease_seconds())
    qs = queryset if queryset is not None else Job.objects.all()
    changed = 0
    waiting: list[Job] = []  # jobs that need a message from the broker to go on
    running = list(qs.filter(state=Job.RUNNING).only("id", "attempt", "cancel_requested", "heartbeat", "kind",
                                                     "state", "dispatched", "created"))
    leases: dict[int, list[JobLease]] = {}
    for lease in JobLease.objects.filter(job__in=[j.pk for j in running], released=False):
        leases.setdefault(lease.job_id, []).append(lease)
    nodes = _nodes([le.node for ls in leases.values() for le in ls], now)
    for job in running:
        held = [le for le in leases.get(job.pk, []) if le.attempt == job.attempt]
        fates = [(le, fate(le, now, nodes, local=False)) for le in held]
        if any(f is None for _, f in fates):
            continue  # somebody works on it
        if job.cancel_requested:
            changed += Job.objects.filter(pk=job.pk, attempt=job.attempt, state=Job.RUNNING).update(
                state=Job.CANCELLED, finished=now, message="cancelled")
            continue
        gone = [le for le, f in fates if f == FAULT_WORKER_GONE]
        if gone:
            changed += _fault(job, FAULT_WORKER_GONE, _worker_gone_reason(gone[0], nodes.get(gone[0].node)))
        elif held:
            # The holder's worker lives but the holder stopped renewing: its process died (or hangs).
            # A killed pool process has its message requeued (reject_on_worker_lost): wait for it.
            if broker is not None and broker.ok and \
                    not any(broker.has_part(job.pk, job.attempt, le.part, lease_seconds()) for le in held):
                le = held[0]
                changed += _fault(job, FAULT_PROCESS_DIED,
                                  f"the worker process running it ({le.worker}) stopped (killed, or out of memory) "
                                  "and its task was not requeued; retry resumes from what was saved")
        elif job.heartbeat is None or job.heartbeat < now - grace:
            waiting.append(job)  # between parts (inference chunks) for a while
    if broker is None:
        return changed
    waiting += list(qs.filter(state=Job.QUEUED).filter(
        Q(dispatched__lt=now - grace) | Q(dispatched__isnull=True, created__lt=now - grace)))
    if not waiting:
        return changed
    if not broker.ok:
        if broker.down_since is not None and broker.down_since < now - grace:
            for job in waiting:
                changed += _fault(job, FAULT_BROKER_LOST,
                                  f"the broker (Redis) has been unreachable since {_when(broker.down_since)}, so "
                                  "this job's work cannot reach a worker; retry once it is back", state=job.state)
        return changed
    for job in broker.lost([j for j in waiting]):
        changed += resend(job)
    return changed


def resend(job: Job) -> int:
    """Send a job's pending messages again (its earlier ones are gone from the broker). Claimed
    by a conditional update, so two reapers never both send; a copy that arrives anyway stops at
    acquire (final job, other attempt, or a live holder)."""
    from . import tasks
    claimed = Job.objects.filter(pk=job.pk, attempt=job.attempt, state=job.state, dispatched=job.dispatched).update(
        dispatched=timezone.now())
    if not claimed:
        return 0
    log.warning("job %s attempt %s (%s): its message is gone from the broker; sending it again",
                job.pk, job.attempt, job.state)
    try:
        tasks.send_job(Job.objects.get(pk=job.pk))
    except BROKER_ERRORS as e:
        log.warning("job %s: could not send it again (%s)", job.pk, e)
        return 0
    return 1


def mark_stale_jobs(queryset=None) -> int:
    """The reaper's database-only part, for the API's reads: a job whose worker is gone is failed
    with that reason; a cancelled job nobody runs any more ends."""
    return reap(queryset)
