"""Checkpoint files that can be reloaded alone: weights plus everything needed to rebuild the model
(architecture, categories, keypoint schema, input sizes) and what made them (config, metrics, init)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .models import build_model
from .schema import KeypointSchema

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
    atomic_save({"meta": meta, "model": module.state_dict(), **training_state}, path)


def read_checkpoint(path) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{os.path.basename(str(path))} is not a readable PyTorch checkpoint ({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("meta", {}).get("format") != FORMAT:
        raise ValueError(f"{os.path.basename(str(path))} is not a Distill checkpoint (no '{FORMAT}' metadata); "
                         "pass it as initial weights instead")
    return ckpt


def load_model(path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights."""
    ckpt = read_checkpoint(path)
    meta = ckpt["meta"]
    schema = KeypointSchema.from_dict(meta.get("keypoint_schema"))
    model, _ = build_model(meta["arch"], len(meta["categories"]) + 1, schema.num_keypoints if schema else 0,
                           meta["min_size"], meta["max_size"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), meta
