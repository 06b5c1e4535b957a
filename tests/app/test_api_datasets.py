import io
import json
import zipfile

import pytest
from django.conf import settings

from distill_app.models import Annotation, Image
from tests.conftest import png_bytes


@pytest.fixture
def project(as_alice):
    return as_alice.post("/api/projects/", {"name": "p", "task": "detection"}, format="json").json()


@pytest.fixture
def dataset(as_alice, project):
    return as_alice.post("/api/datasets/", {"project": project["id"], "name": "lab", "role": "labeled"}, format="json").json()


def upload(client, ds, files):
    return client.post(f"/api/datasets/{ds['id']}/upload/", {"files": files}, format="multipart")


def named(data, name):
    f = io.BytesIO(data)
    f.name = name
    return f


def test_upload_reports_each_file(as_alice, dataset):
    good = png_bytes()
    jpeg = io.BytesIO()
    from PIL import Image as P
    P.new("RGB", (10, 10)).save(jpeg, "JPEG")
    truncated = jpeg.getvalue()[:-200]
    r = upload(as_alice, dataset, [named(good, "a.png"), named(good, "copy.png"), named(b"", "empty.png"),
                                    named(b"hello", "text.png"), named(truncated, "cut.jpg")])
    res = {f["file_name"]: f for f in r.json()["files"]}
    assert res["a.png"]["status"] == "accepted"
    assert res["copy.png"]["status"] == "duplicate"
    assert res["empty.png"]["reason"] == "empty file"
    assert "not an image" in res["text.png"]["reason"]
    assert "truncated" in res["cut.jpg"]["reason"]
    assert r.json()["counts"] == {"accepted": 1, "duplicate": 1, "rejected": 3}
    assert Image.objects.count() == 1


def test_decompression_bomb_is_rejected(as_alice, dataset, settings):
    settings.DISTILL_MAX_IMAGE_PIXELS = 1000
    r = upload(as_alice, dataset, [named(png_bytes(100, 100), "big.png")])
    assert r.json()["files"][0]["status"] == "rejected" and "above the limit" in r.json()["files"][0]["reason"]


def test_exif_orientation_is_applied(as_alice, dataset):
    from PIL import Image as P
    im = P.new("RGB", (40, 20))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    r = upload(as_alice, dataset, [named(buf.getvalue(), "rot.jpg")])
    img = Image.objects.get(pk=r.json()["files"][0]["image_id"])
    assert (img.width, img.height) == (20, 40)


def make_zip(entries, symlink=None):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            z.writestr(info, "/etc/passwd")
    buf.seek(0)
    buf.name = "set.zip"
    return buf


def test_zip_with_unsafe_entries(as_alice, dataset):
    z = make_zip({"ok/a.png": png_bytes(), "../evil.png": png_bytes(color=(1, 2, 3)), "/abs.png": png_bytes(color=(4, 5, 6)),
                  "notes.txt": b"x"}, symlink="link.png")
    r = as_alice.post(f"/api/datasets/{dataset['id']}/upload-zip/", {"file": z}, format="multipart")
    assert r.status_code == 202
    job = as_alice.get(f"/api/jobs/{r.json()['id']}/").json()
    assert job["state"] == "succeeded"
    res = {f["file_name"]: f for f in job["result"]["files"]}
    assert res["ok/a.png"]["status"] == "accepted"
    assert "'..'" in res["../evil.png"]["reason"]
    assert res["/abs.png"]["reason"] == "absolute path"
    assert res["link.png"]["reason"] == "symbolic link"
    assert "not an image file type" in res["notes.txt"]["reason"]
    assert not any(p.name == "evil.png" for p in settings.MEDIA_ROOT.rglob("*"))


def test_zip_bomb_is_refused(as_alice, dataset):
    z = make_zip({"zeros.png": b"\0" * (20 * 1024 * 1024)})
    r = as_alice.post(f"/api/datasets/{dataset['id']}/upload-zip/", {"file": z}, format="multipart")
    job = as_alice.get(f"/api/jobs/{r.json()['id']}/").json()
    assert "zip bomb" in job["result"]["files"][0]["reason"]


