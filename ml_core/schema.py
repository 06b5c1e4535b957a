"""Categories and keypoint schemas: names, skeleton, flip map and OKS sigmas."""
from __future__ import annotations

from dataclasses import dataclass, field

# COCO person keypoints and their OKS sigmas (pycocotools' defaults for the COCO person).
COCO_PERSON_KEYPOINTS = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
]
COCO_PERSON_SIGMAS = [
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062,
    0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
]
DEFAULT_SIGMA = 0.07


def flip_map_from_names(names: list[str]) -> list[int]:
    """Index permutation that swaps left_*/right_* keypoints (others map to themselves).

    Raises ValueError when a left_ name has no right_ partner (or vice versa), or when
    nothing is paired at all: flip augmentation would then silently teach wrong labels.
    """
    index = {n: i for i, n in enumerate(names)}
    perm = list(range(len(names)))
    paired = 0
    for i, name in enumerate(names):
        for a, b in (("left_", "right_"), ("right_", "left_"), ("l_", "r_"), ("r_", "l_")):
            if name.startswith(a):
                partner = b + name[len(a):]
                if partner not in index:
                    raise ValueError(f"keypoint {name!r} has no partner {partner!r}; declare flip_map explicitly")
                perm[i] = index[partner]
                paired += 1
                break
    if paired == 0:
        raise ValueError(
            "keypoint names have no left_/right_ pairs, so a flip map cannot be inferred; "
            "declare 'flip_map' in the category, or disable flips"
        )
    return perm


@dataclass
class KeypointSchema:
    names: list[str]
    skeleton: list[list[int]] = field(default_factory=list)  # COCO convention: 1-based pairs
    flip_map: list[int] | None = None
    sigmas: list[float] | None = None

    def __post_init__(self):
        k = len(self.names)
        if k == 0:
            raise ValueError("a keypoint schema needs at least one keypoint name")
        if self.flip_map is not None:
            if sorted(self.flip_map) != list(range(k)):
                raise ValueError(f"flip_map must be a permutation of 0..{k - 1}, got {self.flip_map}")
            if any(self.flip_map[self.flip_map[i]] != i for i in range(k)):
                raise ValueError("flip_map must be its own inverse (left<->right swaps)")
        if self.sigmas is None:
            if self.names == COCO_PERSON_KEYPOINTS:
                self.sigmas = list(COCO_PERSON_SIGMAS)
            else:
                self.sigmas = [DEFAULT_SIGMA] * k
        if len(self.sigmas) != k:
            raise ValueError(f"{len(self.sigmas)} OKS sigmas for {k} keypoints")

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    def flip_indices(self) -> list[int]:
        """The flip map, inferred from names when not declared. ValueError if none is usable."""
        if self.flip_map is not None:
            return list(self.flip_map)
        return flip_map_from_names(self.names)

    def to_dict(self) -> dict:
        return {"names": self.names, "skeleton": self.skeleton, "flip_map": self.flip_map, "sigmas": self.sigmas}

    @classmethod
    def from_dict(cls, d: dict | None) -> "KeypointSchema | None":
        if not d:
            return None
        return cls(names=list(d["names"]), skeleton=[list(s) for s in d.get("skeleton", [])],
                   flip_map=d.get("flip_map"), sigmas=d.get("sigmas"))

    @classmethod
    def from_coco_category(cls, cat: dict) -> "KeypointSchema | None":
        if not cat.get("keypoints"):
            return None
        return cls(names=list(cat["keypoints"]), skeleton=[list(s) for s in cat.get("skeleton", [])],
                   flip_map=cat.get("flip_map"), sigmas=cat.get("sigmas"))
