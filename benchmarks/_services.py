"""The served application for the benchmarks, as `distill serve` and production run it: gunicorn
with `serve.web_command` (gthread workers), a real redis-server, and PostgreSQL from Debian's
package in a temporary folder (the production-shape test's PostgresServer) or SQLite.

    with Served(data_dir, database_url) as app:        # gunicorn on a free loopback port
        client = app.client(token)                      # keep-alive HTTP, like a browser
        client.get_ms("/api/...")

Optionally a real Celery worker (`with_worker=True`), started with the embedded setup's command.
"""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill_app.services import (RedisServer, free_port, stop_processes, wait_for_port,  # noqa: E402
                                  worker_command)


def postgres_server():
    """A started PostgreSQL (Debian's package, temp folder, loopback), or None when not installed."""
    import glob
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return None
    from tests.production.test_production_shape import PostgresServer  # one implementation for test and bench
    return PostgresServer().start()


def postgres_url(pg) -> str:
    return f"postgres://distill@127.0.0.1:{pg.port}/distill"


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Served:
    """gunicorn (serve.web_command) + redis-server (+ a Celery worker) on one data folder and database."""

    def __init__(self, data_dir: Path, database_url: str | None = None, with_worker: bool = False,
                 extra_env: dict | None = None, web_workers: int | None = None):
        self.data_dir = Path(data_dir)
        self.database_url = database_url
        self.with_worker = with_worker
        self.extra_env = dict(extra_env or {})
        self.web_workers = web_workers
        self.procs: list[subprocess.Popen] = []
        self.redis: RedisServer | None = None
        self.port = None

    def env(self) -> dict:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("DISTILL_", "DJANGO_", "REDIS_", "CELERY_", "DATABASE_"))}
        env = {**base, "DJANGO_SETTINGS_MODULE": "distill_app.settings", "DISTILL_DATA_DIR": str(self.data_dir),
               "REDIS_URL": self.redis.url, "PYTHONUNBUFFERED": "1", **self.extra_env}
        if self.web_workers:
            env["DISTILL_WEB_WORKERS"] = str(self.web_workers)
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        return env

    def __enter__(self) -> "Served":
        from distill_app.serve import web_command
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(self.data_dir / "redis").start()
        env = self.env()
        self.port = free_port()
        self.web_log = self.data_dir / "web.log"
        web = subprocess.Popen(web_command("127.0.0.1", self.port), cwd=ROOT, env=env,
                               stdout=open(self.web_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(web)
        if self.with_worker:
            self.worker_log = self.data_dir / "worker.log"
            self.procs.append(subprocess.Popen(worker_command("gpu,cpu"), cwd=ROOT, env=env,
                                               stdout=open(self.worker_log, "wb"), stderr=subprocess.STDOUT,
                                               start_new_session=True))
        try:
            wait_for_port("127.0.0.1", self.port, 120, proc=web)
        except Exception:
            self.__exit__(None, None, None)
            raise RuntimeError(f"gunicorn did not start:\n{_tail(self.web_log)}") from None
        return self

    def wait_worker_ready(self, timeout: float = 120):
        """Until the worker's log says it is ready (its start is not part of what is measured)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready." in _tail(self.worker_log, 200):
                return
            if self.procs[-1].poll() is not None:
                raise RuntimeError(f"the Celery worker exited:\n{_tail(self.worker_log)}")
            time.sleep(0.2)
        raise RuntimeError(f"the Celery worker was not ready after {timeout} s:\n{_tail(self.worker_log)}")

    def __exit__(self, *exc):
        stop_processes(self.procs, timeout=15)
        if self.redis is not None:
            self.redis.stop()

    def client(self, token: str | None = None) -> "Client":
        return Client("127.0.0.1", self.port, token)


class Client:
    """HTTP/1.1 with one kept-alive connection (as a browser's), reconnecting when the server closes it."""

    def __init__(self, host: str, port: int, token: str | None = None):
        self.host, self.port, self.token = host, port, token
        self.conn = None

    def request(self, method: str, path: str, body=None, files=None, fields=None):
        """files: [(field, (filename, bytes))] sent as multipart/form-data with `fields`; else JSON body."""
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Token {self.token}"
        data = None
        if files is not None:
            import uuid
            boundary = uuid.uuid4().hex
            parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                     for k, v in (fields or {}).items()]
            for name, (filename, content) in files:
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                             f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
            data = b"".join(parts) + f"--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                raw = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, raw
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.CannotSendRequest):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise

    def ok(self, method: str, path: str, body=None, files=None, fields=None):
        status, raw = self.request(method, path, body, files, fields)
        assert status < 300, (method, path, status, raw[:500])
        return json.loads(raw or b"null")

    def get_ms(self, path: str) -> float:
        t = time.perf_counter()
        status, raw = self.request("GET", path)
        ms = (time.perf_counter() - t) * 1000
        assert status == 200, (path, status, raw[:500])
        return ms
