"""The model registry: torchvision detectors by name. Weights come from local files only."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet18
from torchvision.models.detection import (FasterRCNN, KeypointRCNN, fasterrcnn_mobilenet_v3_large_fpn,
                                          fasterrcnn_resnet50_fpn, keypointrcnn_resnet50_fpn)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.rpn import RegionProposalNetwork

from .roi_align import SmallMapRoIAlign
from .serialization import safe_load, tensor_dict


@dataclass(frozen=True)
class Arch:
    name: str
    task: str  # "detection" or "keypoints"
    build: Callable[..., nn.Module]
    description: str


def _resnet18_fpn(trainable_layers: int = 5) -> BackboneWithFPN:
    return _resnet_fpn_extractor(resnet18(weights=None), trainable_layers)


class _TinyBackbone(nn.Module):
    """Four conv blocks (stride 8 overall) and a single feature map, no FPN: small enough to train
    on two CPU cores in minutes, fine enough for objects of 8 px in 96 px images."""

    def __init__(self, width: int = 48):
        super().__init__()
        layers, c = [], 3
        for out, stride in ((width // 2, 2), (width, 2), (width, 2), (width, 1)):
            layers += [nn.Conv2d(c, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.body = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, x):
        return {"0": self.body(x)}


class _TinyKeypointBackbone(_TinyBackbone):
    """_TinyBackbone (the same layers, so "0" is the same stride-8 map) plus a stride-4 map "p2" for
    the keypoint head, made as FPN makes its P2: the stride-4 block's output through a 1x1 lateral
    conv, plus the stride-8 output upsampled x2 (nearest), then a 3x3 conv (FPN's initialisation).

    Why: on the one stride-8 map a 20-40 px stick figure of the 96 px benchmark images spans 3-5
    feature cells, while OKS at sigma 0.07 accepts a keypoint within about 3-5 px; Keypoint R-CNN as
    published pools keypoints from FPN's stride-4 level. The RPN and the box head read "0" only."""

    STRIDE4 = 6  # body[:6]: the two stride-2 blocks (conv, BN, ReLU each), width channels at stride 4

    def __init__(self, width: int = 48):
        super().__init__(width)
        self.lateral = nn.Conv2d(width, width, 1)
        self.smooth = nn.Conv2d(width, width, 3, padding=1)
        for m in (self.lateral, self.smooth):
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.constant_(m.bias, 0)

    def forward(self, x):
        # sliced at call time: folding batch norms for inference replaces modules of the body in place
        c4 = self.body[:self.STRIDE4](x)
        c8 = self.body[self.STRIDE4:](c4)
        p2 = self.lateral(c4) + F.interpolate(c8, size=c4.shape[-2:], mode="nearest")
        return {"0": c8, "p2": self.smooth(p2)}


class _NamedMapsRPN(RegionProposalNetwork):
    """torchvision's RPN reads every map of the features dict (and the tiny anchor generator has
    sizes for one map): this one reads only `feature_names`."""

    feature_names: tuple[str, ...] = ("0",)

    def forward(self, images, features, targets=None):
        return super().forward(images, {k: features[k] for k in self.feature_names}, targets)


def rpn_features(rpn: nn.Module, features: dict) -> list:
    """The maps the model's RPN reads, in its order (all of them for torchvision's own RPN)."""
    names = getattr(rpn, "feature_names", None)
    return [features[k] for k in names] if names is not None else list(features.values())


def _tiny_anchors():
    return AnchorGenerator(sizes=((8, 16, 32, 64),), aspect_ratios=((0.5, 1.0, 2.0),))


def _fpn_anchors():
    return AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)


def _roi_pool(out: int, featmap: str = "0"):
    return SmallMapRoIAlign(featmap_names=[featmap], output_size=out, sampling_ratio=2)


def _build_fasterrcnn_r50(num_classes, num_keypoints, **kw):
    return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **kw)


def _build_fasterrcnn_mnv3(num_classes, num_keypoints, **kw):
    return fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **kw)


def _build_fasterrcnn_r18(num_classes, num_keypoints, **kw):
    return FasterRCNN(_resnet18_fpn(), num_classes=num_classes, rpn_anchor_generator=_fpn_anchors(), **kw)


# A 96 px image holds a handful of objects: 64 sampled RoIs per image (torchvision's default is
# 512, sized for COCO) lose nothing there (same AP on the synthetic benchmark data) and make a
# CPU training step 4x faster, most of it RoIAlign's backward pass. 300 proposals at test time.
# The single 12x12 map of a 96 px image holds 1,728 anchors; the RPN's NMS over all of them took a
# third of a training step on the CPU. Its 600 best-scored before NMS: 7.1 against 5.9 steps/s
# (batch 4, two threads). RoIAlign pools the small map with matrix products when training
# (ml_core.roi_align; torchvision's serial CPU backward was a fifth of a step). The box head is
# torchvision's TwoMLPHead of 1,024 features, now most of a step (its first layer, 2,352 -> 1,024);
# every figure in the README was measured with it.
_TINY_HEADS = dict(box_batch_size_per_image=64, rpn_pre_nms_top_n_train=600, rpn_pre_nms_top_n_test=600,
                   rpn_post_nms_top_n_train=500, rpn_post_nms_top_n_test=300)


def _build_fasterrcnn_tiny(num_classes, num_keypoints, **kw):
    return FasterRCNN(_TinyBackbone(), num_classes=num_classes, rpn_anchor_generator=_tiny_anchors(),
                      box_roi_pool=_roi_pool(7), **{**_TINY_HEADS, **kw})


def _build_keypointrcnn_r50(num_classes, num_keypoints, **kw):
    return keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                     num_keypoints=num_keypoints, **kw)


