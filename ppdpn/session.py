"""What a training run keeps around the loop: seeding, resume, saving, signals, progress."""
from __future__ import annotations

import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import paddle

from ppdpn import dist
from ppdpn.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint,
                              load_optimizer_state, optimizer_state, save_checkpoint)
from ppdpn.config import code_version


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
    if deterministic and paddle.is_compiled_with_cuda():
        # cuDNN picks non-deterministic algorithms otherwise. CPU kernels are deterministic
        # as they are (the flag does not exist on the CPU build).
        paddle.set_flags({"FLAGS_cudnn_deterministic": True})


# ---------------------------------------------------------------- resume

def _rng_states() -> dict:
    st = np.random.get_state()
    return {"numpy": [st[0], st[1], int(st[2]), int(st[3]), float(st[4])],
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0]}


def _set_rng_states(states: dict) -> None:
    if not states:
        return
    n = states["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate((states["python_version"], tuple(states["python"]), None))


def global_batch(cfg) -> int:
    """Samples per optimizer step over all ranks: what the LR is scaled by and the
    unit of the steps in TrainState."""
    return cfg.DataLoader.batch_size * dist.context().world_size * cfg.Global.accum_steps


def build_state_dict(cfg, model, optimizer, amp, state, steps_per_epoch: int) -> dict:
    m = dist.unwrap(model)
    world = dist.context().world_size
    return {
        "model": {k: v.numpy() for k, v in m.state_dict().items()},
        "optimizer": optimizer_state(getattr(optimizer, "_inner_opt", optimizer), m),
        "scaler": amp.scaler.state_dict() if amp.scaler is not None else None,
        "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step, "best_metric": state.best_metric,
        "rng": _rng_states(), "config": cfg.to_dict(), "code_version": code_version(),
        "world_size": world,
        # The position in the epoch is in steps of this batch (resume on another
        # world size converts it, see reposition()).
        "global_batch": global_batch(cfg), "steps_per_epoch": steps_per_epoch,
        "arch": cfg.Arch.name,
    }


def reposition(step_in_epoch: int, old_batch: int, old_steps: Optional[int],
               new_batch: int, new_steps: int) -> int:
    """The step of the interrupted epoch to resume at when the global batch changed
    (other world size, DataLoader.batch_size or Global.accum_steps): by samples, rounded
    down, so at most one global batch is trained again. A finished epoch stays finished.

    What the rest of that epoch reads: the epoch's permutation `order` depends only on
    (seed, epoch) (ppdpn/data/plan.py), and ShardPlan gives rank r of W the contiguous
    block order[r*P:(r+1)*P], P = ceil(N / W), read b at a time (b: samples per rank and
    step, batch_size x accum_steps). After k steps on W ranks the epoch has read the
    union over r of order[r*P : r*P + k*b].
    The resumed run (W', b', P') starts at k' = k*W*b // (W'*b') and reads the union
    over r' of order[r'*P' + k'*b' : (r'+1)*P']. So the epoch still trains on about N
    samples (k*W*b - k'*W'*b' < W'*b' of them twice), but unless the blocks line up some
    samples are read twice and as many are skipped. Example, N=64, b=b'=8, 2 -> 1 rank
    after k=3: read order[0:24] and order[32:56], then order[48:64]: order[48:56] twice,
    order[24:32] not in this epoch. Later epochs read every sample once again.
    """
    if old_steps is not None and step_in_epoch >= old_steps:
        return new_steps
    return min(step_in_epoch * old_batch // new_batch, new_steps)


def resume(cfg, model, optimizer, amp, state, steps_per_epoch: int, log=print):
    """Restore from Global.checkpoints, else the output dir's latest valid checkpoint."""
    path = cfg.Global.checkpoints
    if not path and cfg.Global.auto_resume:
        path = latest_checkpoint(cfg.Global.output_dir, log=log)
    if not path:
        return None
    from ppdpn import paddleclas_files
    if paddleclas_files.is_checkpoint_prefix(path):  # PaddleClas's output/DPN68/latest
        path, ckpt = paddleclas_files.resume_from_prefix(path, cfg, dist.unwrap(model), steps_per_epoch,
                                                         global_batch(cfg), log=log)
    else:
        ckpt = load_checkpoint(path)
    if ckpt.get("arch") not in (None, cfg.Arch.name):
        raise CheckpointError(f"{path} holds a {ckpt['arch']} model, the config asks for {cfg.Arch.name}")
    _check_resumable(ckpt, path)
    m = dist.unwrap(model)
    _check_same_tensors(m, ckpt["model"], path)
    m.set_state_dict({k: paddle.to_tensor(v) for k, v in ckpt["model"].items()})
    try:
        load_optimizer_state(optimizer, m, ckpt["optimizer"])
        if amp.scaler is not None and ckpt.get("scaler"):
            amp.scaler.load_state_dict(ckpt["scaler"])
        _set_rng_states(ckpt.get("rng"))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: optimizer/scaler/RNG state does not fit this run "
                              f"({type(e).__name__}: {str(e)[:200]})") from e
    for key in ("epoch", "step_in_epoch", "global_step", "best_metric"):
        setattr(state, key, ckpt[key])
    was = ckpt.get("world_size", 1)
    log(f"[resume] {path}: epoch {state.epoch + 1}, step {state.step_in_epoch} of the epoch, "
        f"global step {state.global_step}")
    _convert_position(ckpt, state, cfg, steps_per_epoch, was, log)
    return str(path)


def _convert_position(ckpt, state, cfg, steps_per_epoch, was, log) -> None:
    """Another global batch: the same samples done -> the step numbers of this run."""
    world = dist.context().world_size
    new_batch = global_batch(cfg)
    # Checkpoints from before "global_batch" was recorded: rebuild it from their config.
    old_batch = ckpt.get("global_batch") or ckpt["config"]["DataLoader"]["batch_size"] * was
    old_steps = ckpt.get("steps_per_epoch")
    if old_batch == new_batch and old_steps in (None, steps_per_epoch):
        if was != world:
            log(f"[resume] saved with {was} processes, now {world}: same global batch and "
                f"step; the rest of this epoch is re-sharded (see session.reposition)")
        return
    step = reposition(state.step_in_epoch, old_batch, old_steps, new_batch, steps_per_epoch)
    before = (state.step_in_epoch, state.global_step)
    state.step_in_epoch = step
    state.global_step = state.epoch * steps_per_epoch + step
    log(f"[resume] global batch {old_batch} ({was} processes, {old_steps} steps/epoch) -> "
        f"{new_batch} ({world} processes, {steps_per_epoch} steps/epoch): step "
        f"{before[0]} of epoch {state.epoch + 1} -> {step}, global step {before[1]} -> "
        f"{state.global_step}, the LR schedule continues at the same fraction of training; "
        f"the rest of this epoch is re-sharded, some samples of it are read twice and as "
        f"many skipped (see session.reposition)")


def _check_resumable(ckpt, path) -> None:
    """Counters present and of the right type: a checkpoint of another program, or an
    edited one, must fail here by name, not as a KeyError deep in the loop."""
    def bad(key, ok):
        value = ckpt.get(key)
        return f"entry {key!r} is missing or invalid ({type(value).__name__})" if not ok(value) else ""

    def count(v, low=0):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    config = ckpt.get("config")
    problems = [bad(k, count) for k in ("epoch", "step_in_epoch", "global_step")] + [
        bad("best_metric", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
        bad("optimizer", lambda v: isinstance(v, dict)),
        bad("global_batch", lambda v: v is None or count(v, 1)),
        bad("steps_per_epoch", lambda v: v is None or count(v, 1))]
    if ckpt.get("global_batch") is None and not (
            isinstance(config, dict) and isinstance(config.get("DataLoader"), dict)
            and count(config["DataLoader"].get("batch_size"), 1)):
        problems.append("records neither its global batch nor its config")
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{path} is not a resumable ppdpn checkpoint: {'; '.join(problems)}")


def _check_same_tensors(model, weights: dict, path) -> None:
    """Paddle's set_state_dict only warns about missing or misshapen entries and keeps
    the random init for them: a resume must load every tensor or none."""
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    shape = [f"{k} {list(weights[k].shape)} != {own[k]}" for k in own
             if k in weights and list(weights[k].shape) != own[k]]
    problems = [f"{title}: {', '.join(items[:5])}" + (f" ... ({len(items)})" if len(items) > 5 else "")
                for title, items in (("missing", missing), ("unexpected", extra), ("shape", shape))
                if items]
    if problems:
        raise CheckpointError(f"{path} does not fit the model: " + "; ".join(problems))


def _check_finite_weights(model, state) -> None:
    from ppdpn.engine import NonFiniteLossError
    flags = [paddle.isfinite(p).all().astype("int32") for p in dist.unwrap(model).parameters()]
    if int(paddle.stack(flags).sum().item()) != len(flags):
        raise NonFiniteLossError(f"weights are non-finite after step {state.global_step}; "
                                 f"lower Optimizer.lr.learning_rate, add warmup "
                                 f"(Optimizer.lr.warmup_epoch) or check the data")


def check_finite_eval(metrics: dict, state) -> None:
    """Finite weights can still compute NaN (e.g. BN statistics grown huge): such a model
    must not become a checkpoint, as best or otherwise."""
    from ppdpn.engine import NonFiniteLossError
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteLossError(f"eval loss is non-finite after step {state.global_step}; "
                                 f"lower Optimizer.lr.learning_rate, add warmup "
                                 f"(Optimizer.lr.warmup_epoch) or check the data")


class Saver:
    """Collective BN sync + rank-0 atomic checkpoint writes."""

    def __init__(self, cfg, model, optimizer, amp, log, steps_per_epoch: int):
        self.cfg, self.model, self.optimizer, self.amp, self.log = cfg, model, optimizer, amp, log
        self.steps_per_epoch = steps_per_epoch
        self.ckpt_dir = Path(cfg.Global.output_dir) / "checkpoints"

    def maybe_save_steps(self, state) -> None:
        n = self.cfg.Global.save_steps
        if n and state.global_step % n == 0:
            self.save(state, reason=f"every {n} steps")

    def save(self, state, is_best: bool = False, reason: str = "") -> None:
        _check_finite_weights(self.model, state)  # never replace a good checkpoint with NaNs
        dist.average_buffers(self.model)  # all ranks: checkpoint the averaged BN statistics
        if not dist.context().is_main:
            return
        try:
            blob = build_state_dict(self.cfg, self.model, self.optimizer, self.amp, state,
                                    self.steps_per_epoch)
            path = save_checkpoint(blob, self.ckpt_dir, self.cfg.Global.keep_last, is_best,
                                   log=self.log.info)
            if is_best:
                self._write_paddleclas_best()
        except CheckpointError as e:
            if self.cfg.Global.on_save_error == "stop":
                raise
            self.log.info(f"[checkpoint] save failed, continuing (Global.on_save_error=continue): {e}")
            return
        self.log.info(f"[checkpoint] {path}" + (f" ({reason})" if reason else "") + (" best" if is_best else ""))

    def _write_paddleclas_best(self) -> None:
        """The best weights also in PaddleClas's .pdparams layout, for PaddleClas users."""
        from ppdpn.models.weights import to_paddleclas_state_dict
        out = Path(self.cfg.Global.output_dir) / "best_model.pdparams"
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            paddle.save(to_paddleclas_state_dict(dist.unwrap(self.model), self.cfg.Arch.name), str(tmp))
            os.replace(tmp, out)
        except OSError as e:
            raise CheckpointError(f"cannot write {out}: {e}") from e


# ---------------------------------------------------------------- signals

class StopSignal:
    """Remembers that SIGUSR1/SIGTERM arrived; the loop stops after the current step."""

    def __init__(self, *signums):
        self.flag = False
        self.name = ""
        self._old = {s: signal.signal(s, self._handle) for s in signums}

    def _handle(self, signum, frame):
        self.flag = True
        self.name = signal.Signals(signum).name

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


# ---------------------------------------------------------------- progress

class Progress:
    """Turns the engine's per-window sums into progress lines and per-epoch records."""

    def __init__(self, cfg, steps_per_epoch: int, lr_sched, state, log):
        self.cfg, self.steps_per_epoch, self.lr_sched, self.log = cfg, steps_per_epoch, lr_sched, log
        self.start_step = state.global_step
        self.t_start = self.t_window = self.t_epoch = time.perf_counter()
        self.epoch_losses = []
        self.state = state

    def report(self, state, count, values) -> None:
        if count is None:
            self.log.info(f"[amp] overflow: skipped {values['skipped_steps']} step(s) up to "
                          f"step {state.global_step}")
            return
        now = time.perf_counter()
        img_s = count * global_batch(self.cfg) / max(now - self.t_window, 1e-9)
        busy = values["data_s"] + values["compute_s"]
        self.t_window = now
        self.epoch_losses.append((values["loss"], count))
        self.log.progress(epoch=state.epoch, epochs=self.cfg.Global.epochs, step=state.step_in_epoch,
                          steps=self.steps_per_epoch, global_step=state.global_step,
                          total_steps=self.cfg.Global.epochs * self.steps_per_epoch,
                          loss=values["loss"], lr=self.lr_sched.get_lr(), img_s=img_s,
                          data_frac=values["data_s"] / max(busy, 1e-9),
                          loss_scale=values["loss_scale"], elapsed=now - self.t_start,
                          done_in_run=state.global_step - self.start_step)

    def end_epoch(self, metrics) -> None:
        now = time.perf_counter()
        n = sum(c for _, c in self.epoch_losses)
        train_loss = sum(l * c for l, c in self.epoch_losses) / n if n else None
        record = {"epoch": self.state.epoch, "global_step": self.state.global_step,
                  "train_loss": train_loss, "lr": self.lr_sched.get_lr(),
                  "epoch_time_s": round(now - self.t_epoch, 3)}
        if metrics is not None:
            record.update({f"eval_{k}": v for k, v in metrics.items()})
            self.log.info(f"[eval] epoch {self.state.epoch}: top1 {metrics['top1']:.4f} "
                          f"top5 {metrics['top5']:.4f} loss {metrics['loss']:.4f} "
                          f"({metrics['images']} images)")
        self.log.epoch_record(record)
        self.epoch_losses, self.t_epoch = [], now


def log_sample_images(loader, log, cfg) -> None:
    """A few augmented training inputs to VisualDL at the start of a run."""
    if log.writer is None:
        return
    from ppdpn.data.base import IMAGENET_MEAN, IMAGENET_STD
    for images, _, _ in loader.epoch(0):
        arr = images.numpy()
        if cfg.DataLoader.output_layout == "NHWC":
            arr = arr.transpose(0, 3, 1, 2)
        log.images("train/input", arr.astype(np.float32), IMAGENET_MEAN, IMAGENET_STD)
        break
