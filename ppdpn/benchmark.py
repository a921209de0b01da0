"""`train.py --benchmark`: time the real training step on synthetic or real batches."""
from __future__ import annotations

import resource
import time

import numpy as np
import paddle

from ppdpn import dist
from ppdpn.engine import TrainState, train_one_epoch
from ppdpn.optim import ScheduleLR, build_optimizer, build_schedule


class SyntheticLoader:
    """One fixed random batch on the device, handed out `steps` times: no I/O at all."""

    def __init__(self, batch: int, size: int, classes: int, steps: int, layout: str, seed: int):
        rng = np.random.default_rng(seed)
        shape = [batch, 3, size, size] if layout == "NCHW" else [batch, size, size, 3]
        self.images = paddle.to_tensor(rng.standard_normal(shape).astype("float32"))
        self.labels = paddle.to_tensor(rng.integers(0, classes, batch).astype("int64"))
        self.valid = paddle.ones([batch], dtype="float32")
        self.steps_per_epoch = steps
        self.num_samples = batch * steps * dist.context().world_size

    def epoch(self, epoch, start_step=0):
        for _ in range(start_step, self.steps_per_epoch):
            yield self.images, self.labels, self.valid


def peak_memory_mb(ctx) -> float:
    """Device max allocated on GPU; the process's peak resident set on CPU."""
    if ctx.use_gpu:
        return paddle.device.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_benchmark(cfg, model, amp, ctx, real_data=False, warmup=5, steps=20) -> dict:
    d = cfg.DataLoader
    if real_data:
        from ppdpn.data import build_loader
        loader = build_loader(d, "train", ctx, cfg.Global.seed)
        steps = min(steps, loader.steps_per_epoch - warmup)
    else:
        loader = SyntheticLoader(d.batch_size, d.image_size, cfg.Arch.class_num, warmup + steps,
                                 d.output_layout, cfg.Global.seed)
    schedule = build_schedule(cfg.Optimizer.lr, 1, warmup + steps, d.batch_size * ctx.world_size)
    lr_sched = ScheduleLR(schedule)
    optimizer = build_optimizer(model, cfg.Optimizer, lr_sched, amp.enabled)
    if amp.enabled and amp.level == "O2":
        model, optimizer = paddle.amp.decorate(model, optimizer, level="O2", dtype=amp.dtype)
    model_dp, optimizer = dist.wrap_model(model), dist.wrap_optimizer(optimizer)
    stamps, waits = [], []

    def on_step(state):
        if ctx.use_gpu:
            paddle.device.synchronize()  # time finished work, not queued kernels
        stamps.append(time.perf_counter())

    def on_window(state, count, values):
        if count:
            waits.append(values["data_s"] / count)

    from ppdpn.data.augment import mix_batch
    stamps.append(time.perf_counter())
    train_one_epoch(model_dp, loader, optimizer, lr_sched, amp, TrainState(),
                    num_classes=cfg.Arch.class_num, mix=mix_batch, seed=cfg.Global.seed,
                    label_smoothing=cfg.Loss.label_smoothing, mixup_alpha=d.mixup_alpha,
                    cutmix_alpha=d.cutmix_alpha, print_interval=warmup + steps if not real_data else 1,
                    max_skipped=10**9, should_stop=lambda: False, on_step=on_step,
                    log_progress=on_window, max_steps=warmup + steps)
    step_s = np.diff(stamps)[warmup:]
    med = float(np.median(step_s))
    return {"model": cfg.Arch.name, "batch_per_device": d.batch_size, "image_size": d.image_size,
            "world_size": ctx.world_size, "recompute": cfg.Arch.recompute,
            "data_format": cfg.Arch.data_format, "amp": amp.enabled,
            "real_data": real_data, "steps": len(step_s),
            "img_s": round(d.batch_size * ctx.world_size / med, 2),
            "step_ms": round(1000 * med, 2),
            "data_wait_ms": round(1000 * float(np.median(waits[warmup:] or [0.0])), 3),
            "peak_mem_mb": round(peak_memory_mb(ctx), 1)}
