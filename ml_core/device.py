"""Host data onto the device without waiting for it.

`torch.tensor(data, device="cuda")` (and `.to("cuda")` of a tensor in ordinary host memory) copies
synchronously: the host waits until the stream's queued work has finished before it can queue
more, so the device then idles while the host catches up. The inference fast path makes many small
tensors from Python values (image sizes, group counts); `to_device` queues their copy from pinned
memory instead (PyTorch's pinned-memory allocator keeps the buffer until the copy has run).
"""
from __future__ import annotations

import torch


def to_device(data, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(data, dtype=dtype) on `device`, copied without a host synchronisation on CUDA."""
    device = torch.device(device)
    t = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
