"""PaddleClas recipes as they are: translate their YAML layout into ppdpn's schema.

`load_config` calls `translate` when a file has PaddleClas's layout (`DataLoader.Train`,
`Loss.Train` lists, ...). The result goes through the same strict typed path as a ppdpn
recipe, so nothing here weakens the checks: every PaddleClas key is honoured (mapped to a
typed field), ignored (listed in IGNORED, meaningless here, logged once) or refused with a
ConfigError naming it and saying what ppdpn supports instead. ppdpn's own key names are
accepted beside PaddleClas's in the same file or in `-o`, and win over the PaddleClas keys
they translate from.

    python -m ppdpn.config --from-paddleclas DPN68.yaml   # the equivalent ppdpn recipe
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Dict, List, Tuple

from ppdpn.config import (AMPConfig, ArchConfig, ConfigError, DataConfig, GlobalConfig,
                          LossConfig, OptimizerConfig, _show, parse_override)

logger = logging.getLogger(__name__)

# PaddleClas keys that have no meaning for ppdpn; ignored, and logged once per file.
IGNORED = {
    "Global.image_shape": "static-graph input shape; ppdpn's export uses DataLoader image_size",
    "Global.save_inference_dir": "export folder; ppdpn's export takes --out",
    "Global.to_static": "only false is accepted: ppdpn trains in dygraph",
    "DataLoader.Train.loader.use_shared_memory": "a paddle.io.DataLoader detail",
    "DataLoader.Eval.loader.use_shared_memory": "a paddle.io.DataLoader detail",
    "Infer.infer_imgs": "ppdpn.predict takes the images on its command line",
    "Infer.batch_size": "ppdpn.predict takes --batch-size",
    "Infer.PostProcess": "ppdpn.predict takes --topk and export --labels",
}
# Known PaddleClas keys ppdpn refuses, with what to use instead.
REFUSED = {
    "Global.start_eval_epoch": "ppdpn evaluates every Global.eval_interval epochs",
    "Global.iter_per_epoch": "an epoch is one pass over train_list",
    "Global.use_multilabel": "ppdpn trains single-label classification",
    "Global.distributed": "ppdpn always runs Fleet data parallel under the launcher",
    "Global.class_num": "set Arch.class_num",
    "Optimizer.no_weight_decay_name": "Optimizer.one_dim_param_no_weight_decay: true "
                                      "(no decay on BN and bias) is what ppdpn offers",
    "EMA": "ppdpn keeps no EMA of the weights",
}
_TRAIN_OPS = "DecodeImage, RandCropImage, RandFlipImage, NormalizeImage, ToCHWImage"
_EVAL_OPS = "DecodeImage, ResizeImage (resize_short), CropImage, NormalizeImage, ToCHWImage"
_SECTIONS = {"Global": GlobalConfig, "Arch": ArchConfig, "Loss": LossConfig,
             "Optimizer": OptimizerConfig, "AMP": AMPConfig, "DataLoader": DataConfig}
_logged = set()


def is_paddleclas_layout(raw: dict) -> bool:
    """PaddleClas splits DataLoader and Loss into Train/Eval; ppdpn never does."""
    return any(isinstance(raw.get(s), dict) and ("Train" in raw[s] or "Eval" in raw[s])
               for s in ("DataLoader", "Loss"))


class _Reader:
    """A PaddleClas mapping read key by key: `where` names the keys in messages."""

    def __init__(self, raw: Any, where: str, src: str):
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{src}: {where} must be a mapping, got {_show(raw)}")
        self.raw, self.where, self.src = dict(raw), where, src

    def key(self, name) -> str:
        if name == "":  # the operator itself
            return self.where
        return f"{self.where}.{name}" if self.where else str(name)

    def take(self, name, default=None):
        return self.raw.pop(name, default)

    def sub(self, name) -> "_Reader":
        return _Reader(self.raw.pop(name, None), self.key(name), self.src)

    def fail(self, name, value, why: str):
        raise ConfigError(f"{self.src}: PaddleClas {self.key(name)}={_show(value)}: {why}")

    def expect(self, name, allowed, why: str):
        """Take `name`; refuse any value outside `allowed` (None: the key is absent)."""
        value = self.raw.pop(name, None)
        if value not in allowed:
            self.fail(name, value, why)
        return value

    def ignore(self, name, notes: List[str]):
        if name in self.raw:
            self.raw.pop(name)
            notes.append(self.key(name))

    def refuse_rest(self, supported: str):
        for name in sorted(self.raw, key=str):
            why = REFUSED.get(self.key(name), f"not supported by ppdpn; supported here: {supported}")
            self.fail(name, self.raw[name], why)


# ---------------------------------------------------------------- -o overrides

def apply_override(raw: dict, text: str) -> None:
    """PaddleClas's `-o a.b.1.c=value`: a number steps into a list (transform_ops.1)."""
    parts, value = parse_override(text)
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {_show(text)}: {'.'.join(parts[:i])} is a list of "
                                  f"{len(node)}; {part!r} is not an index of it")
            if last:
                node[int(part)] = value
            else:
                if node[int(part)] is None:
                    node[int(part)] = {}
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"override {_show(text)}: {'.'.join(parts[:i])} is not a section")


