"""Classify images with an exported model folder (see ppdpn/export.py).

    python -m ppdpn.predict --model DIR IMAGES_OR_FOLDERS... [--backend paddle|onnx]
                            [--topk 5] [--batch-size 8] [--device auto|cpu|gpu]
                            [--trt [--trt-precision fp16|fp32]]

Preprocessing is read from DIR/preprocess.json, so it is the one the model was exported
with. Paddle Inference runs with oneDNN on CPU, or on the GPU ppdpn.dist.select_device
picks. ONNX Runtime uses CUDA only when onnxruntime-gpu is installed.

TensorRT (GPU only, never run in this project's CPU CI): `--trt` converts the exported
PIR model with Paddle 3's PIR-TensorRT (paddle.tensorrt.convert, see ppdpn/trt.py) with a
dynamic batch profile 1..batch-size at the exported crop size, prints how many TensorRT
engines it built, and refuses when it built none or this Paddle has no paddle.tensorrt.
`--trt-precision fp16` builds FP16 engines (the seed page's latency table is FP32
TensorRT). The first conversion takes minutes; the result is cached (--trt-cache).

A missing file, a file that is not an image, or a model folder lacking a file is reported
by name on stderr; the other images are still predicted. Exit status: 0 when at least one
image was predicted, 1 when none could be, 2 for a bad model folder or bad arguments.
The last stdout line is one JSON object with all predictions and errors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ppdpn.dist import select_device
from ppdpn.preprocess import decode_image, transform_from_spec
from ppdpn.trt import TrtOptions, convert_model

PREPROCESS_FILE = "preprocess.json"
PADDLE_FILES = ("inference.json", "inference.pdiparams")
ONNX_FILE = "model.onnx"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

Runner = Callable[[np.ndarray], np.ndarray]  # float32 NCHW batch -> (N, classes) outputs


class ModelDirError(FileNotFoundError):
    """An exported model folder that is missing a file or holds a broken one."""


def read_model_dir(model_dir, backend: str) -> dict:
    """preprocess.json of `model_dir`, after checking the backend's files are all there."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"model folder {model_dir} does not exist")
    needed = (PREPROCESS_FILE,) + (PADDLE_FILES if backend == "paddle" else (ONNX_FILE,))
    missing = [name for name in needed if not (model_dir / name).is_file()]
    if missing:
        raise ModelDirError(f"model folder {model_dir} lacks {', '.join(missing)} "
                            f"(needed by the {backend} backend; re-run python -m ppdpn.export)")
    try:
        meta = json.loads((model_dir / PREPROCESS_FILE).read_text())
        lacking = {"resize_short", "crop_size", "mean", "std"} - set(meta["preprocess"])
    except (ValueError, KeyError, TypeError) as e:
        lacking = [f"{e.__class__.__name__}: {e}"]
    if lacking:
        raise ModelDirError(f"{model_dir / PREPROCESS_FILE} is not a preprocess file written "
                            f"by ppdpn.export ({', '.join(sorted(lacking))})")
    return meta


def _load_error(model_dir, files, e: Exception) -> ModelDirError:
    """Backends' load errors rarely name the file; this one does."""
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
    return ModelDirError(f"cannot load {' + '.join(str(Path(model_dir) / f) for f in files)} "
                         f"(corrupt or incomplete? re-run python -m ppdpn.export): {first_line}")


def create_paddle_runner(model_dir, device: str = "cpu", threads: Optional[int] = None,
                         trt: Optional[TrtOptions] = None, trt_cache=None) -> Runner:
    """Paddle Inference predictor over DIR/inference.json + .pdiparams, as a callable;
    with `trt`, over the TensorRT-converted copy of that model (ppdpn.trt)."""
    from paddle import inference
    if trt and not device.startswith("gpu"):
        raise ValueError(f"--trt needs a GPU: TensorRT does not run on CPU (device: {device})")
    model_dir = Path(model_dir)
    program = model_dir / PADDLE_FILES[0]
    if not program.is_file():  # a PaddleClas export from Paddle 2.x (see paddleclas_files)
        program = model_dir / "inference.pdmodel"
    files = [program, model_dir / PADDLE_FILES[1]]
    if trt:
        json_path, params, engines = convert_model(model_dir, trt_cache or default_trt_cache(),
                                                   trt, log=lambda m: print(m, file=sys.stderr))
        print(f"[trt] {engines} TensorRT engine(s), {trt.precision}, batch 1..{trt.max_batch}: "
              f"{json_path}", file=sys.stderr)
        files = [json_path, params]
    config = inference.Config(str(files[0]), str(files[1]))
    if device.startswith("gpu"):
        config.enable_use_gpu(256, int(device.split(":")[1]))  # 256 MB initial pool; it grows
    else:
        config.disable_gpu()
        config.enable_mkldnn()  # oneDNN: ~3x faster than plain CPU kernels (docs/reference.md §8)
        config.set_cpu_math_library_num_threads(threads or os.cpu_count() or 1)
    config.disable_glog_info()
    try:
        predictor = inference.create_predictor(config)
    except Exception as e:  # Paddle raises its own error types, none naming the file
        raise _load_error(model_dir, PADDLE_FILES, e) from e
    feed = predictor.get_input_handle(predictor.get_input_names()[0])
    fetch = predictor.get_output_handle(predictor.get_output_names()[0])

    def run(batch: np.ndarray) -> np.ndarray:
        feed.reshape(batch.shape)
        feed.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        predictor.run()
        return fetch.copy_to_cpu()
    return run


