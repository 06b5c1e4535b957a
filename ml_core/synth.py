"""Deterministic synthetic datasets in COCO format, for tests, demos and the benchmarks.

Detection: discs, blocks and triangles of random colours, sizes and overlaps on textured
backgrounds with unlabeled clutter (rings, lines, speckles). Keypoints: articulated stick figures
with 9 keypoints, one limb pair warm-coloured and the other cool-coloured, facing either way, so
the two sides can only be told apart by colour. Colour survives a mirror image, so a flipped
figure's warm hand is still its warm hand: the category declares the identity flip map (a person's
left hand becomes the mirror image's right, so COCO's persons swap; these figures must not).

Splits: labeled, unlabeled (images only, plus its hidden ground truth for oracle runs), val.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DETECTION_CATEGORIES = [{"id": 1, "name": "disc"}, {"id": 2, "name": "block"}, {"id": 3, "name": "triangle"}]
FIGURE_KEYPOINTS = ["head", "warm_shoulder", "cool_shoulder", "warm_hand", "cool_hand",
                    "warm_hip", "cool_hip", "warm_foot", "cool_foot"]
FIGURE_SKELETON = [[1, 2], [1, 3], [2, 4], [3, 5], [2, 6], [3, 7], [6, 8], [7, 9], [2, 3], [6, 7]]
# sides told apart by colour, which a mirror keeps: flipping swaps no channel
FIGURE_FLIP_MAP = list(range(len(FIGURE_KEYPOINTS)))
KEYPOINT_CATEGORIES = [{"id": 1, "name": "figure", "supercategory": "figure", "keypoints": FIGURE_KEYPOINTS,
                        "skeleton": FIGURE_SKELETON, "flip_map": FIGURE_FLIP_MAP}]
KINDS = ("detection", "keypoints")


@dataclass
class SynthConfig:
    kind: str = "detection"
    image_size: int = 96
    labeled: int = 40
    unlabeled: int = 80
    val: int = 24
    seed: int = 0
    max_objects: int = 6

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown synthetic kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        if not 32 <= self.image_size <= 2048:
            raise ValueError("image_size must lie between 32 and 2048")
        if min(self.labeled, self.unlabeled, self.val) < 1:
            raise ValueError("every split needs at least one image")


def _background(rng: random.Random, size: int) -> Image.Image:
    """Gradient + stripes + noise: enough texture that objects are not found by colour alone."""
    nrng = np.random.default_rng(rng.randrange(2 ** 31))
    c0, c1 = nrng.uniform(40, 215, 3), nrng.uniform(40, 215, 3)
    t = np.linspace(0, 1, size)[None, :, None]
    img = c0 * (1 - t) + c1 * t
    img = np.repeat(img, size, axis=0)
    period = rng.uniform(6, 24)
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)[..., None]
    img = img + stripes * rng.uniform(5, 30) + nrng.normal(0, rng.uniform(4, 14), (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(0, 256) for _ in range(3))


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random, size: int):
    for _ in range(rng.randint(2, 7)):
        kind = rng.random()
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        r = rng.uniform(0.03, 0.15) * size
        if kind < 0.4:  # rings look like discs to a careless detector
            draw.ellipse([x - r, y - r, x + r, y + r], outline=_colour(rng), width=max(1, int(r / 5)))
        elif kind < 0.75:
            draw.line([x, y, x + rng.uniform(-2, 2) * r, y + rng.uniform(-2, 2) * r], fill=_colour(rng),
                      width=max(1, int(size / 90)))
        else:
            for _ in range(12):
                sx, sy = x + rng.uniform(-r, r), y + rng.uniform(-r, r)
                draw.rectangle([sx, sy, sx + size / 80, sy + size / 80], fill=_colour(rng))


def _detection_image(rng: random.Random, size: int, max_objects: int):
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, size)
    anns = []
    for _ in range(rng.randint(1, max_objects)):
        cat = rng.choice(DETECTION_CATEGORIES)["id"]
        s = size * rng.uniform(0.08, 0.42)
        w = s * (rng.uniform(0.6, 1.6) if cat == 2 else 1.0)
        h = s * (rng.uniform(0.6, 1.6) if cat == 2 else (0.87 if cat == 3 else 1.0))
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        fill = _colour(rng)
        if cat == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        elif cat == 2:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
        else:
            draw.polygon([(x0, y0 + h), (x0 + w, y0 + h), (x0 + w / 2, y0)], fill=fill)
        anns.append({"category_id": cat, "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)]})
    # later shapes occlude earlier ones: drop those that are mostly hidden
    keep = []
    for i, a in enumerate(anns):
        x, y, w, h = a["bbox"]
        covered = 0.0
        for b in anns[i + 1:]:
            bx, by, bw, bh = b["bbox"]
            ix, iy = max(0, min(x + w, bx + bw) - max(x, bx)), max(0, min(y + h, by + bh) - max(y, by))
            covered = max(covered, ix * iy / (w * h))
        if covered < 0.6:
            keep.append(a)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6))), keep


def _figure(draw: ImageDraw.ImageDraw, rng: random.Random, size: int):
    """Draw one stick figure; return its keypoints (COCO flat list) and bbox."""
    h = size * rng.uniform(0.3, 0.7)
    cx, cy = rng.uniform(0.2, 0.8) * size, rng.uniform(0.1, 0.9) * size - h / 2
    facing = rng.choice((-1, 1))  # which image side the figure's warm limbs are on
    tilt = rng.uniform(-0.3, 0.3)
    sw = h * 0.14  # half shoulder width
    body = {
        "head": (0, 0.0), "warm_shoulder": (facing * sw, 0.18 * h), "cool_shoulder": (-facing * sw, 0.18 * h),
        "warm_hip": (facing * sw * 0.7, 0.55 * h), "cool_hip": (-facing * sw * 0.7, 0.55 * h),
    }
    def limb(base, length, angle):
        return (base[0] + length * math.sin(angle), base[1] + length * math.cos(angle))
    body["warm_hand"] = limb(body["warm_shoulder"], 0.32 * h, facing * rng.uniform(0.2, 2.6))
    body["cool_hand"] = limb(body["cool_shoulder"], 0.32 * h, -facing * rng.uniform(0.2, 2.6))
    body["warm_foot"] = limb(body["warm_hip"], 0.42 * h, facing * rng.uniform(0.0, 0.9))
    body["cool_foot"] = limb(body["cool_hip"], 0.42 * h, -facing * rng.uniform(0.0, 0.9))
    ct, st = math.cos(tilt), math.sin(tilt)
    pts = {k: (cx + x * ct - (y - 0.3 * h) * st, cy + 0.3 * h + x * st + (y - 0.3 * h) * ct) for k, (x, y) in body.items()}
    width = max(2, int(h * 0.05))
    warm = (rng.randint(200, 255), rng.randint(40, 120), rng.randint(0, 60))
    cool = (rng.randint(0, 60), rng.randint(80, 170), rng.randint(200, 255))
    torso = tuple(rng.randint(90, 170) for _ in range(3))
    draw.line([pts["warm_shoulder"], pts["cool_shoulder"]], fill=torso, width=width)
    draw.line([pts["warm_hip"], pts["cool_hip"]], fill=torso, width=width)
    draw.line([pts["warm_shoulder"], pts["warm_hip"]], fill=torso, width=width)
    draw.line([pts["cool_shoulder"], pts["cool_hip"]], fill=torso, width=width)
    for side, col in (("warm", warm), ("cool", cool)):
        draw.line([pts[f"{side}_shoulder"], pts[f"{side}_hand"]], fill=col, width=width)
        draw.line([pts[f"{side}_hip"], pts[f"{side}_foot"]], fill=col, width=width)
        for end in ("hand", "foot"):
            x, y = pts[f"{side}_{end}"]
            draw.ellipse([x - width, y - width, x + width, y + width], fill=col)
    hr = h * 0.09
    hx, hy = pts["head"]
    draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=torso)
    xs, ys = [p[0] for p in pts.values()], [p[1] for p in pts.values()]
    pad = max(width, hr)
    x0, y0 = max(0.0, min(xs) - pad), max(0.0, min(ys) - pad)
    x1, y1 = min(float(size), max(xs) + pad), min(float(size), max(ys) + pad)
    kps = []
    for name in FIGURE_KEYPOINTS:
        x, y = pts[name]
        inside = 0 <= x < size and 0 <= y < size
        kps += [round(x, 2), round(y, 2), 2] if inside else [0, 0, 0]
    return kps, [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def _keypoint_image(rng: random.Random, size: int, max_objects: int):
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, size)
    anns = []
    for _ in range(rng.randint(1, max(1, min(3, max_objects)))):
        kps, box = _figure(draw, rng, size)
        if box[2] > 4 and box[3] > 4 and sum(1 for v in kps[2::3] if v) >= 5:
            anns.append({"category_id": 1, "bbox": box, "keypoints": kps, "num_keypoints": sum(1 for v in kps[2::3] if v)})
    return img, anns


def generate(out_dir: str | Path, config: SynthConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write <out>/{labeled,unlabeled,val}/*.jpg and <out>/{labeled,unlabeled,unlabeled_gt,val}.json.

    Returns {split: json path}. The same config always writes the same files.
    """
    out = Path(out_dir)
    make = _detection_image if config.kind == "detection" else _keypoint_image
    categories = DETECTION_CATEGORIES if config.kind == "detection" else KEYPOINT_CATEGORIES
    total = config.labeled + config.unlabeled + config.val
    done, paths = 0, {}
    for split, count, offset in (("labeled", config.labeled, 0), ("unlabeled", config.unlabeled, 1), ("val", config.val, 2)):
        rng = random.Random(config.seed * 1000 + offset)
        (out / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(count):
            img, objs = make(rng, config.image_size, config.max_objects)
            name = f"{split}_{i:06d}.jpg"
            img.save(out / split / name, quality=92)
            images.append({"id": i + 1, "file_name": name, "width": config.image_size, "height": config.image_size})
            for o in objs:
                o.update(id=len(anns) + 1, image_id=i + 1, iscrowd=0, area=round(o["bbox"][2] * o["bbox"][3], 2))
                anns.append(o)
            done += 1
            if progress:
                progress(done, total)
        doc = {"info": {"description": f"Distill synthetic {config.kind} data, seed {config.seed}"},
               "images": images, "annotations": anns, "categories": categories}
        if split == "unlabeled":
            paths["unlabeled_gt"] = out / "unlabeled_gt.json"
            paths["unlabeled_gt"].write_text(json.dumps(doc))
            doc = {**doc, "annotations": []}
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(doc))
    return {k: str(v) for k, v in paths.items()}
