"""PaddleClas's files on disk: a training run's checkpoint prefix, and an export folder.

Checkpoint (ppcls/utils/save_load.py, written at every epoch end): `Global.checkpoints`
names a prefix, e.g. `output/DPN68/latest`, standing for
  latest.pdparams  the model's state_dict under PaddleClas's layer names, plus paddle.save's
                   "StructuredToParameterName@@" table (layer name -> parameter name)
  latest.pdopt     a list of optimizer state_dicts: `<parameter name>_velocity_0` per
                   trainable tensor for Momentum, `master_weights` under multi_precision,
                   and `LR_Scheduler`
  latest.pdstates  {"epoch": epochs done, "metric": top-1 of the last eval}
  latest.pdema     with EMA on: the raw training weights (.pdparams then holds the average)
`load_checkpoint_prefix` turns them into the dict `ppdpn.checkpoint.load_checkpoint`
returns, at the epoch boundary where PaddleClas stopped, through the same allow-listed
unpickler (plus `tuple`: paddle.save pickles each optimizer tensor as (name, array)).

Export folder (ppcls/engine/engine.py export, tools/export_model.py): `inference.json` (PIR)
or `inference.pdmodel`, + `inference.pdiparams`, and, when PaddleClas wrote it,
`inference.yml` whose PreProcess.transform_ops hold the eval transform.
"""
from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from ppdpn.checkpoint import CheckpointError
from ppdpn.models.weights import PADDLE_SAVE_META_KEY, WeightsError, _ArrayUnpickler, paddleclas_key_map

SUFFIXES = (".pdparams", ".pdopt", ".pdstates")
VELOCITY = "_velocity_0"  # paddle.optimizer.Momentum's accumulator suffix


def is_checkpoint_prefix(path) -> bool:
    """True for PaddleClas's `output/DPN68/latest` (no such file; latest.pdparams exists)."""
    p = str(path)
    return not os.path.exists(p) and os.path.isfile(p + ".pdparams")


class _OptimizerUnpickler(_ArrayUnpickler):
    """The weights unpickler plus `tuple`, which rebuilds (name, array) pairs only."""

    def __init__(self, file, path: str):
        super().__init__(file, path)
        self.allowed = {**self.allowed, ("builtins", "tuple"): tuple}


