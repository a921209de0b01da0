"""Train or evaluate a DPN / DenseNet on ImageNet-style data. The recipe, top to bottom.

    python -m paddle.distributed.launch train.py -c configs/dpn68.yaml [-o Section.key=value ...]
    python train.py -c configs/demo.yaml --eval-only -o Global.pretrained_model=PATH

Exit codes: 0 done; 2 bad config or input; 3 non-finite loss; 4 checkpoint could not be
written; 75 stopped by SIGUSR1/SIGTERM after checkpointing ("please requeue").
"""
from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppdpn.quiet import before_paddle_import

before_paddle_import()
import paddle  # noqa: E402  (after the filters above)

from ppdpn import dist
from ppdpn.checkpoint import (CheckpointError, CheckpointWriteError, Saver, atomic_write_bytes,
                              latest_checkpoint, verify_checkpoint)
from ppdpn.config import Config, ConfigError, load_config, save_resolved
from ppdpn.data.augment import BatchAugment
from ppdpn.data.lists import DataSetError
from ppdpn.engine import (Amp, Hooks, NonFiniteLossError, Outcome, TrainState, build_amp,
                          evaluate, non_finite, optimizer_steps, train_one_epoch)
from ppdpn.logging import Progress, RunLogger, log_sample_images, planned_steps
from ppdpn.models import create_model
from ppdpn.models.weights import UnsafePickleError, WeightsError
from ppdpn.optim import ScheduleLR, build_training, lr_scale
from ppdpn.requeue import StopSignal, checkpoint_for_requeue

STARTED = time.perf_counter()  # the summary's "in this run"
EXIT_CONFIG, EXIT_NONFINITE, EXIT_SAVE = 2, 3, 4
# The errors a run ends with on purpose, and their exit codes (the most specific class
# wins); anything else is a bug and ends with Python's traceback and exit 1.
EXIT_CODES = {ConfigError: EXIT_CONFIG, DataSetError: EXIT_CONFIG, WeightsError: EXIT_CONFIG,
              UnsafePickleError: EXIT_CONFIG, CheckpointError: EXIT_CONFIG,
              CheckpointWriteError: EXIT_SAVE, NonFiniteLossError: EXIT_NONFINITE}


