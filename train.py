"""Train or evaluate a DPN / DenseNet on ImageNet-style data. The recipe, top to bottom.

    python -m paddle.distributed.launch train.py -c configs/dpn68.yaml [-o Section.key=value ...]
    python train.py -c configs/demo.yaml --eval-only -o Global.pretrained_model=PATH

Exit codes: 0 done; 2 bad config or input; 3 non-finite loss; 4 checkpoint could not be
written; 75 stopped by SIGUSR1/SIGTERM after checkpointing ("please requeue").
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from functools import partial


from ppdpn import dist
from ppdpn.checkpoint import CheckpointError
from ppdpn.config import ConfigError, load_config, save_resolved
from ppdpn.data.lists import DataSetError
from ppdpn.engine import (NonFiniteLossError, TrainState, build_amp, evaluate, optimizer_steps,
                          train_one_epoch)
from ppdpn.logging import RunLogger
from ppdpn.models import create_model
from ppdpn.models.weights import UnsafePickleError, WeightsError
from ppdpn.optim import ScheduleLR, build_optimizer, build_schedule, lr_scale
from ppdpn import session

EXIT_CONFIG, EXIT_NONFINITE, EXIT_SAVE, EXIT_REQUEUE = 2, 3, 4, 75


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", required=True, help="YAML recipe, e.g. configs/dpn68.yaml")
    p.add_argument("-o", "--override", action="append", nargs="+", default=[],
                   metavar="Section.key=value", help="override a config value (YAML-parsed)")
    p.add_argument("--eval-only", action="store_true", help="evaluate Global.pretrained_model and exit")
    p.add_argument("--benchmark", action="store_true", help="time training steps; print one JSON line")
    p.add_argument("--real-data", action="store_true", help="with --benchmark: use the real loader")
    p.add_argument("--warmup", type=int, default=5, help="with --benchmark: untimed steps first")
    p.add_argument("--steps", type=int, default=20, help="with --benchmark: timed steps")
    args = p.parse_args(argv)
    args.override = [o for group in args.override for o in group]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.override)
    # Installed before the slow set-up so an early SIGUSR1/SIGTERM is not lost.
    stopper = session.StopSignal(signal.SIGUSR1, signal.SIGTERM)
    ctx = dist.init_distributed(cfg.Global.device, amp=cfg.AMP.use_amp,
                                deterministic=cfg.Global.deterministic)
    session.seed_everything(cfg.Global.seed)
    log = RunLogger(cfg.Global.output_dir, ctx.is_main, use_visualdl=cfg.Global.visualdl and not args.eval_only)
    log.info(f"[run] rank {ctx.rank}/{ctx.world_size} on {ctx.device}; config {args.config}")

    model = create_model(cfg.Arch.name, num_classes=cfg.Arch.class_num,
                         pretrained=cfg.Global.pretrained_model,
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
        metrics = evaluate(dist.wrap_model(model), val_loader, amp)
        print(json.dumps(metrics), flush=True)
        return 0

    train_loader = build_loader(cfg.DataLoader, "train", ctx, cfg.Global.seed, cfg.Arch.class_num)
    # Steps are optimizer steps: Global.accum_steps batches each.
    steps_per_epoch = optimizer_steps(train_loader.steps_per_epoch, cfg.Global.accum_steps)
    global_batch = session.global_batch(cfg)
    schedule = build_schedule(cfg.Optimizer.lr, cfg.Global.epochs, steps_per_epoch, global_batch)
    derived = {"world_size": ctx.world_size, "global_batch": global_batch,
               "lr_scale": lr_scale(cfg.Optimizer.lr, global_batch), "base_lr": schedule.base_lr,
               "steps_per_epoch": steps_per_epoch, "train_images": train_loader.num_samples}
    log.info("[run] derived: " + json.dumps(derived))

    multi_precision = amp.enabled
    state = TrainState()
    lr_sched = ScheduleLR(schedule)
    optimizer = build_optimizer(model, cfg.Optimizer, lr_sched, multi_precision)
    model, optimizer = amp.decorate(model, optimizer)  # O2: fp16/bf16 weights, fp32 masters
    resumed = session.resume(cfg, model, optimizer, amp, state, steps_per_epoch, log=log.info)
    lr_sched.last_epoch = state.global_step - 1
    lr_sched.step()  # recompute the LR for the resumed step
    log.info(f"[run] starting at global step {state.global_step} of "
             f"{cfg.Global.epochs * steps_per_epoch}, LR {lr_sched.get_lr():.8g}")
    if ctx.is_main:
        save_resolved(cfg, cfg.Global.output_dir, {**derived, "resumed_from": resumed})
        log.text("config", json.dumps(cfg.to_dict(), indent=1))
    dist.broadcast_params(model)
    model_dp, optimizer = dist.wrap_model(model), dist.wrap_optimizer(optimizer)

    return fit(cfg, ctx, model, model_dp, optimizer, lr_sched, amp, state, train_loader,
               steps_per_epoch, val_loader, stopper, log)


def fit(cfg, ctx, model, model_dp, optimizer, lr_sched, amp, state, train_loader,
        steps_per_epoch, val_loader, stopper, log) -> int:
    """Epochs of train / eval / checkpoint until done, stopped or failed;
    `steps_per_epoch` counts optimizer steps (Global.accum_steps batches each)."""
    from ppdpn.data import mix_batch
    g = cfg.Global
    saver = session.Saver(cfg, model, optimizer, amp, log, steps_per_epoch)
    clock = session.Progress(cfg, steps_per_epoch, lr_sched, state, log)
    if state.global_step == 0:
        session.log_sample_images(train_loader, log, cfg)
    metrics = None
    try:
        while state.epoch < g.epochs:
            outcome = train_one_epoch(
                model_dp, train_loader, optimizer, lr_sched, amp, state,
                num_classes=cfg.Arch.class_num, seed=g.seed,
                mix=partial(mix_batch, data_format=cfg.DataLoader.output_layout),
                label_smoothing=cfg.Loss.label_smoothing, mixup_alpha=cfg.DataLoader.mixup_alpha,
                cutmix_alpha=cfg.DataLoader.cutmix_alpha, print_interval=g.print_interval,
                max_skipped=g.max_skipped_steps, stop_requested=lambda: stopper.flag,
                on_step=saver.maybe_save_steps, log_progress=clock.report, max_steps=g.max_steps,
                accum_steps=g.accum_steps)
            if outcome == "stopped":
                return checkpoint_for_requeue(stopper, saver, state, log)
            if outcome == "epoch_end":
                state.epoch += 1
                state.step_in_epoch = 0
            last = state.epoch >= g.epochs or outcome == "max_steps"
            metrics = None
            if last or state.epoch % g.eval_interval == 0:
                dist.average_buffers(model)
                metrics = evaluate(amp.eval_model(model_dp, optimizer), val_loader, amp)
                session.check_finite_eval(metrics, state)
                log.scalars("eval", state.global_step, {k: metrics[k] for k in ("loss", "top1", "top5")})
            clock.end_epoch(metrics)
            is_best = metrics is not None and metrics["top1"] > state.best_metric
            if is_best:
                state.best_metric = metrics["top1"]
            if last or state.epoch % g.save_interval == 0 or is_best:
                saver.save(state, is_best=is_best)
            if outcome == "max_steps":
                break
    except NonFiniteLossError as e:
        log.info(f"[error] {e}. No checkpoint was written after the last good one.")
        return EXIT_NONFINITE
    except CheckpointError as e:
        log.info(f"[error] {e}")
        return EXIT_SAVE
    finally:
        if not stopper.flag:
            stopper.restore()
    if metrics is None:
        dist.average_buffers(model)
        metrics = evaluate(amp.eval_model(model_dp, optimizer), val_loader, amp)
    agree = dist.ranks_agree(dist.weights_checksum(model))
    log.info(f"[run] weights identical on all {ctx.world_size} ranks: {agree}")
    plot = log.plot_curves()
    log.info(f"[run] done: checkpoints in {saver.ckpt_dir}, VisualDL logs in "
             f"{cfg.Global.output_dir}/vdl, curves {plot}")
    log.close()
    if ctx.is_main:
        print(json.dumps(metrics), flush=True)
    return 0


def checkpoint_for_requeue(stopper, saver, state, log) -> int:
    """All ranks stopped at the same step (a signal reached one of them): rank 0 saves
    that step, then every rank exits EXIT_REQUEUE."""
    who = stopper.name or "a signal to another rank"
    # The launcher SIGTERMs the other ranks as soon as one exits 75: ignore that
    # (SIG_IGN survives interpreter shutdown) and exit together after the save.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    saver.save(state, reason=who)
    dist.barrier()
    log.info(f"[run] stopped by {who} at step {state.global_step}; "
             f"checkpointed, exit {EXIT_REQUEUE} (requeue)")
    return EXIT_REQUEUE


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except (DataSetError, CheckpointError, WeightsError, UnsafePickleError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
