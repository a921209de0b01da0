"""Export a model for deployment: Paddle Inference, ONNX and the preprocessing it expects.

    python -m ppdpn.export -c configs/dpn68.yaml -o Global.pretrained_model=PATH --out DIR
                           [--softmax] [--labels labels.txt]

PATH is a PaddleClas `.pdparams` or one of our checkpoints (ppdpn.models loads either).
DIR receives:
  inference.json + inference.pdiparams  Paddle Inference (PIR), input "image" [N,3,S,S],
                                        any N (dynamic batch), S = DataLoader.image_size
  model.onnx                            the same graph via paddle2onnx (opset 13)
  preprocess.json                       resize/crop/mean/std, RGB, NCHW, output kind, labels
With --softmax the graph ends in a softmax, like PaddleClas's infer_add_softmax.
The model is always exported NCHW: conv weights do not depend on Arch.data_format.
Before anything lands in DIR, both backends are run on one random batch and compared with
the dygraph model; a disagreement beyond 1e-4 (relative to the largest output) is an error.
"""
from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppdpn.predict import ONNX_FILE, PADDLE_FILES, PREPROCESS_FILE, create_runner
from ppdpn.preprocess import preprocess_spec

INPUT_NAME = "image"
# Opset 13: what paddle2onnx 2.1 targets for PIR graphs and every onnxruntime >= 1.8 runs.
ONNX_OPSET = 13
# Agreement required between dygraph and each exported backend, scaled by max |output|:
# fp32 kernels differ by ~1e-6 here (docs/reference.md §8), so 1e-4 only trips on a broken export.
EXPORT_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The export could not be written or does not reproduce the model."""


class WithSoftmax(nn.Layer):
    """The classifier followed by softmax over classes (PaddleClas's infer_add_softmax)."""

    def __init__(self, model: nn.Layer):
        super().__init__()
        self.model = model

    def forward(self, x):
        return F.softmax(self.model(x), axis=-1)


def read_labels(path, class_num: int) -> List[str]:
    """Class names, one per line: plain names, or "index name" lines numbered 0, 1, ...
    (PaddleClas's class_id_map and our data tools' labels.txt), whose index is dropped."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"labels file {path} does not exist")
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while labels and not labels[-1]:
        labels.pop()  # tolerate trailing blank lines, not holes
    if len(labels) != class_num:
        raise ExportError(f"labels file {path} has {len(labels)} names, "
                          f"but the model has Arch.class_num={class_num} classes")
    split = [line.split(maxsplit=1) for line in labels]
    if all(len(parts) == 2 and parts[0] == str(i) for i, parts in enumerate(split)):
        labels = [parts[1] for parts in split]
    return labels


def save_paddle_inference(model: nn.Layer, out_dir: Path, image_size: int) -> None:
    """inference.json + inference.pdiparams with a dynamic batch dimension."""
    spec = paddle.static.InputSpec([None, 3, image_size, image_size], "float32", INPUT_NAME)
    paddle.jit.save(model, str(out_dir / Path(PADDLE_FILES[0]).stem), input_spec=[spec])
    for name in PADDLE_FILES:
        if not (out_dir / name).is_file():
            raise ExportError(f"paddle.jit.save wrote no {name} (is FLAGS_enable_pir_api off?)")


def convert_to_onnx(model_dir: Path, opset: int = ONNX_OPSET) -> Path:
    """model.onnx from the Paddle Inference files; installs nothing at run time."""
    import paddle2onnx
    out = model_dir / ONNX_FILE
    try:
        # optimize_tool "None": the default (polygraphy) pip-installs its deps on first use.
        paddle2onnx.export(str(model_dir / PADDLE_FILES[0]), str(model_dir / PADDLE_FILES[1]),
                           str(out), opset_version=opset, enable_onnx_checker=True,
                           optimize_tool="None")
    except Exception as e:  # paddle2onnx logs the cause and then fails on its own result
        raise ExportError(f"paddle2onnx could not convert {model_dir}: {e}") from e
    if not out.is_file():
        raise ExportError(f"paddle2onnx wrote no {out}; see its log above")
    return out


def verify_export(model: nn.Layer, model_dir: Path, image_size: int, batch: int = 2):
    """(max |difference| of each backend from dygraph on one seeded random batch, classes)."""
    x = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size), np.float32)
    with paddle.no_grad():
        ref = model(paddle.to_tensor(x)).numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    diffs = {}
    for backend in ("paddle", "onnx"):
        out = create_runner(model_dir, backend, "cpu")(x)
        diffs[backend] = float(np.abs(out - ref).max())
        if out.shape != ref.shape or diffs[backend] > EXPORT_TOLERANCE * scale:
            raise ExportError(f"{backend} export disagrees with the model: output {out.shape} "
                              f"vs {ref.shape}, max |diff| {diffs[backend]:.3g}")
    return diffs, ref.shape[1]


def export_model(model: nn.Layer, out_dir, *, name: str, image_size: int = 224,
                 resize_short: int = 256, softmax: bool = False,
                 labels: Optional[List[str]] = None) -> dict:
    """Write the deployment folder; return a summary. Files are staged, then moved in,
    so a failed export never leaves a folder mixing new and old files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    if softmax:
        model = WithSoftmax(model)
        model.eval()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        stage = Path(tmp)
        save_paddle_inference(model, stage, image_size)
        convert_to_onnx(stage)
        diffs, class_num = verify_export(model, stage, image_size)
        if labels and len(labels) != class_num:
            raise ExportError(f"{len(labels)} labels for a model with {class_num} classes")
        meta = {"model": name, "input_name": INPUT_NAME, "class_num": class_num,
                "output": "probabilities" if softmax else "logits",
                "preprocess": preprocess_spec(resize_short, image_size), "labels": labels}
        (stage / PREPROCESS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for f in (*PADDLE_FILES, ONNX_FILE, PREPROCESS_FILE):
            shutil.move(str(stage / f), str(out_dir / f))
    return {"out": str(out_dir), "model": name, "softmax": softmax,
            "files": [*PADDLE_FILES, ONNX_FILE, PREPROCESS_FILE], "max_abs_diff": diffs}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ppdpn.export", description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", default=None, help="YAML recipe (defaults if omitted)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. -o Global.pretrained_model=DPN68_pretrained.pdparams")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--softmax", action="store_true", help="end the graph with softmax")
    p.add_argument("--labels", default=None, help="class names, one per line")
    return p.parse_args(argv)


def build_model(cfg) -> nn.Layer:
    """The recipe's model with Global.pretrained_model loaded, classifier included."""
    from ppdpn.models import create_model
    from ppdpn.models.weights import load_pretrained
    model = create_model(cfg.Arch.name, num_classes=cfg.Arch.class_num)
    path = cfg.Global.pretrained_model
    if not path:
        print("warning: no Global.pretrained_model given: exporting random weights",
              file=sys.stderr)
        return model
    try:
        skipped = load_pretrained(model, path, name=cfg.Arch.name)
    except (pickle.UnpicklingError, EOFError) as e:  # raised without the file's name
        raise ExportError(f"{path}: not a weights file saved by paddle.save ({e})") from e
    # Training may start from a file whose classifier has other classes; a deployed model
    # with a freshly initialised classifier would be silently wrong, so here it is an error.
    if skipped:
        raise ExportError(f"{path}: its classifier does not have Arch.class_num="
                          f"{cfg.Arch.class_num} classes; set -o Arch.class_num to the file's")
    return model


def main(argv=None) -> int:
    from ppdpn.config import ConfigError, load_config
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.override)
        labels = read_labels(args.labels, cfg.Arch.class_num) if args.labels else None
        summary = export_model(build_model(cfg), args.out, name=cfg.Arch.name,
                               image_size=cfg.DataLoader.image_size,
                               resize_short=cfg.DataLoader.resize_short,
                               softmax=args.softmax, labels=labels)
    except (ConfigError, ExportError, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary["weights"] = cfg.Global.pretrained_model
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
