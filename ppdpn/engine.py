"""train_one_epoch() and evaluate(): the only place that runs autocast and the scaler."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import paddle
import paddle.nn.functional as F

from ppdpn import dist
from ppdpn.config import AMPConfig


class NonFiniteLossError(RuntimeError):
    """Loss became NaN/inf (fp32) or AMP skipped too many steps in a row."""


@dataclass
class Amp:
    """One AMP path: the autocast context and the scaler, built once from config."""
    enabled: bool
    level: str
    dtype: str
    scaler: Optional[paddle.amp.GradScaler]
    eval_fp32: bool
    use_promote: bool = True  # Paddle applies it under O2 only

    def autocast(self, training: bool = True):
        if not self.enabled or (not training and self.eval_fp32):
            return nullcontext()
        return paddle.amp.auto_cast(enable=True, level=self.level, dtype=self.dtype,
                                    use_promote=self.use_promote)

    def loss_scale(self) -> float:
        return float(self.scaler._scale.item()) if self.scaler is not None else 1.0


def build_amp(cfg: AMPConfig, use_gpu: bool, log=print) -> Amp:
    if cfg.use_amp and not use_gpu:
        # Paddle registers no fp16/bf16 conv/BN kernels on CPU: autocast is a no-op there.
        log("[amp] AMP requested but the device is CPU: Paddle runs it as a no-op; training in fp32")
    enabled = cfg.use_amp and use_gpu
    scaler = None
    if enabled and cfg.dtype == "float16":  # bf16 has fp32's range: no loss scaling needed
        scaler = paddle.amp.GradScaler(init_loss_scaling=cfg.scale_loss,
                                       use_dynamic_loss_scaling=cfg.use_dynamic_loss_scaling)
    return Amp(enabled, cfg.level, cfg.dtype, scaler, cfg.eval_fp32, cfg.use_promote)


def soft_cross_entropy(logits, targets, valid):
    """Mean over valid samples of -sum(t * log_softmax); padding rows weigh zero."""
    logp = F.log_softmax(logits.astype("float32"), axis=-1)
    per_sample = -(targets * logp).sum(axis=-1)
    return (per_sample * valid).sum() / paddle.clip(valid.sum(), min=1.0)


@dataclass
class TrainState:
    """What the loop advances and the checkpoint restores."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = -1.0
    skipped_in_a_row: int = 0
    history: list = field(default_factory=list)


@dataclass
class StepWindow:
    """Device-side values between progress lines, so a step needs no host sync."""
    loss_sum: object = None
    bad: list = field(default_factory=list)  # per step: 1.0 where non-finite / skipped

    @property
    def count(self) -> int:
        return len(self.bad)

    def add(self, loss, finite):
        self.loss_sum = loss.detach() if self.loss_sum is None else self.loss_sum + loss.detach()
        self.bad.append(paddle.logical_not(finite).astype("float32").reshape([]))