# ---------------------------------------------------------------- translation

def translate(raw: dict, overrides=(), src: str = "<paddleclas>") -> Tuple[dict, str]:
    """PaddleClas recipe dict (+ its -o overrides) -> ppdpn raw dict and the source name."""
    out, src, notes = _translate(raw, overrides, src)
    _log_ignored(src, notes)
    return out, src


def _translate(raw: dict, overrides, src: str) -> Tuple[dict, str, List[str]]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        apply_override(raw, text)
    if overrides:
        src = f"{src} with -o {' '.join(overrides)}"
    src = f"{src} (PaddleClas layout)"
    top = _Reader(raw, "", src)
    out: Dict[str, dict] = {name: {} for name in _SECTIONS}
    notes: List[str] = []
    from ppdpn.paddleclas_data import translate_dataloader  # the data half of the layout
    _global(top.sub("Global"), out, notes)
    _arch(top.sub("Arch"), out)
    _loss(top.sub("Loss"), out, notes)
    _amp(top.sub("AMP"), out)
    _optimizer(top.sub("Optimizer"), out)
    translate_dataloader(top.sub("DataLoader"), out, notes)
    _infer(top.sub("Infer"), out, notes)
    _metric(top.sub("Metric"))
    top.refuse_rest("Global, Arch, Loss, Optimizer, AMP, DataLoader, Infer, Metric")
    return {k: v for k, v in out.items() if v}, src, notes


def _native(reader: _Reader, section: str, out: dict) -> None:
    """ppdpn's own keys of this section, laid over the translated ones."""
    fields = {f.name for f in dataclasses.fields(_SECTIONS[section])}
    for name in [n for n in reader.raw if n in fields]:
        value = reader.take(name)
        if isinstance(value, dict) and isinstance(out[section].get(name), dict):
            out[section][name].update(value)
        else:
            out[section][name] = value


def _log_ignored(src: str, notes: List[str]) -> None:
    if notes and src not in _logged:
        _logged.add(src)
        logger.warning("%s: ignored PaddleClas keys with no meaning in ppdpn: %s", src,
                       "; ".join(f"{n} ({IGNORED[n]})" for n in notes))


def _global(g: _Reader, out: dict, notes: List[str]) -> None:
    o = out["Global"]
    renamed = {"print_batch_step": "print_interval", "use_visualdl": "visualdl",
               "update_freq": "accum_steps"}
    for theirs, ours in renamed.items():
        if theirs in g.raw:
            o[ours] = g.take(theirs)
    g.ignore("image_shape", notes)
    g.ignore("save_inference_dir", notes)
    if g.expect("to_static", (None, False), "ppdpn trains in dygraph only") is not None:
        notes.append("Global.to_static")
    g.expect("eval_during_train", (None, True),
             "ppdpn always evaluates, every Global.eval_interval epochs and at the end "
             "(set eval_interval to the epoch count to evaluate only at the end)")
    g.expect("image_channel", (None, 3), "ppdpn's models and loaders use 3 channels")
    use_dali = g.take("use_dali")
    if use_dali is not None:  # absent: ppdpn's default (DALI); both loaders crop alike
        out["DataLoader"]["backend"] = _bool(g, "use_dali", use_dali) and "dali" or "fallback"
    if "device" in g.raw:
        o["device"] = g.expect("device", ("gpu", "cpu"), "ppdpn runs on gpu or cpu")
    if "pretrained_model" in g.raw:
        o["pretrained_model"] = _weights_path(g, "pretrained_model", g.take("pretrained_model"))
    _native(g, "Global", out)
    g.refuse_rest("the keys of ppdpn's Global (ppdpn/config.py) and print_batch_step, "
                  "use_visualdl, update_freq, use_dali, eval_during_train")


