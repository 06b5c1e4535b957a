"""Checkpoint files that can be reloaded alone: weights plus everything needed to rebuild the model
(architecture, categories, keypoint schema, input sizes) and what made them (config, metrics, init)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .models import ARCHITECTURES, build_model
from .schema import KeypointSchema
from .serialization import plain, safe_load, tensor_dict

FORMAT = "distill-checkpoint/1"


def model_meta(arch: str, categories: list[dict], keypoint_schema: KeypointSchema | None, min_size: int,
               max_size: int, **extra) -> dict:
    return {"format": FORMAT, "arch": arch, "categories": categories,
            "keypoint_schema": keypoint_schema.to_dict() if keypoint_schema else None,
            "min_size": min_size, "max_size": max_size, **extra}


def atomic_save(obj, path: str | os.PathLike):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path, model: torch.nn.Module, meta: dict, **training_state):
    module = model.module if hasattr(model, "module") else model
    # The state dict stays as torch made it (an OrderedDict of tensors with its version metadata).
    atomic_save({"model": module.state_dict(), **plain({"meta": meta, **training_state})}, path)


def read_checkpoint(path, name: str | None = None) -> dict:
    """Load a Distill checkpoint without running code in it, and check that its metadata describes a
    model this project can rebuild (ValueError with the reason otherwise)."""
    name = name or os.path.basename(str(path))
    ckpt = safe_load(path, name)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("meta"), dict) or ckpt["meta"].get("format") != FORMAT:
        raise ValueError(f"{name} is not a Distill checkpoint (no '{FORMAT}' metadata); "
                         "pass it as initial weights instead")
    check_meta(ckpt["meta"], name)
    tensor_dict(ckpt.get("model"), f"{name}: 'model'")
    return ckpt


def check_meta(meta: dict, name: str = "checkpoint"):
    arch = meta.get("arch")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ValueError(f"{name}: unknown architecture {str(arch)[:80]!r}; known: {', '.join(ARCHITECTURES)}")
    cats = meta.get("categories")
    if (not isinstance(cats, list) or not cats
            or not all(isinstance(c, dict) and type(c.get("id")) is int and isinstance(c.get("name"), str) for c in cats)):
        raise ValueError(f"{name}: 'categories' must be a non-empty list of {{id: int, name: str}}")
    for key in ("min_size", "max_size"):
        v = meta.get(key)
        if type(v) is not int or not 16 <= v <= 8192:
            raise ValueError(f"{name}: '{key}' must be an integer in [16, 8192], got {str(v)[:40]}")
    ks = meta.get("keypoint_schema")
    if ks is not None:
        try:
            KeypointSchema.from_dict(ks)
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise ValueError(f"{name}: invalid keypoint_schema ({e})") from None


def load_model(path, device="cpu", name: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights."""
    name = name or os.path.basename(str(path))
    ckpt = read_checkpoint(path, name)
    meta = ckpt["meta"]
    schema = KeypointSchema.from_dict(meta.get("keypoint_schema"))
    model, _ = build_model(meta["arch"], len(meta["categories"]) + 1, schema.num_keypoints if schema else 0,
                           meta["min_size"], meta["max_size"])
    load_state(model, ckpt, name)
    return model.to(device).eval(), meta


def load_state(model: torch.nn.Module, ckpt: dict, name: str = "checkpoint"):
    """Load a Distill checkpoint's weights into the model its metadata describes, every tensor: a
    ValueError says what does not fit. A checkpoint of an earlier layout of its architecture (e.g.
    keypointrcnn_tiny before its stride-4 keypoint map) lacks the layers added since, or has layers
    of other sizes (keypointrcnn_tiny's box head before 2026-11-28): it is refused, never run with
    layers at their random initialisation."""
    state, meta = ckpt["model"], ckpt.get("meta") or {}
    arch = meta.get("arch", "model")
    what = f"a {arch}" + (f" with {len(meta['categories'])} categories" if "categories" in meta else "")
    missing = [k for k in model.state_dict() if k not in state]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        if missing:
            listed = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ValueError(f"{name}: the weights do not fit {what}: they lack {listed} (a checkpoint of an "
                             f"earlier version of {arch}? train it again)") from None
        sizes = [k for k, v in model.state_dict().items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if sizes:
            listed = ", ".join(sizes[:4]) + (f" and {len(sizes) - 4} more" if len(sizes) > 4 else "")
            raise ValueError(f"{name}: the weights do not fit {what}: {listed} differ in size (a checkpoint of an "
                             f"earlier version of {arch}? train it again)") from None
        raise ValueError(f"{name}: the weights do not fit {what} ({' '.join(str(e).split())[:200]})") from None
