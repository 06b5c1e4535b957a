#!/usr/bin/env python3
"""CI proof of the README's first command, as a new user meets it: in a fresh virtual environment
holding only what `make run` installs, start `distill serve`, wait until it answers, log in over
HTTP, send a training job through the broker to the worker and see it succeed, then Ctrl-C and
check that every process it started is gone. Standard library only (runs before any install)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def say(msg):
    print(f"[first-command] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, token=None):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Token {token}"} if token else {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def processes_under(folder: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if folder in cmd:
            found.append(f"{pid}: {cmd[:160]}")
    return found


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="distill-first-command-"))
    venv, data, port = tmp / "venv", tmp / "data", free_port()
    say(f"installing what `make run` installs into a fresh {venv}")
    t0 = time.monotonic()
    subprocess.run(["make", "-C", str(ROOT), "install", f"VENV={venv}"], check=True)
    say(f"installed in {time.monotonic() - t0:.0f} s; starting distill serve on port {port}")
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "REDIS_URL", "VIRTUAL_ENV")}
    env.update(DISTILL_DATA_DIR=str(data), DISTILL_PORT=str(port), PYTHONUNBUFFERED="1")
    serve = subprocess.Popen([str(venv / "bin" / "distill"), "serve"], env=env, cwd=tmp, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, password = [], None
    try:
        deadline = time.monotonic() + 300
        for line in serve.stdout:
            out.append(line)
            sys.stdout.write("  | " + line)
            m = re.search(r"username: admin\s+password: (\S+)", line)
            password = m.group(1) if m else password
            if "open http://" in line or time.monotonic() > deadline:
                break
        if not any("open http://" in ln for ln in out):
            raise SystemExit("[first-command] FAIL: distill serve never said it was ready")
        base = f"http://127.0.0.1:{port}"
        assert "Log in" in urllib.request.urlopen(f"{base}/login/", timeout=30).read().decode()
        token = http("POST", f"{base}/api/auth/token/", {"username": "admin", "password": password})["token"]
        say("logged in over HTTP")
        projects = http("GET", f"{base}/api/projects/", token=token)
        projects = projects.get("results", projects) if isinstance(projects, dict) else projects
        demo = next(p for p in projects if p["name"].startswith("Demo"))
        datasets = http("GET", f"{base}/api/datasets/?project={demo['id']}", token=token)
        datasets = datasets.get("results", datasets) if isinstance(datasets, dict) else datasets
        role = {d["role"]: d["id"] for d in datasets}
        run = http("POST", f"{base}/api/training-runs/", {
            "project": demo["id"], "arch": "fasterrcnn_tiny", "labeled": role["labeled"], "validation": role["validation"],
            "config": {"iterations": 4, "batch_size": 2, "num_workers": 0, "checkpoint_every": 2}}, token=token)
        say(f"training run {run['id']} sent through the broker")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = http("GET", f"{base}/api/training-runs/{run['id']}/", token=token)["job"]
            if job["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(2)
        if job["state"] != "succeeded":
            raise SystemExit(f"[first-command] FAIL: the job ended {job['state']}: {job.get('error') or job.get('message')}")
        say(f"the worker ran the job: {job['state']}")
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            rest = serve.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            raise SystemExit("[first-command] FAIL: distill serve did not stop within 120 s of Ctrl-C") from None
        sys.stdout.write("".join("  | " + ln + "\n" for ln in rest.splitlines()))
    time.sleep(1)
    left = processes_under(str(venv))
    if serve.returncode != 0 or left:
        raise SystemExit(f"[first-command] FAIL: serve exited {serve.returncode}; still running: {left}")
    say("Ctrl-C stopped every process; the first command works")
    subprocess.run(["rm", "-rf", str(tmp)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
