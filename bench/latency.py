"""Inference latency of exported models: Paddle Inference and ONNX Runtime side by side.

    python bench/latency.py --model DIR [DIR ...] [--batch-sizes 1 4 8] [--warmup 3]
                            [--repeat 15] [--threads 0] [--device auto|cpu|gpu]
                            [--trt [--trt-precision fp16]]

DIR is a folder written by `python -m ppdpn.export`. For each model: random input at the
exported crop size (224 by default), warm-up calls, then `repeat` rounds in which every
(batch size, backend) pair is timed once, the two backends in alternating order, so
drifting clock speed or a noisy neighbour hits both alike. Reported: the median ms per
batch, as in the seed page's table (docs/reference.md §6, which is TensorRT FP32 on a V100/T4),
and the ratio Paddle / ONNX Runtime (> 1: ONNX Runtime is faster). The last stdout line
is one JSON object; it also holds the fastest call and the load average, because a busy
machine inflates medians.

Each timed call is followed by an idle gap (--gap-ms, 250): Paddle's OpenMP workers
(libiomp5) keep spinning for KMP_BLOCKTIME = 200 ms after a call, and in one process they
would steal cores from the next ONNX Runtime call (ORT's own spinning is switched off in
ppdpn.predict for the same reason).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# Runnable as `python bench/latency.py` from a checkout that is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppdpn.dist import select_device  # noqa: E402
from ppdpn.predict import TrtOptions, create_runner, read_model_dir  # noqa: E402

BACKENDS = ("paddle", "onnx")
BACKEND_NAMES = {"paddle": "Paddle Inference", "onnx": "ONNX Runtime"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_model(model_dir, batch_sizes, warmup: int, repeat: int, gap_s: float, device: str,
               threads: int, trt: bool, trt_precision: str) -> dict:
    """Median ms per batch for each backend and batch size, measured interleaved."""
    meta = read_model_dir(model_dir, "paddle")
    read_model_dir(model_dir, "onnx")
    size = meta["preprocess"]["crop_size"]
    trt_opts = TrtOptions(trt_precision, max(batch_sizes), size, meta.get("input_name", "image"))
    runners = {"paddle": create_runner(model_dir, "paddle", device, threads, trt_opts if trt else None),
               "onnx": create_runner(model_dir, "onnx", device, threads)}
    rng = np.random.default_rng(0)
    inputs = {bs: rng.standard_normal((bs, 3, size, size), dtype=np.float32) for bs in batch_sizes}
    # Both backends must compute the same thing, or the comparison means nothing.
    outs = {b: runners[b](inputs[batch_sizes[0]]) for b in BACKENDS}
    max_diff = float(np.abs(outs["paddle"] - outs["onnx"]).max())
    for bs in batch_sizes:  # oneDNN and ORT both specialise per shape on first sight
        for b in BACKENDS:
            for _ in range(warmup):
                runners[b](inputs[bs])
    samples = {(b, bs): [] for b in BACKENDS for bs in batch_sizes}
    for r in range(repeat):
        for bs in batch_sizes:
            for b in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
                t0 = time.perf_counter()
                runners[b](inputs[bs])
                samples[(b, bs)].append((time.perf_counter() - t0) * 1e3)
                time.sleep(gap_s)
    ms = {b: {bs: round(statistics.median(samples[(b, bs)]), 2) for bs in batch_sizes}
          for b in BACKENDS}
    ms_min = {b: {bs: round(min(samples[(b, bs)]), 2) for bs in batch_sizes} for b in BACKENDS}
    ratio = {bs: round(ms["paddle"][bs] / ms["onnx"][bs], 2) for bs in batch_sizes}
    return {"model": meta.get("model") or Path(model_dir).name, "dir": str(model_dir),
            "size": size, "ms": ms, "ms_min": ms_min, "ratio_paddle_over_onnx": ratio,
            "max_abs_diff_paddle_vs_onnx": max_diff}


def format_table(results, batch_sizes) -> str:
    head = "| Model | Size | Backend | " + " | ".join(f"bs={bs} (ms)" for bs in batch_sizes) + " |"
    lines = [head, "|" + "---|" * (3 + len(batch_sizes))]
    for res in results:
        rows = [(BACKEND_NAMES[b], res["ms"][b]) for b in BACKENDS]
        rows.append(("ratio Paddle/ORT", res["ratio_paddle_over_onnx"]))
        for label, values in rows:
            cells = " | ".join(f"{values[bs]:.2f}" for bs in batch_sizes)
            lines.append(f"| {res['model']} | {res['size']} | {label} | {cells} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", required=True, help="folders from ppdpn.export")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per backend and batch")
    p.add_argument("--repeat", type=int, default=15, help="timed calls per backend and batch")
    p.add_argument("--gap-ms", type=float, default=250.0,
                   help="idle time after each timed call (see the module docstring)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both (0: all cores)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--trt", action="store_true", help="Paddle Inference with TensorRT (GPU)")
    p.add_argument("--trt-precision", choices=["fp32", "fp16"], default="fp32")
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.repeat < 1 or args.warmup < 0:
        p.error("batch sizes and --repeat must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = select_device(args.device)
    threads = args.threads or os.cpu_count() or 1
    load_before = os.getloadavg()
    results = [time_model(d, args.batch_sizes, args.warmup, args.repeat, args.gap_ms / 1e3,
                          device, threads, args.trt, args.trt_precision) for d in args.model]
    load = [round(a, 2) for a in (load_before[0], os.getloadavg()[0])]
    import onnxruntime
    import paddle
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "device": device,
               "trt": args.trt and f"TensorRT {args.trt_precision}",
               "paddle": paddle.__version__, "onnxruntime": onnxruntime.__version__,
               "loadavg_1min_before_after": load}
    print(f"# {machine['cpu']}, {os.cpu_count()} cores, {threads} threads, device {device}, "
          f"load average {load[0]} -> {load[1]}; median of {args.repeat} interleaved runs "
          f"after {args.warmup} warm-up, random input")
    print(format_table(results, args.batch_sizes))
    print(json.dumps({"bench": "latency", "machine": machine, "warmup": args.warmup,
                      "repeat": args.repeat, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
