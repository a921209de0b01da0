"""`train.py --benchmark`: time the real training step on synthetic or real batches.

The step is train_one_epoch's own (autocast, scaler, optimizer, Fleet wrapper), fed either
one fixed in-memory batch (no I/O: the model's speed) or, with --real-data, the configured
loader (the pipeline's speed too). The result is one JSON object:

- img_s: global images per second over the timed steps (global batch: batch x world size
  x Global.accum_steps, over the median step);
- step_ms: median wall time of a timed step; data_wait_ms: median wait for a step's batches;
- cpu_ms: median CPU time (all threads of this process) of a timed step: steadier than
  wall time where other jobs share the cores;
- peak_mem_mb: on a GPU the device's max allocated bytes; on a CPU the process's peak
  resident set (ru_maxrss), which covers the whole process: Paddle's import, model
  creation, the warm-up steps and the timed ones;
- alloc_peak_mb: the most bytes Paddle's allocator held at once during the timed steps
  (weights, gradients, optimizer state and activations; host allocator on a CPU, device on
  a GPU), the figure to compare configurations by: unlike RSS it does not count memory
  that malloc keeps cached, nor Paddle's own code;
- rss_before_mb: resident set when the timed steps start (after model, optimizer, warm-up).
"""
from __future__ import annotations

import resource
import time
from dataclasses import replace

import numpy as np
import paddle

from ppdpn import dist
from ppdpn.data.augment import BatchAugment
from ppdpn.engine import Hooks, TrainState, train_one_epoch
from ppdpn.optim import build_training


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


class RepeatedLoader:
    """`steps` batches of a real loader, running over as many of its epochs as needed
    (a small data set has fewer steps per epoch than a benchmark wants)."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps_per_epoch = loader, steps

    def epoch(self, epoch, start_step=0):
        count, e = start_step, 0
        while count < self.steps_per_epoch:
            for batch in self.loader.epoch(e):
                yield batch
                count += 1
                if count == self.steps_per_epoch:
                    return
            e += 1


def rss_mb() -> float:
    """Current resident set of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class MemoryMeter:
    """Peak memory: Paddle's allocator (resettable) and the process (ru_maxrss, not)."""

    def __init__(self, use_gpu: bool):
        self.use_gpu = use_gpu
        self.rss_before_mb = 0.0

    def start(self):
        self.rss_before_mb = rss_mb()
        if self.use_gpu:
            paddle.device.cuda.reset_max_memory_allocated()
        else:
            paddle.base.core.host_memory_stat_reset_peak_value("Allocated", 0)

    def alloc_peak_mb(self) -> float:
        if self.use_gpu:
            return paddle.device.cuda.max_memory_allocated() / 2**20
        return paddle.base.core.host_memory_stat_peak_value("Allocated", 0) / 2**20

    def peak_mb(self) -> float:
        """What the JSON calls peak_mem_mb (see the module docstring)."""
        if self.use_gpu:
            return paddle.device.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def benchmark_loader(cfg, ctx, real_data: bool, steps: int):
    """`steps` batches: the configured train loader's, or one synthetic batch repeated."""
    d = cfg.DataLoader  # load_config has checked that its layout is the model's
    if real_data:
        from ppdpn.data import build_loader
        return RepeatedLoader(build_loader(d, "train", ctx, cfg.Global.seed, cfg.Arch.class_num),
                              steps)
    return SyntheticLoader(d.batch_size, d.image_size, cfg.Arch.class_num, steps,
                           d.output_layout, cfg.Global.seed)


def run_benchmark(cfg, model, amp, ctx, real_data=False, warmup=5, steps=20) -> dict:
    """Train `warmup` + `steps` optimizer steps (Global.accum_steps batches each); time
    the last `steps`. Returns the JSON record."""
    d, total = cfg.DataLoader, warmup + steps
    loader = benchmark_loader(cfg, ctx, real_data, total * cfg.Global.accum_steps)
    training = build_training(cfg, model, amp, steps_per_epoch=total, epochs=1)
    model_dp = dist.wrap_model(training.model)
    optimizer = dist.wrap_optimizer(training.optimizer)
    memory = MemoryMeter(ctx.use_gpu)
    stamps, cpu, waits = [], [], []

    def after_step(state):
        if ctx.use_gpu:
            paddle.device.synchronize()  # time finished work, not queued kernels
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        if state.global_step == warmup:
            memory.start()

    if warmup == 0:
        memory.start()
    stamps.append(time.perf_counter())
    cpu.append(time.process_time())
    # Synthetic: one progress window (one host sync) for the whole run, as in training
    # with a long print interval. Real data: a window per step, to see each step's wait.
    run = replace(cfg.Global, print_interval=1 if real_data else total, max_steps=total,
                  max_skipped_steps=10**9)
    hooks = Hooks(progress=lambda state, count, values: waits.append(values["data_s"] / count),
                  after_step=after_step)
    train_one_epoch(model_dp, loader, optimizer, training.lr_sched, amp, TrainState(), run,
                    BatchAugment.from_config(cfg), hooks)
    step_s = np.diff(stamps)[warmup:]
    med = float(np.median(step_s))
    return {"model": cfg.Arch.name, "batch_per_device": d.batch_size, "image_size": d.image_size,
            "world_size": ctx.world_size, "accum_steps": cfg.Global.accum_steps,
            "img_s": round(training.global_batch / med, 2),
            "step_ms": round(1000 * med, 2),
            "cpu_ms": round(1000 * float(np.median(np.diff(cpu)[warmup:])), 2),
            "data_wait_ms": round(1000 * float(np.median(waits[warmup:] or [0.0])), 3),
            "peak_mem_mb": round(memory.peak_mb(), 1),
            "peak_mem_kind": "device_max_allocated" if ctx.use_gpu else "process_max_rss",
            "alloc_peak_mb": round(memory.alloc_peak_mb(), 1),
            "rss_before_mb": round(memory.rss_before_mb, 1),
            "recompute": cfg.Arch.recompute, "data_format": cfg.Arch.data_format,
            "amp": amp.enabled, "real_data": real_data, "warmup": warmup, "steps": len(step_s),
            "step_ms_each": [round(1000 * float(t), 2) for t in step_s],
            "cpu_ms_each": [round(1000 * float(t), 2) for t in np.diff(cpu)[warmup:]],
            "device": ctx.device}
