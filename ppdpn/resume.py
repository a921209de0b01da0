"""Resume a run: restore a checkpoint into the model, optimizer, scaler and TrainState,
and reposition the interrupted epoch when the global batch changed since the save."""
from __future__ import annotations

from typing import Optional

from ppdpn import dist
from ppdpn.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint,
                              load_optimizer_state, set_rng_states, set_weights)
from ppdpn.optim import global_batch


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
        path, ckpt = paddleclas_files.resume_from_prefix(path, cfg, dist.unwrap(model),
                                                         steps_per_epoch, global_batch(cfg),
                                                         log=log)
    else:
        ckpt = load_checkpoint(path)
    if ckpt.get("arch") not in (None, cfg.Arch.name):
        raise CheckpointError(f"{path} holds a {ckpt['arch']} model, the config asks for {cfg.Arch.name}")
    _check_resumable(ckpt, path)
    m = dist.unwrap(model)
    _check_same_tensors(m, ckpt["model"], path)
    set_weights(m, ckpt["model"])  # cast to the dtypes this run keeps (fp16 under O2)
    try:
        load_optimizer_state(optimizer, m, ckpt["optimizer"], weights=ckpt["model"])
        if amp.scaler is not None and ckpt.get("scaler"):
            amp.scaler.load_state_dict(ckpt["scaler"])
        set_rng_states(ckpt.get("rng"))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: optimizer/scaler/RNG state does not fit this run "
                              f"({type(e).__name__}: {str(e)[:200]})") from e
    state.epoch_loss_sum = float(ckpt.get("epoch_loss_sum", 0.0))  # absent before December
    state.epoch_loss_steps = int(ckpt.get("epoch_loss_steps", 0))
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
                f"step; the rest of this epoch is re-sharded (see resume.reposition)")
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
        f"many skipped (see resume.reposition)")


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