def exit_code(error: BaseException) -> int:
    return next(EXIT_CODES[cls] for cls in type(error).__mro__ if cls in EXIT_CODES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", required=True, help="YAML recipe, e.g. configs/dpn68.yaml")
    p.add_argument("-o", "--override", action="append", nargs="+", default=[],
                   metavar="Section.key=value", help="override a config value (YAML-parsed)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate Global.pretrained_model or Global.checkpoints and exit")
    p.add_argument("--benchmark", action="store_true", help="time training steps; print one JSON line")
    p.add_argument("--real-data", action="store_true", help="with --benchmark: use the real loader")
    p.add_argument("--warmup", type=int, default=5, help="with --benchmark: untimed steps first")
    p.add_argument("--steps", type=int, default=20, help="with --benchmark: timed steps")
    args = p.parse_args(argv)
    args.override = [o for group in args.override for o in group]
    return args


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and Paddle. Deterministic GPU kernels are a cuDNN flag, set with
    the others by dist.gpu_flags (CPU kernels are deterministic as they are)."""
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.override)
    if cfg.Global.device == "gpu" and dist.gpu_count() == 0:
        raise ConfigError(f"{args.config}: Global.device=gpu but Paddle sees no GPU (a CPU "
                          f"build of Paddle, or CUDA_VISIBLE_DEVICES hides them); use "
                          f"Global.device=auto or cpu")
    # Installed before the slow set-up so an early SIGUSR1/SIGTERM is not lost.
    stopper = StopSignal(signal.SIGUSR1, signal.SIGTERM)
    ctx = dist.init_distributed(cfg.Global.device, amp=cfg.AMP.use_amp,
                                deterministic=cfg.Global.deterministic)
    seed_everything(cfg.Global.seed)
    log = RunLogger(cfg.Global.output_dir, ctx.is_main, use_visualdl=cfg.Global.visualdl and not args.eval_only)
    log.info(f"[run] rank {ctx.rank}/{ctx.world_size} on {ctx.device}; config {args.config}")

    weights = eval_weights(cfg, log.info) if args.eval_only else cfg.Global.pretrained_model
    model = create_model(cfg.Arch.name, num_classes=cfg.Arch.class_num, pretrained=weights,
                         new_classifier=not args.eval_only,
                         recompute=cfg.Arch.recompute, data_format=cfg.Arch.data_format)
    amp = build_amp(cfg.AMP, ctx.use_gpu, log=log.info, data_format=cfg.Arch.data_format)

    if args.benchmark or args.eval_only:
        stopper.restore()  # nothing to checkpoint: signals end these runs as usual
    if args.benchmark:
        from ppdpn.benchmark import run_benchmark
        print(json.dumps(run_benchmark(cfg, model, amp, ctx, real_data=args.real_data,
                                         warmup=args.warmup, steps=args.steps)))
        return 0

    from ppdpn.data import build_loader
    val_loader = build_loader(cfg.DataLoader, "val", ctx, cfg.Global.seed, cfg.Arch.class_num)
    if args.eval_only:
        model = amp.decorate(model)  # O2 only when eval runs under autocast (AMP.eval_fp32=false)
        dist.broadcast_params(model)
        metrics = {**evaluate(dist.wrap_model(model), val_loader, amp), "weights": str(weights)}
        log.info("[eval] " + json.dumps(metrics))
        if ctx.is_main:
            out = Path(cfg.Global.output_dir) / "eval.json"
            atomic_write_bytes(out, (json.dumps(metrics, indent=1) + "\n").encode())
            log.info(f"[eval] written to {out}")
        print(json.dumps(metrics), flush=True)  # all-reduced: the same line on every rank
        return 0
    run, state = prepare_training(cfg, ctx, model, amp, val_loader, stopper, log)
    return fit(run, state)


def eval_weights(cfg: Config, log) -> str:
    """The file --eval-only evaluates, exactly: Global.pretrained_model (a .pdparams or a
    checkpoint), or Global.checkpoints (a checkpoint, or a run folder: its best checkpoint,
    else its latest). Neither, or both, is a config error: eval-only never scores random
    weights."""
    g = cfg.Global
    if g.pretrained_model and g.checkpoints:
        raise ConfigError(f"--eval-only evaluates one set of weights: Global.pretrained_model="
                          f"{g.pretrained_model} and Global.checkpoints={g.checkpoints} are both set")
    if not (g.pretrained_model or g.checkpoints):
        raise ConfigError("--eval-only needs the weights to evaluate: set "
                          "Global.pretrained_model=FILE (.pdparams or checkpoint) or "
                          "Global.checkpoints=FILE or RUN_DIR")
    path = Path(g.pretrained_model or g.checkpoints)
    if path.is_dir():
        key = "Global.pretrained_model" if g.pretrained_model else "Global.checkpoints"
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        best = ckpt_dir / "best.pdckpt"
        found = best if best.is_file() and verify_checkpoint(best) is None else \
            latest_checkpoint(ckpt_dir, log=log)
        if found is None:
            raise ConfigError(f"{key}={path}: no valid checkpoint in this folder")
        log(f"[eval] {key}={path}: evaluating {found}")
        path = found
    return str(path)


@dataclass(frozen=True)
class Run:
    """What fit works with, set up once by prepare_training."""
    cfg: Config
    ctx: dist.DistContext
    model: object          # unwrapped: BN averaging, checksums, checkpoints
    model_dp: object       # wrapped for data parallelism: training and eval
    optimizer: object
    lr_sched: ScheduleLR
    amp: Amp
    train_loader: object
    val_loader: object
    steps_per_epoch: int   # optimizer steps: Global.accum_steps batches each
    global_batch: int
    stopper: StopSignal
    log: RunLogger


def prepare_training(cfg, ctx, model, amp, val_loader, stopper, log):
    """Loader, schedule, optimizer, resume, the resolved config on disk: (Run, TrainState)."""
    from ppdpn.data import build_loader
    from ppdpn.resume import resume
    train_loader = build_loader(cfg.DataLoader, "train", ctx, cfg.Global.seed, cfg.Arch.class_num)
    steps_per_epoch = optimizer_steps(train_loader.steps_per_epoch, cfg.Global.accum_steps)
    training = build_training(cfg, model, amp, steps_per_epoch, cfg.Global.epochs)
    lr_sched = training.lr_sched
    derived = {"world_size": ctx.world_size, "global_batch": training.global_batch,
               "lr_scale": lr_scale(cfg.Optimizer.lr, training.global_batch),
               "base_lr": lr_sched.schedule.base_lr, "steps_per_epoch": steps_per_epoch,
               "train_images": train_loader.num_samples}
    log.info("[run] derived: " + json.dumps(derived))
    planned = planned_steps(cfg.Global, steps_per_epoch)
    if lr_sched.schedule.warmup_steps >= planned:
        log.info(f"[lr] the warmup ({lr_sched.schedule.warmup_steps} steps: "
                 f"Optimizer.lr.warmup_epoch / warmup_steps) lasts the whole run of {planned} "
                 f"steps: the LR only rises and ends at its peak, it never decays")
    state = TrainState()
    resumed = resume(cfg, training.model, training.optimizer, amp, state, steps_per_epoch, log=log.info)
    lr_sched.seek(state.global_step)
    log.info(f"[run] starting at global step {state.global_step} of "
             f"{planned_steps(cfg.Global, steps_per_epoch)}, LR {lr_sched.get_lr():.8g}")
    if ctx.is_main:
        save_resolved(cfg, cfg.Global.output_dir, {**derived, "resumed_from": resumed})
        log.text("config", json.dumps(cfg.to_dict(), indent=1))
    dist.broadcast_params(training.model)
    run = Run(cfg, ctx, training.model, dist.wrap_model(training.model),
              dist.wrap_optimizer(training.optimizer), lr_sched, amp, train_loader, val_loader,
              steps_per_epoch, training.global_batch, stopper, log)
    return run, state


def fit(run: Run, state: TrainState) -> int:
    """Epochs of train / eval / checkpoint until done, stopped or failed."""
    saver = Saver(run.cfg, run.model, run.optimizer, run.amp, run.log, run.steps_per_epoch)
    progress = Progress(run.cfg, run.steps_per_epoch, run.global_batch, run.lr_sched, state, run.log)
    hooks = Hooks(progress=progress.report, overflow=progress.overflow,
                  after_step=saver.maybe_save_steps, stop_requested=lambda: run.stopper.flag)
    augment = BatchAugment.from_config(run.cfg)
    if state.global_step == 0:
        log_sample_images(run.train_loader, run.log, run.cfg)
    if state.global_step >= planned_steps(run.cfg.Global, run.steps_per_epoch):
        # A finished run run again: nothing to train, nothing to write.
        run.log.info(f"[run] already finished: global step {state.global_step} of "
                     f"{planned_steps(run.cfg.Global, run.steps_per_epoch)} (Global.epochs / "
                     f"Global.max_steps); checkpoints in {saver.ckpt_dir}")
        return 0
    metrics = None
    try:
        while state.epoch < run.cfg.Global.epochs:
            outcome = train_one_epoch(run.model_dp, run.train_loader, run.optimizer, run.lr_sched,
                                      run.amp, state, run.cfg.Global, augment, hooks)
            if outcome is Outcome.STOPPED:
                return checkpoint_for_requeue(run.stopper, saver, state, run.log)
            metrics = end_epoch(run, state, outcome, saver, progress)
            if outcome is Outcome.MAX_STEPS:
                break
    except (NonFiniteLossError, CheckpointError) as e:
        hint = ". No checkpoint was written after the last good one." if isinstance(
            e, NonFiniteLossError) else ""
        run.log.info(f"[error] {e}{hint}")
        return exit_code(e)
    finally:
        if not run.stopper.flag:
            run.stopper.restore()
    return finish(run, saver, metrics or validate(run, state))


def end_epoch(run: Run, state: TrainState, outcome: Outcome, saver, progress):
    """Evaluate and checkpoint as the recipe asks; the eval metrics, or None."""
    g = run.cfg.Global
    if outcome is Outcome.EPOCH_END:
        state.epoch += 1
        state.step_in_epoch = 0
    last = state.epoch >= g.epochs or outcome is Outcome.MAX_STEPS
    metrics = None
    if last or state.epoch % g.eval_interval == 0:
        metrics = validate(run, state)
        run.log.scalars("eval", state.global_step, {k: metrics[k] for k in ("loss", "top1", "top5")})
    progress.end_epoch(metrics)
    is_best = metrics is not None and metrics["top1"] > state.best_metric
    if is_best:
        state.best_metric = metrics["top1"]
    if last or state.epoch % g.save_interval == 0 or is_best:
        saver.save(state, is_best=is_best)
    return metrics


def validate(run: Run, state: TrainState) -> dict:
    """Every val image once, with the BN statistics averaged over the ranks first."""
    dist.average_buffers(run.model)
    # fp32 eval of an O2 model: an fp32 copy of the optimizer's master weights (Amp.eval_model)
    metrics = evaluate(run.amp.eval_model(run.model_dp, run.optimizer), run.val_loader, run.amp)
    # Finite weights can still compute NaN (e.g. BN statistics grown huge): such a model
    # must not become a checkpoint, as best or otherwise.
    if not math.isfinite(metrics["loss"]):
        raise non_finite(f"eval loss is non-finite after step {state.global_step}")
    return metrics


def finish(run: Run, saver: Saver, metrics: dict) -> int:
    agree = dist.ranks_agree(dist.weights_checksum(run.model))
    run.log.info(f"[run] weights identical on all {run.ctx.world_size} ranks: {agree}")
    plot = run.log.plot_curves()
    run.log.info(f"[run] done: checkpoints in {saver.ckpt_dir}, VisualDL logs in "
                 f"{run.cfg.Global.output_dir}/vdl, curves {plot}")
    run.log.info(run.log.summary(time.perf_counter() - STARTED))
    run.log.close()
    if run.ctx.is_main:
        print(json.dumps(metrics), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except tuple(EXIT_CODES) as e:
        print(f"{'config error' if isinstance(e, ConfigError) else 'error'}: {e}", file=sys.stderr)
        sys.exit(exit_code(e))
