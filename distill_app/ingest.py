"""Getting images and COCO annotations in: verification, de-duplication, safe zip extraction.

Every file gets a per-file result (accepted, duplicate, rejected with a reason); a bad file never
stops the rest of a multi-file upload, and nothing is half-registered: files are written under a
temporary name and renamed, then recorded; whatever no row owns in the end (the file failed, or
the import was rolled back) is removed again. A zip import is all or nothing: its images and its
COCO annotations are recorded in one transaction, after every file is written.

Colour policy (one function, `ml_core.data.to_rgb8`, used here and by `ml_core.data.load_image`):
the stored working copy that thumbnails, review and training use is 8-bit RGB. An upload that is
already 8-bit RGB JPEG/PNG without EXIF rotation or transparency is stored byte for byte; any other
(CMYK, grayscale, 16-bit, palette, RGBA, TIFF, WebP, ...) is converted -- 16-bit scaled from its
full range, transparency composited on white, EXIF rotation applied -- and stored as PNG (JPEG at
quality 95 when the upload was a JPEG), with the uploaded bytes kept beside it under `originals/`.
Nothing written carries the upload's metadata (text chunks, EXIF, ICC profile).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from ml_core.data import CocoFormatError, is_rgb8, to_rgb8, validate_coco

from . import validation
from .models import Annotation, Dataset, Image, Project

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
THUMBNAIL_SIDE = 256
ORIGINAL_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif", "GIF": ".gif",
                       "MPO": ".jpg"}
log = logging.getLogger(__name__)


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


class _Batch:
    """The files written for one upload (or zip), by content digest. `cleanup` removes those that
    no Image row owns in the end: the file failed, or the transaction that recorded it rolled back.
    Files a row owns stay, whoever wrote them (the same content arriving concurrently writes the
    same paths)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.written: dict[str, list[Path]] = {}
        self.pending: dict[str, _Stored] = {}

    def write(self, digest: str, rel: Path, data: bytes):
        path = Path(settings.MEDIA_ROOT) / rel
        self.written.setdefault(digest, []).append(path)
        _write_atomic(path, data)

    def cleanup(self):
        for digest, paths in self.written.items():
            try:
                owned = Image.objects.filter(dataset=self.dataset, sha256=digest).exists()
            except DatabaseError:
                owned = False
            if owned:
                continue
            for path in paths:
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    log.exception("could not remove %s", path)


@dataclass
class _Stored:
    """An image whose files are written and whose row is not created yet."""
    name: str
    digest: str
    rel: str
    thumb_rel: str
    width: int
    height: int


def _clean_name(file_name) -> str:
    return PurePosixPath(str(file_name).replace("\\", "/")).as_posix().lstrip("/")[:500] or "unnamed"


