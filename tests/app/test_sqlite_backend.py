"""SQLite write transactions wait in line (distill_app.sqlite_backend): between threads and between
processes, released on commit, rollback and close, and still bounded by the connection's timeout."""
import multiprocessing
import threading
import time

import pytest
from django.db import OperationalError, connection, connections, transaction

from distill_app.models import Project
from distill_app.sqlite_backend.base import WriteLock

pytestmark = pytest.mark.skipif(connection.vendor != "sqlite", reason="the SQLite backend only")


def test_a_second_thread_waits_and_times_out_with_sqlites_message(tmp_path):
    lock = WriteLock.for_database(str(tmp_path / "x.sqlite3"))
    assert WriteLock.for_database(str(tmp_path / "x.sqlite3")) is lock
    lock.acquire(1)
    failed = []
    t = threading.Thread(target=lambda: failed.append(pytest.raises(OperationalError, lock.acquire, 0.2)))
    t.start()
    t.join()
    assert "database is locked" in str(failed[0].value)
    lock.release()
    lock.acquire(0.2)  # free again
    lock.release()


def _hold(path, seconds, ready):
    lock = WriteLock.for_database(path)
    lock.acquire(5)
    ready.set()
    time.sleep(seconds)
    lock.release()


def test_another_process_holding_it_makes_this_one_wait(tmp_path):
    path = str(tmp_path / "y.sqlite3")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_hold, args=(path, 0.6, ready))
    p.start()
    try:
        assert ready.wait(10)
        lock = WriteLock.for_database(path)
        with pytest.raises(OperationalError):
            lock.acquire(0.1)
        t = time.monotonic()
        lock.acquire(10)  # granted as soon as the other process lets go
        waited = time.monotonic() - t
        lock.release()
        assert 0.2 < waited < 5
    finally:
        p.join(10)


@pytest.mark.django_db(transaction=True)
def test_concurrent_atomic_writes_all_commit_and_an_error_releases_the_lock(django_user_model):
    user = django_user_model.objects.create_user("w", password="pw-123456789")
    errors = []

    def writer(n):
        try:
            for k in range(10):
                with transaction.atomic():
                    Project.objects.create(owner=user, name=f"p{n}-{k}", task="detection")
                    time.sleep(0.002)  # Python work inside the transaction, as a view does
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and Project.objects.filter(owner=user).count() == 60

    with pytest.raises(RuntimeError):
        with transaction.atomic():
            Project.objects.create(owner=user, name="rolled back", task="detection")
            raise RuntimeError("a view failed inside its transaction")
    assert connection._write_lock_held is None
    with transaction.atomic():  # the rollback released the lock: this does not wait 30 s
        Project.objects.create(owner=user, name="after", task="detection")
    assert not Project.objects.filter(name="rolled back").exists()
