def test_create_and_list_projects(as_alice):
    r = as_alice.post("/api/projects/", {"name": "p1", "task": "detection"}, format="json")
    assert r.status_code == 201 and r.json()["owner"] == "alice"
    assert [p["name"] for p in as_alice.get("/api/projects/").json()["results"]] == ["p1"]


def test_bad_categories_get_a_message(as_alice):
    r = as_alice.post("/api/projects/", {"name": "p", "categories": [{"id": "x"}]}, format="json")
    assert r.status_code == 400 and "categories[0]" in r.json()["message"]


def test_pipeline_summary(as_alice, det_project):
    r = as_alice.get(f"/api/projects/{det_project['project']}/pipeline/").json()
    assert r["datasets"]["labeled"][0]["n"] == 6 and r["teacher"] is None


def test_anonymous_requests_are_refused(client, db):
    r = client.get("/api/projects/")
    assert r.status_code in (401, 403) and "message" in r.json()


def test_token_authentication(client, alice):
    r = client.post("/api/auth/token/", {"username": "alice", "password": "alice-password-123"})
    token = r.json()["token"]
    r = client.get("/api/projects/", HTTP_AUTHORIZATION=f"Token {token}")
    assert r.status_code == 200