def _encode(im: PILImage.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _store(batch: _Batch, name: str, data: bytes, digest: str, im: PILImage.Image) -> _Stored:
    """Write the working copy (8-bit RGB, see the module docstring), its thumbnail and, when the
    working copy is not the upload itself, the uploaded bytes. No row yet."""
    fmt = (im.format or "").upper()
    as_uploaded = fmt in ("JPEG", "PNG") and is_rgb8(im)
    rgb = to_rgb8(im)  # carries no metadata over: a huge PNG text chunk cannot break the JPEG thumbnail
    width, height = rgb.size
    folder = Path("projects") / str(batch.dataset.project_id) / "datasets" / str(batch.dataset.pk)
    key = digest[:24]
    ext = ".jpg" if fmt == "JPEG" else ".png"
    rel = folder / "images" / f"{key}{ext}"
    if as_uploaded:
        batch.write(digest, rel, data)
    else:
        working = _encode(rgb, "JPEG", quality=95) if fmt == "JPEG" else _encode(rgb, "PNG")
        batch.write(digest, rel, working)
        original_ext = ORIGINAL_EXTENSIONS.get(fmt, f".{fmt.lower()}" if fmt.isalnum() else ".bin")
        batch.write(digest, folder / "originals" / f"{key}{original_ext}", data)
    rgb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    thumb_rel = folder / "thumbs" / f"{key}.jpg"
    batch.write(digest, thumb_rel, _encode(rgb, "JPEG", quality=85))
    stored = _Stored(name, digest, str(rel), str(thumb_rel), width, height)
    batch.pending[digest] = stored
    return stored


def _prepare(batch: _Batch, file_name: str, data: bytes) -> FileResult | _Stored:
    """Check one image and write its files: a FileResult when it is refused (or a duplicate), else
    what `_register` records. Raises only when storing fails (disk, encoder)."""
    name = _clean_name(file_name)
    if len(data) == 0:
        return FileResult(name, "rejected", "empty file")
    if len(data) > settings.DISTILL_MAX_IMAGE_BYTES:
        return FileResult(name, "rejected", f"{len(data):,} bytes is above the limit of {settings.DISTILL_MAX_IMAGE_BYTES:,}")
    digest = hashlib.sha256(data).hexdigest()
    if digest in batch.pending:
        return FileResult(name, "duplicate", f"same content as {batch.pending[digest].name} of this upload")
    existing = Image.objects.filter(dataset=batch.dataset, sha256=digest).only("id").first()
    if existing:
        return FileResult(name, "duplicate", "same content as an image already in this dataset", existing.id)
    try:
        im = _decode(data)
    except ValueError as e:
        return FileResult(name, "rejected", str(e))
    return _store(batch, name, data, digest, im)


def _register(dataset: Dataset, s: _Stored) -> FileResult:
    try:
        with transaction.atomic():
            img = Image.objects.create(dataset=dataset, file=s.rel, thumbnail=s.thumb_rel, file_name=s.name,
                                       sha256=s.digest, width=s.width, height=s.height)
    except IntegrityError:  # the same content arrived concurrently: keep the first
        other = Image.objects.get(dataset=dataset, sha256=s.digest)
        return FileResult(s.name, "duplicate", "same content as an image already in this dataset", other.id)
    return FileResult(s.name, "accepted", "", img.id)


def ingest_bytes(dataset: Dataset, file_name: str, data: bytes) -> FileResult:
    """Verify one image and register it in the dataset. Whatever goes wrong with this file is its
    own result (rejected, with the reason) and leaves no file behind."""
    batch = _Batch(dataset)
    try:
        result = _prepare(batch, file_name, data)
        return _register(dataset, result) if isinstance(result, _Stored) else result
    except Exception as e:  # noqa: BLE001 -- one file's failure is that file's result, never the batch's
        log.exception("storing the upload %r failed", file_name)
        return FileResult(_clean_name(file_name), "rejected", f"could not be stored ({type(e).__name__}: {e})")
    finally:
        batch.cleanup()


def ingest_upload(dataset: Dataset, uploaded) -> FileResult:
    if uploaded.size > settings.DISTILL_MAX_IMAGE_BYTES:
        return FileResult(_clean_name(uploaded.name), "rejected", f"{uploaded.size:,} bytes is above the limit of "
                          f"{settings.DISTILL_MAX_IMAGE_BYTES:,}")
    try:
        data = uploaded.read()
    except OSError as e:
        return FileResult(_clean_name(uploaded.name), "rejected", f"could not be read ({e})")
    return ingest_bytes(dataset, uploaded.name, data)


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
    """Every image of a zip into the dataset; a COCO JSON inside it is imported with the images
    (labeled and validation sets). All or nothing: images are checked and written first, then every
    row and the annotations are recorded in one transaction; if anything fails (the COCO file, the
    database), no row is left and the written files are removed. Entries that are not usable
    images are reported as rejected and do not stop the rest. Returns {"files": [...], "coco": {...} | None}."""
    batch = _Batch(dataset)
    try:
        return _ingest_zip(batch, zip_path, progress)
    finally:
        batch.cleanup()


def _ingest_zip(batch: _Batch, zip_path: str | Path, progress) -> dict:
    dataset = batch.dataset
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
        results: list[FileResult | _Stored] = []
        coco_docs = []
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
            try:
                results.append(_prepare(batch, name, data))
            except Exception as e:  # noqa: BLE001 -- an entry that cannot be stored is rejected like a bad one
                log.exception("storing the zip entry %r failed", name)
                results.append(FileResult(_clean_name(name), "rejected", f"could not be stored ({type(e).__name__}: {e})"))
            if progress:
                progress(n + 1, len(infos))
    doc = None
    if coco_docs and dataset.role in ("labeled", "validation"):
        if len(coco_docs) > 1:
            raise IngestError(f"the zip holds {len(coco_docs)} JSON files; include one COCO annotation file")
        name, raw = coco_docs[0]
        doc = parse_coco_bytes(raw, name)
    coco = None
    with transaction.atomic():
        results = [_register(dataset, r) if isinstance(r, _Stored) else r for r in results]
        if doc is not None:
            coco = import_coco(dataset, doc)
    return {"files": [r.to_dict() for r in results], "coco": coco}


def parse_coco_bytes(raw: bytes, name: str = "COCO JSON") -> dict:
    if len(raw) > settings.DISTILL_MAX_COCO_BYTES:
        raise IngestError(f"{name} is {len(raw):,} bytes, above the limit of {settings.DISTILL_MAX_COCO_BYTES:,}")
    try:
        return validation.loads(raw, name)  # no NaN, no RecursionError, bounded nesting
    except ValueError as e:
        raise IngestError(str(e)) from None


def check_coco_document(doc, skip_invalid: bool = False) -> tuple[dict, list[str]]:
    """The types of a COCO document, before ml_core's checks compare and hash its values: ids are
    integers the database holds, file names strings, boxes and keypoints finite numbers, and the
    categories pass the one category check every path uses (validation.check_categories), even
    when the document has no image. Returns the document without the entries skip_invalid drops,
    and what it dropped; without skip_invalid the first bad entry is an IngestError."""
    if not isinstance(doc, dict):
        raise IngestError("COCO JSON must be an object with 'images', 'annotations' and 'categories'")
    try:
        validation.check_json_value(doc, "COCO JSON")
    except ValueError as e:
        raise IngestError(str(e)) from None
    for key in ("images", "annotations", "categories"):
        if doc.get(key) is not None and not isinstance(doc[key], list):
            raise IngestError(f"COCO JSON: '{key}' must be a list")
    if isinstance(doc.get("categories"), list):
        try:
            validation.check_categories(doc["categories"])
        except ValueError as e:
            raise IngestError(f"COCO JSON {e}") from None
    skipped: list[str] = []

    def keep(ok: bool, msg: str) -> bool:
        if ok:
            return True
        if not skip_invalid:
            raise IngestError(msg)
        skipped.append(msg)
        return False

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    images = []
    for i, im in enumerate(doc.get("images") or []):
        if not keep(isinstance(im, dict), f"images[{i}] must be an object"):
            continue
        if "id" in im and not keep(validation.is_id(im["id"]), f"images[{i}]: id must be a non-negative integer"):
            continue
        if "file_name" in im and not keep(isinstance(im["file_name"], str) and 0 < len(im["file_name"]) <= 500,
                                          f"images[{i}]: file_name must be a string of 1 to 500 characters"):
            continue
        if not keep(all(validation.is_id(im[k]) and im[k] < 2 ** 31 for k in ("width", "height") if k in im),
                    f"images[{i}]: width and height must be positive integers"):
            continue
        images.append(im)
    annotations = []
    for i, a in enumerate(doc.get("annotations") or []):
        if not keep(isinstance(a, dict), f"annotations[{i}] must be an object"):
            continue
        bad_ids = [k for k in ("id", "image_id", "category_id") if k in a and not validation.is_id(a[k])]
        if not keep(not bad_ids, f"annotations[{i}]: {', '.join(bad_ids)} must be non-negative integers"):
            continue
        if "bbox" in a and not keep(isinstance(a["bbox"], list) and len(a["bbox"]) == 4 and all(map(number, a["bbox"])),
                                    f"annotations[{i}]: bbox must be [x, y, width, height] numbers"):
            continue
        kps = a.get("keypoints")
        if kps is not None and not keep(isinstance(kps, list) and all(map(number, kps)),
                                        f"annotations[{i}]: keypoints must be a list of numbers"):
            continue
        if not keep(a.get("iscrowd", 0) in (0, 1), f"annotations[{i}]: iscrowd must be 0 or 1"):
            continue
        annotations.append(a)
    if skipped:
        doc = {**doc, "images": images, "annotations": annotations}
    return doc, skipped


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
    doc, skipped = check_coco_document(doc, skip_invalid=skip_invalid)
    try:
        data = validate_coco(doc, skip_invalid=skip_invalid)
    except (CocoFormatError, ValueError, TypeError) as e:
        raise IngestError(str(e)) from None
    data.skipped = skipped + data.skipped
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
    images = list(Image.objects.filter(dataset=dataset).order_by("id")
                  .values("id", "file", "width", "height"))
    doc = {"images": [{"id": i["id"], "file_name": i["file"], "width": i["width"], "height": i["height"]} for i in images],
           "categories": dataset.project.categories, "annotations": []}
    if with_annotations:
        annotations = Annotation.objects.filter(image__dataset=dataset).order_by("id")
        for a in annotations.values("id", "image_id", "category_id", "bbox", "keypoints", "iscrowd"):
            ann = {"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                   "iscrowd": int(a["iscrowd"]), "area": a["bbox"][2] * a["bbox"][3]}
            if a["keypoints"] is not None:
                ann["keypoints"] = a["keypoints"]
            doc["annotations"].append(ann)
    return doc
