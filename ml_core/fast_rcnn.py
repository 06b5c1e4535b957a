"""The batched test-time forward pass of a torchvision two-stage detector over many views.

`BatchedViews.run` replaces, for inference over a group of images at several scales (each maybe
flipped), torchvision's `rpn` -> `roi_heads` -> `transform.postprocess` chain. It computes the
same predictions (tests/ml_core/test_fast_path.py checks them against the plain per-view
torchvision path) but is organised for a GPU:

* The transform queues its work without waiting for the device: each image is normalised once
  (torchvision makes the normalisation constants from Python lists for every image at every
  scale, a copy that waits for the device's queued work), images of one size are resized
  together, and small host values reach the device through pinned memory (ml_core.device).
* Post-processing is batched over every view of the group. torchvision loops over images in
  Python in `RegionProposalNetwork.filter_proposals` and `RoIHeads.postprocess_detections`; each
  iteration indexes with data-dependent masks (a host synchronisation) and runs its own NMS. Here
  boxes stay padded ([views, slots] with a validity mask) and NMS runs for every
  (view, level) or (view, class) group at once: `ml_core.nms.padded_nms`, greedy NMS written as a
  fixed point over a batch of IoU matrices (same result as torchvision's NMS; see its docstring).
* The RPN decodes only the top-scoring anchors of each level (torchvision decodes every anchor
  first, then selects); decoding is per anchor, so the result is the same.
* Detections are ranked once per view across classes with `topk` instead of torchvision's
  `batched_nms` followed by `keep[:detections_per_img]`; NMS in the detection head only goes as
  deep into each (view, class) group as the final top-k can reach (checked, else done in full).
* Keypoint heatmaps are decoded by `heatmaps_to_keypoints` below: torchvision's version resizes
  every RoI's heatmap with its own bicubic `interpolate` call in a Python loop (two host
  synchronisations per box); this one builds the same bicubic weights as matrices and resizes a
  chunk of RoIs with two batched matmuls.
* On CUDA the backbone runs on a copy of itself with batch norms folded into the convolutions,
  conv + bias + ReLU fused into single cuDNN calls and in channels_last memory format
  (`ml_core.inference_backbone`), with cudnn.benchmark and optionally torch.compile'd (both pay
  per new input shape); the keypoint head runs on a channels_last copy; on the CPU the model's
  own modules run.
* A pre-NMS union (`run(shown=...)`) post-processes the box head's outputs twice: without NMS for
  the union, with the model's own NMS for the views shown.

What is not batched: the backbone, the RPN head and RoI pooling run once per scale (the feature
maps of different scales have different sizes); the box head and predictor run per scale too
(their matmuls are already large there).
Differences from torchvision are rounding (folded batch norm, summation order) and the order of
exactly tied scores.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import _resize_image_and_masks

from .device import to_device
from .inference_backbone import cudnn_autotuned, inference_backbone, inference_head
from .nms import padded_nms, sort_groups
from .models import rpn_features


# --- keypoint heatmaps -> keypoints, batched ------------------------------------------------------

def _bicubic_matrix(out_sizes: torch.Tensor, out_max: int, in_size: int) -> torch.Tensor:
    """[R, out_max, in_size]: row d of RoI r holds PyTorch's bicubic weights (align_corners=False,
    A = -0.75, border taps clamped) of output pixel d when resizing in_size -> out_sizes[r]."""
    R = out_sizes.shape[0]
    dev = out_sizes.device
    scale = in_size / out_sizes.float()                                         # float, as ATen
    d = torch.arange(out_max, device=dev, dtype=torch.float32)
    real = scale[:, None] * (d[None, :] + 0.5) - 0.5
    fl = real.floor()
    t = real - fl
    A = -0.75

    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    w = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)      # [R, out_max, 4]
    idx = (fl.long()[..., None] + torch.arange(-1, 3, device=dev)).clamp_(0, in_size - 1)
    w = w * (d[None, :, None] < out_sizes[:, None, None].float())
    return torch.zeros(R, out_max, in_size, device=dev).scatter_add_(2, idx, w)


def heatmaps_to_keypoints(maps: torch.Tensor, rois: torch.Tensor, max_elements: int = 2 ** 28):
    """torchvision.models.detection.roi_heads.heatmaps_to_keypoints without the per-RoI loop.

    Same computation: each RoI's (K, H, W) logits are resized bicubically to ceil(box size) and
    the argmax of every channel gives the keypoint. Here the resize is A_y @ map @ A_x^T with the
    bicubic weight matrices of each RoI, for chunks of RoIs of similar size padded to the largest
    (at most max_elements floats at a time). One host synchronisation (the RoI sizes).
    Returns keypoints (N, K, 3) with visibility 1 and scores (N, K).
    """
    N, K, H, W = maps.shape
    xy = torch.zeros((N, K, 3), dtype=torch.float32, device=maps.device)
    scores = torch.zeros((N, K), dtype=torch.float32, device=maps.device)
    if N == 0:
        return xy, scores
    rois = rois.float()
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    wc, hc = widths.ceil(), heights.ceil()
    wi, hi = wc.long(), hc.long()
    sizes = torch.stack([hi, wi], 1).tolist()                                   # the one sync
    area = [h * w for h, w in sizes]
    order = sorted(range(N), key=area.__getitem__)
    start = 0
    while start < N:
        end = start + 1
        hmax, wmax = sizes[order[start]]
        while end < N:
            h2, w2 = sizes[order[end]]
            if (end + 1 - start) * K * max(hmax, h2) * max(wmax, w2) > max_elements:
                break
            hmax, wmax = max(hmax, h2), max(wmax, w2)
            end += 1
        sel = torch.tensor(order[start:end], device=maps.device)
        ay = _bicubic_matrix(hi[sel], hmax, H)                                   # [r, hmax, H]
        ax = _bicubic_matrix(wi[sel], wmax, W)                                   # [r, wmax, W]
        m = maps[sel].float()
        big = torch.matmul(torch.matmul(ay[:, None], m), ax[:, None].transpose(-1, -2))  # [r, K, hmax, wmax]
        inside = ((torch.arange(hmax, device=maps.device)[None, :, None] < hi[sel][:, None, None])
                  & (torch.arange(wmax, device=maps.device)[None, None, :] < wi[sel][:, None, None]))
        big = big.masked_fill(~inside[:, None], float("-inf")).flatten(2)
        val, pos = big.max(2)
        x_int, y_int = pos % wmax, pos // wmax
        x = (x_int.float() + 0.5) * (widths[sel] / wc[sel])[:, None]
        y = (y_int.float() + 0.5) * (heights[sel] / hc[sel])[:, None]
        xy[sel, :, 0] = x + rois[sel, 0, None]
        xy[sel, :, 1] = y + rois[sel, 1, None]
        scores[sel] = val
        start = end
    xy[..., 2] = 1
    return xy, scores


# --- the batched views ----------------------------------------------------------------------------

@dataclass
class ScaleFeatures:
    """What one scale's forward pass leaves for later passes of the RoI heads."""

    scale: int
    features: dict
    image_sizes: list[tuple[int, int]]