def _load(path: str, unpickler=_ArrayUnpickler):
    try:
        with open(path, "rb") as f:
            return unpickler(f, path).load()
    except pickle.UnpicklingError as e:  # UnsafePickleError included: names the global
        raise CheckpointError(f"cannot load {path}: {e}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - truncated/garbage bytes fail in many ways
        raise CheckpointError(f"{path} is not a readable PaddleClas file "
                              f"({type(e).__name__}: {str(e)[:120]})") from e


def _array(value):
    """paddle.save stores a tensor inside a list/dict as (name, array)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
        return value[1]
    return value


def _weights(path: str, model, arch: str):
    """(ours -> array, PaddleClas parameter name -> ours) from a PaddleClas .pdparams."""
    raw = _load(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a state_dict")
    names = raw.pop(PADDLE_SAVE_META_KEY, None) or {}
    try:
        theirs_to_ours = {v: k for k, v in paddleclas_key_map(model, arch).items()}
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from e
    weights, param_to_ours = {}, {}
    for key, value in raw.items():
        ours = theirs_to_ours.get(key, key)  # an unknown key is reported by resume, by name
        weights[ours] = np.asarray(_array(value))
        if isinstance(names, dict) and key in names:
            param_to_ours[names[key]] = ours
    return weights, param_to_ours


def _optimizer(path: str, param_to_ours: Dict[str, str], model) -> dict:
    """PaddleClas's Momentum state -> ppdpn's optimizer_state layout (structured names)."""
    raw = _load(path, _OptimizerUnpickler)
    if isinstance(raw, list):
        if len(raw) != 1:
            raise CheckpointError(f"{path} holds {len(raw)} optimizers; ppdpn continues one "
                                  f"Momentum optimizer")
        raw = raw[0]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not an optimizer state")
    out: dict = {}
    for key, value in raw.items():
        if key == "LR_Scheduler":
            continue  # ppdpn recomputes the LR from the global step (see the caller)
        if key == "master_weights":
            out[key] = {_ours(k, param_to_ours, path): _array(v) for k, v in value.items()}
            continue
        if not (isinstance(key, str) and key.endswith(VELOCITY)):
            raise CheckpointError(f"{path}: optimizer state {str(key)[:80]!r} is not Momentum's "
                                  f"(`<param>{VELOCITY}`); ppdpn continues Momentum runs only")
        out[_ours(key[:-len(VELOCITY)], param_to_ours, path) + VELOCITY] = _array(value)
    trainable = [n for n, p in model.named_parameters() if not p.stop_gradient]
    missing = [n for n in trainable if n + VELOCITY not in out]
    if missing:
        raise CheckpointError(f"{path} has no momentum buffer for {len(missing)} parameter(s): "
                              f"{', '.join(missing[:5])}")
    return out


def _ours(param_name: str, param_to_ours: Dict[str, str], path: str) -> str:
    if param_name not in param_to_ours:
        raise CheckpointError(f"{path}: optimizer state for parameter {param_name!r}, which the "
                              f".pdparams name table does not list")
    return param_to_ours[param_name]


def _states(path: str) -> dict:
    raw = _load(path)
    epoch, metric = (raw.get("epoch"), raw.get("metric")) if isinstance(raw, dict) else (None, None)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise CheckpointError(f"{path}: 'epoch' is missing or not a count ({epoch!r})")
    if not isinstance(metric, (int, float)) or isinstance(metric, bool) or not math.isfinite(metric):
        metric = -1.0  # PaddleClas writes 0 before the first eval; nothing to compare against
    return {"epoch": epoch, "metric": float(metric)}


def resume_from_prefix(prefix, cfg, model, steps_per_epoch: int, global_batch: int,
                       log: Callable = print):
    """(path, checkpoint dict) to resume from: the run's own newer checkpoint, else
    PaddleClas's files converted."""
    from ppdpn.checkpoint import load_checkpoint
    own = own_checkpoint_after(prefix, cfg, log)
    if own is not None:
        return own, load_checkpoint(own)
    return prefix, load_checkpoint_prefix(prefix, cfg, model, steps_per_epoch, global_batch, log)


def own_checkpoint_after(prefix, cfg, log: Callable = print) -> Optional[Path]:
    """The output dir's newest ppdpn checkpoint when it is at or past PaddleClas's epoch.

    A requeued Slurm job (or any rerun) repeats `-o Global.checkpoints=output/DPN68/latest`;
    the run has gone on since and checkpointed in its own format, so it continues from
    there instead of going back to PaddleClas's files. Off with Global.auto_resume=false.
    """
    import json

    from ppdpn.checkpoint import latest_checkpoint
    if not cfg.Global.auto_resume:
        return None
    own = latest_checkpoint(cfg.Global.output_dir, log=log)
    if own is None:
        return None
    try:
        epoch = json.loads(own.with_suffix(".json").read_text())["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    theirs = _states(str(prefix) + ".pdstates")["epoch"] if os.path.isfile(str(prefix) + ".pdstates") else 0
    if not isinstance(epoch, int) or epoch < theirs:
        return None
    log(f"[resume] {own} (epoch {epoch}) continues the PaddleClas run {prefix} (epoch {theirs}): "
        f"resuming from it, not from PaddleClas's files")
    return own


def load_checkpoint_prefix(prefix, cfg, model, steps_per_epoch: int, global_batch: int,
                           log: Callable = print) -> dict:
    """A ppdpn checkpoint dict (see checkpoint.build_state_dict) from PaddleClas's files."""
    prefix = str(prefix)
    missing = [prefix + s for s in SUFFIXES if not os.path.isfile(prefix + s)]
    if missing:
        raise CheckpointError(f"PaddleClas checkpoint {prefix}: missing {', '.join(missing)}")
    ema = prefix + ".pdema"
    raw_weights = ema if os.path.isfile(ema) else prefix + ".pdparams"
    weights, param_to_ours = _weights(raw_weights, model, cfg.Arch.name)
    optimizer = _optimizer(prefix + ".pdopt", param_to_ours, model)
    states = _states(prefix + ".pdstates")
    best = Path(prefix).parent / "best_model.pdstates"
    best_metric = max(states["metric"], _states(str(best))["metric"] if best.is_file() else -1.0)
    if raw_weights == ema:
        log(f"[resume] {ema}: training weights taken from it; the EMA average in "
            f"{prefix}.pdparams is not carried over (ppdpn keeps no EMA)")
    log(f"[resume] PaddleClas checkpoint {prefix}: {states['epoch']} epochs done, best top-1 "
        f"{best_metric:.4f}; AMP loss scale (not saved by PaddleClas) starts again from "
        f"AMP.scale_loss")
    from ppdpn import dist
    # Paddle's set_state_dict wants the scheduler's keys; train.py then sets the step itself.
    optimizer["LR_Scheduler"] = {"last_epoch": states["epoch"] * steps_per_epoch - 1,
                                 "last_lr": 0.0}
    return {"model": weights, "optimizer": optimizer, "scaler": None,
            "epoch": states["epoch"], "step_in_epoch": 0,
            "global_step": states["epoch"] * steps_per_epoch, "best_metric": best_metric,
            "rng": None, "config": cfg.to_dict(), "world_size": dist.context().world_size,
            "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
            "arch": cfg.Arch.name}


# ---------------------------------------------------------------- export folders

PROGRAM_FILES = ("inference.json", "inference.pdmodel")  # PIR (Paddle 3), legacy (2.x)
INFER_CONFIG = "inference.yml"  # PaddleClas writes it beside the model (dump_infer_config)


def is_export_folder(model_dir) -> bool:
    """A PaddleClas export: a program + inference.pdiparams and no ppdpn preprocess.json."""
    d = Path(model_dir)
    return (d.is_dir() and not (d / "preprocess.json").exists()
            and (d / "inference.pdiparams").is_file()
            and any((d / name).is_file() for name in PROGRAM_FILES))


def read_export_folder(model_dir, backend: str, recipe: Optional[str] = None) -> dict:
    """The preprocess.json-shaped description of a PaddleClas export folder: from its
    inference.yml, else from the recipe given with -c; refused when neither exists."""
    from ppdpn.predict import ModelDirError
    from ppdpn.preprocess import preprocess_spec
    d = Path(model_dir)
    if backend != "paddle":
        raise ModelDirError(f"{d} is a PaddleClas export (Paddle Inference files, no "
                            f"model.onnx): use --backend paddle")
    meta = {"input_name": "x", "source": "PaddleClas export"}  # to_static names it after forward(x)
    if (d / INFER_CONFIG).is_file():
        spec, labels = _infer_config(d / INFER_CONFIG)
        meta.update(preprocess=spec, labels=labels)
    elif recipe:
        from ppdpn.config import load_config
        cfg = load_config(recipe)
        meta["preprocess"] = preprocess_spec(cfg.DataLoader.resize_short, cfg.DataLoader.image_size)
    else:
        raise ModelDirError(f"{d} holds no {INFER_CONFIG} (PaddleClas's preprocessing) and no "
                            f"preprocess.json (ppdpn's): pass the recipe the model was trained "
                            f"with, -c RECIPE.yaml, so the images are preprocessed as in training")
    return meta


def _infer_config(path: Path):
    """PreProcess.transform_ops (ResizeImage, CropImage, NormalizeImage, ToCHWImage) and
    PostProcess.Topk.label_list of PaddleClas's inference.yml."""
    import yaml

    from ppdpn.predict import ModelDirError
    from ppdpn.preprocess import preprocess_spec
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        ops = doc["PreProcess"]["transform_ops"]
        steps = {}
        for op in ops:
            (name, params), = op.items()
            steps[name] = params or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise ModelDirError(f"{path}: not a PaddleClas inference config with "
                            f"PreProcess.transform_ops ({type(e).__name__}: {str(e)[:120]})") from e
    unknown = sorted(set(steps) - {"DecodeImage", "ResizeImage", "CropImage", "NormalizeImage",
                                   "ToCHWImage"})
    resize, crop, norm = (steps.get(k) for k in ("ResizeImage", "CropImage", "NormalizeImage"))
    if unknown or not all((resize, crop, norm)) or "resize_short" not in resize:
        raise ModelDirError(f"{path}: ppdpn.predict runs ResizeImage (resize_short), CropImage, "
                            f"NormalizeImage, ToCHWImage; this file asks for "
                            f"{', '.join(steps)}")
    scale = norm.get("scale", 1 / 255)
    if isinstance(scale, str) and "/" in scale:
        num, den = scale.split("/")
        scale = float(num) / float(den)
    if abs(float(scale) - 1 / 255) > 1e-6 or norm.get("order", "") not in ("", "hwc"):
        raise ModelDirError(f"{path}: NormalizeImage scale={norm.get('scale')!r}, order="
                            f"{norm.get('order')!r}: ppdpn.predict scales by 1/255, HWC")
    spec = preprocess_spec(int(resize["resize_short"]), int(crop["size"]),
                           norm.get("mean", [0.485, 0.456, 0.406]),
                           norm.get("std", [0.229, 0.224, 0.225]))
    post = (doc.get("PostProcess") or {}).get("Topk") or {}
    labels = post.get("label_list") if isinstance(post, dict) else None
    return spec, labels if isinstance(labels, list) else None