def _bool(reader: _Reader, name, value) -> bool:
    if not isinstance(value, bool):
        reader.fail(name, value, "must be true or false")
    return value


def _weights_path(reader: _Reader, name, value):
    """PaddleClas names weights without the .pdparams suffix and may give a URL."""
    if value is None:
        return None
    if not isinstance(value, str):
        reader.fail(name, value, "must be a path")
    if value.startswith(("http://", "https://")):
        reader.fail(name, value, "ppdpn downloads nothing; download the file and give its path")
    if value.endswith((".pdparams", ".pdckpt")):
        return value
    return value + ".pdparams"


def _arch(a: _Reader, out: dict) -> None:
    pretrained = a.take("pretrained", False)
    if pretrained is True:
        a.fail("pretrained", True, "ppdpn downloads nothing; give the file with "
                                   "Global.pretrained_model=PATH")
    if pretrained not in (False, None):
        out["Global"]["pretrained_model"] = _weights_path(a, "pretrained", pretrained)
    a.expect("input_image_channel", (None, 3), "ppdpn's models take 3 channels")
    if "data_format" in a.raw:  # the loader must hand the model this layout
        out["DataLoader"]["output_layout"] = a.raw["data_format"]
    _native(a, "Arch", out)
    a.refuse_rest("name, class_num, pretrained, data_format, recompute")


def _single_op(item, reader: _Reader, name: str, index: int) -> Tuple[str, _Reader]:
    where = f"{reader.key(name)}[{index}]"
    if not isinstance(item, dict) or len(item) != 1:
        raise ConfigError(f"{reader.src}: PaddleClas {where} must be one `Operator: "
                          f"{{params}}` mapping, got {_show(item)}")
    (op, params), = item.items()
    return str(op), _Reader(params, f"{where}.{op}", reader.src)


def _op_list(reader: _Reader, name: str) -> List[Tuple[str, _Reader]]:
    items = reader.take(name) or []
    if not isinstance(items, list):
        reader.fail(name, items, "must be a list of operators")
    return [_single_op(item, reader, name, i) for i, item in enumerate(items)]


def _loss(loss: _Reader, out: dict, notes: List[str]) -> None:
    for part in ("Train", "Eval"):
        ops = _op_list(loss, part)
        if part == "Train" and len(ops) != 1:
            loss.fail(part, [o for o, _ in ops], "ppdpn trains with one CELoss (epsilon = "
                                                 "label smoothing)")
        for op, p in ops:
            if op != "CELoss":
                p.fail("", op, "ppdpn's loss is CELoss (soft-target cross-entropy; "
                               "epsilon = label smoothing)")
            p.expect("weight", (None, 1, 1.0), "a single loss has weight 1.0")
            if part == "Train" and "epsilon" in p.raw:
                out["Loss"]["label_smoothing"] = p.take("epsilon")
            p.refuse_rest("weight" + (", epsilon" if part == "Train" else ""))
    _native(loss, "Loss", out)
    loss.refuse_rest("Train, Eval, label_smoothing")


def _optimizer(opt: _Reader, out: dict) -> None:
    o = out["Optimizer"]
    reg = opt.sub("regularizer")
    if reg.raw:
        reg.expect("name", ("L2", "L2Decay"), "ppdpn's weight decay is L2")
        o["weight_decay"] = reg.take("coeff", 0.0)
        reg.refuse_rest("name: L2, coeff")
    if "one_dim_param_no_weight_decay" in opt.raw:
        o["no_decay_bn_bias"] = opt.take("one_dim_param_no_weight_decay")
    # ppdpn keeps fp32 master weights whenever AMP runs (Paddle's multi_precision).
    if opt.expect("multi_precision", (None, True, False), "must be true or false") is False \
            and out["AMP"].get("use_amp"):
        opt.fail("multi_precision", False, "ppdpn keeps fp32 master weights whenever AMP is on")
    # PaddleClas uses the LR as written, whatever the global batch: so does the translation
    # (ppdpn's own recipes scale it from base_batch_size; a native key here wins).
    o["lr"] = {"scale_with_batch": False}
    if isinstance(opt.raw.get("lr"), dict):
        lr = _Reader(opt.raw["lr"], opt.key("lr"), opt.src)
        lr.expect("by_epoch", (None, False), "ppdpn decays the LR every iteration")
        opt.raw["lr"] = lr.raw
    _native(opt, "Optimizer", out)
    opt.refuse_rest("name (Momentum), momentum, lr, regularizer, one_dim_param_no_weight_decay, "
                    "multi_precision")


