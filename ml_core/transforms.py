"""Geometric transforms: training augmentation (image and target together) and the test-time
views of multi-transform inference, each recorded so it can be inverted."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


# --- boxes and keypoints under a horizontal flip (torchvision's continuous convention) ---------

def flip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """x1' = W - x2, x2' = W - x1 (xyxy)."""
    out = boxes.clone()
    out[..., 0] = width - boxes[..., 2]
    out[..., 2] = width - boxes[..., 0]
    return out


def flip_keypoints(kps: torch.Tensor, width: float, flip_inds: list[int]) -> torch.Tensor:
    """Mirror x and swap left/right channels: (N, K, 3) -> (N, K, 3)."""
    out = kps[:, flip_inds].clone()
    out[..., 0] = width - out[..., 0]
    return out


def flip_heatmaps(heatmaps: torch.Tensor, flip_inds: list[int]) -> torch.Tensor:
    """Heatmaps of a flipped view back to the original orientation: (N, K, H, W).

    Mirror each map horizontally and swap left/right channels, so channel k of the result
    describes keypoint k of the unflipped image.
    """
    return heatmaps.flip(-1)[:, flip_inds]


# --- training augmentation: transforms carry their targets ------------------------------------

class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomHorizontalFlip:
    """Flips the image, its boxes and its keypoints (left/right swapped) together.

    The coin comes from `rng` if given, else from torch's generator: the one fit() seeds, or in a
    DataLoader worker the one the loader seeds for that worker, so the same seed draws the same
    flips (a Random() of its own was seeded from the OS and copied alike into every worker)."""

    def __init__(self, p: float = 0.5, flip_inds: list[int] | None = None, rng: random.Random | None = None):
        self.p, self.flip_inds, self.rng = p, flip_inds, rng

    def __call__(self, image, target):
        coin = self.rng.random() if self.rng is not None else float(torch.rand(()))
        if coin >= self.p:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        target["boxes"] = flip_boxes(target["boxes"], width)
        if "keypoints" in target:
            if self.flip_inds is None:
                raise ValueError("keypoint data needs a flip map for flip augmentation")
            target["keypoints"] = flip_keypoints(target["keypoints"], width, self.flip_inds)
        return image, target


def training_transform(flip_inds: list[int] | None, task: str, flip: bool = True):
    if not flip:
        return None
    if task == "keypoints" and flip_inds is None:
        raise ValueError("keypoint training with flip augmentation needs a flip map; declare one or pass flip=False")
    return Compose([RandomHorizontalFlip(0.5, flip_inds)])


# --- test-time views --------------------------------------------------------------------------

@dataclass(frozen=True)
class View:
    """One transformation of an image: shorter side resized to `scale`, optionally flipped."""

    scale: int
    flip: bool

    @property
    def name(self) -> str:
        return f"s{self.scale}" + ("-flip" if self.flip else "")


@dataclass
class TransformSet:
    """Scales x flips (the paper: 400..1200 step 100, each flipped; 4 scales x flip by default)."""

    scales: list[int] = field(default_factory=lambda: [400, 600, 800, 1000])
    flip: bool = True
    max_size: int = 4000

    def __post_init__(self):
        if not self.scales:
            raise ValueError("a transform set needs at least one scale")
        if any((not isinstance(s, int)) or s < 16 or s > 4000 for s in self.scales):
            raise ValueError(f"scales must be integers between 16 and 4000, got {self.scales}")
        if self.max_size < max(self.scales):
            raise ValueError(f"max_size {self.max_size} is below the largest scale {max(self.scales)}")
        self.scales = sorted(set(int(s) for s in self.scales))

    @property
    def views(self) -> list[View]:
        return [View(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]

    def to_dict(self) -> dict:
        return {"scales": list(self.scales), "flip": self.flip, "max_size": self.max_size}

    @classmethod
    def from_dict(cls, d: dict | None) -> "TransformSet":
        d = d or {}
        return cls(scales=[int(s) for s in d.get("scales", [400, 600, 800, 1000])], flip=bool(d.get("flip", True)),
                   max_size=int(d.get("max_size", 4000)))

    @classmethod
    def parse(cls, scales: str, flip: bool = True, max_size: int = 4000) -> "TransformSet":
        try:
            values = [int(s) for s in scales.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"scales must be a comma-separated list of integers, got {scales!r}") from None
        return cls(values, flip, max_size)


def resized_size(height: int, width: int, scale: int, max_size: int) -> tuple[int, int]:
    """The size torchvision's GeneralizedRCNNTransform gives an image for min_size=scale."""
    factor = min(scale / min(height, width), max_size / max(height, width))
    # torchvision interpolates with scale_factor and recompute_scale_factor=True: floor(dim * f)
    return int(height * factor), int(width * factor)


def boxes_to_view(boxes: torch.Tensor, view: View, orig_hw: tuple[int, int], view_hw: tuple[int, int]) -> torch.Tensor:
    """Original-image boxes -> the coordinates of a resized (and maybe flipped) view."""
    h, w = orig_hw
    vh, vw = view_hw
    out = boxes.clone()
    if view.flip:
        out = flip_boxes(out, w)
    out[..., 0::2] *= vw / w
    out[..., 1::2] *= vh / h
    return out
