"""What a training run keeps around the loop: seeding, resume, saving, signals, progress."""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

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


def build_state_dict(cfg, model, optimizer, amp, state) -> dict:
    m = dist.unwrap(model)
    return {
        "model": {k: v.numpy() for k, v in m.state_dict().items()},
        "optimizer": optimizer_state(getattr(optimizer, "_inner_opt", optimizer), m),
        "scaler": amp.scaler.state_dict() if amp.scaler is not None else None,
        "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step, "best_metric": state.best_metric,
        "rng": _rng_states(), "config": cfg.to_dict(), "code_version": code_version(),
        "world_size": dist.context().world_size,
        "arch": cfg.Arch.name,
    }


def resume(cfg, model, optimizer, amp, state, log=print):
    """Restore from Global.checkpoints, else the output dir's latest valid checkpoint."""
    path = cfg.Global.checkpoints
    if not path and cfg.Global.auto_resume:
        path = latest_checkpoint(cfg.Global.output_dir, log=log)
    if not path:
        return None
    ckpt = load_checkpoint(path)
    if ckpt.get("arch") not in (None, cfg.Arch.name):
        raise CheckpointError(f"{path} holds a {ckpt['arch']} model, the config asks for {cfg.Arch.name}")
    m = dist.unwrap(model)
    m.set_state_dict({k: paddle.to_tensor(v) for k, v in ckpt["model"].items()})
    load_optimizer_state(optimizer, m, ckpt["optimizer"])
    if amp.scaler is not None and ckpt.get("scaler"):
        amp.scaler.load_state_dict(ckpt["scaler"])
    for key in ("epoch", "step_in_epoch", "global_step", "best_metric"):
        setattr(state, key, ckpt[key])
    _set_rng_states(ckpt.get("rng"))
    was = ckpt.get("world_size", 1)
    note = (f" (saved with {was} processes, now {dist.context().world_size}: the rest of "
            f"this epoch is re-sharded over the new ranks)") if was != dist.context().world_size else ""
    log(f"[resume] {path}: epoch {state.epoch + 1}, step {state.step_in_epoch} of the epoch, "
        f"global step {state.global_step}{note}")
    return str(path)


def _check_finite_weights(model, state) -> None:
    from ppdpn.engine import NonFiniteLossError
    flags = [paddle.isfinite(p).all().astype("int32") for p in dist.unwrap(model).parameters()]
    if int(paddle.stack(flags).sum().item()) != len(flags):
        raise NonFiniteLossError(f"weights became non-finite before step {state.global_step}; "
                                 f"lower Optimizer.lr.learning_rate or add warmup")


class Saver:
    """Collective BN sync + rank-0 atomic checkpoint writes."""

    def __init__(self, cfg, model, optimizer, amp, log):
        self.cfg, self.model, self.optimizer, self.amp, self.log = cfg, model, optimizer, amp, log
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
            blob = build_state_dict(self.cfg, self.model, self.optimizer, self.amp, state)
            path = save_checkpoint(blob, self.ckpt_dir, self.cfg.Global.keep_last, is_best)
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

    def __init__(self, cfg, loader, lr_sched, state, log):
        self.cfg, self.loader, self.lr_sched, self.log = cfg, loader, lr_sched, log
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
        world = dist.context().world_size
        img_s = count * self.cfg.DataLoader.batch_size * world / max(now - self.t_window, 1e-9)
        busy = values["data_s"] + values["compute_s"]
        self.t_window = now
        self.epoch_losses.append((values["loss"], count))
        self.log.progress(epoch=state.epoch, epochs=self.cfg.Global.epochs, step=state.step_in_epoch,
                          steps=self.loader.steps_per_epoch, global_step=state.global_step,
                          total_steps=self.cfg.Global.epochs * self.loader.steps_per_epoch,
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
