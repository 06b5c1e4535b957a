"""Reading tensor files without running code in them.

A PyTorch `.pt` file is a pickle: loading one with `weights_only=False` runs whatever Python the
file names, so any checkpoint a user uploads could execute code on the server. Every file this
project loads goes through `safe_load`, which uses PyTorch's weights-only unpickler (tensors and
plain containers only) and turns every failure into a ValueError with a message a person can act
on. What the project writes goes through `plain`, so its own files always pass that check.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

CONVERT_HINT = (
    "If you wrote this file yourself with an older tool and trust it, re-save it with plain values only, e.g. "
    "`python -c \"import torch; c = torch.load('old.pt', weights_only=False); "
    "torch.save({k: c[k] for k in ('meta', 'model')}, 'new.pt')\"` (run that only on files you trust)."
)


def safe_load(path: str | os.PathLike, name: str | None = None):
    """torch.load with the weights-only unpickler; ValueError (never code execution) for anything else.
    `name` is how messages call the file (an upload's own name rather than its temporary path)."""
    name = name or Path(path).name
    if not os.path.isfile(path):
        raise ValueError(f"{name} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _weights_only_reason(str(e))
        if "global" not in reason.lower():  # a GLOBAL it refused is code the file would run
            raise ValueError(f"{name} is not a readable PyTorch checkpoint or weights file ({reason})") from None
        raise ValueError(f"{name} was refused: it holds Python objects other than tensors and plain values, "
                         f"and loading it would run code ({reason}). {CONVERT_HINT}") from None
    except RecursionError:
        raise ValueError(f"{name} is nested too deeply to be a checkpoint") from None
    except Exception as e:  # a truncated file, a zip that is not a torch archive, random bytes, ...
        raise ValueError(f"{name} is not a readable PyTorch checkpoint or weights file ({e.__class__.__name__})") from None


def _weights_only_reason(text: str) -> str:
    """The line of torch's message that says what failed (it wraps every failure in the same advice)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error:" in ln:
            return ln.split("WeightsUnpickler error:", 1)[1].strip()[:200]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln[:200]
    return lines[-1][:200] if lines else ""


_PLAIN_SCALARS = (str, int, float, bool, type(None))


def plain(obj, where: str = "checkpoint"):
    """The same structure made only of what `safe_load` accepts: dicts, lists, tuples, str, numbers,
    None and tensors. NumPy scalars become Python numbers; anything else is a TypeError at save time,
    so a checkpoint that could not be read back is never written."""
    if type(obj) in _PLAIN_SCALARS or torch.is_tensor(obj):  # type(): np.float64 subclasses float
        return obj
    if type(obj) is dict:
        return {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar or 0-d array
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{where} holds a {type(obj).__name__}; checkpoints hold only tensors and plain values")


def tensor_dict(obj, name: str) -> dict[str, torch.Tensor]:
    """A state dict: string keys, tensor values (checked, since a hostile file can hold anything)."""
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{name} holds no state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{name}: entry {str(bad[0])[:80]!r} of the state dict is not a named tensor")
    return obj
