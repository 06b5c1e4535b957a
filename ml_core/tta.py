"""Multi-transform inference: run one model over every view of a group of images, map each
view's predictions back to the original image, and ensemble them (see ensemble.py).

The first half (transforms.py) makes the views and knows how to invert them; this half runs the
model. Views of the same scale are batched together (every image and its mirror in one forward
pass); keypoint models get a second pass of the keypoint head on the ensembled boxes.

Two paths compute the same predictions. The fast path (the default on CUDA; `fast=True`
anywhere) runs torchvision's RPN and RoI heads through ml_core.fast_rcnn.BatchedViews: every view
of the group post-processed at once on the device, padded, without per-image Python loops, and
the ensembling, the agreement and the keypoint heatmaps batched over the group likewise. The
plain path (the default on the CPU, where padding costs more than it saves) calls torchvision's
modules per scale and ensembles image by image.

An ensemble of models (extra_models: e.g. a round's student with the model that taught it) runs
every model over every view and ensembles all their views together; it takes the plain path, on a
GPU too (the fast path batches one model's views).
"""
from __future__ import annotations

import contextlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from . import ensemble
from .fast_rcnn import BatchedViews
from .data import load_image
from .device import to_device
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
    # Which views' heatmaps vote on the keypoints (Detectron's TEST.KPS_AUG.SCALES; the boxes always
    # come from every view): "auto", the views at or below the model's own test size (the smallest
    # view scale when every view is larger); "all"; or scales such as "64,96", each one of the views'.
    # "auto" is the default because the keypoint head reads its heatmaps at the scale it was trained
    # at: on the validation sets of benchmarks/keypoint_views.py every up-scaled view alone placed
    # keypoints worse than the model's own, and averaging them in lowered the ensemble (README).
    keypoint_scales: str = "auto"
    # Detectron's optional scale-size dependence of keypoint views (ensemble.size_dependent_views)
    keypoint_size_dependence: bool = False
    keypoint_area_thresh: float = 150.0 ** 2
    # Which boxes of each view enter the union (Detectron's SCORE_HEUR: UNION):
    # "post_nms": each view's detections after torchvision's per-class NMS and top-100;
    # "pre_nms": every per-class box of every proposal above score_thresh, before any NMS (at most
    # union_per_view per view), so box voting sees all of them. The compare view shows each view
    # NMS'd either way. Boxes only: a keypoint model would run its head on every pre-NMS box.
    # "auto" (the default): pre_nms for box models, post_nms for keypoint models. Measured by
    # benchmarks/union_quality.py on a validation set, pre_nms gave better pseudo-labels on every
    # measure (README, Benchmarks), so it is the default where it applies.
    union: str = "auto"
    union_per_view: int = 1000

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
        ensemble._check_choice(self.union, ("auto", "post_nms", "pre_nms"), "union")
        ensemble.heatmap_views(self.keypoint_scales, [], 1)  # its spelling; the views are checked by the predictor
        if not 1 <= self.union_per_view <= 100_000:
            raise ValueError(f"union_per_view must lie in [1, 100000], got {self.union_per_view}")

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
    """Predictions in original-image coordinates; keypoints (N, K, 3) only for keypoint models, and
    for the ensemble their scores (N, K): the merged heatmap's logit at each decoded keypoint."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    keypoints: torch.Tensor | None = None
    keypoint_scores: torch.Tensor | None = None

    def to(self, device) -> "Instances":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Instances(self.boxes.to(device), self.scores.to(device), self.labels.to(device),
                         move(self.keypoints), move(self.keypoint_scores))

    def as_list(self) -> list[dict]:
        """JSON-ready: bbox in COCO [x, y, w, h], model label (1..K), score, flat keypoints and
        their scores."""
        b = self.boxes.tolist()
        s = self.scores.tolist()
        lab = self.labels.tolist()
        k = self.keypoints.flatten(1).tolist() if self.keypoints is not None else None
        ks = self.keypoint_scores.tolist() if self.keypoint_scores is not None else None
        out = []
        for i in range(len(b)):
            x1, y1, x2, y2 = b[i]
            d = {"bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                 "score": round(s[i], 5), "label": int(lab[i])}
            if k is not None:
                d["keypoints"] = [round(v, 2) for v in k[i]]
            if ks is not None:
                d["keypoint_scores"] = [round(v, 3) for v in ks[i]]
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


def model_view_name(name: str, model: int, num_models: int) -> str:
    """A view's name in an ensemble of num_models models: one model's views keep their names
    (s96, s96-flip); several models' are m1-s96, m2-s96, ... (model counts from 0)."""
    return name if num_models == 1 else f"m{model + 1}-{name}"


