"""Nothing half-imported, nothing orphaned (issue 9): every file of a multi-file upload stands on
its own, a zip import is all or nothing, no file stays on disk that no row owns, and one colour
policy (8-bit RGB working copy, `ml_core.data.to_rgb8`) for thumbnails, review and training."""
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from PIL import Image as P
from PIL import PngImagePlugin

from distill_app import ingest
from distill_app.models import Annotation, Image
from ml_core.data import load_image, to_rgb8
from tests.conftest import png_bytes


@pytest.fixture
def dataset(as_alice):
    p = as_alice.post("/api/projects/", {"name": "p", "task": "detection"}, format="json").json()
    return as_alice.post("/api/datasets/", {"project": p["id"], "name": "lab", "role": "labeled"}, format="json").json()


def named(data, name):
    f = io.BytesIO(data)
    f.name = name
    return f


def upload(client, ds, files):
    return client.post(f"/api/datasets/{ds['id']}/upload/", {"files": files}, format="multipart")


def upload_zip(client, ds, entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    r = client.post(f"/api/datasets/{ds['id']}/upload-zip/", {"file": named(buf.getvalue(), "set.zip")}, format="multipart")
    assert r.status_code == 202, r.content
    return client.get(f"/api/jobs/{r.json()['id']}/").json()


def unowned_files() -> list[str]:
    """Files under MEDIA_ROOT that no Image row owns (working copy, thumbnail, original)."""
    root = Path(settings.MEDIA_ROOT)
    owned = {p for img in Image.objects.all() for p in img.owned_files()}
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p not in owned)


def encoded(im, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_with_big_text_chunk() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 70_000)  # carried into a JPEG thumbnail: "Comment is too long"
    return encoded(P.new("RGB", (64, 48), (10, 200, 10)), pnginfo=info)


# --- multi-file upload --------------------------------------------------------------------------

def test_png_with_a_large_text_chunk_imports(as_alice, dataset):
    r = upload(as_alice, dataset, [named(png_bytes(), "a.png"), named(png_with_big_text_chunk(), "text.png")])
    assert r.status_code == 200, r.content
    res = {f["file_name"]: f for f in r.json()["files"]}
    assert res["a.png"]["status"] == "accepted" and res["text.png"]["status"] == "accepted", res
    img = Image.objects.get(pk=res["text.png"]["image_id"])
    thumb = P.open(Path(settings.MEDIA_ROOT) / img.thumbnail)
    assert thumb.format == "JPEG" and "comment" not in thumb.info
    assert as_alice.get(f"/api/images/{img.pk}/thumbnail/").status_code == 200
    assert unowned_files() == []


def test_a_file_failing_midway_is_rejected_alone_and_leaves_nothing(as_alice, dataset, monkeypatch):
    real = ingest._write_atomic

    def disk_full_for_thumbs_of_blue(path, data):
        if "thumbs" in path.parts and P.open(io.BytesIO(data)).getpixel((0, 0))[2] > 200:
            raise OSError(28, "No space left on device")
        real(path, data)
    monkeypatch.setattr(ingest, "_write_atomic", disk_full_for_thumbs_of_blue)
    files = [named(png_bytes(color=(250, 0, 0)), "red.png"), named(png_bytes(color=(0, 0, 250)), "blue.png"),
             named(png_bytes(color=(0, 250, 0)), "green.png")]
    r = upload(as_alice, dataset, files)
    assert r.status_code == 200, r.content
    res = {f["file_name"]: f for f in r.json()["files"]}
    assert res["red.png"]["status"] == res["green.png"]["status"] == "accepted"
    assert res["blue.png"]["status"] == "rejected" and "No space left" in res["blue.png"]["reason"]
    assert r.json()["counts"] == {"accepted": 2, "duplicate": 0, "rejected": 1}
    assert Image.objects.count() == 2
    assert unowned_files() == []  # the blue working copy was written, then removed again


