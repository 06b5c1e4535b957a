"""COCO AP with pycocotools: bbox and OKS keypoint AP, the usual 12 numbers by name."""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
}


def coco_from_dict(doc: dict) -> COCO:
    coco = COCO()
    d = copy.deepcopy(doc)
    for a in d.get("annotations", []):
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
        if "keypoints" in a:
            a.setdefault("num_keypoints", int(sum(1 for v in a["keypoints"][2::3] if v > 0)))
    d.setdefault("info", {})
    coco.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class COCOEvaluator:
    """detectron2-style evaluator: reset(), process(image_id, predictions), evaluate() -> {name: value}.

    predictions are COCO results without image_id: {"bbox": [x,y,w,h], "score", "category_id",
    optional "keypoints"}. Values are AP in percent, as detection papers report them; -1 where
    pycocotools has no ground truth for an area range.
    """

    def __init__(self, ground_truth: dict, iou_type: str = "bbox", kpt_sigmas: list[float] | None = None):
        if iou_type not in STAT_NAMES:
            raise ValueError(f"unknown iou_type {iou_type!r}; choose one of: {', '.join(STAT_NAMES)}")
        self.gt = coco_from_dict(ground_truth)
        self.iou_type = iou_type
        self.kpt_sigmas = kpt_sigmas
        self.reset()

    def reset(self):
        self.results: list[dict] = []

    def process(self, image_id: int, predictions: list[dict]):
        for p in predictions:
            r = {"image_id": image_id, "category_id": p["category_id"], "bbox": list(p["bbox"]), "score": float(p["score"])}
            if self.iou_type == "keypoints":
                r["keypoints"] = list(p["keypoints"])
            self.results.append(r)

    def evaluate(self) -> dict[str, float]:
        names = STAT_NAMES[self.iou_type]
        if not self.results:
            return {n: 0.0 for n in names}
        with contextlib.redirect_stdout(io.StringIO()):
            dt = self.gt.loadRes(copy.deepcopy(self.results))
            ev = COCOeval(self.gt, dt, self.iou_type)
            if self.iou_type == "keypoints" and self.kpt_sigmas is not None:
                ev.params.kpt_oks_sigmas = np.asarray(self.kpt_sigmas, dtype=np.float64)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return {n: (round(float(v) * 100, 3) if v >= 0 else -1.0) for n, v in zip(names, ev.stats)}


class NamedEvaluator:
    """COCOEvaluators side by side for several prediction sets of the same images (the ensemble
    and each view): process(image_id, {name: predictions}), evaluate() -> {name: {kind: stats}}.
    kinds: "bbox", and "keypoints" when kpt_sigmas are given."""

    def __init__(self, ground_truth: dict, names: list[str], kpt_sigmas: list[float] | None = None):
        kinds = {"bbox": None, **({"keypoints": kpt_sigmas} if kpt_sigmas is not None else {})}
        self.evaluators = {n: {k: COCOEvaluator(ground_truth, k, s) for k, s in kinds.items()} for n in names}

    def process(self, image_id: int, predictions: dict[str, list[dict]]):
        for name, by_kind in self.evaluators.items():
            for ev in by_kind.values():
                ev.process(image_id, predictions.get(name, []))

    def evaluate(self) -> dict[str, dict[str, dict[str, float]]]:
        return {n: {k: ev.evaluate() for k, ev in by_kind.items()} for n, by_kind in self.evaluators.items()}


def format_table(rows: dict[str, dict[str, float]], keys=("AP", "AP50", "AP75")) -> str:
    """Rows of AP tables as aligned text (for the CLI)."""
    width = max([len(r) for r in rows] + [8])
    cols = [max(9, len(k) + 2) for k in keys]
    head = " " * width + "".join(f"{k:>{c}}" for k, c in zip(keys, cols))
    lines = [head]
    for name, stats in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{stats.get(k, float('nan')):>{c}.2f}" for k, c in zip(keys, cols)))
    return "\n".join(lines)
