"""TensorRT for an exported model, the Paddle 3.x way: PIR-TensorRT (`paddle.tensorrt`).

Our exports are PIR programs (inference.json). Paddle Inference 3.x applies
`Config.enable_tensorrt_engine` to the old `.pdmodel` format only (Paddle-Inference-Demo's
GPUConfig.md says so; `OptimizeInferencePirProgram` in analysis_predictor.cc has no
TensorRT pass): on a `.json` model it would run without TensorRT and say nothing. So
`--trt` converts the model ahead of time with `paddle.tensorrt.convert` (which replaces
each TensorRT-able subgraph by a `pd_op.tensorrt_engine` op and writes a new .json +
.pdiparams), counts the engines it built, and refuses when there are none or when this
Paddle build has no `paddle.tensorrt` (the CPU build, a GPU build without TensorRT).
Never silently without TensorRT.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

ENGINE_OP = "pd_op.tensorrt_engine"


class TrtError(RuntimeError):
    """TensorRT cannot be used for this model here; the message says why and what to do."""


@dataclass(frozen=True)
class TrtOptions:
    """A dynamic batch profile 1..max_batch at the exported crop size."""
    precision: str = "fp32"  # "fp32" or "fp16"
    max_batch: int = 8
    crop_size: int = 224
    input_name: str = "image"


def tensorrt_module():
    """paddle.tensorrt.export, or TrtError naming what is missing."""
    try:
        from paddle.tensorrt import export
    except ImportError as e:
        raise TrtError(f"--trt needs Paddle's PIR-TensorRT (paddle.tensorrt), which this Paddle "
                       f"build lacks ({e}); install a paddlepaddle-gpu 3.x build with TensorRT, "
                       f"or run without --trt") from None
    return export


def count_engines(program) -> int:
    """TensorRT engine ops in a converted PIR program."""
    return sum(op.name() == ENGINE_OP for op in program.global_block().ops)


def converted_prefix(model_dir, cache_dir, opts: TrtOptions) -> Path:
    """Where the converted model of (model files, options) lives: a name from the
    model's bytes and the options, so a re-exported model is never served stale."""
    digest = hashlib.sha256(json.dumps(asdict(opts), sort_keys=True).encode())
    for name in ("inference.json", "inference.pdmodel", "inference.pdiparams"):
        if (Path(model_dir) / name).is_file():  # .pdmodel: a Paddle 2.x export
            digest.update((Path(model_dir) / name).read_bytes())
    return Path(cache_dir) / f"trt-{opts.precision}-b{opts.max_batch}-{digest.hexdigest()[:16]}"


def convert_model(model_dir, cache_dir, opts: TrtOptions, log=print) -> tuple:
    """(json path, pdiparams path, engines) of the TensorRT-converted model; converted
    once per (model, options) into cache_dir. Runs on the first visible GPU
    (paddle.tensorrt.convert uses CUDAPlace(0))."""
    prefix = converted_prefix(model_dir, cache_dir, opts)
    json_path, params = prefix.with_suffix(".json"), prefix.with_suffix(".pdiparams")
    meta_path = prefix.with_suffix(".trt.json")
    if json_path.is_file() and params.is_file() and meta_path.is_file():
        return json_path, params, json.loads(meta_path.read_text())["engines"]
    export = tensorrt_module()
    shape = lambda n: [n, 3, opts.crop_size, opts.crop_size]  # noqa: E731
    inputs = [export.Input(min_input_shape=shape(1), optim_input_shape=shape(opts.max_batch),
                           max_input_shape=shape(opts.max_batch), input_data_type="float32",
                           name=opts.input_name)]
    precision = export.PrecisionMode.FP16 if opts.precision == "fp16" else export.PrecisionMode.FP32
    # min_subgraph_size 3: every conv-BN-ReLU run is worth an engine.
    config = export.TensorRTConfig(inputs=inputs, min_subgraph_size=3, precision_mode=precision,
                                   save_model_dir=str(prefix))
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    log(f"[trt] converting {model_dir} to TensorRT {opts.precision} engines (minutes) ...")
    program = export.convert(str(Path(model_dir) / "inference"), config)
    engines = count_engines(program)
    if engines == 0:
        raise TrtError(f"TensorRT built no engine for {model_dir}: nothing would run in TensorRT")
    meta_path.write_text(json.dumps({"engines": engines, **asdict(opts)}))
    return json_path, params, engines