def test_zip_expanding_beyond_the_limit_is_refused_whole(as_alice, dataset, settings):
    settings.DISTILL_MAX_ZIP_UNCOMPRESSED = 100
    z = make_zip({"a.png": png_bytes(), "b.png": png_bytes(color=(0, 1, 2))})
    r = as_alice.post(f"/api/datasets/{dataset['id']}/upload-zip/", {"file": z}, format="multipart")
    job = as_alice.get(f"/api/jobs/{r.json()['id']}/").json()
    assert job["state"] == "failed" and "zip bomb" in job["error"]
    assert Image.objects.count() == 0


def test_not_a_zip(as_alice, dataset):
    f = named(b"PK not really", "x.zip")
    r = as_alice.post(f"/api/datasets/{dataset['id']}/upload-zip/", {"file": f}, format="multipart")
    job = as_alice.get(f"/api/jobs/{r.json()['id']}/").json()
    assert job["state"] == "failed" and "not a readable zip" in job["error"]


def coco(names, anns, cats=None):
    return {"images": [{"id": i + 1, "file_name": n, "width": 64, "height": 48} for i, n in enumerate(names)],
            "annotations": anns, "categories": cats or [{"id": 1, "name": "disc"}, {"id": 2, "name": "block"}]}


def test_coco_import_matches_by_file_name_and_is_atomic(as_alice, dataset):
    upload(as_alice, dataset, [named(png_bytes(), "a.png"), named(png_bytes(color=(0, 0, 9)), "b.png")])
    ok = coco(["a.png", "b.png"], [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
                                   {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 10, 10]}])
    r = as_alice.post(f"/api/datasets/{dataset['id']}/import-coco/", ok, format="json")
    assert r.json() == {"images_matched": 2, "annotations": 2, "skipped": []}
    bad = coco(["a.png", "b.png"], [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
                                    {"id": 2, "image_id": 7, "category_id": 2, "bbox": [5, 5, 10, 10]}])
    r = as_alice.post(f"/api/datasets/{dataset['id']}/import-coco/", bad, format="json")
    assert r.status_code == 400 and "missing image id 7" in r.json()["message"]
    assert Annotation.objects.count() == 2  # nothing half-written


@pytest.mark.parametrize("payload, message", [
    (b"{ nope", "not valid JSON"),
    (json.dumps({"images": [], "categories": []}).encode(), "no 'annotations' list"),
    (json.dumps(coco(["zzz.png"], [])).encode(), "not in this dataset"),
])
def test_bad_coco_files(as_alice, dataset, payload, message):
    r = as_alice.post(f"/api/datasets/{dataset['id']}/import-coco/", {"file": named(payload, "c.json")}, format="multipart")
    assert r.status_code == 400 and message in r.json()["message"]


def test_categories_must_stay_the_same(as_alice, dataset):
    upload(as_alice, dataset, [named(png_bytes(), "a.png")])
    as_alice.post(f"/api/datasets/{dataset['id']}/import-coco/", coco(["a.png"], []), format="json")
    other = coco(["a.png"], [], cats=[{"id": 1, "name": "cat"}])
    r = as_alice.post(f"/api/datasets/{dataset['id']}/import-coco/", other, format="json")
    assert r.status_code == 400 and "differ" in r.json()["message"]


def test_unlabeled_sets_take_no_annotations(as_alice, project):
    ds = as_alice.post("/api/datasets/", {"project": project["id"], "name": "u", "role": "unlabeled"}, format="json").json()
    r = as_alice.post(f"/api/datasets/{ds['id']}/import-coco/", coco([], []), format="json")
    assert r.status_code == 400 and "images only" in r.json()["message"]


def test_export_round_trip(as_alice, det_project):
    doc = as_alice.get(f"/api/datasets/{det_project['labeled']}/export/").json()
    assert len(doc["images"]) == 6 and doc["images"][0]["file_name"].startswith("labeled_")
