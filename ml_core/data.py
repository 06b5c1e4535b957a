"""COCO-format datasets, their validation, and the labeled/pseudo-labeled mixing sampler."""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from .schema import KeypointSchema


class CocoFormatError(ValueError):
    """A COCO JSON document that cannot be used; the message names the offending entry."""


@dataclass
class CocoData:
    """A validated COCO document plus the mapping between category ids and model labels."""

    images: list[dict]
    annotations: list[dict]
    categories: list[dict]
    skipped: list[str] = field(default_factory=list)

    @property
    def cat_ids(self) -> list[int]:
        return [c["id"] for c in self.categories]

    def label_of(self) -> dict[int, int]:
        """category id -> contiguous model label (1..K; 0 is the background)."""
        return {cid: i + 1 for i, cid in enumerate(self.cat_ids)}

    def keypoint_schema(self) -> KeypointSchema | None:
        for c in self.categories:
            s = KeypointSchema.from_coco_category(c)
            if s is not None:
                return s
        return None

    def annotations_by_image(self) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for a in self.annotations:
            out[a["image_id"]].append(a)
        return out

    def to_dict(self) -> dict:
        return {"images": self.images, "annotations": self.annotations, "categories": self.categories}


def _require(entry: dict, keys: tuple[str, ...], where: str):
    missing = [k for k in keys if k not in entry]
    if missing:
        raise CocoFormatError(f"{where} is missing field(s) {', '.join(missing)}")


