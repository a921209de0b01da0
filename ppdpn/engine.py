"""train_one_epoch() and evaluate(): the only place that runs autocast and the scaler."""
from __future__ import annotations

import copy
import enum
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Optional

import numpy as np
import paddle
import paddle.nn.functional as F

from ppdpn import dist
from ppdpn.config import AMPConfig, GlobalConfig


class NonFiniteLossError(RuntimeError):
    """Loss became NaN/inf (fp32) or AMP skipped too many steps in a row."""


def non_finite(what: str) -> NonFiniteLossError:
    """The error for a non-finite loss, weight or eval loss, with what to try."""
    return NonFiniteLossError(f"{what}; lower Optimizer.lr.learning_rate, add warmup "
                              f"(Optimizer.lr.warmup_epoch) or check the data")


class Outcome(str, enum.Enum):
    """Why train_one_epoch returned (a str, so it compares equal to its value)."""
    EPOCH_END = "epoch_end"
    STOPPED = "stopped"      # a stop signal reached some rank; all stopped at this step
    MAX_STEPS = "max_steps"  # Global.max_steps reached


def _nothing(*args) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """What the loop tells the run, and the one thing it asks it."""
    # (state, steps in the window, {loss, data_s, compute_s, loss_scale}); compute_s is
    # the window's wall time but the data wait, so it includes the hooks' own time
    progress: Callable = _nothing
    overflow: Callable = _nothing     # (state, AMP steps skipped in the window)
    after_step: Callable = _nothing   # (state): e.g. the every-N-steps checkpoint
    stop_requested: Callable[[], bool] = lambda: False  # this rank's own flag


@dataclass
class Amp:
    """One AMP path: the autocast context, the scaler, the O2 decoration and the precision
    of eval, built once from config. Disabled (fp32 everywhere) on a CPU."""
    enabled: bool
    level: str
    dtype: str
    scaler: Optional[paddle.amp.GradScaler]
    eval_fp32: bool
    master_grad: bool = False
    use_promote: bool = True  # Paddle applies it under O2 only

    def autocast(self, training: bool = True):
        if not self.enabled or (not training and self.eval_fp32):
            return nullcontext()
        return paddle.amp.auto_cast(enable=True, level=self.level, dtype=self.dtype,
                                    use_promote=self.use_promote)

    def loss_scale(self) -> Optional[float]:
        """The fp16 loss scale; None without a scaler (fp32, bf16)."""
        return float(self.scaler._scale.item()) if self.scaler is not None else None

    @property
    def pure(self) -> bool:
        """O2: parameters themselves are fp16/bf16, with fp32 master copies in the optimizer."""
        return self.enabled and self.level == "O2"

    def decorate(self, model, optimizer=None):
        """Under O2, cast the model's parameters (BatchNorm's stay fp32) and give the
        optimizer fp32 master weights; master_grad keeps fp32 gradients too. Returns
        (model, optimizer), or the model alone for eval-only: the model eval runs under
        O2 autocast is decorated as in training, an fp32 eval's is left in fp32.
        Checkpoints take the master copies, not the cast parameters (fp32_weights)."""
        wanted = self.pure and (optimizer is not None or not self.eval_fp32)
        if wanted:
            return paddle.amp.decorate(model, optimizer, level="O2", dtype=self.dtype,
                                       master_grad=self.master_grad)
        return model if optimizer is None else (model, optimizer)

    def eval_model(self, model, optimizer=None):
        """The model evaluate() runs: `model` itself, except for an fp32 eval (eval_fp32)
        of an O2 model, whose parameters are fp16/bf16: then an fp32 copy loaded with the
        optimizer's master weights, so "fp32 eval" means fp32 weights and fp32 inputs."""
        plain = dist.unwrap(model)
        if not (self.eval_fp32 and any(p.dtype != paddle.float32 for p in plain.parameters())):
            return model
        from ppdpn.checkpoint import fp32_weights, set_weights
        twin = copy.deepcopy(plain)
        twin.to(dtype="float32")
        set_weights(twin, fp32_weights(plain, optimizer))
        return twin


