"""Workers announce themselves: a thread of every Celery worker's main process writes its
WorkerHeartbeat row every few seconds (alive until `expires`, whether it reaches the broker), and
runs the reaper (jobs.reap) with a view of what the broker holds. A job's leases name the worker
row of their holder, so a job whose worker vanished is known within a lease, not at a timeout.

Signal handlers only: imported by distill_app.celery, so every worker has them.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import timedelta

from celery import signals

log = logging.getLogger(__name__)

# kombu's Redis transport: a queue's messages of priority p > 0 live in "<queue>\x06\x16<p>";
# delivered, unacknowledged ones in the hash "unacked" (delivery time in the sorted set "unacked_index").
PRIORITY_SEP, PRIORITY_STEPS = "\x06\x16", (3, 6, 9)
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"


def message_headers(job, part: str = "") -> dict:
    """Headers every job message carries, so the broker's content can be matched to jobs."""
    return {"distill_job": job.pk, "distill_attempt": job.attempt, "distill_part": part}


def _key(message: dict):
    h = message.get("headers") or {}
    if h.get("distill_job") is None:
        return None
    try:
        return int(h["distill_job"]), int(h.get("distill_attempt") or 0), str(h.get("distill_part") or "")
    except (TypeError, ValueError):
        return None


class BrokerView:
    """What a Redis broker holds for each job: messages waiting in a queue, and messages a worker
    took and has not acknowledged yet (with when it took them). Scanned at most once a beat, and
    only when some job's message may be missing."""

    def __init__(self, url: str, queues: list[str]):
        import redis
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
        self.queues = queues
        self.ok, self.down_since, self.error = True, None, ""
        self._scan: tuple[set, dict] | None = None
        self._missing_before: set = set()

    def ping(self) -> bool:
        from django.utils import timezone
        self._scan = None
        try:
            self.client.ping()
        except Exception as e:  # noqa: BLE001 -- any failure to reach it is "down"
            self.ok, self.error = False, str(e)[:300]
            self.down_since = self.down_since or timezone.now()
            return False
        self.ok, self.down_since, self.error = True, None, ""
        return True

    def _content(self) -> tuple[set, dict]:
        if self._scan is None:
            waiting, taken = set(), {}
            for q in self.queues:
                for name in [q] + [f"{q}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]:
                    for start in range(0, self.client.llen(name), 500):
                        for raw in self.client.lrange(name, start, start + 499):
                            k = _key(json.loads(raw))
                            if k:
                                waiting.add(k)
            for tag, raw in self.client.hscan_iter(UNACKED):
                k = _key(json.loads(raw)[0])
                if k:
                    taken[k] = max(taken.get(k, 0.0), self.client.zscore(UNACKED_INDEX, tag) or 0.0)
            self._scan = (waiting, taken)
        return self._scan

    def has_part(self, job_id: int, attempt: int, part: str, fresh_seconds: float) -> bool:
        """A message for this part waits in a queue, or was taken by a worker moments ago."""
        waiting, taken = self._content()
        key = (job_id, attempt, part)
        return key in waiting or taken.get(key, 0.0) > time.time() - fresh_seconds

    def holds(self, job_id: int, attempt: int, fresh_seconds: float) -> bool:
        """A message of this attempt waits in a queue, or was taken by a worker moments ago."""
        waiting, taken = self._content()
        recent = time.time() - fresh_seconds
        return any(k[:2] == (job_id, attempt) for k in waiting) or \
            any(k[:2] == (job_id, attempt) and t > recent for k, t in taken.items())

    def lost(self, jobs: list) -> list:
        """The jobs with no message in the broker at this scan and the one before (a message moves
        from its queue to a worker between two reads; the second look removes that doubt)."""
        from . import jobs as job_state
        missing = {(j.pk, j.attempt) for j in jobs if not self.holds(j.pk, j.attempt, job_state.lease_seconds())}
        found = [j for j in jobs if (j.pk, j.attempt) in missing & self._missing_before]
        self._missing_before = missing
        return found


class Announcer(threading.Thread):
    def __init__(self, name: str, node: str, queues: list[str]):
        super().__init__(name="distill-heartbeat", daemon=True)
        self.worker_name, self.node, self.queues = name, node, queues
        self.stopping = threading.Event()
        self.broker: BrokerView | None = None
        self.started_at = None
        self.last_cleanup = 0.0

    def run(self):
        from django.db import connection
        from django.utils import timezone

        from . import jobs
        from .celery import app
        self.started_at = timezone.now()
        url = app.conf.broker_url or ""
        if url.startswith(("redis://", "rediss://", "unix://")):
            # every queue, not only this worker's: a message it does not consume is not lost
            queues = {r["queue"] for r in app.conf.task_routes.values()} | {app.conf.task_default_queue}
            self.broker = BrokerView(url, sorted(queues))
        try:
            while True:
                try:
                    self.beat()
                except Exception:  # the database busy or gone for a moment: the next beat tries again
                    log.exception("worker heartbeat failed")
                    connection.close()
                if self.stopping.wait(jobs.beat_seconds()):
                    break
            from .models import WorkerHeartbeat
            WorkerHeartbeat.objects.filter(name=self.worker_name).delete()
        except Exception:
            log.exception("worker heartbeat stopped")
        finally:
            connection.close()

    def beat(self):
        from django.conf import settings
        from django.utils import timezone

        from . import jobs
        from .models import WorkerHeartbeat
        ok = self.broker.ping() if self.broker is not None else True
        now = timezone.now()
        WorkerHeartbeat.objects.update_or_create(name=self.worker_name, defaults=dict(
            node=self.node, host=jobs.HOST, pid=os.getpid(), queues=",".join(self.queues), started=self.started_at,
            seen=now, expires=now + timedelta(seconds=jobs.lease_seconds()), broker_ok=ok,
            broker_down_since=self.broker.down_since if self.broker else None,
            broker_error=self.broker.error if self.broker else ""))
        if settings.DISTILL_WORKER_REAPER:
            jobs.reap(broker=self.broker)
        if time.monotonic() - self.last_cleanup > 3600:
            self.last_cleanup = time.monotonic()
            WorkerHeartbeat.objects.filter(expires__lt=now - timedelta(days=1)).delete()


_announcer: Announcer | None = None


@signals.worker_init.connect
def _name_worker(sender=None, **kwargs):
    """The worker's row name, known to its pool processes (forked later) through jobs.WORKER_NODE."""
    from . import jobs
    jobs.WORKER_NODE = f"{getattr(sender, 'hostname', 'worker')}:{os.getpid()}"


@signals.worker_ready.connect
def _start_announcing(sender=None, **kwargs):
    global _announcer
    from . import jobs
    if _announcer is not None:  # sent again after a reconnection to the broker
        return
    node = getattr(sender, "hostname", "worker")
    jobs.WORKER_NODE = jobs.WORKER_NODE or f"{node}:{os.getpid()}"
    try:
        queues = sorted(sender.task_consumer.queues and {q.name for q in sender.task_consumer.queues})
    except Exception:  # noqa: BLE001
        queues = []
    _announcer = Announcer(jobs.WORKER_NODE, node, queues or ["gpu", "cpu"])
    _announcer.start()


@signals.worker_shutdown.connect
def _stop_announcing(**kwargs):
    if _announcer is not None:
        _announcer.stopping.set()
        _announcer.join(timeout=10)