@dataclass
class ViewDetections:
    """Detections of every view, padded: V = scales x (plain, flipped) x images, in that order.

    boxes [V, D, 4] in original-image coordinates (flipped views mapped back), scores [V, D],
    labels [V, D], valid [V, D] (each view's valid entries first, by descending score),
    keypoints [V, D, K, 3] for keypoint models (original orientation, flip map applied)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    keypoints: torch.Tensor | None
    per_scale: list[ScaleFeatures]
    shown: "ViewDetections | None" = None   # with run(shown=...): each view NMS'd as the model gives it


@dataclass
class ScalePasses:
    """What `BatchedViews.scale_passes` leaves for `detections`: each scale's features and RPN
    candidates ([B, L, P] padded boxes, scores, validity), the original images' (height, width),
    and whether mirrored views follow the plain ones in each scale's batch."""

    per_scale: list[ScaleFeatures]
    cands: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    image_sizes: list[tuple[int, int]]
    flip: bool


class BatchedViews:
    """Runs a torchvision GeneralizedRCNN (Faster / Keypoint R-CNN) over all views of a group.

    The model's own modules do the work; this class only replaces the glue between them (see the
    module docstring for what differs from torchvision and why)."""

    def __init__(self, model: nn.Module, *, fold_bn: bool = False, channels_last: bool = False,
                 compile_backbone: bool = False, fuse_conv_relu: bool = False):
        self.model = model
        self.channels_last = channels_last
        # compiled, the backbone is left to inductor's own fusion (the fused cuDNN ops would be opaque to it)
        self.backbone = inference_backbone(model.backbone, fold=fold_bn, channels_last=channels_last,
                                           fuse=fuse_conv_relu and not compile_backbone)
        if compile_backbone:
            # torch.compile (inductor), one graph per input shape: each new shape compiles on first
            # use (seconds to tens of seconds), so this pays off for many images of few sizes
            # (benchmarks/backbone_compile.py). After torch._dynamo's cache limit of shapes it
            # runs eagerly.
            if self.backbone is model.backbone:
                self.backbone = copy.deepcopy(model.backbone).eval()
            self.backbone = torch.compile(self.backbone, dynamic=False)
        # the RPN head's 3x3 conv + ReLU on every level, as one cuDNN call, in channels_last
        self.rpn_head = inference_head(model.rpn.head, channels_last=channels_last, fuse=fuse_conv_relu)
        self.keypoints = getattr(model.roi_heads, "keypoint_predictor", None) is not None
        self._norm: dict = {}                       # the transform's mean and std on each device
        # the keypoint head's eight 3x3 convolutions on every RoI: in channels_last on CUDA too (in
        # NCHW, cuDNN's fp16 kernels convert every layer's input and output to NHWC and back)
        rh = model.roi_heads
        self.keypoint_channels_last = self.keypoints and channels_last
        self.keypoint_head, self.keypoint_predictor = (rh.keypoint_head, rh.keypoint_predictor) \
            if not self.keypoint_channels_last else \
            (copy.deepcopy(m).eval().to(memory_format=torch.channels_last) for m in (rh.keypoint_head, rh.keypoint_predictor))

    # ---- stage 1: one scale through transform, backbone and the RPN's candidate selection
    def _normalized(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """transform.normalize of each image (the same arithmetic), with the mean and std kept on the
        device: torchvision makes them from Python lists at every call, a copy that waits for the
        device's queued work (a host synchronisation per image and scale)."""
        t = self.model.transform
        if not all(im.is_floating_point() for im in images):
            raise TypeError("expected images of floating type (in range [0, 1]), as torchvision's transform does")
        key = (images[0].device, images[0].dtype)
        if key not in self._norm:
            self._norm[key] = tuple(to_device(v, key[0], key[1])[:, None, None] for v in (t.image_mean, t.image_std))
        mean, std = self._norm[key]
        if len({im.shape for im in images}) == 1:
            return list(torch.sub(torch.stack(images), mean).div_(std))
        return [(im - mean) / std for im in images]

    def _transform(self, normalized: list[torch.Tensor], scale: int, max_size: int) -> ImageList:
        """transform(batch) for normalized images at one view scale: each image resized as
        torchvision's _resize_image_and_masks does (the same scale factor, bilinear, recomputed
        from the sizes), images of one size resized together (per image the same arithmetic), then
        padded to the size divisor into one batch."""
        t = self.model.transform
        if t.fixed_size is not None:                               # torchvision's own resize, per image
            resized = [_resize_image_and_masks(im, scale, max_size, None, t.fixed_size)[0] for im in normalized]
            return ImageList(t.batch_images(resized, size_divisible=t.size_divisible),
                             [(int(r.shape[-2]), int(r.shape[-1])) for r in resized])
        by_shape: dict[tuple, list[int]] = {}
        for i, im in enumerate(normalized):
            by_shape.setdefault(tuple(im.shape[-2:]), []).append(i)
        resized: list[torch.Tensor] = [None] * len(normalized)
        for (h, w), idx in by_shape.items():
            factor = min(scale / min(h, w), max_size / max(h, w))
            x = nn.functional.interpolate(torch.stack([normalized[i] for i in idx]), scale_factor=factor,
                                          mode="bilinear", recompute_scale_factor=True, align_corners=False)
            for j, i in enumerate(idx):
                resized[i] = x[j]
        sizes = [(int(r.shape[-2]), int(r.shape[-1])) for r in resized]
        if len(by_shape) == 1:                                     # one size: pad the batch in one go
            d = t.size_divisible
            h, w = sizes[0]
            H, W = -(-h // d) * d, -(-w // d) * d
            return ImageList(nn.functional.pad(x, (0, W - w, 0, H - h)), sizes)
        return ImageList(t.batch_images(resized, size_divisible=t.size_divisible), sizes)

    def _scale_forward(self, normalized: list[torch.Tensor], scale: int, max_size: int, stop_after: str | None):
        image_list = self._transform(normalized, scale, max_size)
        if stop_after == "transform":
            return None
        x = image_list.tensors
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with cudnn_autotuned(x.is_cuda):
            feats = self.backbone(x)
            if stop_after == "backbone":
                return None
            return image_list, feats, self._rpn_candidates(image_list, feats)

    def _rpn_candidates(self, image_list, feats):
        """Per image and pyramid level, the top pre_nms_top_n anchors by objectness, decoded, clipped,
        and masked as torchvision's filter_proposals would drop them: [B, L, P] padded."""
        rpn = self.model.rpn
        fl = rpn_features(rpn, feats)  # the maps the RPN reads
        objectness, deltas = self.rpn_head(fl)
        anchors = rpn.anchor_generator(image_list, fl)[0]             # same for every image of the batch
        per_level = [o[0].numel() for o in objectness]
        obj, dl = concat_box_prediction_layers(objectness, deltas)
        B = len(image_list.image_sizes)
        obj = obj.reshape(B, -1)
        dl = dl.reshape(B, -1, 4)
        P = rpn.pre_nms_top_n()
        boxes, scores, valid = [], [], []
        offset = 0
        for n in per_level:
            k = min(P, n)
            top, idx = obj[:, offset:offset + n].topk(k, dim=1)
            idx = idx + offset
            d = dl.gather(1, idx[..., None].expand(B, k, 4)).float()
            b = rpn.box_coder.decode_single(d.reshape(-1, 4), anchors[idx.reshape(-1)].float()).reshape(B, k, 4)
            pad = P - k
            boxes.append(nn.functional.pad(b, (0, 0, 0, pad)))
            scores.append(nn.functional.pad(torch.sigmoid(top.float()), (0, pad)))
            valid.append(nn.functional.pad(torch.ones_like(top, dtype=torch.bool), (0, pad)))
            offset += n
        boxes, scores, valid = torch.stack(boxes, 1), torch.stack(scores, 1), torch.stack(valid, 1)
        hw = to_device(image_list.image_sizes, boxes.device, boxes.dtype)                  # [B, 2]
        boxes = _clip(boxes, hw[:, None, None])
        ws, hs = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid &= (ws >= rpn.min_size) & (hs >= rpn.min_size) & (scores >= rpn.score_thresh)
        return boxes, scores, valid

    def _proposals(self, boxes, scores, valid):
        """NMS per (view, level), then each view's top post_nms_top_n: [V, N, 4] and validity."""
        rpn = self.model.rpn
        V, L, P = valid.shape
        s, v, _, (b,) = sort_groups(scores.reshape(V * L, P), valid.reshape(V * L, P), boxes.reshape(V * L, P, 4))
        keep = padded_nms(b, v, rpn.nms_thresh)
        s = s.masked_fill(~keep, float("-inf")).reshape(V, L * P)
        n = min(rpn.post_nms_top_n(), L * P)
        top, idx = s.sort(dim=1, descending=True, stable=True)       # stable: ties as torchvision's nms
        top, idx = top[:, :n], idx[:, :n]
        props = b.reshape(V, L * P, 4).gather(1, idx[..., None].expand(V, n, 4))
        ok = top > float("-inf")
        return props.masked_fill(~ok[..., None], 0.0), ok

    # ---- stage 2: the box head for every view
    def _detections(self, logits, regression, proposals, prop_valid, image_sizes,
                    settings: list[tuple[float, int]]) -> list[tuple]:
        """torchvision's postprocess_detections for all views at once -> [V, D] padded, once per
        (nms_thresh, detections_per_img) of settings; decoding and sorting are shared."""
        rh = self.model.roi_heads
        V, N = prop_valid.shape
        C = logits.shape[-1]
        boxes = rh.box_coder.decode_single(regression.float(), proposals.reshape(-1, 4)).reshape(V, N, C, 4)
        scores = torch.softmax(logits.float(), -1).reshape(V, N, C)
        boxes = _clip(boxes, image_sizes[:, None, None, :])[:, :, 1:]
        scores = scores[:, :, 1:]
        ws, hs = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = prop_valid[..., None] & (scores > rh.score_thresh) & (ws >= 1e-2) & (hs >= 1e-2)
        # groups (view, class), each sorted by score
        G = V * (C - 1)
        s, v, order, (b,) = sort_groups(scores.transpose(1, 2).reshape(G, N), valid.transpose(1, 2).reshape(G, N),
                                        boxes.transpose(1, 2).reshape(G, N, 4))
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand_as(order))
        out = []
        for nms_thresh, D in settings:
            keep = _top_nms(b, v, nms_thresh, D, V)
            # rank each view's kept boxes in torchvision's (proposal, class) order, stable for ties
            sk = s.masked_fill(~keep, float("-inf")).reshape(V, C - 1, N)
            sk = sk.gather(2, rank.reshape(V, C - 1, N)).transpose(1, 2).reshape(V, N * (C - 1))
            n = min(D, (C - 1) * N)
            top, idx = sk.sort(dim=1, descending=True, stable=True)
            top, idx = top[:, :n], idx[:, :n]
            prop, cls = idx // (C - 1), idx % (C - 1)
            grp = torch.arange(V, device=idx.device)[:, None] * (C - 1) + cls        # (view, class) group
            ok = top > float("-inf")
            out.append((b[grp, rank[grp, prop]], top.masked_fill(~ok, 0.0), cls + 1, ok))
        return out

    def _box_head(self, feats, proposals: torch.Tensor, image_sizes):
        rh = self.model.roi_heads
        x = rh.box_roi_pool(feats, list(proposals), image_sizes)
        x = rh.box_head(x)
        return rh.box_predictor(x)

    def keypoint_logits(self, feats, boxes: list[torch.Tensor], image_sizes) -> torch.Tensor:
        """The keypoint head of one scale on the given boxes (one tensor per image of the batch)."""
        x = self.model.roi_heads.keypoint_roi_pool(feats, boxes, image_sizes)
        if self.keypoint_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        kp = self.keypoint_predictor
        if not isinstance(kp, KeypointRCNNPredictor):       # a predictor of its own: as it is
            return kp(self.keypoint_head(x))
        x = kp.kps_score_lowres(self.keypoint_head(x))
        # KeypointRCNNPredictor's bilinear upsampling, in the logits' own precision (under autocast
        # it ran in fp32: about a tenth of the keypoint model's device time in a group, on an H100)
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.interpolate(x, scale_factor=float(kp.up_scale), mode="bilinear",
                                             align_corners=False, recompute_scale_factor=False)

    @torch.inference_mode()
    def run(self, images: list[torch.Tensor], scales: list[int], flip: bool, max_size: int,
            flip_inds: list[int] | None = None, autocast=None, stop_after: str | None = None,
            shown: tuple[float, int] | None = None) -> ViewDetections | None:
        """Every view of every image: `scale_passes` then `detections`. stop_after ('transform',
        'backbone', 'rpn', 'roi_heads') ends early, for timing the stages; the result is then None.

        shown=(nms_thresh, detections_per_img): also each view as the model gives it with these
        settings, from the same box-head outputs (result.shown, boxes only). For the pre-NMS union:
        the heads' own settings then say nms_thresh >= 1 (no NMS) and the union's depth per view."""
        self._check_shown(shown)
        passes = self.scale_passes(images, scales, flip, max_size, autocast, stop_after)
        if passes is None:
            return None
        return self.detections(passes, flip_inds, autocast, stop_after, shown)

    def _check_shown(self, shown):
        if shown is not None and self.keypoints:
            raise ValueError("shown views are for the pre-NMS union of box models; a keypoint model's "
                             "keypoint head would run on every union box")

    @torch.inference_mode()
    def scale_passes(self, images: list[torch.Tensor], scales: list[int], flip: bool, max_size: int,
                     autocast=None, stop_after: str | None = None) -> "ScalePasses | None":
        """The first half: every scale's batch (the images, then their mirrors) through the
        transform, the backbone and the RPN's candidate selection. It queues its device work
        without a host synchronisation, so the host is done queuing all scales' convolutions while
        the device is still on the first (before, torchvision's transform made its normalisation
        constants from Python lists for every image and scale, a copy that waited for the device:
        the backbone alone went from 78 to 156 images/s on an H200, benchmarks/gpu_suite.py)."""
        autocast = autocast or contextlib.nullcontext
        normalized = self._normalized(images)
        batch = normalized + ([im.flip(-1) for im in normalized] if flip else [])
        per_scale, cands = [], []
        with autocast():
            for s in scales:
                r = self._scale_forward(batch, s, max_size, stop_after)
                if r is None:
                    continue
                image_list, feats, c = r
                per_scale.append(ScaleFeatures(s, feats, list(image_list.image_sizes)))
                cands.append(c)
        if stop_after in ("transform", "backbone"):
            return None
        return ScalePasses(per_scale, cands, [tuple(im.shape[-2:]) for im in images], flip)

    @torch.inference_mode()
    def detections(self, passes: "ScalePasses", flip_inds: list[int] | None = None, autocast=None,
                   stop_after: str | None = None, shown: tuple[float, int] | None = None) -> ViewDetections | None:
        """The second half: proposals, the box head, post-processing and (keypoint models) each
        view's keypoint head, mapped back to the original images. Arguments as `run`'s."""
        self._check_shown(shown)
        autocast = autocast or contextlib.nullcontext
        per_scale, cands, flip = passes.per_scale, passes.cands, passes.flip
        n = len(passes.image_sizes)
        m = n * (2 if flip else 1)
        dev = cands[0][0].device
        with autocast():
            P = max(c[0].shape[2] for c in cands)
            pad = [tuple(nn.functional.pad(x, (0, 0, 0, P - x.shape[2])) if x.dim() == 4 else
                         nn.functional.pad(x, (0, P - x.shape[2])) for x in c) for c in cands]
            Lmax = max(c[0].shape[1] for c in pad)
            if any(c[0].shape[1] != Lmax for c in pad):
                raise ValueError("every scale must give the same pyramid levels")
            proposals, prop_valid = self._proposals(*(torch.cat(x) for x in zip(*pad)))
            if stop_after == "rpn":
                return None
            logits, regression = [], []
            for i, sf in enumerate(per_scale):
                lg, rg = self._box_head(sf.features, proposals[i * m:(i + 1) * m], sf.image_sizes)
                logits.append(lg)
                regression.append(rg)
        sizes = to_device([hw for sf in per_scale for hw in sf.image_sizes], dev, torch.float32)
        logits, regression = torch.cat(logits), torch.cat(regression)
        rh = self.model.roi_heads
        settings = [(rh.nms_thresh, rh.detections_per_img)] + ([tuple(shown)] if shown is not None else [])
        dets = self._detections(logits, regression, proposals, prop_valid, sizes, settings)
        (boxes, scores, labels, valid), second = dets[0], (dets[1] if shown is not None else None)
        keypoints = None
        if self.keypoints:
            keypoints = self._view_keypoints(per_scale, boxes, valid, m, autocast)
        if stop_after == "roi_heads":
            return None
        # back to the original images: resize (as transform.postprocess), then un-flip
        views = len(per_scale)
        orig = to_device(passes.image_sizes * (m // n) * views, dev, torch.float32)
        ratio = orig / sizes                                                    # [V, 2] (h, w)
        flipped = to_device(([False] * n + [True] * (m - n)) * views, dev)
        W = orig[:, 1, None]

        def to_original(b):
            b = b * ratio[:, None, [1, 0, 1, 0]]
            fb = b.clone()
            fb[..., 0], fb[..., 2] = W - b[..., 2], W - b[..., 0]
            return torch.where(flipped[:, None, None], fb, b)
        boxes = to_original(boxes)
        if keypoints is not None:
            keypoints = keypoints.clone()
            keypoints[..., 0] *= ratio[:, None, None, 1]
            keypoints[..., 1] *= ratio[:, None, None, 0]
            if flip:
                fk = keypoints[:, :, flip_inds].clone()
                fk[..., 0] = W[:, :, None] - fk[..., 0]
                keypoints = torch.where(flipped[:, None, None, None], fk, keypoints)
        if second is not None:
            second = ViewDetections(to_original(second[0]), *second[1:], None, per_scale)
        return ViewDetections(boxes, scores, labels, valid, keypoints, per_scale, second)

    def _view_keypoints(self, per_scale, boxes, valid, m: int, autocast):
        """The keypoint head of each view on its own detections (torchvision's roi_heads does this
        inside its forward), decoded in view coordinates: [V, D, K, 3]."""
        V, D = valid.shape
        counts = valid.sum(1).tolist()                                          # one sync: boxes per view
        heat = []
        with autocast():
            for i, sf in enumerate(per_scale):
                bl = [boxes[j, :counts[j]] for j in range(i * m, (i + 1) * m)]
                heat.append(self.keypoint_logits(sf.features, bl, sf.image_sizes))
        heat = torch.cat(heat)
        flat = torch.cat([boxes[j, :counts[j]] for j in range(V)])
        kps, _ = heatmaps_to_keypoints(heat, flat)
        out = kps.new_zeros((V, D, kps.shape[1], 3))
        out[valid] = kps                                       # valid entries are each view's first
        return out


def _clip(boxes: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """clip_boxes_to_image with a (broadcast) per-image (height, width) tensor."""
    x = boxes[..., 0::2].clamp(min=0)
    y = boxes[..., 1::2].clamp(min=0)
    x = torch.minimum(x, hw[..., 1:2])
    y = torch.minimum(y, hw[..., 0:1])
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)


def _top_nms(boxes, valid, iou_thresh: float, need: int, views: int) -> torch.Tensor:
    """padded_nms, but only as deep into each group as a top-`need` selection can reach: NMS runs on
    the first `depth` ranks; a group whose prefix keeps >= need boxes, or holds all its valid boxes,
    is exact there (ranks below cannot enter its top `need`). Otherwise the full depth is used."""
    G, M = valid.shape
    if iou_thresh >= 1.0:       # IoU > 1 never happens: nothing is suppressed (the pre-NMS union)
        return valid.clone()
    depth = min(M, max(4 * need, 256))
    if depth < M:
        keep = padded_nms(boxes[:, :depth], valid[:, :depth], iou_thresh)
        ok = (keep.sum(1) >= need) | ~valid[:, depth:].any(1)
        if bool(ok.all()):
            return torch.nn.functional.pad(keep, (0, M - depth))
    return padded_nms(boxes, valid, iou_thresh)