def optimizer_steps(loader_steps: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of `loader_steps` batches; the last may take fewer."""
    return -(-loader_steps // accum_steps)


def train_one_epoch(model, loader, optimizer, lr_scheduler, amp: Amp, state: TrainState, *,
                    num_classes: int, mix: Callable, seed: int, label_smoothing: float,
                    mixup_alpha: float, cutmix_alpha: float, print_interval: int,
                    max_skipped: int, stop_requested: Callable[[], bool], on_step: Callable,
                    log_progress: Callable, max_steps: int = 0, accum_steps: int = 1) -> str:
    """Train until the epoch ends ('epoch_end'), a stop is agreed ('stopped') or
    max_steps is reached ('max_steps').

    A step is `accum_steps` batches of the loader (gradient accumulation): each batch's
    loss weighs 1/n, n being the batches of its step (the epoch's last step may have
    fewer), and only the step's last backward all-reduces. TrainState, the LR schedule,
    checkpoints, print_interval and max_steps count steps; the loader resumes at batch
    state.step_in_epoch * accum_steps.

    `stop_requested` is this rank's own flag (a signal arrived). All ranks must stop at
    the same step, so the flags are combined at a host sync: every step with one rank
    (free), else at each progress flush, whose all-reduce carries them: a per-step
    collective would make the host wait for the device every step."""
    model.train()
    alone = dist.context().world_size == 1
    batches = loader.steps_per_epoch
    steps = optimizer_steps(batches, accum_steps)
    window, t_data, t_compute = StepWindow(), 0.0, 0.0
    step_loss, step_finite, in_step = None, None, 0
    tick = time.perf_counter()
    first = state.step_in_epoch * accum_steps
    for batch, (images, labels, valid) in enumerate(loader.epoch(state.epoch, start_step=first), first):
        t0 = time.perf_counter()
        t_data += t0 - tick
        n = min(accum_steps, batches - state.step_in_epoch * accum_steps)  # batches in this step
        in_step += 1
        # Augmentation randomness depends only on (seed, epoch, batch): exact on resume.
        rng = np.random.default_rng([seed, state.epoch, batch])
        images, targets = mix(images, labels, num_classes, mixup_alpha, cutmix_alpha,
                              label_smoothing, rng)
        with dist.gradient_sync(model, sync=in_step == n):
            with amp.autocast(training=True):
                logits = model(images)
            loss = soft_cross_entropy(logits, targets, valid)
            part = loss / n if n > 1 else loss
            (amp.scaler.scale(part) if amp.scaler is not None else part).backward()
        step_loss = part.detach() if step_loss is None else step_loss + part.detach()
        if amp.scaler is None:
            ok = paddle.isfinite(loss)
            step_finite = ok if step_finite is None else paddle.logical_and(step_finite, ok)
        if in_step < n:
            t_compute += (tick := time.perf_counter()) - t0
            continue
        step_finite = _update(optimizer, amp, step_finite)
        lr_scheduler.step()
        window.add(step_loss, step_finite)
        step_loss, step_finite, in_step = None, None, 0
        state.step_in_epoch += 1
        state.global_step += 1
        t_compute += (tick := time.perf_counter()) - t0
        last = state.step_in_epoch == steps
        done = "max_steps" if max_steps and state.global_step >= max_steps else None
        stop, asked = False, stop_requested()  # read once: the flag can rise any time
        if window.count == print_interval or last or done or (alone and asked):
            stop = _flush_window(window, amp, state, max_skipped, log_progress, t_data,
                                 t_compute, asked)
            window, t_data, t_compute = StepWindow(), 0.0, 0.0
        on_step(state)
        if done:
            return done
        if stop:
            return "stopped"
    return "epoch_end"


def _update(optimizer, amp: Amp, finite):
    """The optimizer step on the accumulated gradients, which it then clears; returns
    whether the step was finite (under the fp16 scaler: taken rather than skipped)."""
    if amp.scaler is not None:
        amp.scaler.step(optimizer)  # skips the update on inf/nan grads
        finite = paddle.logical_not(amp.scaler._found_inf)
        amp.scaler.update()
    else:
        optimizer.step()
    optimizer.clear_grad()
    return finite


def _flush_window(window, amp, state, max_skipped, log_progress, t_data, t_compute,
                  stop_here: bool) -> bool:
    """The one host sync per print interval: reduce, check finiteness, report; returns
    whether any rank asked to stop (`stop_here` is this rank's flag).

    Steps are judged over all ranks (a step is bad when it is bad on any rank), so every
    rank raises at the same flush and none is left waiting in a collective."""
    bad_local = paddle.stack(window.bad).numpy()
    loss_mean = float(window.loss_sum.item()) / window.count
    sums = dist.all_reduce_sum([float(stop_here), loss_mean, t_data, t_compute, *bad_local])
    stop, sums = bool(sums[0] > 0), sums[1:]
    world = dist.context().world_size
    bad = sums[3:] > 0
    first_step = state.global_step - window.count + 1  # global step of the window's first
    if bad.any() and amp.scaler is None:
        raise NonFiniteLossError(
            f"non-finite loss at step {first_step + int(np.argmax(bad))}; lower "
            f"Optimizer.lr.learning_rate, add warmup (Optimizer.lr.warmup_epoch) or check the data")
    if bad.any():
        run, limit_at = state.skipped_in_a_row, None
        for i, b in enumerate(bad):  # skips in a row, carried over from earlier windows
            run = run + 1 if b else 0
            if run >= max_skipped and limit_at is None:
                limit_at = first_step + i
        state.skipped_in_a_row = run
        log_progress(state, None, {"skipped_steps": int(bad.sum())})
        if limit_at is not None:
            raise NonFiniteLossError(
                f"AMP skipped {max_skipped} steps in a row (overflow) by step {limit_at}; "
                f"raise Global.max_skipped_steps, lower the LR or check the data")
    else:
        state.skipped_in_a_row = 0
    log_progress(state, window.count, {"loss": sums[0] / world, "data_s": sums[1] / world,
                                       "compute_s": sums[2] / world,
                                       "loss_scale": amp.loss_scale()})
    return stop


@paddle.no_grad()
def evaluate(model, loader, amp: Amp) -> dict:
    """Loss, top-1 and top-5 over every val image once; padding is not counted."""
    model.eval()
    sums = None
    for images, labels, valid in loader.epoch(0):
        with amp.autocast(training=False):
            logits = model(images)
        logits = logits.astype("float32")
        loss = F.cross_entropy(logits, labels.unsqueeze(-1), reduction="none").reshape([-1])
        k = min(5, logits.shape[-1])
        topk = paddle.topk(logits, k=k, axis=-1)[1]
        hit = (topk == labels.unsqueeze(-1)).astype("float32")
        batch = paddle.stack([(loss * valid).sum(), (hit[:, 0] * valid).sum(),
                              (hit.sum(axis=-1) * valid).sum(), valid.sum()])
        sums = batch if sums is None else sums + batch
    total = dist.all_reduce_sum(sums.numpy())
    n = max(total[3], 1.0)
    return {"top1": total[1] / n, "top5": total[2] / n, "loss": total[0] / n, "images": int(total[3])}