def validate_coco(doc: dict, *, skip_invalid: bool = False, require_annotations: bool = True) -> CocoData:
    """Check a COCO document and return it as CocoData.

    Every problem raises CocoFormatError naming the entry, unless skip_invalid is set: then bad
    annotations (and images with a bad id) are dropped and listed in `skipped`.
    """
    if not isinstance(doc, dict):
        raise CocoFormatError("COCO JSON must be an object with 'images', 'annotations' and 'categories'")
    for key in ("images", "categories") + (("annotations",) if require_annotations else ()):
        if not isinstance(doc.get(key), list):
            raise CocoFormatError(f"COCO JSON has no '{key}' list")
    skipped: list[str] = []

    def bad(msg: str):
        if not skip_invalid:
            raise CocoFormatError(msg)
        skipped.append(msg)

    categories = []
    seen_cats: set[int] = set()
    for i, c in enumerate(doc["categories"]):
        _require(c, ("id", "name"), f"categories[{i}]")
        if c["id"] in seen_cats:
            raise CocoFormatError(f"categories[{i}]: duplicate category id {c['id']}")
        seen_cats.add(c["id"])
        if c.get("keypoints"):
            KeypointSchema.from_coco_category(c)  # raises ValueError on a bad schema
        categories.append(c)
    if not categories:
        raise CocoFormatError("COCO JSON declares no categories")
    nkp = {c["id"]: len(c.get("keypoints") or []) for c in categories}

    images = []
    sizes: dict[int, tuple[int, int]] = {}
    for i, im in enumerate(doc["images"]):
        try:
            _require(im, ("id", "file_name", "width", "height"), f"images[{i}]")
        except CocoFormatError as e:
            bad(str(e))
            continue
        if im["id"] in sizes:
            bad(f"images[{i}]: duplicate image id {im['id']}")
            continue
        if not (isinstance(im["width"], int) and isinstance(im["height"], int) and im["width"] > 0 and im["height"] > 0):
            bad(f"images[{i}] (id {im['id']}): width/height must be positive integers")
            continue
        if "/.." in "/" + str(im["file_name"]).replace("\\", "/") or str(im["file_name"]).startswith("/"):
            bad(f"images[{i}] (id {im['id']}): file_name {im['file_name']!r} leaves the image folder")
            continue
        sizes[im["id"]] = (im["width"], im["height"])
        images.append(im)

    annotations = []
    seen_anns: set = set()
    for i, a in enumerate(doc.get("annotations") or []):
        where = f"annotations[{i}]" + (f" (id {a['id']})" if isinstance(a, dict) and "id" in a else "")
        try:
            _require(a, ("id", "image_id", "category_id", "bbox"), where)
        except CocoFormatError as e:
            bad(str(e))
            continue
        if a["id"] in seen_anns:
            bad(f"{where}: duplicate annotation id")
            continue
        if a["image_id"] not in sizes:
            bad(f"{where}: refers to missing image id {a['image_id']}")
            continue
        if a["category_id"] not in seen_cats:
            bad(f"{where}: refers to missing category id {a['category_id']}")
            continue
        box = a["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            bad(f"{where}: bbox must be [x, y, width, height]")
            continue
        x, y, w, h = box
        W, H = sizes[a["image_id"]]
        if w <= 0 or h <= 0:
            bad(f"{where}: bbox has zero or negative size")
            continue
        if x < -1 or y < -1 or x + w > W + 1 or y + h > H + 1:
            bad(f"{where}: bbox {box} lies outside the {W}x{H} image")
            continue
        k = nkp[a["category_id"]]
        if k:
            kps = a.get("keypoints")
            if not isinstance(kps, list) or len(kps) != 3 * k:
                bad(f"{where}: expected {3 * k} keypoint values for {k} keypoints, got "
                    f"{len(kps) if isinstance(kps, list) else 'none'}")
                continue
        seen_anns.add(a["id"])
        annotations.append(a)
    return CocoData(images=images, annotations=annotations, categories=categories, skipped=skipped)


def load_coco(path: str | os.PathLike, **kw) -> CocoData:
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return validate_coco(doc, **kw)


def to_rgb8(im: Image.Image) -> Image.Image:
    """The project's one colour policy: any image Pillow opens becomes 8-bit RGB, EXIF orientation
    applied, with no metadata (text chunks, EXIF, ICC profile) attached. The server applies it at
    ingest (thumbnails, review, training all see its result) and `load_image` applies it to every
    file it reads, so the CLI and the server get the same pixels.

    - 16-bit grayscale (I;16*) is scaled from its full range, 0..65535 -> 0..255 (not clipped).
      32-bit integer images ("I") that hold values in 0..255 are taken as they are, in 0..65535 are
      scaled as 16-bit; float images ("F") in 0..1 are scaled by 255; anything else is stretched
      from its own minimum..maximum.
    - Transparency (RGBA, LA, palette or RGB with a transparent colour) is composited on white.
    - CMYK, grayscale, 1-bit, palette, YCbCr, LAB, HSV: Pillow's conversion to RGB (embedded ICC
      profiles are not applied).
    """
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        im = Image.fromarray(_scale_to_uint8(im), "L")
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or _has_transparency(im):
        out = Image.new("RGBA", im.size, (255, 255, 255, 255))
        out.alpha_composite(im.convert("RGBA"))
        out = out.convert("RGB")
    else:
        out = im.convert("RGB")  # a new image even when im is RGB already
    out.info = {}
    return out


def is_rgb8(im: Image.Image) -> bool:
    """Whether `to_rgb8` keeps the pixels of im as they are: 8-bit RGB, nothing transparent, no
    EXIF rotation."""
    return im.mode == "RGB" and not _has_transparency(im) and im.getexif().get(0x0112, 1) not in range(2, 9)


def _has_transparency(im: Image.Image) -> bool:
    has = getattr(im, "has_transparency_data", None)
    return bool(has) if has is not None else "transparency" in im.info


def _scale_to_uint8(im: Image.Image) -> np.ndarray:
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        return np.rint(a.astype(np.float32) / 257.0).astype(np.uint8)
    a = a.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
    if im.mode == "I" and lo >= 0 and hi <= 255:
        scaled = a
    elif im.mode == "I" and lo >= 0 and hi <= 65535:
        scaled = a / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    else:
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """RGB float tensor in [0, 1], CHW, converted by `to_rgb8` (EXIF orientation applied)."""
    with Image.open(path) as im:
        im = to_rgb8(im)
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        t = t.view(im.height, im.width, 3).permute(2, 0, 1)
    return t.float().div_(255)


def target_from_annotations(anns: list[dict], label_of: dict[int, int], num_keypoints: int = 0,
                            with_scores: bool = False) -> dict:
    """COCO annotations -> torchvision detection target (boxes in xyxy, labels, keypoints)."""
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=torch.float32).reshape(-1, 4)
    target = {"boxes": boxes, "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64)}
    if num_keypoints:
        kps = torch.tensor([a.get("keypoints") or [0] * (3 * num_keypoints) for a in anns], dtype=torch.float32)
        kps = kps.reshape(-1, num_keypoints, 3)
        kps[..., 2] = (kps[..., 2] > 0).float()
        target["keypoints"] = kps
    if with_scores:
        target["scores"] = torch.tensor([a.get("score", 1.0) for a in anns], dtype=torch.float32)
    return target


class CocoDetection(Dataset):
    """(image, target) pairs of a COCO document; an optional transform takes and returns both."""

    def __init__(self, data: CocoData, image_root: str | os.PathLike, transform=None,
                 label_of: dict[int, int] | None = None, num_keypoints: int | None = None):
        self.data = data
        self.root = Path(image_root)
        self.transform = transform
        self.label_of = label_of or data.label_of()
        schema = data.keypoint_schema()
        self.num_keypoints = num_keypoints if num_keypoints is not None else (schema.num_keypoints if schema else 0)
        by_image = data.annotations_by_image()
        self.items = [(im, by_image[im["id"]]) for im in data.images]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        im, anns = self.items[i]
        image = load_image(self.root / im["file_name"])
        target = target_from_annotations(anns, self.label_of, self.num_keypoints)
        target["image_id"] = im["id"]
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def loader_workers(requested: int) -> int:
    """DataLoader worker processes cannot start inside a daemonic process (a Celery prefork
    child, say): load in the main process there instead of failing."""
    import multiprocessing
    return 0 if multiprocessing.current_process().daemon else requested


def loader_kwargs(requested_workers: int) -> dict:
    """DataLoader arguments for `requested_workers` decoding processes.

    Workers start from a forkserver, not by forking the caller: a forked child inherits the
    caller's sockets and threads (a broker connection, CUDA), and some libraries' after-fork
    clean-up then blocks on them."""
    n = loader_workers(requested_workers)
    if n == 0:
        return {"num_workers": 0}
    return {"num_workers": n, "multiprocessing_context": "forkserver"}


def collate(batch):
    return tuple(zip(*batch))


def parse_ratio(ratio: str | tuple[int, int]) -> tuple[int, int]:
    """'6:4' -> (6, 4). Both parts non-negative integers, not both zero."""
    if isinstance(ratio, (tuple, list)):
        a, b = ratio
    else:
        try:
            a, b = (int(x) for x in str(ratio).split(":"))
        except ValueError:
            raise ValueError(f"ratio must look like '6:4' (labeled:pseudo), got {ratio!r}") from None
    if a < 0 or b < 0 or a + b == 0:
        raise ValueError(f"ratio parts must be non-negative and not both zero, got {a}:{b}")
    return int(a), int(b)


class MixedBatchSampler(Sampler[list[int]]):
    """Batches that mix two datasets at a fixed ratio.

    Indices refer to ConcatDataset([labeled, pseudo]): 0..n_labeled-1 are labeled, the rest pseudo.
    Each batch of `batch_size` holds round(batch_size * a / (a + b)) labeled images (at least one
    of each kind when both parts of the ratio are non-zero and the batch has room). Each source is
    walked in its own shuffled order, reshuffled when exhausted, so both are seen evenly.
    """

    def __init__(self, n_labeled: int, n_pseudo: int, batch_size: int, ratio=(6, 4), num_batches: int = 100,
                 seed: int = 0):
        a, b = parse_ratio(ratio)
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if a and n_labeled == 0:
            raise ValueError("the ratio asks for labeled images but there are none")
        if b and n_pseudo == 0:
            raise ValueError("the ratio asks for pseudo-labeled images but there are none")
        self.n_labeled, self.n_pseudo = n_labeled, n_pseudo
        self.batch_size, self.num_batches, self.seed = batch_size, num_batches, seed
        n_lab = round(batch_size * a / (a + b))
        if a and b and batch_size >= 2:
            n_lab = min(max(n_lab, 1), batch_size - 1)
        self.per_batch = (n_lab, batch_size - n_lab)
        self.epoch = 0
        self.skip = 0  # batches to generate but not yield (resuming a run)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.num_batches - self.skip

    def __iter__(self):
        rng = random.Random(self.seed + 1000003 * self.epoch)

        def stream(n, offset):
            while True:
                order = list(range(n))
                rng.shuffle(order)
                for i in order:
                    yield offset + i

        lab = stream(self.n_labeled, 0) if self.per_batch[0] else None
        pse = stream(self.n_pseudo, self.n_labeled) if self.per_batch[1] else None
        for b in range(self.num_batches):
            batch = [next(lab) for _ in range(self.per_batch[0])] + [next(pse) for _ in range(self.per_batch[1])]
            if b >= self.skip:
                yield batch


def infinite_batches(n: int, batch_size: int, num_batches: int, seed: int = 0):
    """Shuffled batches over one dataset, for teacher training (labeled only)."""
    return MixedBatchSampler(n, 0, batch_size, (1, 0), num_batches, seed)


def iterations_for(num_images: int, batch_size: int, epochs: float) -> int:
    return max(1, math.ceil(num_images * epochs / batch_size))
