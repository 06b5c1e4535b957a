"""docker-compose.yml refers only to things that exist in this repository."""
import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _services():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_the_production_shape_is_there():
    s = _services()
    assert {"db", "redis", "web", "cpu-worker", "gpu-worker"} <= set(s)
    assert s["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert all("healthcheck" in svc for svc in s.values())
    assert "-Q" in s["gpu-worker"]["command"] and "gpu" in s["gpu-worker"]["command"]
    assert "cpu" in s["cpu-worker"]["command"]


def test_build_contexts_and_commands_exist():
    for name, svc in _services().items():
        if "build" in svc:
            ctx = ROOT / (svc["build"] if isinstance(svc["build"], str) else svc["build"].get("context", "."))
            assert (ctx / "Dockerfile").is_file(), name
        cmd = svc.get("command") or []
        words = " ".join(cmd).replace("&&", " ").split()
        for w in words:
            if w.startswith("distill_app.") or w.startswith("ml_core."):
                assert importlib.util.find_spec(w.split(":")[0]) is not None, (name, w)
            if w.endswith(".py"):
                assert (ROOT / w).is_file(), (name, w)
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