def _amp(amp: _Reader, out: dict) -> None:
    o = out["AMP"]
    if "use_fp16_test" in amp.raw:
        o["eval_fp32"] = not _bool(amp, "use_fp16_test", amp.take("use_fp16_test"))
    _native(amp, "AMP", out)
    amp.refuse_rest("use_amp, level, scale_loss, use_dynamic_loss_scaling, use_fp16_test, "
                    "use_promote, dtype")


def _infer(infer: _Reader, out: dict, notes: List[str]) -> None:
    for name in ("infer_imgs", "batch_size", "PostProcess"):
        infer.ignore(name, notes)
    ops = _op_list(infer, "transforms")
    if ops:  # must describe the eval transform ppdpn exports, or predictions would differ
        from ppdpn.paddleclas_data import eval_transform
        seen = eval_transform(ops, {}, infer, "transforms")
        d = out["DataLoader"]
        for key in ("resize_short", "image_size"):
            if key in seen and key in d and seen[key] != d[key]:
                infer.fail("transforms", seen[key], f"differs from the eval transform's "
                                                    f"{key}={d[key]}; ppdpn predicts with the eval one")
    infer.refuse_rest("transforms, infer_imgs, batch_size, PostProcess")


def _metric(metric: _Reader) -> None:
    """ppdpn always reports top-1 and top-5 accuracy: TopkAcc within those is honoured."""
    for part in ("Train", "Eval"):
        for op, p in _op_list(metric, part):
            topk = p.take("topk", [1, 5])
            if op != "TopkAcc" or not isinstance(topk, list) or any(k not in (1, 5) for k in topk):
                p.fail("topk" if op == "TopkAcc" else "", topk if op == "TopkAcc" else op,
                       "ppdpn reports TopkAcc top-1 and top-5")
            p.refuse_rest("topk")
    metric.refuse_rest("Train, Eval (TopkAcc)")



# ---------------------------------------------------------------- the translation, shown

def _differences(value, default) -> Any:
    """The parts of a config dict that differ from the defaults' (None: none do)."""
    if isinstance(value, dict):
        diff = {k: d for k, v in value.items()
                if (d := _differences(v, default.get(k))) is not None}
        return diff or None
    return None if value == default else value


def recipe_text(path: str, overrides=()) -> str:
    """The ppdpn recipe equivalent to a PaddleClas file: only what differs from the defaults."""
    import yaml

    from ppdpn.config import Config, load_config
    cfg = load_config(path, overrides)
    diff = _differences(cfg.to_dict(), Config().to_dict()) or {}
    with open(path, encoding="utf-8") as f:
        _, _, notes = _translate(yaml.safe_load(f), overrides, path)
    head = [f"ppdpn recipe translated from the PaddleClas recipe {path}",
            "(python -m ppdpn.config --from-paddleclas); only what differs from ppdpn's defaults.",
            "LR: used as written whatever the global batch, as PaddleClas does "
            "(scale_with_batch: false); ppdpn's recipes quote it for base_batch_size and scale."]
    head += [f"ignored (no meaning in ppdpn): {n}: {IGNORED[n]}" for n in notes]
    return ("".join(f"# {line}\n" for line in head)
            + yaml.safe_dump(diff, sort_keys=False, default_flow_style=False))


def main(argv=None) -> int:
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m ppdpn.config",
                                description="Print the ppdpn recipe a PaddleClas recipe means.")
    p.add_argument("--from-paddleclas", required=True, metavar="FILE",
                   help="a PaddleClas YAML recipe, e.g. ppcls/configs/ImageNet/DPN/DPN68.yaml")
    p.add_argument("-o", "--override", action="append", default=[], metavar="key=value",
                   help="a PaddleClas-style override, applied before translating")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    from ppdpn.config import ConfigError as Error  # the package's class, not __main__'s
    try:
        with open(args.from_paddleclas, encoding="utf-8") as f:
            import yaml
            raw = yaml.safe_load(f)
        if not isinstance(raw, dict) or not is_paddleclas_layout(raw):
            raise Error(f"{args.from_paddleclas}: not a PaddleClas recipe (no DataLoader.Train/"
                        f"Eval or Loss.Train/Eval); ppdpn reads its own recipes as they are")
        sys.stdout.write(recipe_text(args.from_paddleclas, args.override))
    except (Error, OSError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0
