"""The production shape of docker-compose.yml, really running, without containers: PostgreSQL
(Debian's package, in a temporary folder on a loopback port), Redis with its append-only file, the
web service's own command (migrate, then gunicorn), a CPU worker and two GPU-queue workers started
with the compose file's commands and environment. The whole workflow runs over HTTP: upload, COCO
import, teacher, multi-transform inference split across both inference workers, review,
pseudo-label set, student, evaluation.

The commands and environment are read from docker-compose.yml (hostnames and ports swapped for
loopback ones), so the test fails when the compose file and the application drift apart. The one
difference said plainly: without a GPU the GPU-queue workers get DISTILL_DEVICE=cpu.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from distill_app.services import RedisServer, free_port, stop_processes, wait_for_port
from ml_core.synth import SynthConfig, generate

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


# --- PostgreSQL ---------------------------------------------------------------------------------

class PostgresServer:
    """initdb + pg_ctl from Debian's postgresql package, on 127.0.0.1:port, data in a temp folder.
    PostgreSQL refuses to run as root; as root it runs as the package's `postgres` user."""

    def __init__(self):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise FileNotFoundError("no PostgreSQL server: apt-get install postgresql")
        self.bin = Path(found[-1]).parent
        self.folder = Path(tempfile.mkdtemp(prefix="distill-pg-"))
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args):
        subprocess.run(self.as_user + [str(self.bin / args[0]), *args[1:]], check=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)

    def start(self) -> "PostgresServer":
        os.chmod(self.folder, 0o777)
        if self.as_user:
            shutil.chown(self.folder, "postgres")
        data = self.folder / "data"
        self._run("initdb", "-D", str(data), "-U", "distill", "--auth=trust", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(data), "-l", str(self.folder / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "distill", "distill")
        return self

    def stop(self):
        try:
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


# --- the compose file's services, on loopback ----------------------------------------------------

def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolate(value: str, given: dict) -> str:
    """Compose's ${NAME:-default} and ${NAME:?message}: `given` first, then the default."""
    def sub(m):
        name, op, rest = m.group(1), m.group(2), m.group(3)
        if name in given:
            return given[name]
        if op == ":-":
            return rest
        raise AssertionError(f"docker-compose.yml needs {name}: {rest}")
    return re.sub(r"\$\{(\w+)(:-|:\?)([^}]*)\}", sub, value)


def service_env(svc: dict, pg_port: int, redis_port: int, data: Path, given: dict) -> dict:
    env = {k: interpolate(str(v), given) for k, v in svc["environment"].items()}
    env["DATABASE_URL"] = env["DATABASE_URL"].replace("@db:5432/", f"@127.0.0.1:{pg_port}/")
    env = {k: v.replace("redis:6379", f"127.0.0.1:{redis_port}") for k, v in env.items()}
    assert env["DISTILL_DATA_DIR"] == "/data"
    env["DISTILL_DATA_DIR"] = str(data)
    if env.get("DISTILL_DEVICE") == "cuda" and not _cuda():
        env["DISTILL_DEVICE"] = "cpu"
    venv_bin = str(Path(sys.executable).parent)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILL_", "DJANGO_", "REDIS_", "CELERY_",
                                                                      "DATABASE_"))}
    return {**base, **env, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def start(svc: dict, env: dict, log: Path, replace: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [str(c) for c in svc["command"]]
    for old, new in (replace or {}).items():
        cmd = [c.replace(old, new) for c in cmd]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


# --- HTTP ---------------------------------------------------------------------------------------

class Client:
    def __init__(self, base: str):
        self.base, self.token = base, None

    def call(self, method: str, path: str, body=None, files=None):
        headers = {"Authorization": f"Token {self.token}"} if self.token else {}
        data = None
        if files is not None:
            boundary = uuid.uuid4().hex
            parts = []
            for name, (filename, content) in files:
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                             f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
            data = b"".join(parts) + f"--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def ok(self, method, path, body=None, files=None):
        status, data = self.call(method, path, body, files)
        assert status < 300, (method, path, status, data)
        return data

    def wait(self, path: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            obj = self.ok("GET", path)
            if obj["job"]["state"] in ("succeeded", "failed", "cancelled"):
                assert obj["job"]["state"] == "succeeded", (path, obj["job"])
                return obj
            time.sleep(1)
        raise AssertionError(f"{path} did not finish within {timeout} s: {obj['job']}")


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        if os.environ.get("DISTILL_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required here (DISTILL_REQUIRE_POSTGRES) but not installed")
        pytest.skip("Debian's postgresql package is not installed (apt-get install postgresql)")
    tmp = tmp_path_factory.mktemp("production")
    pg = PostgresServer().start()
    redis = RedisServer(tmp / "redis", persist=True).start()  # compose: redis-server --appendonly yes
    services = compose()["services"]
    given = {"DISTILL_SECRET_KEY": "test-" + uuid.uuid4().hex}
    procs, logs = [], {}
    try:
        port = free_port()
        web_env = service_env(services["web"], pg.port, redis.port, tmp / "data", given)
        (tmp / "data").mkdir()
        logs["web"] = tmp / "web.log"
        procs.append(start(services["web"], web_env, logs["web"], {"0.0.0.0:8000": f"127.0.0.1:{port}"}))
        wait_for_port("127.0.0.1", port, 180, proc=procs[-1])
        for name, service, n in (("cpu", "cpu-worker", 1), ("gpu", "gpu-worker", 2)):
            env = service_env(services[service], pg.port, redis.port, tmp / "data", given)
            for i in range(n):
                logs[f"{name}{i}"] = tmp / f"{name}{i}.log"
                svc = {**services[service], "command": services[service]["command"] + ["-n", f"{name}{i}@%h"]}
                procs.append(start(svc, env, logs[f"{name}{i}"]))
        subprocess.run([sys.executable, "manage.py", "createsuperuser", "--noinput", "--username", "admin",
                        "--email", "admin@example.com"], cwd=ROOT, check=True,
                       env={**web_env, "DJANGO_SUPERUSER_PASSWORD": "a-long-test-password"})
        client = Client(f"http://127.0.0.1:{port}")
        client.token = client.ok("POST", "/api/auth/token/", {"username": "admin", "password": "a-long-test-password"})["token"]
        yield client, logs, tmp
    except BaseException:
        for name, path in logs.items():
            print(f"--- {name} log ---\n" + path.read_text(errors="replace")[-3000:])
        raise
    finally:
        for p in procs:  # compose stops services with SIGTERM
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        stop_processes(procs, timeout=20)
        redis.stop()
        pg.stop()


def test_the_whole_workflow_on_postgresql_gunicorn_and_separate_queues(production):
    client, logs, tmp = production
    data = tmp / "synth"
    generate(data, SynthConfig(kind="detection", image_size=64, labeled=6, unlabeled=8, val=4, seed=5))
    p = client.ok("POST", "/api/projects/", {"name": "production shape", "task": "detection"})
    ids = {}
    for split, role in (("labeled", "labeled"), ("unlabeled", "unlabeled"), ("val", "validation")):
        ds = client.ok("POST", "/api/datasets/", {"project": p["id"], "name": split, "role": role})
        ids[role] = ds["id"]
        doc = json.loads((data / f"{split}.json").read_text())
        files = [("files", (im["file_name"], (data / split / im["file_name"]).read_bytes())) for im in doc["images"]]
        up = client.ok("POST", f"/api/datasets/{ds['id']}/upload/", files=files)
        assert up["counts"]["accepted"] == len(doc["images"]), up
        if role != "unlabeled":
            client.ok("POST", f"/api/datasets/{ds['id']}/import-coco/", doc)
    tiny = {"iterations": 4, "batch_size": 2, "lr": 0.01, "warmup_iters": 1, "num_workers": 0, "log_every": 1}
    t = client.ok("POST", "/api/training-runs/", {"project": p["id"], "arch": "fasterrcnn_tiny", "labeled": ids["labeled"],
                                                   "validation": ids["validation"], "config": tiny})
    teacher = client.wait(f"/api/training-runs/{t['id']}/")
    # One image per chunk: eight chunks for two inference workers.
    r = client.ok("POST", "/api/inference-runs/", {"project": p["id"], "checkpoint": teacher["checkpoint"],
                                                    "dataset": ids["unlabeled"], "validation": ids["validation"],
                                                    "chunk_size": 1,
                                                    "transforms": {"scales": [48, 64], "flip": True, "max_size": 200}})
    run = client.wait(f"/api/inference-runs/{r['id']}/")
    preds = client.ok("GET", f"/api/inference-runs/{run['id']}/predictions/?page_size=100")["results"]
    images = [x["image"] for x in preds]
    assert len(images) == 8 and len(set(images)) == 8  # every image exactly one prediction
    chunk_logs = {name: logs[name].read_text(errors="replace").count("infer_chunk") for name in ("gpu0", "gpu1")}
    assert all(chunk_logs.values()), f"the chunks did not split across both inference workers: {chunk_logs}"
    client.ok("POST", "/api/reviews/", {"run": run["id"], "image": images[0], "state": "rejected"})
    pls = client.ok("POST", "/api/pseudo-label-sets/", {"run": run["id"], "thresholds": {"default": 0.0}})
    pls = client.wait(f"/api/pseudo-label-sets/{pls['id']}/")
    assert pls["counts"]["rejected"] == 1
    assert "build_pseudo_labels" in logs["cpu0"].read_text(errors="replace")  # the CPU queue's worker
    s = client.ok("POST", "/api/training-runs/", {"project": p["id"], "arch": "fasterrcnn_tiny", "labeled": ids["labeled"],
                                                   "validation": ids["validation"], "pseudo_label_set": pls["id"],
                                                   "config": {**tiny, "ratio": "6:4"}})
    client.wait(f"/api/training-runs/{s['id']}/")
    evals = client.ok("GET", f"/api/evaluations/?project={p['id']}&dataset={ids['validation']}")["results"]
    assert {e["checkpoint_role"] for e in evals} == {"teacher", "student"}
    assert all("AP" in e["stats"]["bbox"] for e in evals)
    # Static files as in production: WhiteNoise under gunicorn, DEBUG off.
    with urllib.request.urlopen(client.base + "/static/distill/api.js", timeout=30) as r:
        assert r.status == 200


def test_the_compose_queues_are_the_queues_tasks_are_routed_to():
    from django.conf import settings
    services = compose()["services"]
    queues = set()
    for name in ("cpu-worker", "gpu-worker"):
        cmd = services[name]["command"]
        queues |= set(cmd[cmd.index("-Q") + 1].split(","))
    routed = {r["queue"] for r in settings.CELERY_TASK_ROUTES.values()}
    assert routed == queues == {"cpu", "gpu"}
    web = " ".join(services["web"]["command"])
    assert "gunicorn distill_app.wsgi" in web and "migrate" in web
