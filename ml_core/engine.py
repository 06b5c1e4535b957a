"""Training: fit() with hooks for progress, checkpoints, resume and cancellation.

SGD with linear warm-up and step decay (x0.1 at 70% and 90% of the iterations by default), mixed
precision on CUDA, DistributedDataParallel when launched by torchrun. Teacher training uses the
labeled set alone; student training mixes labeled and pseudo-labeled images in every minibatch.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import ConcatDataset, DataLoader

from .checkpoint import read_checkpoint, save_checkpoint
from .data import MixedBatchSampler, collate, loader_kwargs, parse_ratio


class Cancelled(Exception):
    """Raised by a hook to stop training; fit() saves a resumable checkpoint first."""


@dataclass
class TrainConfig:
    iterations: int = 1000
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    steps: tuple[float, ...] = (0.7, 0.9)
    gamma: float = 0.1
    ratio: str = "6:4"
    amp: bool = True
    checkpoint_every: int = 0
    log_every: int = 10
    clip_grad_norm: float = 10.0
    num_workers: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError("iterations must be at least 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not (0 < self.lr < 10):
            raise ValueError(f"lr must be positive and sensible, got {self.lr}")
        if any(not 0 < s < 1 for s in self.steps):
            raise ValueError(f"steps are fractions of the schedule in (0, 1), got {self.steps}")
        parse_ratio(self.ratio)
        self.steps = tuple(self.steps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrainConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        if "steps" in d:
            d["steps"] = tuple(d["steps"])
        return cls(**d)


class Hook:
    """Plug-in points of the loop; override what you need. Raise Cancelled to stop."""

    def before_train(self, state: "TrainState"): ...

    def after_step(self, state: "TrainState"): ...

    def after_train(self, state: "TrainState"): ...


@dataclass
class TrainState:
    config: TrainConfig
    iteration: int = 0
    losses: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # [{"iteration", "loss", parts..., "lr", "time"}]
    started: float = field(default_factory=time.time)
    images_seen: int = 0

    @property
    def progress(self) -> float:
        return self.iteration / self.config.iterations

    def eta_seconds(self) -> float | None:
        if self.iteration == 0:
            return None
        elapsed = time.time() - self.started
        return elapsed / self.iteration * (self.config.iterations - self.iteration)


def lr_factor(it: int, cfg: TrainConfig) -> float:
    f = cfg.gamma ** sum(it >= math.floor(s * cfg.iterations) for s in cfg.steps)
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        f *= cfg.warmup_factor * (1 - alpha) + alpha
    return f


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def fit(model: torch.nn.Module, labeled, config: TrainConfig, *, pseudo=None, hooks: list[Hook] = (),
        device: str | torch.device = "cpu", checkpoint_path: str | os.PathLike | None = None, meta: dict | None = None,
        resume: bool = True) -> TrainState:
    """Train `model` for config.iterations minibatches.

    1. Batches come from `labeled` alone (teacher) or mix `labeled` and `pseudo` at config.ratio.
    2. With checkpoint_path, state is saved every config.checkpoint_every iterations, on
       cancellation and at the end; with resume, an existing checkpoint there is continued.
    3. Hooks see the TrainState after every iteration (progress bars, database rows, cancel checks).
    """
    device = torch.device(device)
    rank, world = _distributed()
    torch.manual_seed(config.seed + rank)
    if pseudo is not None and len(pseudo):
        dataset = ConcatDataset([labeled, pseudo])
        sampler = MixedBatchSampler(len(labeled), len(pseudo), config.batch_size, config.ratio,
                                    config.iterations, config.seed + rank)
    else:
        if len(labeled) == 0:
            raise ValueError("no labeled images with annotations to train on")
        dataset = labeled
        sampler = MixedBatchSampler(len(labeled), 0, config.batch_size, (1, 0), config.iterations, config.seed + rank)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, config))
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state = TrainState(config)

    if resume and checkpoint_path and os.path.exists(checkpoint_path):
        ckpt = read_checkpoint(checkpoint_path)
        if "optimizer" in ckpt and ckpt.get("iteration", 0) < config.iterations:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            state.iteration = ckpt["iteration"]
            state.history = ckpt.get("history", [])

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(final=False):
        if checkpoint_path and rank == 0:
            extra = {} if final else {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            save_checkpoint(checkpoint_path, model, meta or {}, iteration=state.iteration, history=state.history,
                            config=config.to_dict(), **extra)

    # The sampler is deterministic: a resumed run skips the batches it has already trained on.
    sampler.skip = state.iteration
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **loader_kwargs(config.num_workers),
                        pin_memory=device.type == "cuda", persistent_workers=False)
    for h in hooks:
        h.before_train(state)
    state.started = time.time() - (state.history[-1]["time"] if state.history else 0)
    try:
        for images, targets in loader:
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                loss_dict = net(images, targets)
                loss = sum(loss_dict.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss)} at iteration {state.iteration}; "
                                         "lower the learning rate or lengthen the warm-up")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.clip_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state.iteration += 1
            state.images_seen += len(images)
            state.losses = {k: float(v.detach()) for k, v in loss_dict.items()}
            state.losses["loss"] = float(loss.detach())
            if state.iteration % config.log_every == 0 or state.iteration == config.iterations or state.iteration == 1:
                state.history.append({"iteration": state.iteration, **{k: round(v, 5) for k, v in state.losses.items()},
                                      "lr": optimizer.param_groups[0]["lr"], "time": round(time.time() - state.started, 2)})
            for h in hooks:
                h.after_step(state)
            if config.checkpoint_every and state.iteration % config.checkpoint_every == 0:
                save()
    except Cancelled:
        save()
        raise
    model.eval()
    save(final=True)
    for h in hooks:
        h.after_train(state)
    return state
