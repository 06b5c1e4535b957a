import io

from distill_app.models import ModelCheckpoint


def test_download_and_reimport_a_checkpoint(as_alice, det_project, teacher):
    r = as_alice.get(f"/api/models/{teacher['checkpoint']}/download/")
    data = b"".join(r.streaming_content)
    f = io.BytesIO(data)
    f.name = "teacher.pt"
    up = as_alice.post("/api/models/upload/", {"project": det_project["project"], "file": f, "name": "imported"}, format="multipart")
    assert up.status_code == 201 and up.json()["arch"] == "fasterrcnn_tiny"
    assert ModelCheckpoint.objects.count() == 2


def test_garbage_checkpoint_is_refused_and_not_kept(as_alice, det_project, settings):
    f = io.BytesIO(b"not a checkpoint")
    f.name = "x.pt"
    r = as_alice.post("/api/models/upload/", {"project": det_project["project"], "file": f}, format="multipart")
    assert r.status_code == 400 and "not a readable PyTorch checkpoint" in r.json()["message"]
    assert not list((settings.MEDIA_ROOT / "projects").rglob("checkpoints/*.pt"))
