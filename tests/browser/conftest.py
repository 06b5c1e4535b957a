"""Chromium (Debian's /usr/bin/chromium) driven by Playwright against a live server backed by the
real Redis and Celery worker."""
import os

import pytest

from tests.app.conftest import TINY_TRAIN, build_project
from tests.conftest import wait_for

# Playwright's sync API runs an event loop in this thread; the test's own ORM calls are synchronous.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
CHROMIUM = os.environ.get("DISTILL_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (the CI script does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser, live_server, alice):
    ctx = browser.new_context(viewport={"width": 1366, "height": 768})
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("dialog", lambda d: (errors.append("dialog: " + d.message), d.dismiss()))
    pg.goto(live_server.url + "/login/")
    pg.fill("input[name=username]", "alice")
    pg.fill("input[name=password]", "alice-password-123")
    pg.click("button[type=submit]")
    pg.wait_for_url(live_server.url + "/")
    pg.errors = errors
    yield pg
    ctx.close()
    assert not errors, errors


@pytest.fixture
def ready_run(celery_worker_process, as_alice, synth_browser):
    """A project with a trained teacher and a finished inference run, made through the API."""
    ids = build_project(as_alice, synth_browser)
    r = as_alice.post("/api/training-runs/", {"project": ids["project"], "arch": "fasterrcnn_tiny", "labeled": ids["labeled"],
                                              "validation": ids["validation"],
                                              "config": {**TINY_TRAIN, "iterations": 40, "batch_size": 4, "lr": 0.02}},
                      format="json")
    t = wait_for(lambda: (x := as_alice.get(f"/api/training-runs/{r.json()['id']}/").json())["job"]["state"]
                 in ("succeeded", "failed") and x, what="teacher")
    assert t["job"]["state"] == "succeeded", t["job"]["error"]
    r = as_alice.post("/api/inference-runs/", {"project": ids["project"], "checkpoint": t["checkpoint"], "dataset": ids["unlabeled"],
                                               "validation": ids["validation"], "chunk_size": 8,
                                               "transforms": {"scales": [48, 64], "flip": True, "max_size": 200}}, format="json")
    run = wait_for(lambda: (x := as_alice.get(f"/api/inference-runs/{r.json()['id']}/").json())["job"]["state"]
                   in ("succeeded", "failed") and x, what="inference")
    assert run["job"]["state"] == "succeeded", run["job"]["error"]
    return {**ids, "run": run["id"], "teacher": t["checkpoint"]}


@pytest.fixture
def keypoint_run(celery_worker_process, as_alice, tmp_path):
    """A keypoint project (stick figures) with a Keypoint R-CNN teacher and an inference run."""
    from ml_core.synth import SynthConfig, generate
    generate(tmp_path, SynthConfig(kind="keypoints", image_size=64, labeled=6, unlabeled=3, val=2, seed=4))
    ids = build_project(as_alice, tmp_path, task="keypoints")
    r = as_alice.post("/api/training-runs/", {"project": ids["project"], "arch": "keypointrcnn_tiny", "labeled": ids["labeled"],
                                              "config": {**TINY_TRAIN, "iterations": 4, "batch_size": 2}}, format="json")
    t = wait_for(lambda: (x := as_alice.get(f"/api/training-runs/{r.json()['id']}/").json())["job"]["state"]
                 in ("succeeded", "failed") and x, what="teacher")
    assert t["job"]["state"] == "succeeded", t["job"]["error"]
    r = as_alice.post("/api/inference-runs/", {"project": ids["project"], "checkpoint": t["checkpoint"], "dataset": ids["unlabeled"],
                                               "transforms": {"scales": [64], "flip": True, "max_size": 200}}, format="json")
    run = wait_for(lambda: (x := as_alice.get(f"/api/inference-runs/{r.json()['id']}/").json())["job"]["state"]
                   in ("succeeded", "failed") and x, what="inference")
    assert run["job"]["state"] == "succeeded", run["job"]["error"]
    return run["id"]


@pytest.fixture(scope="session")
def synth_browser(tmp_path_factory):
    from ml_core.synth import SynthConfig, generate
    out = tmp_path_factory.mktemp("synth_browser")
    generate(out, SynthConfig(kind="detection", image_size=64, labeled=6, unlabeled=12, val=4, seed=5))
    return out