def test_a_file_whose_row_cannot_be_written_leaves_no_bytes(as_alice, dataset, monkeypatch):
    from django.db import OperationalError
    real = Image.objects.create

    def create(**kw):
        if kw["file_name"] == "b.png":
            raise OperationalError("database is locked")
        return real(**kw)
    monkeypatch.setattr(Image.objects, "create", create)
    r = upload(as_alice, dataset, [named(png_bytes(), "a.png"), named(png_bytes(color=(1, 2, 3)), "b.png")])
    res = {f["file_name"]: f for f in r.json()["files"]}
    assert res["a.png"]["status"] == "accepted"
    assert res["b.png"]["status"] == "rejected" and "database is locked" in res["b.png"]["reason"]
    assert Image.objects.count() == 1 and unowned_files() == []


def test_deleting_an_image_removes_its_files(as_alice, dataset):
    cmyk = encoded(P.new("CMYK", (32, 32), (0, 200, 200, 0)), "JPEG")
    r = upload(as_alice, dataset, [named(cmyk, "c.jpg"), named(png_bytes(), "a.png")])
    ids = [f["image_id"] for f in r.json()["files"]]
    img = Image.objects.get(pk=ids[0])
    files = img.owned_files()
    assert len(files) == 3 and all(p.exists() for p in files)  # working copy, thumbnail, original
    assert as_alice.delete(f"/api/images/{ids[0]}/").status_code == 204
    assert not any(p.exists() for p in files)
    assert as_alice.delete(f"/api/datasets/{dataset['id']}/").status_code == 204
    assert unowned_files() == []


# --- zip ----------------------------------------------------------------------------------------

def coco(names, anns, cats=None):
    return {"images": [{"id": i + 1, "file_name": n, "width": 64, "height": 48} for i, n in enumerate(names)],
            "annotations": anns, "categories": cats or [{"id": 1, "name": "disc"}]}


def test_zip_with_a_dangling_category_imports_nothing(as_alice, dataset):
    doc = coco(["a.png", "b.png"], [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                                    {"id": 2, "image_id": 2, "category_id": 9, "bbox": [1, 1, 5, 5]}])
    job = upload_zip(as_alice, dataset, {"a.png": png_bytes(), "b.png": png_bytes(color=(0, 9, 0)),
                                         "ann.json": json.dumps(doc)})
    assert job["state"] == "failed", job
    assert Image.objects.count() == 0 and Annotation.objects.count() == 0
    assert unowned_files() == []  # neither the images nor the uploaded zip stay


def test_zip_failing_while_recording_rows_imports_nothing(as_alice, dataset, monkeypatch):
    real = ingest._register
    calls = []

    def register(ds, stored):
        calls.append(stored.name)
        if len(calls) == 2:
            raise RuntimeError("the database went away")
        return real(ds, stored)
    monkeypatch.setattr(ingest, "_register", register)
    job = upload_zip(as_alice, dataset, {"a.png": png_bytes(), "b.png": png_bytes(color=(0, 9, 0)),
                                         "c.png": png_bytes(color=(9, 0, 0))})
    assert job["state"] == "failed" and "went away" in job["error"], job
    assert Image.objects.count() == 0 and unowned_files() == []


def test_zip_with_images_and_coco_imports_all(as_alice, dataset):
    doc = coco(["a.png", "b.png"], [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    job = upload_zip(as_alice, dataset, {"imgs/a.png": png_bytes(), "imgs/b.png": png_bytes(color=(0, 9, 0)),
                                         "imgs/b-again.png": png_bytes(color=(0, 9, 0)),
                                         "text.png": png_with_big_text_chunk(), "ann.json": json.dumps(doc)})
    assert job["state"] == "succeeded", job
    assert job["result"]["counts"] == {"accepted": 3, "duplicate": 1, "rejected": 0}
    assert job["result"]["coco"]["annotations"] == 1
    assert Image.objects.count() == 3 and Annotation.objects.count() == 1
    assert unowned_files() == []


def test_coco_import_writes_no_files(as_alice, dataset):
    upload(as_alice, dataset, [named(png_bytes(), "a.png")])
    r = as_alice.post(f"/api/datasets/{dataset['id']}/import-coco/", coco(["a.png"], [], cats=[{"id": 1, "name": "x"}]),
                      format="json")
    assert r.status_code == 200, r.content
    bad = coco(["a.png"], [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5]}], cats=[{"id": 1, "name": "x"}])
    assert as_alice.post(f"/api/datasets/{dataset['id']}/import-coco/", bad, format="json").status_code == 400
    assert unowned_files() == []


