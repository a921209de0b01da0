"""Training-step speed and memory, measured side by side on this machine.

    python bench/train_step.py [--parts peer recompute zoo] [--rounds 2] [--steps 2] ...

peer       ppdpn's DenseNet121 against paddle.vision.models.densenet121: the same framework,
           the same batch and input, the same step (ppdpn.benchmark, i.e. train.py
           --benchmark's: forward, soft-label cross-entropy, backward, Momentum), rounds
           alternating the two. ratio = ppdpn img/s / paddle.vision img/s (>= 1: ppdpn is
           not slower). --peer-batch, --peer-size.
recompute  DenseNet121 and DPN68 at batch 32, 224 px, with and without Arch.recompute:
           memory ratio (recompute / plain) and step-time ratio. --big-batch, --big-size.
zoo        every registered model at a small batch (--zoo-batch, --zoo-size), plain and
           with recompute: img/s and peak memory, the README's table.

Every configuration runs in its own process, so each process's peak memory is its own;
within a round the configurations run one after the other, and rounds repeat that order,
so a noisy neighbour or a drifting clock hits all of them alike. Reported per
configuration: the median of all timed steps over the rounds, img/s from it, and
  alloc_peak_mb  the most Paddle's allocator held during a timed step (weights, gradients,
                 momentum, activations): the like-for-like figure;
  peak_rss_mb    the process's peak resident set over its whole life (Paddle itself, model
                 creation, warm-up), rss_model_mb its resident set once the model exists.
Ratios are medians of the per-round ratios (paired, so load changes between rounds
cancel); the same ratios of CPU time (cpu_ms: all threads of the process) come beside
them, steadier where other jobs share the cores. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BIG_MODELS = ("DenseNet121", "DPN68")


def run_worker(spec: dict) -> dict:
    """In this process: build one configuration, run ppdpn.benchmark's timed steps."""
    import paddle

    from ppdpn import dist
    from ppdpn.benchmark import rss_mb, run_benchmark
    from ppdpn.config import load_config
    from ppdpn.engine import build_amp
    from ppdpn.models import create_model

    cfg = load_config(None, [f"Arch.name={spec['model']}", f"Arch.recompute={spec['recompute']}",
                             f"DataLoader.batch_size={spec['batch']}",
                             f"DataLoader.image_size={spec['size']}", "Global.seed=0"])
    ctx = dist.init_distributed(cfg.Global.device)
    paddle.seed(0)
    if spec["source"] == "paddle.vision":
        model = getattr(paddle.vision.models, spec["model"].lower())(num_classes=cfg.Arch.class_num)
    else:
        model = create_model(cfg.Arch.name, num_classes=cfg.Arch.class_num,
                             recompute=cfg.Arch.recompute)
    rss_model = rss_mb()
    record = run_benchmark(cfg, model, build_amp(cfg.AMP, ctx.use_gpu, log=lambda m: None), ctx,
                           warmup=spec["warmup"], steps=spec["steps"])
    trainable = sum(p.size for p in model.parameters() if not p.stop_gradient)
    record.update(source=spec["source"], rss_model_mb=round(rss_model, 1),
                  params_m=round(trainable / 1e6, 3))
    return record


