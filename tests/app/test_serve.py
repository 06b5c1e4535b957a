"""`distill serve` on a fresh data directory: Redis, worker and web server come up, the login page
answers, the first user is printed, and Ctrl-C stops everything."""
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from distill_app.services import free_port


def test_serve_starts_everything_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = {**os.environ, "DISTILL_DATA_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "distill_app.cli", "serve", "--port", str(port), "--no-demo"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "open http://" in line:
                break
        out = "".join(lines)
        assert f"open http://127.0.0.1:{port}/" in out, out
        assert re.search(r"username: admin\s+password: \S{12,}", out), out
        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/login/").read().decode()
        assert "Log in" in html
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rest = proc.communicate(timeout=120)[0]  # generous: a loaded CI machine stops slowly
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("distill serve did not stop within 120 s of Ctrl-C; it printed:\n"
                                 + "".join(lines) + proc.communicate(timeout=10)[0]) from None
    assert proc.returncode == 0, rest
    assert "stopping" in rest
    import socket
    try:  # nothing listens any more: the web server stopped with it
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        raise AssertionError("the web server still answers")
    except ConnectionRefusedError:
        pass
