"""Accounts: wrong passwords are throttled (API token route and login form), and another user's
ids answer exactly like ids that do not exist."""
import pytest
from django.core.cache import cache

from distill_app.models import Dataset, Image, InferenceRun, Job, ModelCheckpoint, Project
from tests.conftest import make_user


@pytest.fixture(autouse=True)
def _fresh_counts(settings):
    settings.DISTILL_LOGIN_FAILURES = 3
    settings.DISTILL_LOGIN_FAILURES_PER_ADDRESS = 6
    settings.DISTILL_LOGIN_WINDOW_SECONDS = 600
    cache.clear()
    yield
    cache.clear()


def _later(monkeypatch, seconds):
    import time
    now = time.time()
    monkeypatch.setattr("distill_app.accounts.time.time", lambda: now + seconds)


def test_token_route_throttles_wrong_passwords(client, alice, monkeypatch):
    url = "/api/auth/token/"
    for _ in range(3):
        r = client.post(url, {"username": "alice", "password": "wrong"})
        assert r.status_code == 400 and r.json()["message"]
    r = client.post(url, {"username": "alice", "password": "alice-password-123"})
    assert r.status_code == 429, r.content
    assert r["Content-Type"].startswith("application/json")
    assert "too many failed logins" in r.json()["message"] and int(r["Retry-After"]) > 0
    # JSON bodies are counted the same way
    assert client.post(url, {"username": "alice", "password": "x"}, content_type="application/json").status_code == 429
    _later(monkeypatch, 601)
    r = client.post(url, {"username": "alice", "password": "alice-password-123"})
    assert r.status_code == 200 and r.json()["token"]


def test_a_success_clears_the_count_and_other_users_are_not_locked_out(client, alice, bob, settings):
    settings.DISTILL_LOGIN_FAILURES_PER_ADDRESS = 20  # a success does not clear the per-address count
    url = "/api/auth/token/"
    for _ in range(2):
        assert client.post(url, {"username": "alice", "password": "wrong"}).status_code == 400
    assert client.post(url, {"username": "alice", "password": "alice-password-123"}).status_code == 200
    for _ in range(2):
        assert client.post(url, {"username": "alice", "password": "wrong"}).status_code == 400
    assert client.post(url, {"username": "alice", "password": "alice-password-123"}).status_code == 200
    for _ in range(3):
        client.post(url, {"username": "alice", "password": "wrong"})
    assert client.post(url, {"username": "bob", "password": "bob-password-123"}).status_code == 200


def test_one_address_guessing_many_usernames_is_throttled(client, alice):
    url = "/api/auth/token/"
    for i in range(6):
        assert client.post(url, {"username": f"user{i}", "password": "wrong"}).status_code == 400
    assert client.post(url, {"username": "alice", "password": "alice-password-123"}).status_code == 429


def test_hostile_token_bodies(client, db):
    for body in ("[1]", "null", '{"username": [1], "password": {}}', "[" * 5000):
        r = client.post("/api/auth/token/", body, content_type="application/json")
        assert r.status_code == 400 and r.json()["message"], (body[:20], r.content[:200])


def test_login_form_throttles_wrong_passwords(client, alice, monkeypatch):
    for _ in range(3):
        r = client.post("/login/", {"username": "alice", "password": "wrong"})
        assert r.status_code == 200 and b"Wrong username or password" in r.content
    r = client.post("/login/", {"username": "alice", "password": "alice-password-123"})
    assert r.status_code == 429 and b"too many failed logins" in r.content
    assert "_auth_user_id" not in client.session
    _later(monkeypatch, 601)
    r = client.post("/login/", {"username": "alice", "password": "alice-password-123"})
    assert r.status_code == 302 and client.session["_auth_user_id"] == str(alice.pk)


# --- another user's ids -------------------------------------------------------------------------

def _run_with_image(user):
    project = Project.objects.create(owner=user, name="p", categories=[{"id": 1, "name": "a"}])
    ds = Dataset.objects.create(project=project, name="u", role="unlabeled")
    img = Image.objects.create(dataset=ds, file="x.png", file_name="x.png", sha256=f"{user.pk:064d}", width=8, height=8)
    ckpt = ModelCheckpoint.objects.create(project=project, name="t", role="teacher", arch="fasterrcnn_tiny", file="t.pt")
    job = Job.objects.create(project=project, owner=user, kind="infer", state=Job.SUCCEEDED)
    return InferenceRun.objects.create(project=project, checkpoint=ckpt, dataset=ds, job=job), img


def test_review_of_another_users_image_answers_like_a_missing_id(as_alice, alice):
    run, own = _run_with_image(alice)
    _, foreign = _run_with_image(make_user("carol"))
    missing = Image.objects.order_by("-pk").first().pk + 1000

    def post(image_id):
        r = as_alice.post("/api/reviews/", {"run": run.pk, "image": image_id, "state": "accepted"}, format="json")
        return r.status_code, r.json(), r["Content-Type"]

    code, body, ctype = post(foreign.pk)
    code2, body2, ctype2 = post(missing)
    assert code == code2 == 400 and ctype == ctype2
    assert body == _swap(body2, str(missing), str(foreign.pk))
    assert "does not exist" in body["message"]
    # the same for edited reviews, and for the run
    assert post(own.pk)[0] == 201
    r1 = as_alice.post("/api/reviews/", {"run": run.pk, "image": foreign.pk, "state": "edited", "instances": []}, format="json")
    r2 = as_alice.post("/api/reviews/", {"run": run.pk, "image": missing, "state": "edited", "instances": []}, format="json")
    assert r1.status_code == r2.status_code == 400
    assert r1.json() == _swap(r2.json(), str(missing), str(foreign.pk))


def _swap(value, old, new):
    import json
    return json.loads(json.dumps(value).replace(old, new))
