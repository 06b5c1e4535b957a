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


def _hostile_file(tmp_path, marker, name="hostile.pt"):
    from tests.ml_core.test_checkpoint_safety import hostile_checkpoint
    f = io.BytesIO(hostile_checkpoint(tmp_path, marker).read_bytes())
    f.name = name
    return f


def test_a_hostile_pickle_upload_is_refused_without_running_it(as_alice, det_project, settings, tmp_path):
    marker = tmp_path / "pwned"
    r = as_alice.post("/api/models/upload/", {"project": det_project["project"], "file": _hostile_file(tmp_path, marker)},
                      format="multipart")
    assert r.status_code == 400 and "refused" in r.json()["message"]
    assert not marker.exists()
    assert not list((settings.MEDIA_ROOT / "projects").rglob("checkpoints/*.pt"))
    assert ModelCheckpoint.objects.count() == 0


def test_a_malformed_checkpoint_upload_is_a_400(as_alice, det_project, tmp_path):
    import torch
    torch.save({"meta": 3}, tmp_path / "m.pt")
    f = io.BytesIO((tmp_path / "m.pt").read_bytes())
    f.name = "m.pt"
    r = as_alice.post("/api/models/upload/", {"project": det_project["project"], "file": f}, format="multipart")
    assert r.status_code == 400 and "not a Distill checkpoint" in r.json()["message"]


def test_a_keypoint_checkpoint_of_an_earlier_layout_upload_is_a_400(as_alice, det_project, tmp_path):
    # keypointrcnn_tiny before its stride-4 keypoint map: refused with the reason, not a 500
    import torch
    from ml_core.checkpoint import model_meta
    from ml_core.models import build_model
    from ml_core.schema import KeypointSchema
    m, _ = build_model("keypointrcnn_tiny", 2, 3, min_size=64, max_size=96)
    meta = model_meta("keypointrcnn_tiny", [{"id": 1, "name": "a"}], KeypointSchema(names=["a", "b", "c"]), 64, 96)
    old = {k: v for k, v in m.state_dict().items() if not k.startswith(("backbone.lateral.", "backbone.smooth."))}
    torch.save({"meta": meta, "model": old}, tmp_path / "old.pt")
    f = io.BytesIO((tmp_path / "old.pt").read_bytes())
    f.name = "old.pt"
    r = as_alice.post("/api/models/upload/", {"project": det_project["project"], "file": f}, format="multipart")
    assert r.status_code == 400 and "earlier version of keypointrcnn_tiny" in r.json()["message"]
    assert ModelCheckpoint.objects.count() == 0


def test_a_worker_refuses_a_hostile_checkpoint_on_disk(as_alice, det_project, teacher, tmp_path):
    # A checkpoint file replaced behind the database's back: the worker that loads it must not run it.
    from tests.app.conftest import run_inference
    from tests.ml_core.test_checkpoint_safety import hostile_checkpoint
    marker = tmp_path / "pwned"
    ckpt = ModelCheckpoint.objects.get(pk=teacher["checkpoint"])
    with open(ckpt.path, "wb") as out:
        out.write(hostile_checkpoint(tmp_path, marker).read_bytes())
    run = run_inference(as_alice, det_project, teacher["checkpoint"])
    assert run["job"]["state"] == "failed" and "refused" in run["job"]["error"]
    assert not marker.exists()
