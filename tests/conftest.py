"""Shared fixtures: personas (alice, bob), API clients, a media folder per test, Celery in eager
mode for API tests, and -- for integration and browser tests -- a real redis-server and a real
Celery worker process on the same test database."""
from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image as PILImage


def pytest_collection_modifyitems(items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "browser" in parts:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def media_root(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(autouse=True)
def _media(request, settings, tmp_path, media_root):
    """A fresh media folder per test; the worker-backed tests share the worker's."""
    shared = request.node.get_closest_marker("integration") or request.node.get_closest_marker("browser")
    settings.MEDIA_ROOT = media_root if shared else tmp_path / "media"


@pytest.fixture(autouse=True)
def _eager_tasks(request, monkeypatch):
    """API tests run tasks in-process, as soon as the view asks; integration and browser tests use
    the real worker."""
    if request.node.get_closest_marker("integration") or request.node.get_closest_marker("browser"):
        yield
        return
    from django.db import transaction

    from distill_app.celery import app
    # The test transaction never commits, so run on_commit callbacks at once.
    monkeypatch.setattr(transaction, "on_commit", lambda fn, using=None, robust=False: fn())
    old = app.conf.task_always_eager
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    yield
    app.conf.task_always_eager = old


def make_user(name):
    from django.contrib.auth import get_user_model
    return get_user_model().objects.create_user(name, f"{name}@example.com", f"{name}-password-123")


@pytest.fixture
def alice(db):
    return make_user("alice")


@pytest.fixture
def bob(db):
    return make_user("bob")


def client_for(user):
    from rest_framework.test import APIClient
    c = APIClient()
    c.force_authenticate(user)
    return c


@pytest.fixture
def as_alice(alice):
    return client_for(alice)


@pytest.fixture
def as_bob(bob):
    return client_for(bob)


def png_bytes(w=64, h=48, color=(200, 30, 30), fmt="PNG"):
    buf = io.BytesIO()
    PILImage.new("RGB", (w, h), color).save(buf, fmt)
    return buf.getvalue()


# --- real services ------------------------------------------------------------------------------

def use_broker(url: str):
    """Point this process's Celery app (what the API publishes with) at the Redis at url."""
    from distill_app.celery import app
    app.conf.broker_url = url
    app.conf.result_backend = url
    # Earlier (eager) tests may have built connection pools and a result backend for another URL;
    # drop them so that this process talks to this Redis.
    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    # kombu keeps producer pools in a global registry keyed by the broker URL: going back to a URL
    # used before would hand out the old pool, whose connections were just closed.
    from kombu import pools
    pools.reset()
    if "amqp" in app.__dict__:
        app.__dict__["amqp"]._producer_pool = None
    app._local.__dict__.pop("backend", None)


def worker_env(redis_url: str, media_root) -> dict:
    """The environment of a worker process on the test database and the given Redis."""
    from django.conf import settings
    return {"REDIS_URL": redis_url, "CELERY_BROKER_URL": redis_url, "CELERY_RESULT_BACKEND": redis_url,
            "DATABASE_URL": f"sqlite:///{settings.DATABASES['default']['NAME']}", "DISTILL_MEDIA_DIR": str(media_root),
            "DISTILL_DEVICE": "cpu", "DJANGO_SETTINGS_MODULE": "distill_app.settings"}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    from distill_app.services import RedisServer
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def celery_worker_process(redis_server, django_db_setup, django_db_blocker, media_root, tmp_path_factory):
    """A real `celery worker` process on the real Redis, sharing the test database file."""
    from distill_app.celery import app
    from distill_app.services import start_worker, stop_process
    use_broker(redis_server.url)
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    log = open(log_path, "wb")
    # This worker does not look for lost work: tests with a Redis of their own (test_faults) share
    # its database, and their messages are not in its broker.
    env = {**worker_env(redis_server.url, media_root), "DISTILL_JOB_STALE_SECONDS": "600", "DISTILL_WORKER_REAPER": "0"}
    proc = start_worker(env=env, log=log, hostname="testworker@%h")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("celery worker exited:\n" + log_path.read_text()[-3000:])
        if app.control.ping(timeout=1.0):
            break
    else:
        stop_process(proc)
        raise RuntimeError("celery worker did not answer within 90 s:\n" + log_path.read_text()[-3000:])
    proc.log_path = log_path
    yield proc
    stop_process(proc)
    # Close this process's broker connections: a later fork (a DataLoader worker) would otherwise
    # inherit them, and kombu's after-fork cleanup blocks on the dead broker.
    app.pool.force_close_all()
    app._pool = None


def wait_for(predicate, timeout=300, interval=0.5, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