# --- colour modes -------------------------------------------------------------------------------

def gray16() -> P.Image:
    a = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    return P.fromarray(a)


def rgba() -> P.Image:
    im = P.new("RGBA", (64, 48), (255, 0, 0, 255))
    im.paste((0, 0, 255, 0), (0, 0, 32, 48))  # left half fully transparent (blue underneath)
    return im


def palette() -> P.Image:
    im = P.new("P", (64, 48), 1)
    im.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
    return im


COLOUR_CASES = {
    "cmyk.jpg": lambda: encoded(P.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", quality=95),
    "gray.png": lambda: encoded(P.new("L", (64, 48), 90)),
    "gray16.png": lambda: encoded(gray16()),
    "rgba.png": lambda: encoded(rgba()),
    "palette.png": lambda: encoded(palette()),
    "palette-transparent.png": lambda: encoded(palette(), transparency=1),
    "gray16.tif": lambda: encoded(gray16(), "TIFF"),
    "la.png": lambda: encoded(P.new("LA", (64, 48), (0, 0))),
}


@pytest.mark.parametrize("name", list(COLOUR_CASES))
def test_every_colour_mode_becomes_the_same_8bit_rgb_everywhere(as_alice, dataset, name, tmp_path):
    data = COLOUR_CASES[name]()
    r = upload(as_alice, dataset, [named(data, name)])
    res = r.json()["files"][0]
    assert res["status"] == "accepted", res
    img = Image.objects.get(pk=res["image_id"])
    expected = np.asarray(to_rgb8(P.open(io.BytesIO(data))))
    # review: the file the UI shows
    shown = P.open(io.BytesIO(b"".join(as_alice.get(f"/api/images/{img.pk}/file/").streaming_content)))
    assert shown.mode == "RGB" and shown.size == (img.width, img.height) == (64, 48)
    tolerance = 3 if name.endswith(".jpg") else 0  # a JPEG upload that needs converting is re-encoded as JPEG
    assert np.abs(np.asarray(shown).astype(int) - expected).max() <= tolerance
    # thumbnail
    assert P.open(Path(settings.MEDIA_ROOT) / img.thumbnail).mode == "RGB"
    # training reads the stored file with load_image: the same pixels
    trained = (load_image(img.path) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.abs(trained.astype(int) - expected).max() <= tolerance
    # and the CLI, given the uploaded file itself, gets the same pixels as the server
    src = tmp_path / name
    src.write_bytes(data)
    cli = (load_image(src) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.abs(cli.astype(int) - np.asarray(shown)).max() <= tolerance
    # the upload itself is kept beside the working copy
    assert img.original_path is not None and img.original_path.read_bytes() == data
    assert unowned_files() == []


def test_16bit_gray_is_scaled_not_clipped(as_alice, dataset):
    r = upload(as_alice, dataset, [named(encoded(gray16()), "g.png")])
    img = Image.objects.get(pk=r.json()["files"][0]["image_id"])
    row = np.asarray(P.open(img.path))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and 120 <= row[32] <= 135  # was 255 (white) from x = 1 on
    assert np.all(np.diff(row.astype(int)) >= 0)


def test_transparency_is_composited_on_white(as_alice, dataset):
    r = upload(as_alice, dataset, [named(encoded(rgba()), "t.png")])
    img = Image.objects.get(pk=r.json()["files"][0]["image_id"])
    px = P.open(img.path)
    assert px.getpixel((0, 0)) == (255, 255, 255) and px.getpixel((63, 0)) == (255, 0, 0)


def test_plain_rgb_uploads_are_stored_byte_for_byte(as_alice, dataset):
    data = png_bytes()
    jpeg = png_bytes(fmt="JPEG")
    r = upload(as_alice, dataset, [named(data, "a.png"), named(jpeg, "b.jpg")])
    a, b = (Image.objects.get(pk=f["image_id"]) for f in r.json()["files"])
    assert a.path.read_bytes() == data and b.path.read_bytes() == jpeg
    assert a.original_path is None and b.original_path is None
