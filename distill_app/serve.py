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


def _first_user() -> str:
    from django.contrib.auth import get_user_model
    User = get_user_model()
    if User.objects.exists():
        return "log in with an existing account (add one: python manage.py createsuperuser)"
    password = secrets.token_urlsafe(12)
    User.objects.create_superuser("admin", "", password)
    return f"first user created -- username: admin  password: {password}  (shown once; change it after logging in)"


def serve(host: str | None = None, port: int | None = None, demo: bool = True, worker: bool = True) -> int:
    procs: list[subprocess.Popen] = []
    redis = None
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
        if not os.environ.get("REDIS_URL") and not os.environ.get("CELERY_BROKER_URL"):
            redis = RedisServer(data / "redis").start()
            os.environ["REDIS_URL"] = redis.url
            _say(f"redis-server on {redis.url}")
        _setup_django()
        from django.core.management import call_command
        call_command("migrate", interactive=False, verbosity=0)
        _say(_first_user())
        if demo:
            call_command("seed_demo")
        if worker:
            log = open(data / "worker.log", "ab")
            procs.append(start_worker(log=log))
            _say(f"Celery worker (queues gpu,cpu), log in {data / 'worker.log'}")
        web = subprocess.Popen([sys.executable, "-m", "django", "runserver", "--noreload", f"{host}:{port}"],
                               env={**os.environ, "DJANGO_SETTINGS_MODULE": "distill_app.settings"}, start_new_session=True)
        procs.append(web)
        wait_for_port(host, port, 30, proc=web)
        _say(f"open http://{host}:{port}/ in your browser (API: /api/, docs: /api/docs/). Ctrl-C stops everything.")
        signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        dead = next(p for p in procs if p.poll() is not None)
        raise StartupError(f"{' '.join(map(str, dead.args[:4]))} exited with status {dead.returncode}")
    except StartupError as e:
        print(f"distill serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _say("stopping")
        return 0
    finally:
        stop_processes(procs)
        if redis:
            redis.stop()


def run_worker(queues: str | None, concurrency: int = 1) -> int:
    from .env import envstr
    queues = queues or envstr("DISTILL_QUEUES", "gpu,cpu")
    if not set(q.strip() for q in queues.split(",")) <= {"gpu", "cpu"}:
        print(f"distill worker: queues are gpu and cpu, got {queues!r}", file=sys.stderr)
        return 1
    from .services import worker_command
    cmd = worker_command(queues, concurrency)
    os.execv(cmd[0], cmd)