def build_amp(cfg: AMPConfig, use_gpu: bool, log=print, data_format: str = "NCHW") -> Amp:
    if cfg.use_amp and not use_gpu:
        # Paddle registers no fp16/bf16 conv/BN kernels on CPU: autocast is a no-op there.
        log("[amp] AMP requested but the device is CPU: Paddle has no fp16/bf16 kernels "
            "there; training and evaluating in fp32 (fp32 inputs, fp32 weights)")
    enabled = cfg.use_amp and use_gpu
    if use_gpu and data_format == "NHWC" and not enabled:
        # cuDNN runs Paddle's convolutions natively in NHWC for fp16/bf16 only; an fp32
        # NHWC conv is transposed to NCHW and back around every call.
        log("[perf] Arch.data_format=NHWC with AMP.use_amp=false: Paddle's fp32 convolutions "
            "run NCHW and transpose NHWC inputs at every conv; use NHWC with AMP, or "
            "Arch.data_format=NCHW + DataLoader.output_layout=NCHW in fp32")
    scaler = None
    if enabled and cfg.dtype == "float16":  # bf16 has fp32's range: no loss scaling needed
        scaler = paddle.amp.GradScaler(init_loss_scaling=cfg.scale_loss,
                                       use_dynamic_loss_scaling=cfg.use_dynamic_loss_scaling)
    return Amp(enabled, cfg.level, cfg.dtype, scaler, cfg.eval_fp32, cfg.master_grad,
               cfg.use_promote)


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
    # The epoch's reported training loss so far (sum over steps, and their count): in the
    # checkpoint, so an epoch resumed midway still reports the loss of all its steps.
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0


class TimedBatches:
    """The loader's batches, numbered, with the time spent waiting for them: the loop
    itself carries no timing. `take()` returns (data wait, everything else) in seconds
    since the last take and starts a new window."""

    def __init__(self, batches, first: int):
        self._batches = enumerate(batches, first)
        self._wait = 0.0
        self._since = time.perf_counter()

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self._wait += time.perf_counter() - t0

    def take(self) -> tuple:
        now = time.perf_counter()
        wait, wall = self._wait, now - self._since
        self._wait, self._since = 0.0, now
        return wait, wall - wait


@dataclass
class StepWindow:
    """Device-side values between progress lines, so a step needs no host sync."""
    loss_sum: object = None
    bad: list = field(default_factory=list)  # per step: 1.0 where non-finite / skipped

    @property
    def count(self) -> int:
        return len(self.bad)

    def add(self, loss, finite):
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.bad.append(paddle.logical_not(finite).astype("float32").reshape([]))


