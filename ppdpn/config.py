"""Typed, strict configuration: YAML recipe + `-o Section.key=value` overrides.

Unknown keys, wrong types and impossible values raise ConfigError naming the key,
the value and the file. A recipe may inherit another (`_base_: dpn68.yaml`). The
loaded config is frozen: derived values get their own names elsewhere (see train.py),
never written back here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad recipe or override; the message names the key, value and source."""


# Ints must fit int64 (numpy, Paddle); YAML reads any number of digits.
_INT_LIMIT = 2 ** 63
# What yaml.safe_load raises besides YAMLError: ValueError (a timestamp like 2001-13-45,
# an int of more than 4300 digits), OverflowError, RecursionError (deeply nested text).
_YAML_ERRORS = (yaml.YAMLError, ValueError, OverflowError, RecursionError)
_short_repr = reprlib.Repr()
_short_repr.maxstring, _short_repr.maxother, _short_repr.maxlevel = 80, 80, 3


def _show(value) -> str:
    """repr() bounded in length and depth: values in messages may be huge or nested."""
    return _short_repr.repr(value)


def _f(default, *, min=None, max=None, choices=None, doc=""):
    """A field with its constraint, checked by `_check_value`."""
    meta = {"min": min, "max": max, "choices": choices, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class GlobalConfig:
    epochs: int = _f(200, min=1)
    output_dir: str = _f("./output")
    checkpoints: Optional[str] = _f(None, doc="resume from this checkpoint (file or run dir)")
    pretrained_model: Optional[str] = _f(None, doc="initialise weights only")
    auto_resume: bool = _f(True, doc="resume from output_dir's latest checkpoint")
    save_interval: int = _f(1, min=1, doc="epochs between checkpoints")
    save_steps: int = _f(0, min=0, doc="also checkpoint every N global steps (0: off)")
    keep_last: int = _f(3, min=1, doc="checkpoints kept besides the best")
    eval_interval: int = _f(1, min=1)
    print_interval: int = _f(10, min=1, doc="steps between progress lines")
    seed: int = _f(42, min=0, max=2 ** 32 - 1, doc="numpy takes 32-bit seeds")
    deterministic: bool = _f(False, doc="deterministic kernels (CPU runs are bit-exact)")
    device: str = _f("auto", choices=["auto", "gpu", "cpu"])
    max_steps: int = _f(0, min=0, doc="stop after this many global steps (0: no limit)")
    accum_steps: int = _f(1, min=1, doc="batches whose gradients make one optimizer step: "
                          "global batch = DataLoader.batch_size x processes x accum_steps")
    max_skipped_steps: int = _f(20, min=1, doc="AMP overflow skips in a row before stopping")
    on_save_error: str = _f("stop", choices=["stop", "continue"])
    visualdl: bool = _f(True)


@dataclass(frozen=True)
class ArchConfig:
    name: str = _f("DPN68")
    class_num: int = _f(1000, min=1)
    recompute: bool = _f(False, doc="memory-efficient blocks: rebuild concat+BN+ReLU in backward")
    data_format: str = _f("NCHW", choices=["NCHW", "NHWC"])


@dataclass(frozen=True)
class LossConfig:
    label_smoothing: float = _f(0.0, min=0.0, max=0.999)


@dataclass(frozen=True)
class LRConfig:
    name: str = _f("Cosine", choices=["Cosine", "Piecewise"])
    learning_rate: float = _f(0.1, min=0.0)
    warmup_epoch: float = _f(0.0, min=0.0)
    warmup_steps: int = _f(0, min=0, doc="overrides warmup_epoch when > 0")
    warmup_start_lr: float = _f(0.0, min=0.0)
    eta_min: float = _f(0.0, min=0.0, doc="cosine floor")
    decay_epochs: List[int] = _f([30, 60, 90], doc="Piecewise boundaries")
    values: List[float] = _f([0.1, 0.01, 0.001, 0.0001], doc="Piecewise values")
    base_batch_size: int = _f(256, min=1, doc="global batch the LR is quoted for")
    scale_with_batch: bool = _f(True, doc="lr *= global_batch / base_batch_size")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = _f("Momentum", choices=["Momentum"])
    momentum: float = _f(0.9, min=0.0, max=1.0)
    weight_decay: float = _f(1e-4, min=0.0, doc="L2 coefficient")
    no_decay_bn_bias: bool = _f(False)
    lr: LRConfig = field(default_factory=LRConfig)


@dataclass(frozen=True)
class AMPConfig:
    use_amp: bool = _f(False)
    level: str = _f("O1", choices=["O1", "O2"])
    dtype: str = _f("float16", choices=["float16", "bfloat16"])
    scale_loss: float = _f(128.0, min=1.0)
    use_dynamic_loss_scaling: bool = _f(True)
    eval_fp32: bool = _f(True, doc="evaluate with fp32 weights and inputs (under O2: the "
                         "fp32 master copies); false: under autocast at `level`")
    master_grad: bool = _f(False, doc="O2 only: keep fp32 weight gradients (decorate's "
                           "master_grad) for the update, weight decay and clipping")
    use_promote: bool = _f(True, doc="O2: an op with an fp32 input runs in fp32 (Paddle's "
                                     "default; PaddleClas's recipes set false)")


@dataclass(frozen=True)
class DataConfig:
    backend: str = _f("dali", choices=["dali", "fallback"])
    image_root: str = _f("./data/ILSVRC2012")
    train_list: str = _f("train_list.txt", doc="relative to image_root, or absolute")
    val_list: str = _f("val_list.txt")
    batch_size: int = _f(64, min=1, doc="per device")
    eval_batch_size: int = _f(0, min=0, doc="per device; 0: same as batch_size")
    num_workers: int = _f(4, min=0, doc="DALI threads (on a CPU also those finishing train "
                                        "batches) / DataLoader workers")
    image_size: int = _f(224, min=8)
    resize_short: int = _f(256, min=8)
    scale: List[float] = _f([0.08, 1.0])
    ratio: List[float] = _f([0.75, 1.3333333333333333])
    shuffle_block: int = _f(1, min=1, doc="1: shuffle every train sample over the whole split. "
                                          "N > 1: shuffle blocks of N consecutive sample ids, "
                                          "then the samples of each shuffle_window blocks: a "
                                          "reader of packed shards reads a block at once "
                                          "(data/README.md)")
    shuffle_window: int = _f(8, min=1, doc="blocks whose samples are shuffled together "
                                           "(with shuffle_block > 1)")
    mixup_alpha: float = _f(0.0, min=0.0)
    cutmix_alpha: float = _f(0.0, min=0.0)
    drop_bad_files: bool = _f(False, doc="drop files failing the pre-flight check")
    manifest_dir: str = _f("", doc="folder of the manifest of checked files (built once per "
                                   "data set, read by every rank); '': next to the list file "
                                   "(<list>.manifest.npz) or class-folder tree (<folder>.manifest.npz)")
    output_layout: str = _f("NCHW", choices=["NCHW", "NHWC"])
    output_dtype: str = _f("float32", choices=["float32", "float16"])
    prefetch: int = _f(2, min=1)


@dataclass(frozen=True)
class Config:
    Global: GlobalConfig = field(default_factory=GlobalConfig)
    Arch: ArchConfig = field(default_factory=ArchConfig)
    Loss: LossConfig = field(default_factory=LossConfig)
    Optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    AMP: AMPConfig = field(default_factory=AMPConfig)
    DataLoader: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp, value, key: str, src: str):
    """Check `value` against annotation `tp`; return it (ints widen to float)."""
    origin = get_origin(tp)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in get_args(tp) if a is not type(None)]
        return _coerce(inner, value, key, src)
    if origin in (list, List):
        (inner,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{src}: {key}={_show(value)} must be a list of {_type_name(inner)}")
        return [_coerce(inner, v, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= _INT_LIMIT:
                raise ConfigError(f"{src}: {key}={_show(value)} does not fit 64 bits")
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            try:
                number = float(number)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{src}: {key}={_show(value)} must be a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            if "\x00" in value:  # no path or name may hold one; the OS refuses it later
                raise ConfigError(f"{src}: {key}={_show(value)} contains a NUL character")
            return value
    raise ConfigError(f"{src}: {key}={_show(value)} must be of type {_type_name(tp)}, "
                      f"got {type(value).__name__}")


def _check_value(meta, value, key, src):
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    for v in values:
        if meta.get("choices") and v not in meta["choices"]:
            raise ConfigError(f"{src}: {key}={_show(v)} is not one of {meta['choices']}")
        if meta.get("min") is not None and v < meta["min"]:
            raise ConfigError(f"{src}: {key}={_show(v)} must be >= {meta['min']}")
        if meta.get("max") is not None and v > meta["max"]:
            raise ConfigError(f"{src}: {key}={_show(v)} must be <= {meta['max']}")


def _build(cls, raw: Any, prefix: str, src: str):
    """Build dataclass `cls` from dict `raw`, rejecting unknown keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: {prefix or 'top level'} must be a mapping, got {_show(raw)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in raw if k not in fields), key=str)  # YAML keys may be any type
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{src}: unknown key {where}{str(unknown[0])[:80]} "
                          f"(known under {prefix or 'top level'}: {', '.join(fields)})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key, src)
        else:
            value = _coerce(tp, value, key, src)
            _check_value(fields[name].metadata, value, key, src)
            kwargs[name] = value
    return cls(**kwargs)


def _cross_check(cfg: Config, src: str) -> None:
    """Constraints spanning several keys."""
    from ppdpn.models import list_models  # lazy: config is imported by everything

    if cfg.Arch.name not in list_models():
        raise ConfigError(f"{src}: Arch.name={cfg.Arch.name!r} is not a registered model "
                          f"(known: {', '.join(list_models())})")
    lr = cfg.Optimizer.lr
    if lr.name == "Piecewise" and len(lr.values) != len(lr.decay_epochs) + 1:
        raise ConfigError(f"{src}: Optimizer.lr.values needs len(decay_epochs)+1 = "
                          f"{len(lr.decay_epochs) + 1} entries, got {lr.values!r}")
    if lr.decay_epochs != sorted(lr.decay_epochs):
        raise ConfigError(f"{src}: Optimizer.lr.decay_epochs={lr.decay_epochs!r} must increase")
    if cfg.Arch.data_format != cfg.DataLoader.output_layout:
        raise ConfigError(f"{src}: Arch.data_format={cfg.Arch.data_format!r} needs "
                          f"DataLoader.output_layout={cfg.Arch.data_format!r}, "
                          f"got {cfg.DataLoader.output_layout!r}")
    d = cfg.DataLoader
    if d.output_dtype == "float16" and not cfg.AMP.use_amp:
        raise ConfigError(f"{src}: DataLoader.output_dtype=float16 feeds fp16 images to the "
                          f"model, which only AMP runs: set AMP.use_amp=true or "
                          f"DataLoader.output_dtype=float32")
    if cfg.AMP.master_grad and cfg.AMP.level != "O2":
        raise ConfigError(f"{src}: AMP.master_grad=true needs AMP.level=O2 (O1 keeps fp32 "
                          f"weights and gradients already), got {cfg.AMP.level!r}")
    for key, pair in (("scale", d.scale), ("ratio", d.ratio)):
        if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
            raise ConfigError(f"{src}: DataLoader.{key}={pair!r} must be [low, high], 0 < low <= high")
    if d.scale[1] > 1.0:
        raise ConfigError(f"{src}: DataLoader.scale={d.scale!r}: area fraction above 1")
    if d.resize_short < d.image_size:
        raise ConfigError(f"{src}: DataLoader.resize_short={d.resize_short} is smaller than "
                          f"DataLoader.image_size={d.image_size}")


# ---------------------------------------------------------------- overrides

def parse_override(text: str):
    """`Section.key=value` -> (['Section', 'key'], value parsed as YAML, never eval)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {_show(text)} must look like Section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p or not p.replace("_", "").isalnum() for p in parts):
        raise ConfigError(f"override {_show(text)}: bad key {_show(key)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except _YAML_ERRORS as e:
        raise ConfigError(f"override {_show(text)}: value is not valid YAML "
                          f"({e.__class__.__name__}: {str(e)[:100]})") from None
    return parts, value


def _apply_override(raw: dict, parts, value, text):
    node = raw
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {_show(text)}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: Optional[str] = None, overrides=()) -> Config:
    """Load a YAML recipe (with its `_base_` chain) or the defaults, apply `-o` overrides."""
    src = str(path) if path else "<defaults>"
    from ppdpn.recipe import load_with_bases  # it checks each base with this module
    raw: dict = load_with_bases(str(path)) if path else {}
    from ppdpn import paddleclas
    if paddleclas.is_paddleclas_layout(raw):
        # A PaddleClas recipe as it is: its -o overrides (list indexes too) apply to its
        # own layout, then it is translated into this schema and checked like ours.
        raw, src = paddleclas.translate(raw, overrides, src)
        overrides = ()
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(raw, parts, value, text)
    if overrides:
        src = f"{src} with -o {' '.join(overrides)}"
    cfg = _build(Config, raw, "", src)
    _cross_check(cfg, src)
    return cfg


def code_version() -> str:
    """git describe of the checkout this package runs from, or the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from ppdpn import __version__
    return __version__


def save_resolved(cfg: Config, out_dir: str, extra: Optional[dict] = None) -> Path:
    """Write the resolved config (plus code version and derived values) as YAML."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = cfg.to_dict()
    doc["_run"] = {"code_version": code_version(), **(extra or {})}
    path = out / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(json.loads(json.dumps(doc)), sort_keys=False))
    tmp.replace(path)
    return path


if __name__ == "__main__":  # python -m ppdpn.config --from-paddleclas FILE
    from ppdpn.paddleclas import main
    raise SystemExit(main())
