"""The data half of a PaddleClas recipe: `DataLoader.Train/Eval` (dataset, transform_ops,
batch_transform_ops, sampler, loader) -> ppdpn's one `DataLoader` section.

ppdpn's loaders run one fixed pipeline, PaddleClas's ImageNet one: train = decode RGB,
random resized crop, horizontal flip, normalise; eval = decode, resize the short side,
centre crop, normalise; mixup or cutmix on the batch. A recipe that asks for another
operator, or for these with other settings, is refused naming the operator.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from ppdpn.paddleclas import _EVAL_OPS, _TRAIN_OPS, _native, _op_list, _Reader
from ppdpn.preprocess import IMAGENET_MEAN, IMAGENET_STD


def translate_dataloader(dl: _Reader, out: dict, notes: List[str]) -> None:
    d = out["DataLoader"]
    train, evaluate = dl.sub("Train"), dl.sub("Eval")
    roots = {}
    for part, reader in (("Train", train), ("Eval", evaluate)):
        if not reader.raw:
            continue
        roots[part] = _dataset(reader.sub("dataset"), part, d, notes)
        _sampler(reader.sub("sampler"), part, d)
        loader = reader.sub("loader")
        loader.ignore("use_shared_memory", notes)
        if "num_workers" in loader.raw:
            _same(loader, "num_workers", loader.take("num_workers"), d, "num_workers")
        loader.refuse_rest("num_workers, use_shared_memory")
        reader.refuse_rest("dataset, sampler, loader")
    if len(set(roots.values())) > 1:
        dl.fail("Eval.dataset.image_root", roots["Eval"], f"ppdpn reads train and val from one "
                f"DataLoader.image_root; Train has {roots['Train']!r}")
    _native(dl, "DataLoader", out)
    dl.refuse_rest("Train, Eval and the keys of ppdpn's DataLoader (ppdpn/config.py)")


def _same(reader: _Reader, name, value, d: dict, ours: str) -> None:
    """Train and Eval share one ppdpn field: they must agree."""
    if ours in d and d[ours] != value:
        reader.fail(name, value, f"ppdpn uses one DataLoader.{ours} for train and eval; "
                                 f"the other part has {d[ours]!r}")
    d[ours] = value


def _dataset(ds: _Reader, part: str, d: dict, notes: List[str]):
    ds.expect("name", ("ImageNetDataset",), "ppdpn reads ImageNetDataset list files "
                                            "(`relative/path.JPEG label`)")
    root = ds.take("image_root")
    if not isinstance(root, str):
        ds.fail("image_root", root, "must be a path")
    d["image_root"] = root
    labels = ds.take("cls_label_path")
    if not isinstance(labels, str):
        ds.fail("cls_label_path", labels, "must be a path")
    d["train_list" if part == "Train" else "val_list"] = _list_path(root, labels)
    ds.expect("delimiter", (None, " "), "ppdpn's list files are separated by one space")
    ops = _op_list(ds, "transform_ops")
    if part == "Train":
        train_transform(ops, d, ds)
        _batch_ops(_op_list(ds, "batch_transform_ops"), ds, d)
        ds.refuse_rest("name, image_root, cls_label_path, transform_ops, batch_transform_ops")
    else:
        seen = eval_transform(ops, d, ds)
        for key, value in seen.items():
            _same(ds, "transform_ops", value, d, key)
        ds.refuse_rest("name, image_root, cls_label_path, transform_ops")
    return os.path.normpath(root)


def _list_path(root: str, labels: str) -> str:
    """ppdpn's list paths are relative to image_root (or absolute); PaddleClas's to the cwd."""
    rel = os.path.relpath(os.path.normpath(labels), os.path.normpath(root))
    if not rel.startswith(".."):
        return rel
    return os.path.abspath(labels)


def _sampler(s: _Reader, part: str, d: dict) -> None:
    if not s.raw:
        return
    s.expect("name", ("DistributedBatchSampler",), "ppdpn shards every epoch over the ranks "
                                                   "itself (DistributedBatchSampler)")
    size = s.take("batch_size")
    if size is not None:
        d["batch_size" if part == "Train" else "eval_batch_size"] = size
    s.expect("drop_last", (None, False), "ppdpn reads every sample once per epoch (the last "
                                         "batch is padded, padding never counted)")
    s.expect("shuffle", (None, part == "Train"),
             "ppdpn shuffles train and never eval" if part == "Train" else
             "ppdpn never shuffles eval")
    s.refuse_rest("name, batch_size, drop_last, shuffle")


# ---------------------------------------------------------------- operators

def _size(p: _Reader, name: str) -> int:
    value = p.take(name)
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        p.fail(name, value, "ppdpn crops squares: give one integer")
    return value


def _decode(p: _Reader) -> None:
    p.expect("to_rgb", (None, True), "ppdpn decodes to RGB")
    p.expect("channel_first", (None, False), "ppdpn decodes HWC, then transposes once")
    p.refuse_rest("to_rgb: true, channel_first: false")


def _normalize(p: _Reader, d: dict) -> None:
    scale = p.take("scale", 1.0 / 255.0)
    if isinstance(scale, str) and "/" in scale:  # PaddleClas writes `1.0/255.0`
        try:
            num, den = scale.split("/")
            scale = float(num) / float(den)
        except ValueError:
            p.fail("scale", scale, "must be a number or a/b")
    if not isinstance(scale, (int, float)) or abs(scale - 1 / 255) > 1e-6:
        p.fail("scale", scale, "ppdpn scales pixels by 1/255")
    for name, ours in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        value = p.take(name, list(ours))
        if (not isinstance(value, list) or len(value) != 3 or
                any(not isinstance(v, (int, float)) or abs(v - o) > 1e-6 for v, o in zip(value, ours))):
            p.fail(name, value, f"ppdpn normalises with ImageNet's {name} {list(ours)}")
    p.expect("order", (None, "", "hwc"), "ppdpn normalises HWC images (order: '')")
    p.expect("channel_num", (None, 3), "ppdpn's models take 3 channels")
    if "output_fp16" in p.raw:
        d["output_dtype"] = "float16" if p.take("output_fp16") is True else "float32"
    p.refuse_rest("scale: 1.0/255.0, mean, std (ImageNet's), order: '', channel_num: 3, "
                  "output_fp16")


def _resample(p: _Reader) -> None:
    """ppdpn resizes with OpenCV INTER_LINEAR (DALI's resize matches it)."""
    p.expect("interpolation", (None, "bilinear"), "ppdpn resizes bilinearly (cv2 INTER_LINEAR)")
    p.expect("backend", (None, "cv2"), "ppdpn resizes with OpenCV")


def _each_once(ops: List[Tuple[str, _Reader]], needed, owner: _Reader, name: str,
               what: str) -> None:
    """Each operator of `needed` stands exactly once in `ops`."""
    names = [op for op, _ in ops]
    for op in needed:
        if names.count(op) != 1:
            owner.fail(name, names, f"must hold {op} once; {what}")


def train_transform(ops: List[Tuple[str, _Reader]], d: dict, owner: _Reader,
                    name: str = "transform_ops") -> None:
    _known_ops(ops, _TRAIN_OPS, "ppdpn's train transform is " + _TRAIN_OPS +
               " (+ MixupOperator or CutmixOperator in batch_transform_ops)")
    _each_once(ops, ("DecodeImage", "RandCropImage", "RandFlipImage", "NormalizeImage"),
               owner, name, "ppdpn's train transform is " + _TRAIN_OPS)
    for op, p in ops:
        if op == "DecodeImage":
            _decode(p)
        elif op == "RandCropImage":
            d["image_size"] = _size(p, "size")
            for key in ("scale", "ratio"):
                if key in p.raw:
                    d[key] = p.take(key)
            _resample(p)
            p.expect("use_log_aspect", (None, False), "ppdpn samples the aspect ratio uniformly")
            p.expect("progress_size", (None,), "ppdpn crops one size for the whole run")
            p.refuse_rest("size, scale, ratio")
        elif op == "RandFlipImage":
            p.expect("flip_code", (None, 1), "ppdpn flips horizontally (flip_code: 1)")
            p.refuse_rest("flip_code: 1")
        elif op == "NormalizeImage":
            _normalize(p, d)
        elif op == "ToCHWImage":
            p.refuse_rest("no parameters")


def eval_transform(ops: List[Tuple[str, _Reader]], d: dict, owner: _Reader,
                   name: str = "transform_ops") -> Dict[str, int]:
    """Check an eval (or Infer) transform; return {resize_short, image_size} it sets."""
    seen: Dict[str, int] = {}
    _known_ops(ops, _EVAL_OPS, "ppdpn's eval transform is " + _EVAL_OPS)
    _each_once(ops, ("ResizeImage", "CropImage", "NormalizeImage"), owner, name,
               "ppdpn's eval transform is " + _EVAL_OPS)
    for op, p in ops:
        if op == "DecodeImage":
            _decode(p)
        elif op == "ResizeImage":
            if "size" in p.raw:
                p.fail("size", p.raw["size"], "ppdpn resizes the short side: use resize_short")
            seen["resize_short"] = _size(p, "resize_short")
            _resample(p)
            p.refuse_rest("resize_short")
        elif op == "CropImage":
            seen["image_size"] = _size(p, "size")
            p.refuse_rest("size")
        elif op == "NormalizeImage":
            _normalize(p, dict(d))  # eval's output_fp16 follows train's in ppdpn
        elif op == "ToCHWImage":
            p.refuse_rest("no parameters")
    return seen


def _known_ops(ops, names: str, why: str) -> None:
    """An operator ppdpn does not run is named before anything else is checked."""
    for op, p in ops:
        if op not in names.replace(" (resize_short)", "").split(", "):
            p.fail("", op, why)


def _batch_ops(ops: List[Tuple[str, _Reader]], ds: _Reader, d: dict) -> None:
    """MixupOperator or CutmixOperator alone, or both under OpSampler at 0.5 each
    (ppdpn mixes each batch one way, picked 50/50, when both alphas are set)."""
    if len(ops) > 1:
        ds.fail("batch_transform_ops", [op for op, _ in ops], "ppdpn applies one batch "
                "operator; for mixup or cutmix per batch use OpSampler with prob 0.5 each")
    for op, p in ops:
        if op == "OpSampler":
            chosen = {}
            for name in list(p.raw):
                inner = p.sub(name)
                inner.expect("prob", (0.5,), "ppdpn picks mixup or cutmix 50/50")
                chosen[name] = inner
            if sorted(chosen) != ["CutmixOperator", "MixupOperator"]:
                p.fail("", sorted(chosen), "ppdpn's OpSampler is MixupOperator + CutmixOperator")
            for name, inner in chosen.items():
                _mix_op(name, inner, d)
        else:
            _mix_op(op, p, d)


def _mix_op(op: str, p: _Reader, d: dict) -> None:
    if op not in ("MixupOperator", "CutmixOperator"):
        p.fail("", op, "ppdpn's batch operators are MixupOperator, CutmixOperator, "
                       "or both under OpSampler")
    d["mixup_alpha" if op == "MixupOperator" else "cutmix_alpha"] = p.take("alpha", 1.0)
    p.refuse_rest("alpha")