class MultiTransformPredictor:
    """Runs a torchvision detector over a TransformSet and ensembles the views."""

    def __init__(self, model: torch.nn.Module, transforms: TransformSet, *, flip_inds: list[int] | None = None,
                 options: EnsembleOptions | None = None, device: str | torch.device = "cpu", amp: bool = True,
                 fast: bool | None = None, compile_backbone: bool = False, extra_models: Sequence[torch.nn.Module] = ()):
        self.model = model.to(device).eval()
        # model ensembling: the views of every model join one ensemble (e.g. a round's teacher and
        # its student relabelling for the next round); models of the same architecture and classes
        self.models = [self.model] + [m.to(device).eval() for m in extra_models]
        self.transforms = transforms
        self.options = options or EnsembleOptions()
        self.device = torch.device(device)
        self.amp = amp and self.device.type == "cuda"
        self.keypoints = getattr(model.roi_heads, "keypoint_predictor", None) is not None
        for m in self.models[1:]:
            if (getattr(m.roi_heads, "keypoint_predictor", None) is not None) != self.keypoints or \
                    m.roi_heads.box_predictor.cls_score.out_features != model.roi_heads.box_predictor.cls_score.out_features:
                raise ValueError("an ensemble of models needs models with the same classes and heads")
        self.union = self.options.union
        if self.union == "auto":
            self.union = "post_nms" if self.keypoints else "pre_nms"
        if self.keypoints and self.union == "pre_nms":
            raise ValueError("the pre-NMS union is for box models: a keypoint model would run its keypoint head "
                             "on every pre-NMS box of every view; use union 'post_nms'")
        if self.keypoints and transforms.flip and flip_inds is None:
            raise ValueError("flipped views of a keypoint model need the keypoint flip map "
                             "(declare flip_map, or run without flips)")
        self.flip_inds = flip_inds
        # the model's own test size: views above it are up-scaled, below it down-scaled
        self.base_scale = int(model.transform.min_size[-1])
        # the scales whose views' heatmaps vote on the keypoints (the others give boxes only, and
        # their keypoint head is never run); size dependence then chooses among these per box
        self.keypoint_scales = {s for s, on in zip(transforms.scales, ensemble.heatmap_views(
            self.options.keypoint_scales, transforms.scales, self.base_scale)) if on}
        cuda = self.device.type == "cuda"
        if fast and len(self.models) > 1:
            raise ValueError("an ensemble of models runs the plain path (fast=False)")
        self.fast = (cuda and len(self.models) == 1) if fast is None else fast
        if compile_backbone and not self.fast:
            raise ValueError("compiling the backbone needs the fast path (fast=True; the default on CUDA)")
        # on CUDA the fast path's backbone is a copy with batch norms folded, conv + ReLU fused, in
        # channels_last (ml_core.inference_backbone; measured in benchmarks/gpu_suite.py);
        # compile_backbone: torch.compile the fast path's backbone (one compile per input shape)
        self.batched = BatchedViews(self.model, fold_bn=cuda, channels_last=cuda, fuse_conv_relu=cuda,
                                    compile_backbone=compile_backbone) if self.fast else None

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _forward(self, model, images: list[torch.Tensor], scale: int, shown: tuple[float, int] | None = None):
        """One batched forward pass at one scale; predictions mapped back to each input's size.

        shown=(nms_thresh, detections_per_img): the box head's outputs are post-processed twice,
        with the heads' current settings (the pre-NMS union) and with these (each view as the model
        gives it); returns (dets, shown_dets, feats, image_sizes), shown_dets None without it."""
        t = model.transform
        t.min_size, t.max_size = (scale,), self.transforms.max_size
        sizes = [tuple(im.shape[-2:]) for im in images]
        with self._autocast():
            image_list, _ = t(images)
            feats = model.backbone(image_list.tensors)
            proposals, _ = model.rpn(image_list, feats)
            if shown is None:
                dets, _ = model.roi_heads(feats, proposals, image_list.image_sizes)
                shown_dets = None
            else:
                dets, shown_dets = self._two_postprocessings(model, feats, proposals, image_list.image_sizes, shown)
        dets = t.postprocess(dets, image_list.image_sizes, sizes)
        if shown_dets is not None:
            shown_dets = t.postprocess(shown_dets, image_list.image_sizes, sizes)
        return dets, shown_dets, feats, image_list.image_sizes

    @staticmethod
    def _two_postprocessings(model, feats, proposals, image_sizes, shown: tuple[float, int]):
        """torchvision's RoIHeads forward (box models, eval) with its post-processing run twice on
        the same box-head outputs: the heads' settings, then `shown`'s."""
        rh = model.roi_heads
        x = rh.box_head(rh.box_roi_pool(feats, proposals, image_sizes))
        logits, regression = rh.box_predictor(x)
        out, own = [], (rh.nms_thresh, rh.detections_per_img)
        try:
            for nms_thresh, per_view in (own, shown):
                rh.nms_thresh, rh.detections_per_img = nms_thresh, per_view
                b, s, lab = rh.postprocess_detections(logits, regression, proposals, image_sizes)
                out.append([{"boxes": bi, "scores": si, "labels": li} for bi, si, li in zip(b, s, lab)])
        finally:
            rh.nms_thresh, rh.detections_per_img = own
        return out

    def _keypoint_logits(self, model, feats, image_sizes, boxes_per_image: list[torch.Tensor]) -> list[torch.Tensor]:
        rh = model.roi_heads
        with self._autocast():
            x = rh.keypoint_roi_pool(feats, boxes_per_image, image_sizes)
            logits = rh.keypoint_predictor(rh.keypoint_head(x))
        return list(logits.float().split([len(b) for b in boxes_per_image]))

    @torch.inference_mode()
    def predict(self, images: list[torch.Tensor]) -> list[ImagePrediction]:
        """Every view of every image in the group, then one ensembled prediction per image."""
        images = [im.to(self.device, non_blocking=True) for im in images]
        # the views set each model's test size; the heads' post-processing changes for the pre-NMS union
        own = [(m.transform.min_size, m.transform.max_size, m.roi_heads.nms_thresh, m.roi_heads.detections_per_img)
               for m in self.models]
        heads = own[0][2:]
        pre_nms = self.union == "pre_nms"
        if pre_nms:
            # IoU > 1 never happens: the heads' per-class NMS keeps every box above the score threshold
            for m in self.models:
                m.roi_heads.nms_thresh, m.roi_heads.detections_per_img = 1.0, self.options.union_per_view
        try:
            shown = heads if pre_nms else None
            results = self._predict_fast(images, shown) if self.fast else self._predict_plain(images, shown)
        finally:
            for m, (min_size, max_size, nms_thresh, per_img) in zip(self.models, own):
                m.transform.min_size, m.transform.max_size = min_size, max_size
                m.roi_heads.nms_thresh, m.roi_heads.detections_per_img = nms_thresh, per_img
        return results

    def _instances(self, d: dict, view: View, width: int) -> Instances:
        boxes = flip_boxes(d["boxes"], width) if view.flip else d["boxes"]
        kps = d.get("keypoints")
        if kps is not None and view.flip:
            kps = flip_keypoints(kps, width, self.flip_inds)
        return Instances(boxes.float(), d["scores"].float(), d["labels"], None if kps is None else kps.float())

    def _predict_plain(self, images: list[torch.Tensor], shown: tuple[float, int] | None = None) -> list[ImagePrediction]:
        """predict() one scale at a time through torchvision's modules. shown as in _predict_fast."""
        n = len(images)
        results = [ImagePrediction(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        unions: list[list[Instances]] = [[] for _ in images]     # what is ensembled, per image
        flipped = [im.flip(-1) for im in images] if self.transforms.flip else []
        per_scale = []  # (model, view list, feats, image_sizes) of the keypoint scales, for the keypoint pass
        for k, model in enumerate(self.models):
            for scale in self.transforms.scales:
                batch = images + flipped
                dets, shown_dets, feats, image_sizes = self._forward(model, batch, scale, shown)
                views = [View(scale, False)] * n + [View(scale, True)] * len(flipped)
                if self.keypoints and scale in self.keypoint_scales:
                    per_scale.append((model, views, feats, image_sizes))
                for j, v in enumerate(views):
                    r = results[j % n]
                    union = self._instances(dets[j], v, r.width)
                    unions[j % n].append(union)
                    r.views[model_view_name(v.name, k, len(self.models))] = union if shown_dets is None else \
                        self._instances(shown_dets[j], v, r.width)
        merged = ensemble.ensemble_boxes_batch([torch.cat([u.boxes for u in un]) for un in unions],
                                               [torch.cat([u.scores for u in un]) for un in unions],
                                               [torch.cat([u.labels for u in un]) for un in unions],
                                               num_views=len(unions[0]), **self.options.box_kwargs())
        for r, (b, s, lab) in zip(results, merged):
            r.ensembled = Instances(b, s, lab)
            shown_views = list(r.views.values())
            r.agreement = ensemble.agreement([u.boxes for u in shown_views], [u.labels for u in shown_views], b, lab)
        if self.keypoints:
            self._ensemble_keypoints(results, per_scale, n)
        return [self._to_cpu(r) for r in results]

    def _ensemble_keypoints(self, results: list[ImagePrediction], per_scale, n: int):
        """Keypoint head of every keypoint view on the fixed ensembled boxes; heatmaps merged, then decoded."""
        heat: list[list[torch.Tensor]] = [[] for _ in results]
        flips: list[list[bool]] = [[] for _ in results]
        scales: list[int] = []
        for model, views, feats, image_sizes in per_scale:
            boxes = []
            for j, v in enumerate(views):
                r = results[j % n]
                boxes.append(boxes_to_view(r.ensembled.boxes, v, (r.height, r.width), tuple(image_sizes[j])))
            for j, logits in enumerate(self._keypoint_logits(model, feats, image_sizes, boxes)):
                heat[j % n].append(logits)
                flips[j % n].append(views[j].flip)
            scales += [v.scale for v in views[::n]]
        o = self.options
        for i, r in enumerate(results):
            keep = None
            if o.keypoint_size_dependence:
                keep = ensemble.size_dependent_views(r.ensembled.boxes, scales, self.base_scale, o.keypoint_area_thresh)
            maps = ensemble.ensemble_heatmaps(heat[i], flips[i], self.flip_inds, o.heatmap_method, keep)
            r.ensembled.keypoints, r.ensembled.keypoint_scores = ensemble.decode_heatmaps(maps, r.ensembled.boxes)

    def _predict_fast(self, images: list[torch.Tensor], shown: tuple[float, int] | None = None) -> list[ImagePrediction]:
        """predict() through BatchedViews: all views padded on the device until the end of the group.
        shown=(nms_thresh, detections_per_img) for the pre-NMS union: the union is ensembled, the
        views are kept NMS'd with these settings (what the compare view shows, agreement measures)."""
        ts, o = self.transforms, self.options
        n = len(images)
        det = self.batched.run(images, ts.scales, ts.flip, ts.max_size, self.flip_inds, self._autocast, shown=shown)
        views = ts.views                                   # scale-major, plain before flipped: det's order
        V, D = len(views), det.valid.shape[1]

        def by_image(t):                                   # [V * n, D, ...] -> [n, V, D, ...]
            return t.reshape((V, n) + t.shape[1:]).transpose(0, 1)

        vb, vs, vl, vv = by_image(det.boxes), by_image(det.scores), by_image(det.labels), by_image(det.valid)
        img = torch.arange(n, device=self.device)[:, None].expand(n, V * D)
        sel = vv.reshape(n, V * D)
        merged = ensemble.ensemble_boxes_flat(vb.reshape(n, V * D, 4)[sel], vs.reshape(n, V * D)[sel],
                                              vl.reshape(n, V * D)[sel], img[sel], n, num_views=V, **o.box_kwargs())
        if det.shown is not None:
            d = det.shown
            vb, vs, vl, vv = by_image(d.boxes), by_image(d.scores), by_image(d.labels), by_image(d.valid)
        E = max((len(b) for b, _, _ in merged), default=0)
        eb = torch.stack([torch.nn.functional.pad(b, (0, 0, 0, E - len(b))) for b, _, _ in merged])
        el = torch.stack([torch.nn.functional.pad(lab, (0, E - len(lab))) for _, _, lab in merged])
        ev = torch.arange(E, device=self.device)[None, :] < to_device([len(b) for b, _, _ in merged],
                                                                      self.device)[:, None]
        agreement = ensemble.agreement_padded(vb, vl, vv, eb.float(), el, ev)
        ens_kps = self._ensemble_keypoints_fast(images, merged, det.per_scale) if self.keypoints else None
        # one copy of everything to the host, then split there
        cpu = [t.cpu() if t is not None else None for t in (vb, vs, vl, vv, by_image(det.keypoints)
                                                             if det.keypoints is not None else None)]
        vb, vs, vl, vv, vk = cpu
        results = []
        for i, im in enumerate(images):
            r = ImagePrediction(int(im.shape[-2]), int(im.shape[-1]))
            for j, v in enumerate(views):
                k = int(vv[i, j].sum())
                r.views[v.name] = Instances(vb[i, j, :k].float(), vs[i, j, :k].float(), vl[i, j, :k],
                                            None if vk is None else vk[i, j, :k].float())
            b, sc, lab = merged[i]
            r.ensembled = Instances(b.cpu(), sc.cpu(), lab.cpu(), *(() if ens_kps is None else
                                                                   (ens_kps[0][i].cpu(), ens_kps[1][i].cpu())))
            r.agreement = agreement[i]
            results.append(r)
        return results

    def _ensemble_keypoints_fast(self, images, merged, per_scale) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The keypoint head of every view on the ensembled boxes of its image, heatmaps merged
        (flipped views mirrored back) and decoded, for the whole group at once: keypoints and
        their scores, one tensor per image."""
        from .fast_rcnn import heatmaps_to_keypoints
        o = self.options
        n = len(images)
        boxes = [b for b, _, _ in merged]
        counts = [len(b) for b in boxes]
        flat = torch.cat(boxes)
        if len(flat) == 0:
            k = self.model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels
            return [flat.new_zeros((0, k, 3)) for _ in boxes], [flat.new_zeros((0, k)) for _ in boxes]
        hw = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        keep_rows = []
        flips = (False, True) if self.transforms.flip else (False,)
        per_scale = [sf for sf in per_scale if sf.scale in self.keypoint_scales]
        for sf in per_scale:
            lists = []
            for f in flips:
                for i in range(n):
                    lists.append(boxes_to_view(boxes[i], View(sf.scale, f), hw[i], tuple(sf.image_sizes[len(lists)])))
            with self._autocast():
                logits = self.batched.keypoint_logits(sf.features, lists, sf.image_sizes).float()
            for part, f in zip(logits.split(len(flat)), flips):
                h = part.flip(-1)[:, self.flip_inds] if f else part
                keep_rows.append(h)
        heat = torch.stack(keep_rows)                                      # [views, boxes, K, H, W]
        mask = None
        if o.keypoint_size_dependence:
            scales = [sf.scale for sf in per_scale for _ in flips]
            mask = ensemble.size_dependent_views(flat, scales, self.base_scale, o.keypoint_area_thresh)
        if mask is None:
            maps = heat.mean(0) if o.heatmap_method == "mean" else heat.amax(0)
        else:
            m = mask.to(heat.dtype)[:, :, None, None, None]
            maps = (heat * m).sum(0) / m.sum(0).clamp_min(1) if o.heatmap_method == "mean" else \
                heat.masked_fill(m == 0, float("-inf")).amax(0)
        kps, scores = heatmaps_to_keypoints(maps, flat)
        return list(kps.split(counts)), list(scores.split(counts))

    @staticmethod
    def _to_cpu(r: ImagePrediction) -> ImagePrediction:
        r.views = {k: v.to("cpu") for k, v in r.views.items()}
        r.ensembled = r.ensembled.to("cpu")
        return r


class _ImageFiles(Dataset):
    """The images of a run, decoded; pin=True: in pinned memory, so that their copy to the GPU is
    queued rather than waited for (pinning runs in the loading threads, beside the model)."""

    def __init__(self, paths, pin: bool = False):
        self.paths = list(paths)
        self.pin = pin

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            im = load_image(self.paths[i])
            return i, im.pin_memory() if self.pin else im, None
        except Exception as e:  # unreadable images are reported, never fatal
            return i, None, f"{os.path.basename(str(self.paths[i]))}: {e}"


def run_inference(predictor: MultiTransformPredictor, paths: list[str], *, group_size: int = 4, num_workers: int = 2,
                  progress: Callable[[int, int], None] | None = None):
    """Yield (index, ImagePrediction | None, error | None) for every path, in order.

    Images are decoded by num_workers threads while the model runs (overlapped loading, up to two
    groups ahead); a file that cannot be read yields an error string instead of stopping the run.
    Threads rather than DataLoader worker processes: decoding (PIL) releases the GIL, and worker
    processes cost seconds to start before the first group (measured: 8-10 s with 6 workers on
    the GPU machine), on every call.
    """
    if not paths:
        raise ValueError("no images to run inference on")
    files = _ImageFiles(paths, pin=predictor.device.type == "cuda")
    starts = list(range(0, len(paths), group_size))
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    pending: deque = deque()

    def submit(k):
        idx = range(starts[k], min(starts[k] + group_size, len(paths)))
        pending.append([pool.submit(files.__getitem__, i) for i in idx] if pool else [files[i] for i in idx])

    done = 0
    try:
        for k in range(min(2, len(starts))):
            submit(k)
        for k in range(len(starts)):
            group = [f.result() if pool else f for f in pending.popleft()]
            if k + 2 < len(starts):
                submit(k + 2)
            ok = [(i, im) for i, im, err in group if im is not None]
            preds = predictor.predict([im for _, im in ok]) if ok else []
            by_index = {i: p for (i, _), p in zip(ok, preds)}
            for i, _, err in group:
                yield i, by_index.get(i), err
            done += len(group)
            if progress:
                progress(done, len(paths))
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
