"""Getting images and COCO annotations in: verification, de-duplication, safe zip extraction.

Every file gets a per-file result (accepted, duplicate, rejected with a reason); a bad file never
stops the rest of a batch, and nothing is half-registered: the file is written under a temporary
name, renamed, and only then recorded, and removed again if recording fails.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.db import IntegrityError, transaction
from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError

from ml_core.data import CocoFormatError, validate_coco

from .models import Annotation, Dataset, Image, Project

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
THUMBNAIL_SIDE = 256


class IngestError(ValueError):
    """A whole upload that cannot be taken (bad zip, bad COCO JSON); the message says why."""


@dataclass
class FileResult:
    file_name: str
    status: str  # accepted | duplicate | rejected
    reason: str = ""
    image_id: int | None = None

    def to_dict(self):
        return asdict(self)


def _decode(data: bytes) -> PILImage.Image:
    """Open, verify and fully decode an image, refusing decompression bombs before decoding."""
    limit = settings.DISTILL_MAX_IMAGE_PIXELS
    try:
        with PILImage.open(io.BytesIO(data)) as probe:
            w, h = probe.size
            if w * h > limit:
                raise ValueError(f"{w}x{h} is {w * h:,} pixels, above the limit of {limit:,}")
            probe.verify()
        im = PILImage.open(io.BytesIO(data))
        im.load()  # verify() does not decode: truncated files fail only here
    except ValueError:
        raise
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read") from None
    except PILImage.DecompressionBombError:
        raise ValueError("decompression bomb: too many pixels") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"corrupt or truncated image ({e})") from None
    return im


def _write_atomic(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ingest_bytes(dataset: Dataset, file_name: str, data: bytes) -> FileResult:
    """Verify one image and register it in the dataset."""
    name = PurePosixPath(str(file_name).replace("\\", "/")).as_posix().lstrip("/")[:500] or "unnamed"
    if len(data) == 0:
        return FileResult(name, "rejected", "empty file")
    if len(data) > settings.DISTILL_MAX_IMAGE_BYTES:
        return FileResult(name, "rejected", f"{len(data):,} bytes is above the limit of {settings.DISTILL_MAX_IMAGE_BYTES:,}")
    digest = hashlib.sha256(data).hexdigest()
    existing = Image.objects.filter(dataset=dataset, sha256=digest).only("id").first()
    if existing:
        return FileResult(name, "duplicate", "same content as an image already in this dataset", existing.id)
    try:
        im = _decode(data)
    except ValueError as e:
        return FileResult(name, "rejected", str(e))
    orientation = im.getexif().get(0x0112, 1)
    fmt = (im.format or "PNG").upper()
    if orientation != 1 or fmt not in ("JPEG", "PNG"):
        # Store what the user saw: EXIF rotation applied, in a format every browser shows.
        im = ImageOps.exif_transpose(im).convert("RGB")
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95)
        data, ext = buf.getvalue(), ".jpg"
    else:
        ext = ".jpg" if fmt == "JPEG" else ".png"
    rel = Path("projects") / str(dataset.project_id) / "datasets" / str(dataset.pk) / "images" / f"{digest[:24]}{ext}"
    thumb_rel = rel.parent.parent / "thumbs" / f"{digest[:24]}.jpg"
    root = Path(settings.MEDIA_ROOT)
    _write_atomic(root / rel, data)
    th = im.convert("RGB")
    th.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buf = io.BytesIO()
    th.save(buf, "JPEG", quality=85)
    _write_atomic(root / thumb_rel, buf.getvalue())
    try:
        with transaction.atomic():
            img = Image.objects.create(dataset=dataset, file=str(rel), thumbnail=str(thumb_rel), file_name=name,
                                       sha256=digest, width=im.width, height=im.height)
    except IntegrityError:  # the same content arrived concurrently: keep the first
        other = Image.objects.get(dataset=dataset, sha256=digest)
        return FileResult(name, "duplicate", "same content as an image already in this dataset", other.id)
    return FileResult(name, "accepted", "", img.id)


def ingest_upload(dataset: Dataset, uploaded) -> FileResult:
    if uploaded.size > settings.DISTILL_MAX_IMAGE_BYTES:
        return FileResult(uploaded.name, "rejected", f"{uploaded.size:,} bytes is above the limit of "
                          f"{settings.DISTILL_MAX_IMAGE_BYTES:,}")
    return ingest_bytes(dataset, uploaded.name, uploaded.read())


def check_zip_entry(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry must not be extracted, or None when it is safe."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "path leaves the archive ('..')"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if info.file_size > settings.DISTILL_MAX_IMAGE_BYTES and not name.lower().endswith(".json"):
        return f"{info.file_size:,} bytes uncompressed, above the per-image limit"
    # Images barely compress; JSON does, but not 200-fold. Higher ratios are bombs.
    if info.compress_size and info.file_size > 1 << 20 and info.file_size / info.compress_size > 200:
        return "compression ratio above 200:1 (zip bomb)"
    return None


def _read_limited(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """Read an entry without trusting its declared size."""
    out = bytearray()
    with zf.open(info) as f:
        while chunk := f.read(1 << 20):
            out += chunk
            if len(out) > limit:
                raise ValueError(f"entry grows beyond {limit:,} bytes when decompressed")
    return bytes(out)


def ingest_zip(dataset: Dataset, zip_path: str | Path, progress=None) -> dict:
    """Every image of a zip into the dataset; a COCO JSON inside it is imported after the images
    (labeled and validation sets). Returns {"files": [...], "coco": {...} | None}."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise IngestError(f"not a readable zip file ({e})") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        total = sum(i.file_size for i in infos)
        if total > settings.DISTILL_MAX_ZIP_UNCOMPRESSED:
            raise IngestError(f"the zip expands to {total:,} bytes, above the limit of "
                              f"{settings.DISTILL_MAX_ZIP_UNCOMPRESSED:,} (zip bomb?)")
        results, coco_docs = [], []
        for n, info in enumerate(infos):
            name = info.filename
            base = PurePosixPath(name.replace("\\", "/")).name
            if base.startswith(".") or "__MACOSX" in name:
                continue
            reason = check_zip_entry(info)
            if reason:
                results.append(FileResult(name, "rejected", reason))
                continue
            ext = PurePosixPath(base).suffix.lower()
            try:
                if ext == ".json":
                    coco_docs.append((name, _read_limited(zf, info, settings.DISTILL_MAX_COCO_BYTES)))
                    continue
                if ext not in IMAGE_EXTENSIONS:
                    results.append(FileResult(name, "rejected", f"not an image file type ({ext or 'no extension'})"))
                    continue
                data = _read_limited(zf, info, settings.DISTILL_MAX_IMAGE_BYTES)
            except (ValueError, zipfile.BadZipFile, OSError, EOFError) as e:
                results.append(FileResult(name, "rejected", f"unreadable zip entry ({e})"))
                continue
            results.append(ingest_bytes(dataset, name, data))
            if progress:
                progress(n + 1, len(infos))
    coco = None
    if coco_docs and dataset.role in ("labeled", "validation"):
        if len(coco_docs) > 1:
            raise IngestError(f"the zip holds {len(coco_docs)} JSON files; include one COCO annotation file")
        name, raw = coco_docs[0]
        coco = import_coco(dataset, parse_coco_bytes(raw, name))
    return {"files": [r.to_dict() for r in results], "coco": coco}


