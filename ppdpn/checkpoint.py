"""One checkpoint format, one atomic save, verified loads, and the run's Saver.

Layout under `<output_dir>/checkpoints/`:
  ckpt-<global_step>.pdckpt   pickled dict of numpy arrays and plain Python values
  ckpt-<global_step>.json     its size and sha256 (written after the data, so a file
                              without a matching record is never trusted)
  latest                      name of the newest complete checkpoint
  best.pdckpt (+ .json)       the checkpoint with the best eval top-1
  superseded/                 checkpoints numbered above a newer save (see _prune)
A new checkpoint is complete before any older one is deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import paddle

from ppdpn import dist
from ppdpn.config import code_version
from ppdpn.engine import non_finite
from ppdpn.optim import global_batch

CKPT_RE = re.compile(r"^ckpt-(\d+)\.pdckpt$")
# Files atomic_write_bytes writes aside; a process killed mid-write leaves one behind.
TMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or written; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, permissions): the run's fault is
    the storage, not its input."""


# ---------------------------------------------------------------- atomic files

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write aside, fsync, rename: a crash leaves the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise CheckpointWriteError(f"cannot write {path}: {e.strerror or e}") from e
    _fsync_dir(path.parent)


def _record(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ---------------------------------------------------------------- state conversion

def to_numpy_tree(obj):
    """Tensors -> numpy arrays, recursively, so the pickle holds no Paddle objects."""
    if isinstance(obj, (paddle.Tensor,)):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: to_numpy_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy_tree(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def inner_optimizer(optimizer):
    """The Paddle optimizer inside Fleet's distributed wrapper."""
    return getattr(optimizer, "_inner_opt", optimizer)


def fp32_weights(model, optimizer=None) -> dict:
    """The model's state_dict as numpy, every floating tensor float32: checkpoints,
    best_model.pdparams, exports and fp32 eval hold fp32 weights whatever the AMP level.

    Under AMP O2 a parameter is fp16/bf16 and the optimizer keeps its fp32 master copy
    (multi_precision): that copy is taken as it is. Casting the fp16 parameter up, as
    paddle.amp.decorate(save_dtype="float32") does, would save weights rounded to fp16."""
    masters = getattr(inner_optimizer(optimizer), "_master_weights", None) or {}
    out = {}
    for key, tensor in model.state_dict().items():
        master = masters.get(tensor.name)
        if master is not None and tensor.dtype != paddle.float32:
            tensor = master
        if tensor.is_floating_point() and tensor.dtype != paddle.float32:
            tensor = tensor.astype("float32")  # bf16 .numpy() would give raw uint16
        out[key] = tensor.numpy()
    return out


def set_weights(model, weights: dict) -> None:
    """Load a {key: array} state into `model`, each value cast to the dtype the model
    holds it in (fp16/bf16 parameters under AMP O2, fp32 otherwise): checkpoints are fp32,
    and Paddle's set_value refuses another dtype with a bare AssertionError."""
    own = model.state_dict()
    model.set_state_dict({k: paddle.to_tensor(v).astype(own[k].dtype) if k in own
                          else paddle.to_tensor(v) for k, v in weights.items()})


def master_weights_for(model, weights: dict) -> dict:
    """{structured name: fp32 array} for the parameters `model` keeps in fp16/bf16 (AMP
    O2), taken from fp32 `weights`: the optimizer's master copies resume exactly, whatever
    AMP level the checkpoint was written under. Empty when every parameter is fp32."""
    return {name: np.asarray(weights[name], dtype=np.float32)
            for name, p in model.named_parameters()
            if p.dtype != paddle.float32 and name in weights}


def optimizer_state(optimizer, model) -> dict:
    """Optimizer state keyed by structured parameter names, not Paddle's generated
    names (`conv2d_7.w_0`), which change with the order layers were created in."""
    names = {p.name: n for n, p in model.named_parameters()}
    state = to_numpy_tree(optimizer.state_dict())
    out = {}
    for key, value in state.items():
        if key == "master_weights":
            out[key] = {names.get(k, k): v for k, v in value.items()}
        else:
            out[_rename(key, names)] = value
    return out


def load_optimizer_state(optimizer, model, state: dict, weights: Optional[dict] = None) -> None:
    """Restore `state` (from optimizer_state). With `weights` (the checkpoint's fp32
    model), the master copies of this run's fp16/bf16 parameters come from the saved
    ones where the checkpoint has them (an O2 run's), else from `weights`; masters of
    parameters this run keeps in fp32 are dropped. So a run resumes under O2 from a
    checkpoint of any AMP level, and from fp32 weights without any rounding."""
    names = {n: p.name for n, p in model.named_parameters()}
    if weights is not None:
        masters = master_weights_for(model, weights)
        saved = state.get("master_weights") or {}
        masters.update({k: v for k, v in saved.items() if k in masters})
        state = {k: v for k, v in state.items() if k != "master_weights"}
        if masters:
            state["master_weights"] = masters
    restored = {}
    for key, value in state.items():
        if key == "master_weights":
            restored[key] = {names.get(k, k): paddle.to_tensor(v) for k, v in value.items()}
        elif isinstance(value, np.ndarray):
            restored[_rename(key, names)] = paddle.to_tensor(value)
        else:
            restored[_rename(key, names)] = value
    optimizer.set_state_dict(restored)


def _rename(key: str, mapping: dict) -> str:
    """Replace the longest parameter-name prefix of an accumulator key."""
    best = ""
    for old in mapping:
        if key.startswith(old + "_") and len(old) > len(best):
            best = old
    return mapping[best] + key[len(best):] if best else key


# ---------------------------------------------------------------- save / load

def save_checkpoint(state: dict, ckpt_dir, keep_last: int = 3, is_best: bool = False,
                    log: Callable = print) -> Path:
    """Save `state` (must hold 'global_step') as the newest checkpoint; prune old ones."""
    ckpt_dir = Path(ckpt_dir)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointWriteError(f"cannot create checkpoint directory {ckpt_dir}: {e.strerror}") from e
    data = pickle.dumps(to_numpy_tree(state), protocol=4)
    name = f"ckpt-{int(state['global_step']):08d}.pdckpt"
    path = ckpt_dir / name
    record = {**_record(data), "global_step": int(state["global_step"]),
              "epoch": int(state.get("epoch", 0)), "metric": state.get("best_metric")}
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(record).encode())
    atomic_write_bytes(ckpt_dir / "latest", name.encode())
    if is_best:
        atomic_write_bytes(ckpt_dir / "best.pdckpt", data)
        atomic_write_bytes(ckpt_dir / "best.json", json.dumps(record).encode())
    _prune(ckpt_dir, keep_last, path, log)
    return path


def _size_matches(path: Path) -> bool:
    """The cheap half of verify_checkpoint: a record exists and the size agrees."""
    try:
        record = json.loads(path.with_suffix(".json").read_text())
        return isinstance(record, dict) and path.stat().st_size == record.get("size")
    except (OSError, ValueError):
        return False


def _prune(ckpt_dir: Path, keep_last: int, newest: Path, log: Callable) -> None:
    """Called once `newest` is complete. Keeps it and the keep_last - 1 intact ones
    before it; torn ones (size differs from the record) do not count and go too.

    Checkpoints numbered above `newest` come from a line of training this run left: it
    resumed from an earlier checkpoint (the newer ones were torn, or Global.checkpoints
    named an older one), or a new world size renumbered the steps. Left in place they
    would be taken for the newest on the next resume and would push `newest` out here,
    so they move to superseded/ (never deleted: they may be all a user has of that line).
    """
    step = int(CKPT_RE.match(newest.name).group(1))
    older = []
    for p in list_checkpoints(ckpt_dir):
        n = int(CKPT_RE.match(p.name).group(1))
        if n > step:
            _move_aside(p, ckpt_dir / "superseded", log)
        elif n < step:
            older.append(p)
    intact = [p for p in older if _size_matches(p)]
    keep = set(intact[len(intact) - (keep_last - 1):]) if keep_last > 1 else set()
    for old in older:
        if old not in keep:
            for p in (old, old.with_suffix(".json")):
                try:
                    p.unlink()
                except OSError:
                    pass
    _remove_stale_tmp(ckpt_dir)


def _move_aside(path: Path, dest: Path, log: Callable) -> None:
    try:
        dest.mkdir(exist_ok=True)
        for p in (path, path.with_suffix(".json")):
            if p.exists():
                os.replace(p, dest / p.name)
        log(f"[checkpoint] moved {path.name} to {dest}: numbered after the newest save")
    except OSError as e:  # keep going: the new checkpoint is safe either way
        log(f"[checkpoint] could not move {path} to {dest}: {e}")


def _remove_stale_tmp(ckpt_dir: Path) -> None:
    """Half-written files of a process killed mid-save (only rank 0 of one job writes
    here, so any other process's temporary file is dead)."""
    for p in ckpt_dir.iterdir():
        m = TMP_RE.match(p.name)
        if m and int(m.group(1)) != os.getpid():
            try:
                p.unlink()
            except OSError:
                pass


def list_checkpoints(ckpt_dir) -> list:
    """Step-numbered checkpoint files, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path) -> Optional[str]:
    """None if `path` matches its recorded size and sha256, else the reason."""
    path = Path(path)
    meta = path.with_suffix(".json")
    if not path.is_file():
        return "file is missing"
    if not meta.is_file():
        return f"no integrity record {meta.name} (save never completed)"
    try:
        record = json.loads(meta.read_text())
        data = path.read_bytes()
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    if not isinstance(record, dict):
        return f"integrity record {meta.name} is not a JSON object (overwritten)"
    if len(data) != record.get("size"):
        return f"size {len(data)} != recorded {record.get('size')} (truncated or overwritten)"
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        return "sha256 differs from the recorded one (corrupted)"
    return None


def load_checkpoint(path, verify: bool = True) -> dict:
    """Load a checkpoint without executing code from it; refuse corrupted files."""
    from ppdpn.models.weights import safe_load

    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {path}")
        path = found
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    # Step-numbered files always have a record; other files (copies, best.pdckpt without
    # its .json) are loaded unverified but still through the safe unpickler.
    if verify and (path.with_suffix(".json").is_file() or CKPT_RE.match(path.name)):
        reason = verify_checkpoint(path)
        if reason:
            raise CheckpointError(f"checkpoint {path} is not valid: {reason}")
    try:
        state = safe_load(str(path))
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not loadable"
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: "
                              f"{str(e)[:300]}") from e
    _check_format(state, path)
    return state


def _check_format(state, path) -> None:
    """A dict with a 'model' dict of numeric arrays: anything else is not ours."""
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path} is not a ppdpn checkpoint (no 'model' entry)")
    for key, value in state["model"].items():
        if not (isinstance(key, str) and isinstance(value, np.ndarray)
                and (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_)):
            raise CheckpointError(f"{path}: model entry {str(key)[:80]!r} is not a numeric "
                                  f"array ({type(value).__name__})")


def latest_checkpoint(out_or_ckpt_dir, log=print) -> Optional[Path]:
    """Newest checkpoint that verifies; corrupted ones are reported and skipped."""
    d = Path(out_or_ckpt_dir)
    if (d / "checkpoints").is_dir():
        d = d / "checkpoints"
    for path in reversed(list_checkpoints(d)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        log(f"[checkpoint] skipping {path}: {reason}")
    return None


# ---------------------------------------------------------------- what a run saves

def rng_states() -> dict:
    """numpy's and Python's global RNG states as plain lists (the pickle holds no objects)."""
    st = np.random.get_state()
    return {"numpy": [st[0], st[1], int(st[2]), int(st[3]), float(st[4])],
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0]}


def set_rng_states(states: dict) -> None:
    """Back to the numpy and Python RNG states rng_states() recorded."""
    if not states:
        return
    n = states["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate((states["python_version"], tuple(states["python"]), None))


def build_state_dict(cfg, model, optimizer, amp, state, steps_per_epoch: int) -> dict:
    """Everything a resume needs, as numpy arrays and plain values."""
    m = dist.unwrap(model)
    world = dist.context().world_size
    return {
        "model": fp32_weights(m, optimizer),
        "optimizer": optimizer_state(inner_optimizer(optimizer), m),
        "scaler": amp.scaler.state_dict() if amp.scaler is not None else None,
        "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step, "best_metric": state.best_metric,
        "epoch_loss_sum": state.epoch_loss_sum, "epoch_loss_steps": state.epoch_loss_steps,
        "rng": rng_states(), "config": cfg.to_dict(), "code_version": code_version(),
        "world_size": world,
        # The position in the epoch is in steps of this batch (resume on another
        # world size converts it, see resume.reposition()).
        "global_batch": global_batch(cfg), "steps_per_epoch": steps_per_epoch,
        "arch": cfg.Arch.name,
    }


def _check_finite_weights(model, state) -> None:
    flags = [paddle.isfinite(p).all().astype("int32") for p in dist.unwrap(model).parameters()]
    if int(paddle.stack(flags).sum().item()) != len(flags):
        raise non_finite(f"weights are non-finite after step {state.global_step}")


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
        """Checkpoint `state` on rank 0; every rank returns once it is written. The write
        runs while the ranks exchange a flag every second (dist.while_writing): a single
        long wait would hit gloo's fixed 30 s timeout when a large checkpoint meets a
        slow file system."""
        _check_finite_weights(self.model, state)  # never replace a good checkpoint with NaNs
        dist.average_buffers(self.model)  # all ranks: checkpoint the averaged BN statistics
        if not dist.context().is_main:
            dist.while_writing(None)
            return
        blob = build_state_dict(self.cfg, self.model, self.optimizer, self.amp, state,
                                self.steps_per_epoch)  # device-to-host copies: this thread
        dist.while_writing(lambda: self._write(blob, is_best, reason))

    def _write(self, blob: dict, is_best: bool, reason: str) -> None:
        try:
            path = save_checkpoint(blob, self.ckpt_dir, self.cfg.Global.keep_last, is_best,
                                   log=self.log.info)
            if is_best:
                self._write_paddleclas_best(blob["model"])
        except CheckpointError as e:
            if self.cfg.Global.on_save_error == "stop":
                raise
            self.log.info(f"[checkpoint] save failed, continuing (Global.on_save_error=continue): {e}")
            return
        self.log.info(f"[checkpoint] {path}" + (f" ({reason})" if reason else "") + (" best" if is_best else ""))

    def _write_paddleclas_best(self, weights: dict) -> None:
        """The best weights (the checkpoint's fp32 ones, see fp32_weights) also in
        PaddleClas's .pdparams layout, for PaddleClas users."""
        from ppdpn.models.weights import to_paddleclas_state_dict
        out = Path(self.cfg.Global.output_dir) / "best_model.pdparams"
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            paddle.save(to_paddleclas_state_dict(dist.unwrap(self.model), self.cfg.Arch.name,
                                                 weights), str(tmp))
            os.replace(tmp, out)
        except OSError as e:
            raise CheckpointWriteError(f"cannot write {out}: {e}") from e