def create_onnx_runner(model_dir, device: str = "cpu", threads: Optional[int] = None) -> Runner:
    """ONNX Runtime session over DIR/model.onnx, as a callable."""
    import onnxruntime as ort
    providers = ["CPUExecutionProvider"]
    if device.startswith("gpu"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(f"device {device} chosen, but this onnxruntime has no CUDA "
                             "provider (install onnxruntime-gpu, or pass --device cpu)")
        providers = [("CUDAExecutionProvider", {"device_id": int(device.split(":")[1])}),
                     "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    # No busy-waiting between calls: ORT's idle workers would otherwise hold the cores that
    # image decoding (here) or a Paddle predictor in the same process (bench) needs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: keep stdout/stderr for the predictions
    try:
        session = ort.InferenceSession(str(Path(model_dir) / ONNX_FILE), options, providers=providers)
    except Exception as e:  # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...)
        raise _load_error(model_dir, [ONNX_FILE], e) from e
    input_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
    return run


def create_runner(model_dir, backend: str, device: str = "cpu", threads: Optional[int] = None,
                  trt: Optional[TrtOptions] = None, trt_cache=None) -> Runner:
    if backend == "onnx":
        return create_onnx_runner(model_dir, device, threads)
    return create_paddle_runner(model_dir, device, threads, trt, trt_cache)


def default_trt_cache() -> Path:
    """Converted TensorRT models go here, not into the (maybe read-only) model folder."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ppdpn" / "trt"


def list_images(paths: Sequence[str]) -> Tuple[List[Path], List[dict]]:
    """Files named on the command line, plus images found in named folders (sorted)."""
    files, errors = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
            if not found:
                errors.append({"path": str(p), "error": f"{p}: folder holds no image files"})
            files.extend(found)
        elif p.is_file():
            files.append(p)  # named explicitly: tried whatever its suffix
        else:
            errors.append({"path": str(p), "error": f"{p}: no such file or folder"})
    return files, errors


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, k: int, labels: Optional[List[str]]) -> List[dict]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class_id": int(i), "label": labels[i] if labels else None,
             "prob": round(float(probs[i]), 6)} for i in order]


def predict_files(run: Runner, meta: dict, files: Sequence[Path], batch_size: int = 8,
                  topk: int = 5) -> Tuple[List[dict], List[dict]]:
    """Top-k per decodable file; files that fail to decode come back as errors."""
    predictions, errors = [], []
    is_prob = meta.get("output") == "probabilities"
    for start in range(0, len(files), batch_size):
        batch, names = [], []
        for f in files[start:start + batch_size]:
            try:
                batch.append(transform_from_spec(decode_image(f), meta["preprocess"]))
                names.append(f)
            except (ValueError, OSError) as e:  # undecodable (ImageDecodeError), vanished, ...
                errors.append({"path": str(f), "error": str(e)})
        if not batch:
            continue
        out = run(np.stack(batch))
        probs = out.astype(np.float64) if is_prob else softmax(out)
        for f, p in zip(names, probs):
            predictions.append({"path": str(f), "topk": top_k(p, topk, meta.get("labels"))})
    return predictions, errors


def format_prediction(pred: dict) -> str:
    """`path: name (id) prob, ...`; the id alone when the export had no labels."""
    parts = [(f"{t['label']} ({t['class_id']})" if t["label"] else f"class {t['class_id']}")
             + f" {t['prob']:.4f}" for t in pred["topk"]]
    return f"{pred['path']}: " + ", ".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ppdpn.predict", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--model", required=True, help="folder written by python -m ppdpn.export, or "
                   "a PaddleClas export (inference.json/.pdmodel + .pdiparams, inference.yml or -c)")
    p.add_argument("-c", "--config", help="for a PaddleClas export folder without inference.yml: "
                                          "the recipe whose eval transform to apply")
    p.add_argument("--backend", choices=["paddle", "onnx"], default="paddle")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    p.add_argument("--trt", action="store_true", help="Paddle Inference + TensorRT (GPU only)")
    p.add_argument("--trt-precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--trt-cache", default=None,
                   help="folder for TensorRT-converted models (default ~/.cache/ppdpn/trt)")
    args = p.parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        p.error("--topk and --batch-size must be >= 1")
    if args.trt and args.backend != "paddle":
        p.error("--trt applies to --backend paddle only")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from ppdpn import paddleclas_files
        if paddleclas_files.is_export_folder(args.model):  # PaddleClas's, no preprocess.json
            meta = paddleclas_files.read_export_folder(args.model, args.backend, args.config)
        else:
            meta = read_model_dir(args.model, args.backend)
        device = select_device(args.device)
        trt = None
        if args.trt:
            trt = TrtOptions(args.trt_precision, args.batch_size,
                             meta["preprocess"]["crop_size"], meta.get("input_name", "image"))
        run = create_runner(args.model, args.backend, device, args.threads or None, trt,
                            args.trt_cache)
    except (ModelDirError, ValueError, RuntimeError) as e:  # ConfigError is a ValueError,
        # TrtError a RuntimeError
        print(f"error: {e}", file=sys.stderr)
        return 2
    files, errors = list_images(args.inputs)
    predictions, bad = predict_files(run, meta, files, args.batch_size, args.topk)
    errors += bad
    for err in errors:
        print(f"error: {err['error']}", file=sys.stderr)
    for pred in predictions:
        print(format_prediction(pred))
    print(json.dumps({"model": str(args.model), "backend": args.backend, "device": device,
                      "predictions": predictions, "errors": errors}))
    if not predictions:
        print("error: no image could be predicted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