def _build_keypointrcnn_r18(num_classes, num_keypoints, **kw):
    return KeypointRCNN(_resnet18_fpn(), num_classes=num_classes, num_keypoints=num_keypoints,
                        rpn_anchor_generator=_fpn_anchors(), **kw)


# The keypoint head pools its 14x14 RoIs from the backbone's stride-4 map "p2" (24x24 for a 96 px
# image: still the product form of SmallMapRoIAlign when training, up to 1,024 positions, i.e.
# images up to 128 px; larger ones go to torchvision's kernel); the RPN and the box head read the
# stride-8 map "0" as in fasterrcnn_tiny. torchvision builds the RPN inside FasterRCNN.__init__:
# it is re-classed to _NamedMapsRPN (no state of its own, the same state dict keys). Checkpoints
# of the earlier layout (keypoints pooled from "0") lack backbone.lateral and backbone.smooth and
# are refused with a ValueError when loaded (checkpoint.load_state).
#
# Its box head is lighter than fasterrcnn_tiny's, so a keypoint model trains in the time the CPU
# benchmark allows (training steps of batch 4 at 96 px on two cores, benchmarks/keypoint_step.py:
# 7.88 steps/s against 4.48 with fasterrcnn_tiny's box head, x1.76):
# - 32 sampled RoIs per image, not 64. Its images hold 1-3 figures where detection's hold 1-6
#   objects, so at the same foreground fraction (a quarter) each object still gets as many
#   positive RoIs. With 64, the box head on the RoIs and the keypoint head on their positives were
#   about half of a step.
# - A box head of 256 features, not 1,024: Detectron's MLP head has 1,024 for 12,544 inputs
#   (7x7x256); 2,352 inputs (7x7x48) at that ratio get about 200.
# Checkpoints of the heavier box head (before 2026-11-28) do not fit and are refused when loaded.
_TINY_KEYPOINT_BOX_FEATURES = 256


def _build_keypointrcnn_tiny(num_classes, num_keypoints, **kw):
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
    backbone = _TinyKeypointBackbone()
    box_features = _TINY_KEYPOINT_BOX_FEATURES
    model = KeypointRCNN(backbone, num_classes=None, rpn_anchor_generator=_tiny_anchors(), box_roi_pool=_roi_pool(7),
                         box_head=TwoMLPHead(backbone.out_channels * 7 * 7, box_features),
                         box_predictor=FastRCNNPredictor(box_features, num_classes),
                         keypoint_roi_pool=_roi_pool(14, "p2"), keypoint_head=KeypointRCNNHeads(48, (64, 64)),
                         keypoint_predictor=KeypointRCNNPredictor(64, num_keypoints),
                         **{**_TINY_HEADS, "box_batch_size_per_image": 32, **kw})
    model.rpn.__class__ = _NamedMapsRPN
    return model


ARCHITECTURES: dict[str, Arch] = {a.name: a for a in [
    Arch("fasterrcnn_resnet50_fpn", "detection", _build_fasterrcnn_r50, "Faster R-CNN, ResNet-50 FPN (GPU)"),
    Arch("fasterrcnn_mobilenet_v3_large_fpn", "detection", _build_fasterrcnn_mnv3, "Faster R-CNN, MobileNetV3-Large FPN"),
    Arch("fasterrcnn_resnet18_fpn", "detection", _build_fasterrcnn_r18, "Faster R-CNN, ResNet-18 FPN (CPU-sized)"),
    Arch("fasterrcnn_tiny", "detection", _build_fasterrcnn_tiny, "Faster R-CNN, 4-layer conv backbone (tests, demos)"),
    Arch("keypointrcnn_resnet50_fpn", "keypoints", _build_keypointrcnn_r50, "Keypoint R-CNN, ResNet-50 FPN (GPU)"),
    Arch("keypointrcnn_resnet18_fpn", "keypoints", _build_keypointrcnn_r18, "Keypoint R-CNN, ResNet-18 FPN (CPU-sized)"),
    Arch("keypointrcnn_tiny", "keypoints", _build_keypointrcnn_tiny,
         "Keypoint R-CNN, 4-layer conv backbone, keypoints from a stride-4 map (tests, demos)"),
]}


def get_arch(name: str) -> Arch:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_model(arch: str, num_classes: int, num_keypoints: int = 0, min_size: int = 800, max_size: int = 1333,
                weights_path: str | os.PathLike | None = None) -> tuple[nn.Module, str]:
    """Build a detector. num_classes counts the background.

    weights_path may be a torchvision COCO/ImageNet state dict or one of our checkpoints; tensors
    whose shapes differ (e.g. a different number of classes) are left at their initialisation.
    Returns (model, init) where init says where the weights came from.
    """
    a = get_arch(arch)
    if a.task == "keypoints" and num_keypoints < 1:
        raise ValueError(f"{arch} is a keypoint model: the dataset must declare keypoints")
    if num_classes < 2:
        raise ValueError("num_classes counts the background and must be at least 2")
    model = a.build(num_classes, num_keypoints, min_size=min_size, max_size=max_size)
    init = "random"
    if weights_path:
        init = load_weights(model, weights_path)
    return model, init


def load_weights(model: nn.Module, path: str | os.PathLike) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path} does not exist")
    state = safe_load(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    state = tensor_dict(state, os.path.basename(str(path)))
    own = model.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not compatible:
        # an ImageNet classification checkpoint: its keys live under backbone.body.*
        prefixed = {f"backbone.body.{k}": v for k, v in state.items()}
        compatible = {k: v for k, v in prefixed.items() if k in own and own[k].shape == v.shape}
    if not compatible:
        raise ValueError(f"{path} holds no weights that fit this architecture")
    model.load_state_dict(compatible, strict=False)
    return f"{os.path.basename(path)} ({len(compatible)}/{len(own)} tensors)"
