"""`distill serve`: the embedded setup in one command.

Checks the configuration, starts a local Redis (unless REDIS_URL is set), migrates, creates a first
user, offers a demo project, starts a Celery worker and the web server, and stops everything on
Ctrl-C. Every start-up problem is one line saying what to fix.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from .services import RedisServer, StartupError, check_port_free, start_worker, stop_processes, wait_for_port


def _say(msg: str):
    print(f"[distill] {msg}", flush=True)


def _check_data_dir() -> Path:
    from .env import envstr
    data = Path(envstr("DISTILL_DATA_DIR", str(Path(__file__).resolve().parent.parent / "var"))).resolve()
    try:
        data.mkdir(parents=True, exist_ok=True)
        probe = data / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise StartupError(f"data directory {data} is not writable ({e.strerror}); set DISTILL_DATA_DIR") from None
    return data


def _setup_django():
    import django
    from django.core.exceptions import ImproperlyConfigured
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distill_app.settings")
    try:
        django.setup()
    except ImproperlyConfigured as e:
        raise StartupError(f"configuration: {e}") from None


PASSWORD_FILE = "first-user-password.txt"


def _first_user(data: Path) -> str:
    """Create the first user, or show its password again while it has never been used.

    The password also goes to a file only the owner can read, so a first start that fails after
    printing it does not lock anyone out; the file goes once the password has been used or changed.
    """
    from django.contrib.auth import get_user_model
    User = get_user_model()
    secret = data / PASSWORD_FILE
    if not User.objects.exists():
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser("admin", "", password)
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        return (f"first user created -- username: admin  password: {password}  (also in {secret}, readable by you "
                "only, until first used; change it after logging in)")
    admin = User.objects.filter(username="admin").first()
    if secret.exists():
        password = secret.read_text().strip()
        if admin is not None and admin.last_login is None and admin.check_password(password):
            return f"first user not used yet -- username: admin  password: {password}  (from {secret})"
        secret.unlink()
    return "log in with an existing account (add one: python manage.py createsuperuser)"


def _tail(path: Path, lines: int = 12) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in text.splitlines()[-lines:])


class Child:
    """A process `distill serve` keeps alive: restarted with a back-off when it dies, with the last
    lines of its log said each time, so one dead worker never takes the web server down."""

    def __init__(self, name: str, start, log: Path):
        self.name, self._start, self.log = name, start, log
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.failures = 0
        self.retry_at: float | None = None

    def start(self):
        self.proc = self._start()
        self.started = time.monotonic()
        self.retry_at = None
        return self

    def check(self):
        """Restart the process if it died (after 1, 2, 4 ... 60 s; a run of a minute resets the back-off)."""
        now = time.monotonic()
        if self.retry_at is not None:
            if now >= self.retry_at:
                try:
                    self.start()
                    _say(f"{self.name} restarted (pid {self.proc.pid})")
                except StartupError as e:
                    self.failures += 1
                    self.retry_at = now + min(60, 2 ** self.failures)
                    _say(f"{self.name} could not restart ({e}); next try in {self.retry_at - now:.0f} s")
            return
        if self.proc is None or self.proc.poll() is None:
            return
        self.failures = 0 if now - self.started > 60 else self.failures + 1
        delay = min(60, 2 ** self.failures) if self.failures else 1
        self.retry_at = now + delay
        tail = _tail(self.log)
        _say(f"{self.name} (pid {self.proc.pid}) exited with status {self.proc.returncode}; restarting in {delay} s."
             + (f" Last lines of {self.log}:\n{tail}" if tail else ""))


def web_command(host: str, port: int) -> list[str]:
    """gunicorn, as in production (docker-compose.yml); threads serve concurrent reviewers."""
    from .env import envint
    workers = envint("DISTILL_WEB_WORKERS", 2, 1, 64)
    threads = envint("DISTILL_WEB_THREADS", 8, 1, 256)
    return [sys.executable, "-m", "gunicorn", "distill_app.wsgi:application", "--bind", f"{host}:{port}",
            "--workers", str(workers), "--threads", str(threads), "--worker-class", "gthread", "--timeout", "120",
            "--graceful-timeout", "5", "--backlog", "2048", "--keep-alive", "75",  # browsers reuse connections
            # the app (and PyTorch) loaded once, before the port opens: a web process that answers is ready
            "--preload", "--access-logfile", "-", "--error-logfile", "-"]


def serve(host: str | None = None, port: int | None = None, demo: bool = True, worker: bool = True) -> int:
    children: list[Child] = []
    # Ctrl-C must stop everything even when started from a parent that ignores SIGINT (a
    # background job of a non-interactive shell, as some CI runners start it): Python only
    # installs its KeyboardInterrupt handler where SIGINT was not ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        from .env import envint, envstr
        data = _check_data_dir()
        host = host or envstr("DISTILL_HOST", "127.0.0.1")
        port = port or envint("DISTILL_PORT", 8000, 1, 65535)
        check_port_free(host, port)
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "distill_app.settings"}
        if not os.environ.get("REDIS_URL") and not os.environ.get("CELERY_BROKER_URL"):
            # Append-only file in the data folder: queued work survives a Redis restart.
            redis = RedisServer(data / "redis", persist=True, log=data / "redis.log")
            children.append(Child("redis-server", lambda: redis.start().proc, data / "redis.log").start())
            os.environ["REDIS_URL"] = env["REDIS_URL"] = redis.url
            if not os.environ.get("DISTILL_CACHE_URL"):
                # every web process counts failed logins in one place (the throttle), not each its own
                os.environ["DISTILL_CACHE_URL"] = env["DISTILL_CACHE_URL"] = redis.url.rsplit("/", 1)[0] + "/1"
            _say(f"redis-server on {redis.url} (append-only file in {redis.folder})")
        _setup_django()
        from django.core.management import call_command
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        _say(_first_user(data))
        if demo:
            call_command("seed_demo")
        if worker:
            def start_embedded_worker():
                return start_worker(log=open(data / "worker.log", "ab"))
            children.append(Child("Celery worker", start_embedded_worker, data / "worker.log").start())
            _say(f"Celery worker (queues gpu,cpu; pid {children[-1].proc.pid}), log in {data / 'worker.log'}")

        def start_web():
            log = open(data / "web.log", "ab")
            return subprocess.Popen(web_command(host, port), env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        web = Child("web server", start_web, data / "web.log").start()
        children.append(web)
        try:
            wait_for_port(host, port, 60, proc=web.proc)
        except StartupError as e:
            raise StartupError(f"{e}; last lines of {web.log}:\n{_tail(web.log)}") from None
        _say(f"open http://{host}:{port}/ in your browser (API: /api/, docs: /api/docs/). Ctrl-C stops everything.")
        signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        while True:
            for child in children:
                child.check()
            time.sleep(0.5)
    except StartupError as e:
        print(f"distill serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _say("stopping")
        return 0
    finally:
        # Redis last: the worker and the web server may still write to it while they stop.
        stop_processes([c.proc for c in children if c.name != "redis-server"])
        stop_processes([c.proc for c in children if c.name == "redis-server"])


def run_worker(queues: str | None, concurrency: int = 1) -> int:
    from .env import envstr
    queues = queues or envstr("DISTILL_QUEUES", "gpu,cpu")
    if not set(q.strip() for q in queues.split(",")) <= {"gpu", "cpu"}:
        print(f"distill worker: queues are gpu and cpu, got {queues!r}", file=sys.stderr)
        return 1
    from .services import worker_command
    cmd = worker_command(queues, concurrency)
    os.execv(cmd[0], cmd)