def parse_coco_bytes(raw: bytes, name: str = "COCO JSON") -> dict:
    if len(raw) > settings.DISTILL_MAX_COCO_BYTES:
        raise IngestError(f"{name} is {len(raw):,} bytes, above the limit of {settings.DISTILL_MAX_COCO_BYTES:,}")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IngestError(f"{name} is not valid JSON ({e})") from None


def _image_key(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/")).name


def check_categories(project: Project, categories: list[dict]):
    """A project's categories are fixed by its first COCO import; later imports must agree."""
    incoming = [{k: c[k] for k in ("id", "name", "keypoints", "skeleton", "flip_map") if k in c} for c in categories]
    if project.task == "keypoints" and not any(c.get("keypoints") for c in incoming):
        raise IngestError("this is a keypoint project but the COCO categories declare no 'keypoints'")
    if project.task == "detection" and any(c.get("keypoints") for c in incoming):
        raise IngestError("this is a detection project but the COCO categories declare keypoints; "
                          "create a keypoint project for them")
    if not project.categories:
        project.categories = incoming
        project.save(update_fields=["categories"])
        return
    have = {c["id"]: c["name"] for c in project.categories}
    got = {c["id"]: c["name"] for c in incoming}
    if have != got:
        raise IngestError(f"categories {got} differ from the project's {have}")


def import_coco(dataset: Dataset, doc: dict, skip_invalid: bool = False) -> dict:
    """Attach a COCO document's annotations to the dataset's images, matched by file name.

    All or nothing: the document is validated and every image matched before anything is written;
    then the annotations of the matched images are replaced in one transaction.
    """
    if dataset.role == "unlabeled":
        raise IngestError("unlabeled datasets take images only; import annotations into a labeled or validation set")
    try:
        data = validate_coco(doc, skip_invalid=skip_invalid)
    except (CocoFormatError, ValueError) as e:
        raise IngestError(str(e)) from None
    by_name: dict[str, Image] = {}
    for img in Image.objects.filter(dataset=dataset):
        by_name.setdefault(img.file_name, img)
        by_name.setdefault(_image_key(img.file_name), img)
    missing, matched = [], {}
    for im in data.images:
        img = by_name.get(im["file_name"]) or by_name.get(_image_key(im["file_name"]))
        if img is None:
            missing.append(im["file_name"])
            continue
        if (img.width, img.height) != (im["width"], im["height"]):
            missing.append(f"{im['file_name']} (COCO says {im['width']}x{im['height']}, the file is {img.width}x{img.height})")
            continue
        matched[im["id"]] = img
    if missing and not skip_invalid:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise IngestError(f"{len(missing)} image(s) of the COCO file are not in this dataset: {shown}; "
                          "upload the images first (or set skip_invalid)")
    anns = [a for a in data.annotations if a["image_id"] in matched]
    with transaction.atomic():
        check_categories(dataset.project, data.categories)
        Annotation.objects.filter(image__in=list(matched.values())).delete()
        Annotation.objects.bulk_create([
            Annotation(image=matched[a["image_id"]], category_id=a["category_id"], bbox=a["bbox"],
                       keypoints=a.get("keypoints"), iscrowd=bool(a.get("iscrowd", 0))) for a in anns
        ], batch_size=2000)
    return {"images_matched": len(matched), "annotations": len(anns), "skipped": data.skipped + missing if skip_invalid else []}


def dataset_to_coco(dataset: Dataset, with_annotations: bool = True) -> dict:
    """The dataset as a COCO document whose file_names are paths under MEDIA_ROOT."""
    images = list(Image.objects.filter(dataset=dataset).values("id", "file", "width", "height"))
    doc = {"images": [{"id": i["id"], "file_name": i["file"], "width": i["width"], "height": i["height"]} for i in images],
           "categories": dataset.project.categories, "annotations": []}
    if with_annotations:
        for a in Annotation.objects.filter(image__dataset=dataset).values("id", "image_id", "category_id", "bbox", "keypoints", "iscrowd"):
            ann = {"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                   "iscrowd": int(a["iscrowd"]), "area": a["bbox"][2] * a["bbox"][3]}
            if a["keypoints"] is not None:
                ann["keypoints"] = a["keypoints"]
            doc["annotations"].append(ann)
    return doc
