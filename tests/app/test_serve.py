"""`distill serve` on a fresh data directory: Redis, worker and gunicorn come up, the login page
answers, the first user is printed (and kept in an owner-only file until used), a killed worker or
Redis is restarted while the web server stays up, and Ctrl-C stops everything."""
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request

from distill_app.services import free_port


class Serve:
    def __init__(self, data, port):
        env = {**os.environ, "DISTILL_DATA_DIR": str(data), "PYTHONUNBUFFERED": "1"}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        env.pop("REDIS_URL", None)
        self.port = port
        self.proc = subprocess.Popen([sys.executable, "-m", "distill_app.cli", "serve", "--port", str(port), "--no-demo"],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                m = re.search(pattern, line)
                if m:
                    return m
            try:
                line = self._q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError(f"serve never printed {pattern!r}; it printed:\n" + "".join(self.lines))

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=120)  # generous: a loaded CI machine stops slowly
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError("distill serve did not stop within 120 s of Ctrl-C; it printed:\n"
                                 + "".join(self.lines)) from None
        time.sleep(0.2)
        while not self._q.empty():
            line = self._q.get()
            if line:
                self.lines.append(line)
        return "".join(self.lines)


def login_page(port) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=10).read().decode()


def test_serve_starts_everything_survives_dead_children_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    s = Serve(tmp_path, port)
    try:
        password = s.wait_for(r"username: admin\s+password: (\S{12,})").group(1)
        worker_pid = int(s.wait_for(r"Celery worker \(queues gpu,cpu; pid (\d+)\)").group(1))
        s.wait_for(f"open http://127.0.0.1:{port}/")
        assert "Log in" in login_page(port)
        secret = tmp_path / "first-user-password.txt"
        assert secret.read_text().strip() == password and stat.S_IMODE(secret.stat().st_mode) == 0o600

        os.kill(worker_pid, signal.SIGKILL)  # the Celery main process, not a pool child
        s.wait_for(r"Celery worker \(pid \d+\) exited with status -9; restarting", 30)
        assert "Log in" in login_page(port)  # the web server stayed up
        s.wait_for(r"Celery worker restarted \(pid \d+\)", 30)
    finally:
        out = s.stop()
    assert s.proc.returncode == 0, out
    assert "stopping" in out
    try:  # nothing listens any more: the web server stopped with it
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        raise AssertionError("the web server still answers")
    except ConnectionRefusedError:
        pass

    # A second start before anyone logged in shows the same password again (a failed first start
    # must not lock the user out).
    s = Serve(tmp_path, port)
    try:
        assert s.wait_for(r"first user not used yet -- username: admin\s+password: (\S+)").group(1) == password
        s.wait_for(f"open http://127.0.0.1:{port}/")
    finally:
        s.stop()
