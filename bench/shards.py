"""Packed shards against loose files: pack throughput, then Samples.read img/s.

    python bench/shards.py [--images 4000] [--rounds 5] [--work DIR]

Makes `--images` JPEGs of ImageNet's typical size (bench/loader.py's generator), packs
them with data.pack (page cache warm, fsync per shard as always), then reads every
sample in a shuffled order through Samples.read, loose and packed in turn for
`--rounds` rounds. This measures the per-sample read path only (open + read + close
against one pread on an open shard); what per-file latency costs on a network file
system is what shards are for and is not visible on a local disk. Ends with one
JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loader import load_photos, write_train_set  # noqa: E402
from data import pack  # noqa: E402
from ppdpn.data.lists import load_split  # noqa: E402


def read_rate(samples, order):
    """Samples.read of every sample in `order`: (images per second, CPU us per image).
    CPU time is reported too because other jobs on a shared machine move wall time."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in order:
        samples.read(i)
    cpu = time.process_time() - cpu
    return len(order) / (time.perf_counter() - start), 1e6 * cpu / len(order)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shard-size", default="64MiB")
    p.add_argument("--work", help="keep the data set here (default: a temporary folder)")
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_shards_"))
    if not (work / "train_list.txt").is_file():
        write_train_set(work, load_photos(), a.images)
    shutil.rmtree(work / "shards", ignore_errors=True)
    loose = load_split(str(work), "train_list.txt")
    for i in range(len(loose)):  # page cache warm for the pack, as for the reads
        loose.read(i)
    total = sum(os.path.getsize(loose.name(i)) for i in range(len(loose)))
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        assert pack.main(["--root", str(work), "--list", "train_list.txt",
                          "--shard-size", a.shard_size]) == 0
    pack_s = time.perf_counter() - start
    shards = load_split(str(work), "shards/train.index.npz")
    order = np.random.default_rng(0).permutation(len(loose))
    read_rate(shards, order)  # shard pages warm too
    rates = {"loose": [], "shards": []}
    cpu_us = {"loose": [], "shards": []}
    for _ in range(a.rounds):
        for name, samples in (("loose", loose), ("shards", shards)):
            rate, us = read_rate(samples, order)
            rates[name].append(rate)
            cpu_us[name].append(us)
    result = {"images": len(loose), "mb": round(total / 1e6, 1),
              "shards": len(shards.index.shards),
              "pack_s": round(pack_s, 2), "pack_mb_s": round(total / 1e6 / pack_s, 1),
              "pack_files_s": round(len(loose) / pack_s),
              "read_img_s": {k: round(float(np.median(v))) for k, v in rates.items()},
              "read_img_s_range": {k: [round(min(v)), round(max(v))] for k, v in rates.items()},
              "ratio": round(float(np.median(np.divide(rates["shards"], rates["loose"]))), 2),
              "read_cpu_us": {k: round(float(np.median(v)), 1) for k, v in cpu_us.items()}}
    print(f"pack: {result['images']} files, {result['mb']} MB in {pack_s:.1f} s "
          f"({result['pack_mb_s']} MB/s, {result['pack_files_s']} files/s, "
          f"{result['shards']} shards)")
    print(f"Samples.read: loose {result['read_img_s']['loose']} img/s, shards "
          f"{result['read_img_s']['shards']} img/s (median of {a.rounds}), ratio {result['ratio']}; "
          f"CPU per image {result['read_cpu_us']['loose']} vs {result['read_cpu_us']['shards']} us")
    print(json.dumps(result))
    if not a.work:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
