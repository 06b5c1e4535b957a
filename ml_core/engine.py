"""Training: fit() with hooks for progress, checkpoints, resume and cancellation, and validation
tracking that keeps the best weights.

SGD with linear warm-up, mixed precision on CUDA, DistributedDataParallel when launched by
torchrun. Learning-rate schedules:
- "steps": x0.1 at 70% and 90% of the iterations (Detectron's fixed schedule);
- "plateau" (needs a validation function): the rate stays up while validation AP improves; after
  `patience` evaluations without a new best it drops x0.1 (and at 70% and 90% of the bound at the
  latest), and after the last drop's plateau training stops. `iterations` is then the bound, not
  the length: the model trains until its validation AP says it has converged.
- "auto" (the default): with a validation function, the first decay comes at 70% of the bound as
  in "steps" and the plateau rule applies only after it (an earlier second decay, then the stop).
  On a small validation set AP moves by a few points between evaluations, and the plateau rule
  read that noise as convergence early in training: on the CPU preset's data (seed 0), a teacher
  whose rate it cut at 1,100 of 2,300 iterations ended at 33.7 AP where runs with the first decay
  at 70% reached 38.6 and 40.1.
  Without a validation function, "auto" is "steps".
With validation, the weights that scored best are the ones saved at the end. Teacher training uses
the labeled set alone; student training mixes labeled and pseudo-labeled images in every minibatch.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.utils.data import ConcatDataset, DataLoader

from .checkpoint import load_state, read_checkpoint, save_checkpoint
from .data import MixedBatchSampler, collate, loader_kwargs, parse_ratio
from .serialization import plain


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
    # a resumable checkpoint every N iterations; None (the default): every tenth of the run, at
    # most 50 iterations apart; 0: only on cancellation and at the end
    checkpoint_every: int | None = None
    log_every: int = 10
    clip_grad_norm: float = 10.0
    # DataLoader worker processes; None: 2 when training on CUDA, none on the CPU, where worker
    # processes take the cores the model's threads use (benchmarks/train_throughput.py, 2 cores:
    # fit() 61-66 images/s without them, 59-60 with two)
    num_workers: int | None = None
    seed: int = 0
    # "auto": plateau when a validation function is given, steps otherwise
    schedule: str = "auto"
    # evaluate every N iterations; 0 picks N so that evaluation costs about a tenth of training
    eval_every: int = 0
    # evaluations without a new best before the rate drops (plateau) or training stops
    patience: int = 4
    # an evaluation must beat the best by this many AP points to count as better
    min_delta: float = 0.1
    # shorter sides drawn at random for each training image, as fractions of the model's own size
    # (evaluation and inference keep that size); None: the task's default (default_train_scales),
    # which pipeline.train fills in; fit() alone trains at the model's size
    train_scales: tuple[float, ...] | None = None

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
        if self.checkpoint_every is None and isinstance(self.iterations, int):
            self.checkpoint_every = max(1, min(50, self.iterations // 10))
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0")
        if self.schedule not in ("auto", "steps", "plateau"):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of: auto, steps, plateau")
        if self.eval_every < 0 or self.patience < 1:
            raise ValueError("eval_every must be >= 0 and patience >= 1")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if self.train_scales is not None:
            self.train_scales = tuple(float(f) for f in self.train_scales)
            if not self.train_scales or any(not 0.25 <= f <= 4 for f in self.train_scales):
                raise ValueError(f"train_scales are fractions of the model's size in [0.25, 4], got {self.train_scales}")

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


class StopTraining(Exception):
    """Raised inside fit() when validation AP has converged: training ends normally."""


class Hook:
    """Plug-in points of the loop; override what you need. Raise Cancelled to stop."""

    def before_train(self, state: "TrainState"): ...

    def after_step(self, state: "TrainState"): ...

    def after_train(self, state: "TrainState"): ...


def default_iterations(num_images: int, batch_size: int, device: str | torch.device = "cpu") -> int:
    """The schedule's bound from the data and the device.

    Epochs shrink as data grows: Detectron's 2x schedule trains COCO's 118k images for 24 epochs;
    n images get 24 * (118k / n)^(1/3) epochs (a few dozen images: several hundred). The bound is
    generous on purpose: with validation, the rate drops and training stops on the validation
    curve (plateau schedule), and the bound only caps the time. Half of this bound (the 1x
    schedule) was too short: on the CPU benchmark's 60 labeled images, every seed's teacher was
    still improving at the end of its high rate, and continuing it on the same labels gained
    3.9 to 7.3 AP. On a CPU the bound is capped at 16,000 images seen (4,000 minibatches of 4),
    so a run ends in reasonable time.
    """
    n = max(int(num_images), 1)
    batch = max(int(batch_size), 1)
    epochs = 24 * (118_000 / n) ** (1 / 3)
    iters = math.ceil(epochs * n / batch / 100) * 100
    cap = 90_000 if torch.device(device).type == "cuda" else max(16_000 // batch, 300)
    return int(min(max(iters, 300), cap))


# Detectron's keypoint R-CNN trains at shorter sides 640, 672, ..., 800 and tests at 800: scale
# jitter against over-fitting the few instances a keypoint set has. Its box configurations train at
# the test size alone.
KEYPOINT_TRAIN_SCALES = (0.8, 0.84, 0.88, 0.92, 0.96, 1.0)


def default_train_scales(task: str) -> tuple[float, ...]:
    """The training sizes' fractions a task gets by default (Detectron's, above)."""
    return KEYPOINT_TRAIN_SCALES if task == "keypoints" else (1.0,)


def training_sizes(test_size: int, fractions: tuple[float, ...]) -> tuple[int, ...]:
    """Shorter sides for training: each fraction of the test size, rounded, without repeats."""
    return tuple(sorted({max(8, round(test_size * f)) for f in fractions}))


@dataclass
class TrainState:
    config: TrainConfig
    iteration: int = 0
    losses: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # [{"iteration", "loss", parts..., "lr", "time"}]
    started: float = field(default_factory=time.time)
    images_seen: int = 0
    # validation tracking: [{"iteration", "AP", "lr", "time", "seconds"}], best so far, rate drops
    val_history: list = field(default_factory=list)
    best: dict | None = None
    drops: int = 0
    stopped: str = ""
    eval_every: int = 0
    # True when fit found this training already finished at its checkpoint path (nothing trained)
    already_trained: bool = False

    @property
    def progress(self) -> float:
        return self.iteration / self.config.iterations

    def eta_seconds(self) -> float | None:
        if self.iteration == 0:
            return None
        elapsed = time.time() - self.started
        return elapsed / self.iteration * (self.config.iterations - self.iteration)


def scheduled_drops(it: int, cfg: TrainConfig) -> int:
    return sum(it >= math.floor(s * cfg.iterations) for s in cfg.steps)


def lr_factor(it: int, cfg: TrainConfig, drops: int | None = None) -> float:
    """drops=None: the fixed step schedule. Otherwise the plateau schedule after that many drops,
    and never later than the step schedule: a curve that keeps creeping up (noise on a small
    validation set) still gets its decays at 70% and 90% of the bound."""
    f = cfg.gamma ** (scheduled_drops(it, cfg) if drops is None else max(drops, scheduled_drops(it, cfg)))
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        f *= cfg.warmup_factor * (1 - alpha) + alpha
    return f


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Validation:
    """When to evaluate, what counts as better, when the rate drops and when training stops.

    `evaluate(model) -> AP` is called with the model in eval mode. The weights of the best
    evaluation are kept (on the CPU), so fit() can end with them.
    """

    def __init__(self, evaluate: Callable[[torch.nn.Module], float], config: TrainConfig, plateau: bool):
        self.evaluate, self.cfg, self.plateau = evaluate, config, plateau
        # "auto": the first decay follows the step schedule; the plateau rule only acts after it
        self.after_first_decay = config.schedule == "auto"
        self.best_state: dict | None = None
        self.since_best = 0

    def due(self, state: TrainState) -> bool:
        it = state.iteration
        if it == state.config.iterations:
            return True
        every = state.eval_every or self.cfg.eval_every
        if not every:  # first evaluation, to measure what one costs
            return it == max(10, min(50, state.config.iterations // 20))
        if not state.val_history:
            return it % every == 0
        return it - state.val_history[-1]["iteration"] >= every

    def run(self, model: torch.nn.Module, state: TrainState, lr: float, seconds_per_iter: float):
        """Evaluate; keep the best; return 'drop', 'stop' or None."""
        t = time.time()
        model.eval()
        try:
            ap = float(self.evaluate(model))
        finally:
            model.train()
        spent = time.time() - t
        if not self.cfg.eval_every:
            # evaluation costs about a tenth of the training between two evaluations, re-measured at each one:
            # the first (a barely trained model, many low-score detections) costs several times what later ones do
            n = math.ceil(10 * spent / max(seconds_per_iter, 1e-6))
            state.eval_every = int(max(10, min(n, max(10, state.config.iterations // 5))))
        state.val_history.append({"iteration": state.iteration, "AP": round(ap, 3), "lr": lr,
                                  "time": round(time.time() - state.started, 2), "seconds": round(spent, 2)})
        if state.best is None or ap > state.best["AP"] + self.cfg.min_delta:
            state.best = {"iteration": state.iteration, "AP": round(ap, 3)}
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.since_best = 0
            return None
        self.since_best += 1
        if not self.plateau or self.since_best < self.cfg.patience:
            return None
        if self.after_first_decay and state.drops == 0:
            return None
        self.since_best = 0
        if state.drops < len(self.cfg.steps):
            return "drop"
        return "stop"


# settings that say how a run is kept and shown, not what it trains: a finished model stands
# whatever they were when it trained (a pipeline run again with another checkpoint interval)
BOOKKEEPING = ("checkpoint_every", "log_every")


def _what_trains(d: dict | None, nested: str | None = None) -> dict | None:
    """A saved config (or, with nested="config", a checkpoint's meta holding one) without BOOKKEEPING."""
    if d is None:
        return None
    if nested is not None:
        return {k: (_what_trains(v) if k == nested and isinstance(v, dict) else v) for k, v in d.items()}
    return {k: v for k, v in d.items() if k not in BOOKKEEPING}


def fit(model: torch.nn.Module, labeled, config: TrainConfig, *, pseudo=None, hooks: list[Hook] = (),
        device: str | torch.device = "cpu", checkpoint_path: str | os.PathLike | None = None, meta: dict | None = None,
        resume: bool = True, validate: Callable[[torch.nn.Module], float] | None = None) -> TrainState:
    """Train `model` for config.iterations minibatches (at most, with the plateau schedule).

    1. Batches come from `labeled` alone (teacher) or mix `labeled` and `pseudo` at config.ratio.
    2. With `validate` (model -> AP), the model is evaluated every config.eval_every iterations
       (automatic: about a tenth of the time), the best weights are kept and end up in the final
       checkpoint, and the plateau schedule drops the rate and stops on converged AP.
    3. With checkpoint_path, state is saved every config.checkpoint_every iterations, on
       cancellation and at the end; with resume, an existing checkpoint there is continued.
    4. Hooks see the TrainState after every iteration (progress bars, database rows, cancel checks).
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
    # torchvision's transform draws one of min_size for every training image and evaluates at the
    # last; the model's own sizes come back for every evaluation and at the end
    test_sizes = tuple(model.transform.min_size)
    train_sizes = training_sizes(int(test_sizes[-1]), config.train_scales or (1.0,))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    plateau = validate is not None and config.schedule in ("auto", "plateau")
    if config.schedule == "plateau" and validate is None:
        raise ValueError("the plateau schedule needs a validation set")
    state = TrainState(config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, config, state.drops if plateau else None))
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if validate is not None:
        validate = _at_sizes(validate, test_sizes, train_sizes)
    validation = Validation(validate, config, plateau) if validate is not None else None

    if resume and checkpoint_path and os.path.exists(checkpoint_path):
        ckpt = read_checkpoint(checkpoint_path)
        # the same settings and inputs (the same files, by their digests) as the saved run's
        same = _what_trains(ckpt.get("config")) == _what_trains(plain(config.to_dict())) and \
            _what_trains(ckpt["meta"], "config") == _what_trains(plain(meta or {}), "config")
        if "optimizer" not in ckpt and same and meta is not None and "inputs" in meta:
            # finished earlier with these very settings and inputs (a pipeline run again after it
            # stopped): its weights and curves stand, and nothing is trained twice
            return _finished(model, ckpt, config, hooks, device)
        # a run stopped part-way continues only on what it began with: with other settings or
        # inputs (new pseudo-labels, say) it starts over rather than finish the old model
        if "optimizer" in ckpt and same and ckpt.get("iteration", 0) < config.iterations:
            load_state(model, ckpt, os.path.basename(str(checkpoint_path)))
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            _restore(state, ckpt)
            if validation is not None and ckpt.get("best_model") is not None:
                validation.best_state = ckpt["best_model"]

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(final=False):
        if checkpoint_path and rank == 0:
            extra = {} if final else {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            if validation is not None:
                extra["validation"] = validation_summary(state)
                if not final and validation.best_state is not None:
                    extra["best_model"] = validation.best_state
            save_checkpoint(checkpoint_path, model, meta or {}, iteration=state.iteration, history=state.history,
                            config=config.to_dict(), **extra)

    # The sampler is deterministic: a resumed run skips the batches it has already trained on.
    sampler.skip = state.iteration
    workers = config.num_workers if config.num_workers is not None else (2 if device.type == "cuda" else 0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **loader_kwargs(workers),
                        pin_memory=device.type == "cuda", persistent_workers=False)
    for h in hooks:
        h.before_train(state)
    state.started = time.time() - (state.history[-1]["time"] if state.history else 0)
    model.transform.min_size = train_sizes
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
            if plateau and scheduled_drops(state.iteration, config) > state.drops:
                # the step schedule's decays count as drops; patience counts afresh after each
                state.drops = scheduled_drops(state.iteration, config)
                validation.since_best = 0
            if validation is not None and rank == 0 and validation.due(state):
                seconds_per_iter = (time.time() - state.started - sum(v["seconds"] for v in state.val_history)) \
                    / max(state.iteration, 1)
                decision = validation.run(model, state, optimizer.param_groups[0]["lr"], seconds_per_iter)
                if decision == "drop":
                    state.drops += 1  # the scheduler's lambda reads it from the next step on
                elif decision == "stop":
                    state.stopped = (f"validation AP converged: no gain of {config.min_delta} AP in {config.patience} "
                                     f"evaluations after {state.drops} rate drops")
            for h in hooks:
                h.after_step(state)
            if config.checkpoint_every and state.iteration % config.checkpoint_every == 0:
                save()
            if state.stopped:
                raise StopTraining()
    except StopTraining:
        pass
    except Cancelled:
        save()
        raise
    finally:
        model.transform.min_size = test_sizes
    if state.iteration >= config.iterations and not state.stopped and validation is not None:
        state.stopped = "reached the iteration bound" + (" while validation AP was still improving"
                                                         if validation.since_best == 0 else "")
    if validation is not None and validation.best_state is not None:
        model.load_state_dict(validation.best_state)  # the final checkpoint holds the best weights
    model.eval()
    for h in hooks:
        h.after_train(state)
    save(final=True)
    return state


def _at_sizes(validate: Callable[[torch.nn.Module], float], test_sizes: tuple, train_sizes: tuple):
    """`validate` run at the model's own sizes, from inside a loop that trains at train_sizes."""
    def run(model: torch.nn.Module) -> float:
        model.transform.min_size = test_sizes
        try:
            return validate(model)
        finally:
            model.transform.min_size = train_sizes
    return run


def _restore(state: TrainState, ckpt: dict) -> dict:
    """Put a checkpoint's progress back into `state` (iteration, loss history, validation curve);
    returns its validation summary."""
    v = ckpt.get("validation") or {}
    state.iteration, state.history = ckpt.get("iteration", 0), ckpt.get("history", [])
    state.val_history, state.best = v.get("history", []), v.get("best")
    state.drops, state.eval_every = v.get("drops", 0), v.get("eval_every", 0)
    return v


def _finished(model: torch.nn.Module, ckpt: dict, config: TrainConfig, hooks, device) -> TrainState:
    """The TrainState of a final checkpoint, its weights loaded into `model`; hooks see it end."""
    state = TrainState(config=config, already_trained=True)
    state.stopped = _restore(state, ckpt).get("stopped", "")
    state.started = time.time() - (state.history[-1]["time"] if state.history else 0)
    load_state(model, ckpt)
    model.to(device).eval()
    for h in hooks:
        h.before_train(state)
        h.after_train(state)
    return state


def validation_summary(state: TrainState) -> dict:
    """What the validation curve says, stored in the checkpoint and shown next to the loss."""
    return {"history": state.val_history, "best": state.best, "drops": state.drops, "eval_every": state.eval_every,
            "stopped": state.stopped, "last_AP": state.val_history[-1]["AP"] if state.val_history else None,
            "iterations": state.iteration}