def spawn(spec: dict) -> dict:
    """One configuration in a fresh process; its JSON record."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(specs, rounds: int, label: str) -> list:
    """Run every spec once per round, in the same order each round; aggregate."""
    runs = {i: [] for i in range(len(specs))}
    for r in range(rounds):
        for i, spec in enumerate(specs):
            t0 = time.time()
            runs[i].append(spawn(spec))
            rec = runs[i][-1]
            print(f"[{label}] round {r + 1}/{rounds} {spec['source']}:{spec['model']} "
                  f"recompute={spec['recompute']} step {rec['step_ms']:.0f} ms, alloc peak "
                  f"{rec['alloc_peak_mb']:.0f} MiB ({time.time() - t0:.0f} s, load "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
    out = []
    for i, spec in enumerate(specs):
        steps = [t for rec in runs[i] for t in rec["step_ms_each"]]
        cpu = [t for rec in runs[i] for t in rec["cpu_ms_each"]]
        med = statistics.median(steps)
        out.append({**spec, "step_ms": round(med, 1), "img_s": round(spec["batch"] * 1000 / med, 2),
                    "cpu_ms": round(statistics.median(cpu), 1),
                    "round_step_ms": [rec["step_ms"] for rec in runs[i]],
                    "round_cpu_ms": [rec["cpu_ms"] for rec in runs[i]],
                    "alloc_peak_mb": max(rec["alloc_peak_mb"] for rec in runs[i]),
                    "peak_rss_mb": max(rec["peak_mem_mb"] for rec in runs[i]),
                    "rss_model_mb": min(rec["rss_model_mb"] for rec in runs[i]),
                    "params_m": runs[i][0]["params_m"]})
    return out


def paired_ratio(a: dict, b: dict, key: str = "round_step_ms") -> float:
    """Median over rounds of a's step time / b's step time (wall, or CPU with round_cpu_ms)."""
    return round(statistics.median(x / y for x, y in zip(a[key], b[key])), 3)


def spec(model, recompute, batch, size, args, source="ppdpn") -> dict:
    return {"source": source, "model": model, "recompute": recompute, "batch": batch,
            "size": size, "warmup": args.warmup, "steps": args.steps}


def part_peer(args) -> dict:
    specs = [spec("DenseNet121", False, args.peer_batch, args.peer_size, args),
             spec("DenseNet121", False, args.peer_batch, args.peer_size, args, "paddle.vision")]
    ours, theirs = measure(specs, args.rounds, "peer")
    ratio = paired_ratio(theirs, ours)  # their step time / ours = our speed / theirs
    cpu_ratio = paired_ratio(theirs, ours, "round_cpu_ms")
    print(f"[peer] DenseNet121 batch {args.peer_batch} @ {args.peer_size}px: ppdpn "
          f"{ours['img_s']} img/s, paddle.vision {theirs['img_s']} img/s, ratio {ratio} "
          f"(CPU time: {cpu_ratio})")
    return {"ppdpn": ours, "paddle_vision": theirs, "ratio": ratio, "cpu_ratio": cpu_ratio}


def part_recompute(args) -> list:
    rows = []
    for model in args.big_models:
        plain, lean = measure([spec(model, False, args.big_batch, args.big_size, args),
                               spec(model, True, args.big_batch, args.big_size, args)],
                              args.rounds, "recompute")
        rows.append({"model": model, "batch": args.big_batch, "size": args.big_size,
                     "plain": plain, "recompute": lean,
                     "alloc_ratio": round(lean["alloc_peak_mb"] / plain["alloc_peak_mb"], 3),
                     "rss_ratio": round(lean["peak_rss_mb"] / plain["peak_rss_mb"], 3),
                     "rss_growth_ratio": round((lean["peak_rss_mb"] - lean["rss_model_mb"])
                                               / (plain["peak_rss_mb"] - plain["rss_model_mb"]), 3),
                     "time_ratio": paired_ratio(lean, plain),
                     "cpu_time_ratio": paired_ratio(lean, plain, "round_cpu_ms")})
        r = rows[-1]
        print(f"[recompute] {model} batch {args.big_batch} @ {args.big_size}px: alloc peak "
              f"{plain['alloc_peak_mb']:.0f} -> {lean['alloc_peak_mb']:.0f} MiB "
              f"(x{r['alloc_ratio']}), peak RSS {plain['peak_rss_mb']:.0f} -> "
              f"{lean['peak_rss_mb']:.0f} MiB (x{r['rss_ratio']}), step time "
              f"x{r['time_ratio']} (CPU time x{r['cpu_time_ratio']})")
    return rows


def part_zoo(args) -> list:
    from ppdpn.models import list_models
    from ppdpn.models.__main__ import PUBLISHED
    names = args.models or PUBLISHED + sorted(set(list_models()) - set(PUBLISHED))
    rows = []
    for name in names:
        plain, lean = measure([spec(name, False, args.zoo_batch, args.zoo_size, args),
                               spec(name, True, args.zoo_batch, args.zoo_size, args)],
                              args.rounds, "zoo")
        rows.append({"model": name, "params_m": plain["params_m"],
                     "img_s": plain["img_s"], "alloc_peak_mb": plain["alloc_peak_mb"],
                     "peak_rss_mb": plain["peak_rss_mb"], "recompute_img_s": lean["img_s"],
                     "recompute_alloc_peak_mb": lean["alloc_peak_mb"],
                     "recompute_peak_rss_mb": lean["peak_rss_mb"],
                     "recompute_time_ratio": paired_ratio(lean, plain)})
    print(f"\n[zoo] batch {args.zoo_batch} @ {args.zoo_size}px, median of {args.rounds} x "
          f"{args.steps} steps after {args.warmup} warm-up, one process each")
    print("| model | params (M) | img/s | alloc peak MiB | peak RSS MiB | recompute: img/s "
          "| alloc peak MiB | peak RSS MiB | step time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params_m']} | {r['img_s']} | {r['alloc_peak_mb']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['recompute_img_s']} | "
              f"{r['recompute_alloc_peak_mb']:.0f} | {r['recompute_peak_rss_mb']:.0f} | "
              f"x{r['recompute_time_ratio']} |")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", choices=["peer", "recompute", "zoo"],
                   default=["peer", "recompute", "zoo"])
    p.add_argument("--rounds", type=int, default=2, help="rounds per part")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    p.add_argument("--steps", type=int, default=2, help="timed steps per process")
    p.add_argument("--peer-batch", type=int, default=16)
    p.add_argument("--peer-size", type=int, default=224)
    p.add_argument("--big-models", nargs="+", default=list(BIG_MODELS))
    p.add_argument("--big-batch", type=int, default=32)
    p.add_argument("--big-size", type=int, default=224)
    p.add_argument("--zoo-batch", type=int, default=8)
    p.add_argument("--zoo-size", type=int, default=128)
    p.add_argument("--models", nargs="+", help="zoo: these models only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    result = {"cpu_count": os.cpu_count(), "load_start": round(os.getloadavg()[0], 2)}
    for part in args.parts:
        result[part] = {"peer": part_peer, "recompute": part_recompute, "zoo": part_zoo}[part](args)
    result["load_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