def optimizer_steps(loader_steps: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of `loader_steps` batches; the last may take fewer."""
    return -(-loader_steps // accum_steps)


def train_one_epoch(model, loader, optimizer, lr_scheduler, amp: Amp, state: TrainState,
                    run: GlobalConfig, augment: Callable, hooks: Hooks) -> Outcome:
    """Train until the epoch ends, a stop is agreed or run.max_steps is reached.

    A step is `run.accum_steps` batches of the loader (gradient accumulation; the
    epoch's last step may have fewer). TrainState, the LR schedule, checkpoints,
    print_interval and max_steps count steps; the loader resumes at batch
    state.step_in_epoch * accum_steps. `augment(images, labels, rng)` gives (images,
    soft targets).

    All ranks must stop at the same step, so the stop flags are combined at a host sync:
    every step with one rank (free), else at each progress flush, whose all-reduce
    carries them: a per-step collective would make the host wait for the device."""
    model.train()
    alone = dist.context().world_size == 1
    steps = optimizer_steps(loader.steps_per_epoch, run.accum_steps)
    first = state.step_in_epoch * run.accum_steps
    batches = TimedBatches(loader.epoch(state.epoch, start_step=first), first)
    window = StepWindow()
    while state.step_in_epoch < steps:
        n = min(run.accum_steps, loader.steps_per_epoch - state.step_in_epoch * run.accum_steps)
        loss, finite = _accumulate(model, amp, augment, islice(batches, n), n, run.seed, state.epoch)
        if loss is None:  # the loader ended early
            break
        window.add(loss, _update(optimizer, amp, finite))
        lr_scheduler.step()
        state.step_in_epoch += 1
        state.global_step += 1
        at_max = bool(run.max_steps) and state.global_step >= run.max_steps
        asked = hooks.stop_requested()  # read once: the flag can rise any time
        stop = False
        if (window.count == run.print_interval or state.step_in_epoch == steps or at_max
                or (alone and asked)):
            stop = _flush_window(window, amp, state, run.max_skipped_steps, hooks,
                                 batches.take(), asked)
            window = StepWindow()
        hooks.after_step(state)
        if at_max:
            return Outcome.MAX_STEPS
        if stop:
            return Outcome.STOPPED
    return Outcome.EPOCH_END


def _accumulate(model, amp: Amp, augment, micro_batches, n: int, seed: int, epoch: int):
    """Forward and backward of one step's `n` batches; each loss weighs 1/n and only the
    last backward all-reduces. Returns the step's loss and (fp32 only: the scaler judges
    fp16 steps) whether every batch's loss was finite, both on the device."""
    step_loss, finite = None, None
    for micro, (batch, (images, labels, valid)) in enumerate(micro_batches):
        # Augmentation randomness depends only on (seed, epoch, batch): exact on resume.
        images, targets = augment(images, labels, np.random.default_rng([seed, epoch, batch]))
        with dist.gradient_sync(model, sync=micro == n - 1):
            with amp.autocast(training=True):
                logits = model(images)
            loss = soft_cross_entropy(logits, targets, valid)
            part = loss / n if n > 1 else loss
            (amp.scaler.scale(part) if amp.scaler is not None else part).backward()
        step_loss = part.detach() if step_loss is None else step_loss + part.detach()
        if amp.scaler is None:
            ok = paddle.isfinite(loss)
            finite = ok if finite is None else paddle.logical_and(finite, ok)
    return step_loss, finite


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


def _flush_window(window, amp, state, max_skipped, hooks: Hooks, times, stop_here: bool) -> bool:
    """The one host sync per print interval: reduce, check finiteness, report; returns
    whether any rank asked to stop (`stop_here` is this rank's flag; `times` this
    window's data wait and compute seconds).

    Steps are judged over all ranks (a step is bad when it is bad on any rank), so every
    rank raises at the same flush and none is left waiting in a collective."""
    bad_local = paddle.stack(window.bad).numpy()
    loss_mean = float(window.loss_sum.item()) / window.count
    sums = dist.all_reduce_sum([float(stop_here), loss_mean, *times, *bad_local])
    stop, sums = bool(sums[0] > 0), sums[1:]
    world = dist.context().world_size
    bad = sums[3:] > 0
    first_step = state.global_step - window.count + 1  # global step of the window's first
    if bad.any() and amp.scaler is None:
        raise non_finite(f"non-finite loss at step {first_step + int(np.argmax(bad))}")
    _count_skips(bad, state, max_skipped, first_step, hooks)
    hooks.progress(state, window.count, {"loss": sums[0] / world, "data_s": sums[1] / world,
                                         "compute_s": sums[2] / world,
                                         "loss_scale": amp.loss_scale()})
    return stop


def _count_skips(bad, state, max_skipped: int, first_step: int, hooks: Hooks) -> None:
    """AMP overflow skips: reported, and counted in a row across windows; too many in a
    row end the run."""
    if not bad.any():
        state.skipped_in_a_row = 0
        return
    run, limit_at = state.skipped_in_a_row, None
    for i, b in enumerate(bad):  # skips in a row, carried over from earlier windows
        run = run + 1 if b else 0
        if run >= max_skipped and limit_at is None:
            limit_at = first_step + i
    state.skipped_in_a_row = run
    hooks.overflow(state, int(bad.sum()))
    if limit_at is not None:
        raise NonFiniteLossError(
            f"AMP skipped {max_skipped} steps in a row (overflow) by step {limit_at}; "
            f"raise Global.max_skipped_steps, lower the LR or check the data")


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
