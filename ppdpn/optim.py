"""Optimizer and learning-rate schedules, decayed per iteration."""
from __future__ import annotations

import math
from dataclasses import dataclass

import paddle

from ppdpn import dist
from ppdpn.config import Config, LRConfig, OptimizerConfig


@dataclass(frozen=True)
class Schedule:
    """LR as a pure function of the global step (so resume needs only the step)."""
    name: str
    base_lr: float          # after batch scaling
    total_steps: int
    warmup_steps: int
    warmup_start_lr: float
    eta_min: float
    boundaries: tuple       # Piecewise: global steps where the value changes
    values: tuple           # Piecewise: values (scaled like base_lr)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.warmup_start_lr + (self._after_warmup(self.warmup_steps) - self.warmup_start_lr) * frac
        return self._after_warmup(step)

    def _after_warmup(self, step: int) -> float:
        if self.name == "Piecewise":
            for boundary, value in zip(self.boundaries, self.values):
                if step < boundary:
                    return value
            return self.values[-1]
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(max(step - self.warmup_steps, 0), span) / span
        return self.eta_min + (self.base_lr - self.eta_min) * 0.5 * (1.0 + math.cos(math.pi * t))


def global_batch(cfg: Config) -> int:
    """Samples per optimizer step over all ranks: what the LR is scaled by and the
    unit of the steps in TrainState."""
    return cfg.DataLoader.batch_size * dist.context().world_size * cfg.Global.accum_steps


def lr_scale(lr_cfg: LRConfig, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): LR grows with the global batch."""
    return global_batch / lr_cfg.base_batch_size if lr_cfg.scale_with_batch else 1.0


def build_schedule(lr_cfg: LRConfig, epochs: int, steps_per_epoch: int, global_batch: int) -> Schedule:
    scale = lr_scale(lr_cfg, global_batch)
    warmup = lr_cfg.warmup_steps or int(round(lr_cfg.warmup_epoch * steps_per_epoch))
    return Schedule(
        name=lr_cfg.name,
        base_lr=lr_cfg.learning_rate * scale,
        total_steps=epochs * steps_per_epoch,
        warmup_steps=warmup,
        warmup_start_lr=lr_cfg.warmup_start_lr * scale,
        eta_min=lr_cfg.eta_min * scale,
        boundaries=tuple(e * steps_per_epoch for e in lr_cfg.decay_epochs),
        values=tuple(v * scale for v in lr_cfg.values),
    )


class ScheduleLR(paddle.optimizer.lr.LRScheduler):
    """Paddle scheduler view of a Schedule; `last_epoch` counts global steps."""

    def __init__(self, schedule: Schedule, start_step: int = 0):
        self.schedule = schedule
        super().__init__(learning_rate=schedule.lr_at(0), last_epoch=start_step - 1)

    def get_lr(self):
        return self.schedule.lr_at(self.last_epoch)

    def seek(self, step: int) -> None:
        """Continue at global step `step` (a resume): the next optimizer step uses its LR."""
        self.last_epoch = step - 1
        self.step()


def _no_decay(name: str, param) -> bool:
    """BN scale/shift and biases: 1-D parameters."""
    return len(param.shape) <= 1


def build_optimizer(model, opt_cfg: OptimizerConfig, lr_scheduler, multi_precision: bool):
    """SGD with momentum and L2 decay, optionally none on BN and bias."""
    params = [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]
    decay = paddle.regularizer.L2Decay(opt_cfg.weight_decay)
    if opt_cfg.no_decay_bn_bias:
        groups = [
            {"params": [p for n, p in params if not _no_decay(n, p)], "weight_decay": decay},
            {"params": [p for n, p in params if _no_decay(n, p)],
             "weight_decay": paddle.regularizer.L2Decay(0.0)},
        ]
    else:
        groups = [p for _, p in params]
    return paddle.optimizer.Momentum(
        learning_rate=lr_scheduler, momentum=opt_cfg.momentum, parameters=groups,
        weight_decay=decay, multi_precision=multi_precision)


@dataclass(frozen=True)
class Training:
    """The LR schedule, the optimizer and (AMP O2) the decorated model: built once, by
    build_training, for training and for --benchmark alike."""
    model: object       # not yet wrapped for data parallelism
    optimizer: object
    lr_sched: ScheduleLR
    global_batch: int


def build_training(cfg: Config, model, amp, steps_per_epoch: int, epochs: int) -> Training:
    """Schedule over `epochs` of `steps_per_epoch` optimizer steps, SGD on it, and under
    AMP O2 fp16/bf16 weights with fp32 master copies."""
    batch = global_batch(cfg)
    lr_sched = ScheduleLR(build_schedule(cfg.Optimizer.lr, epochs, steps_per_epoch, batch))
    optimizer = build_optimizer(model, cfg.Optimizer, lr_sched, multi_precision=amp.enabled)
    model, optimizer = amp.decorate(model, optimizer)  # O2 only (engine.Amp.decorate)
    return Training(model, optimizer, lr_sched, batch)
