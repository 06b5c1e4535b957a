"""Multi-transform inference: run one model over every view of a group of images, map each
view's predictions back to the original image, and ensemble them (see ensemble.py).

The first half (transforms.py) makes the views and knows how to invert them; this half runs the
model. Views of the same scale are batched together (every image and its mirror in one forward
pass); keypoint models get a second pass of the keypoint head on the ensembled boxes.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from . import ensemble
from .data import load_image, loader_kwargs
from .transforms import TransformSet, View, boxes_to_view, flip_boxes, flip_keypoints


@dataclass
class EnsembleOptions:
    method: str = "nms_vote"
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    vote_thresh: float = 0.8
    vote_scoring: str = "id"
    wbf_thresh: float = 0.55
    detections_per_img: int = 100
    heatmap_method: str = "mean"
    # Detectron's optional scale-size dependence of keypoint views (ensemble.size_dependent_views)
    keypoint_size_dependence: bool = False
    keypoint_area_thresh: float = 150.0 ** 2

    def __post_init__(self):
        ensemble._check_choice(self.method, ensemble.BOX_METHODS, "box ensembling method")
        ensemble._check_choice(self.vote_scoring, ensemble.VOTE_SCORING, "vote scoring")
        ensemble._check_choice(self.heatmap_method, ensemble.HEATMAP_METHODS, "heatmap ensembling method")
        for name in ("score_thresh", "nms_thresh", "vote_thresh", "wbf_thresh"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if not self.keypoint_area_thresh > 0:
            raise ValueError(f"keypoint_area_thresh must be positive, got {self.keypoint_area_thresh}")

    def box_kwargs(self) -> dict:
        return dict(method=self.method, score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
                    vote_thresh=self.vote_thresh, vote_scoring=self.vote_scoring, wbf_thresh=self.wbf_thresh,
                    detections_per_img=self.detections_per_img)

    @classmethod
    def from_dict(cls, d: dict | None) -> "EnsembleOptions":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ensembling option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass
class Instances:
    """Predictions in original-image coordinates; keypoints (N, K, 3) only for keypoint models."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    keypoints: torch.Tensor | None = None

    def to(self, device) -> "Instances":
        return Instances(self.boxes.to(device), self.scores.to(device), self.labels.to(device),
                         None if self.keypoints is None else self.keypoints.to(device))

    def as_list(self) -> list[dict]:
        """JSON-ready: bbox in COCO [x, y, w, h], model label (1..K), score, flat keypoints."""
        b = self.boxes.tolist()
        s = self.scores.tolist()
        lab = self.labels.tolist()
        k = self.keypoints.flatten(1).tolist() if self.keypoints is not None else None
        out = []
        for i in range(len(b)):
            x1, y1, x2, y2 = b[i]
            d = {"bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                 "score": round(s[i], 5), "label": int(lab[i])}
            if k is not None:
                d["keypoints"] = [round(v, 2) for v in k[i]]
            out.append(d)
        return out


@dataclass
class ImagePrediction:
    height: int
    width: int
    views: dict[str, Instances] = field(default_factory=dict)
    ensembled: Instances | None = None
    agreement: float = 1.0

    def to_json(self) -> dict:
        return {"height": self.height, "width": self.width, "agreement": round(self.agreement, 4),
                "ensembled": self.ensembled.as_list() if self.ensembled is not None else [],
                "views": {name: inst.as_list() for name, inst in self.views.items()}}


class MultiTransformPredictor:
    """Runs a torchvision detector over a TransformSet and ensembles the views."""

    def __init__(self, model: torch.nn.Module, transforms: TransformSet, *, flip_inds: list[int] | None = None,
                 options: EnsembleOptions | None = None, device: str | torch.device = "cpu", amp: bool = True):
        self.model = model.to(device).eval()
        self.transforms = transforms
        self.options = options or EnsembleOptions()
        self.device = torch.device(device)
        self.amp = amp and self.device.type == "cuda"
        self.keypoints = getattr(model.roi_heads, "keypoint_predictor", None) is not None
        if self.keypoints and transforms.flip and flip_inds is None:
            raise ValueError("flipped views of a keypoint model need the keypoint flip map "
                             "(declare flip_map, or run without flips)")
        self.flip_inds = flip_inds
        # the model's own test size: views above it are up-scaled, below it down-scaled
        self.base_scale = int(model.transform.min_size[-1])

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _forward(self, images: list[torch.Tensor], scale: int):
        """One batched forward pass at one scale; predictions mapped back to each input's size."""
        t = self.model.transform
        t.min_size, t.max_size = (scale,), self.transforms.max_size
        sizes = [tuple(im.shape[-2:]) for im in images]
        with self._autocast():
            image_list, _ = t(images)
            feats = self.model.backbone(image_list.tensors)
            proposals, _ = self.model.rpn(image_list, feats)
            dets, _ = self.model.roi_heads(feats, proposals, image_list.image_sizes)
        dets = t.postprocess(dets, image_list.image_sizes, sizes)
        return dets, feats, image_list.image_sizes

    def _keypoint_logits(self, feats, image_sizes, boxes_per_image: list[torch.Tensor]) -> list[torch.Tensor]:
        rh = self.model.roi_heads
        with self._autocast():
            x = rh.keypoint_roi_pool(feats, boxes_per_image, image_sizes)
            logits = rh.keypoint_predictor(rh.keypoint_head(x))
        return list(logits.float().split([len(b) for b in boxes_per_image]))

    @torch.inference_mode()
    def predict(self, images: list[torch.Tensor]) -> list[ImagePrediction]:
        """Every view of every image in the group, then one ensembled prediction per image."""
        images = [im.to(self.device, non_blocking=True) for im in images]
        n = len(images)
        results = [ImagePrediction(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        flipped = [im.flip(-1) for im in images] if self.transforms.flip else []
        per_scale = []  # (view list, feats, image_sizes) kept for the keypoint pass
        for scale in self.transforms.scales:
            batch = images + flipped
            dets, feats, image_sizes = self._forward(batch, scale)
            views = [View(scale, False)] * n + [View(scale, True)] * len(flipped)
            per_scale.append((views, feats, image_sizes))
            for j, (d, v) in enumerate(zip(dets, views)):
                i = j % n
                w = results[i].width
                boxes = flip_boxes(d["boxes"], w) if v.flip else d["boxes"]
                kps = d.get("keypoints")
                if kps is not None and v.flip:
                    kps = flip_keypoints(kps, w, self.flip_inds)
                results[i].views[v.name] = Instances(boxes.float(), d["scores"].float(), d["labels"],
                                                     None if kps is None else kps.float())
        unions = [list(r.views.values()) for r in results]
        merged = ensemble.ensemble_boxes_batch([torch.cat([u.boxes for u in un]) for un in unions],
                                               [torch.cat([u.scores for u in un]) for un in unions],
                                               [torch.cat([u.labels for u in un]) for un in unions],
                                               num_views=len(unions[0]), **self.options.box_kwargs())
        for r, union, (b, s, lab) in zip(results, unions, merged):
            r.ensembled = Instances(b, s, lab)
            r.agreement = ensemble.agreement([u.boxes for u in union], [u.labels for u in union], b, lab)
        if self.keypoints:
            self._ensemble_keypoints(results, per_scale, n)
        return [self._to_cpu(r) for r in results]

    def _ensemble_keypoints(self, results: list[ImagePrediction], per_scale, n: int):
        """Keypoint head of every view on the fixed ensembled boxes; heatmaps merged, then decoded."""
        heat: list[list[torch.Tensor]] = [[] for _ in results]
        flips: list[list[bool]] = [[] for _ in results]
        scales: list[int] = []
        for views, feats, image_sizes in per_scale:
            boxes = []
            for j, v in enumerate(views):
                r = results[j % n]
                boxes.append(boxes_to_view(r.ensembled.boxes, v, (r.height, r.width), tuple(image_sizes[j])))
            for j, logits in enumerate(self._keypoint_logits(feats, image_sizes, boxes)):
                heat[j % n].append(logits)
                flips[j % n].append(views[j].flip)
            scales += [v.scale for v in views[::n]]
        o = self.options
        for i, r in enumerate(results):
            keep = None
            if o.keypoint_size_dependence:
                keep = ensemble.size_dependent_views(r.ensembled.boxes, scales, self.base_scale, o.keypoint_area_thresh)
            maps = ensemble.ensemble_heatmaps(heat[i], flips[i], self.flip_inds, o.heatmap_method, keep)
            kps, _ = ensemble.decode_heatmaps(maps, r.ensembled.boxes)
            r.ensembled.keypoints = kps

    @staticmethod
    def _to_cpu(r: ImagePrediction) -> ImagePrediction:
        r.views = {k: v.to("cpu") for k, v in r.views.items()}
        r.ensembled = r.ensembled.to("cpu")
        return r


def _as_list(batch):
    return batch


class _ImageFiles(Dataset):
    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, load_image(self.paths[i]), None
        except Exception as e:  # unreadable images are reported, never fatal
            return i, None, f"{os.path.basename(str(self.paths[i]))}: {e}"


def run_inference(predictor: MultiTransformPredictor, paths: list[str], *, group_size: int = 4, num_workers: int = 2,
                  progress: Callable[[int, int], None] | None = None):
    """Yield (index, ImagePrediction | None, error | None) for every path, in order.

    Images are decoded by DataLoader workers while the model runs (overlapped loading); a file
    that cannot be read yields an error string instead of stopping the run.
    """
    if not paths:
        raise ValueError("no images to run inference on")
    loader = DataLoader(_ImageFiles(paths), batch_size=group_size, **loader_kwargs(num_workers),
                        collate_fn=_as_list, pin_memory=predictor.device.type == "cuda",
                        persistent_workers=False)
    done = 0
    for group in loader:
        ok = [(i, im) for i, im, err in group if im is not None]
        preds = predictor.predict([im for _, im in ok]) if ok else []
        by_index = {i: p for (i, _), p in zip(ok, preds)}
        for i, _, err in group:
            yield i, by_index.get(i), err
        done += len(group)
        if progress:
            progress(done, len(paths))
