"""Manifest build: threads per checking process against file-system latency, and the
cost per rank of a 1.28 M-line split (parse, manifest read, memory).

    python bench/manifest_build.py [--files 2000] [--delay-ms 1] [--workers 1,2]
                                   [--threads 1,4,16,32] [--rounds 3] [--lines 0]

Latency: `--files` JPEGs are hard links to 50 small real ones; every check of a file
(check.inspect_file) is wrapped to sleep `--delay-ms` first, standing in for a network
file system's round trip (the page cache hides the real one here). Without threads the
scan is bounded by files x delay / workers; with them by the parse. Each setting runs
with and without the delay, interleaved over `--rounds` rounds (machine load hits all
alike); the median is reported.

`--lines N` (e.g. 1281167) also writes an N-line list of hard links to the same 50 files
in 1,000 class folders (`--dir` keeps them for the next run), then times the manifest
build with the largest `--workers` x 16 threads (no delay), and, in a fresh process,
what every rank does at start: parse the list and read the manifest (wall, CPU, RSS
delta), and the memory it then holds for the tables (tracemalloc).
The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppdpn.data import check, manifest  # noqa: E402
from ppdpn.data.lists import read_list  # noqa: E402

ORIGINALS = 50


def write_originals(folder: Path) -> list:
    """50 small JPEGs of varied size (cv2), the files every name links to."""
    import cv2
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(ORIGINALS):
        w, h = (int(v) for v in rng.integers(60, 160, 2))
        img = cv2.resize(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8), (w, h))
        names.append(folder / f"orig_{i}.jpg")
        cv2.imwrite(str(names[-1]), img)
    return names


def link_set(root: Path, originals: list, n: int, classes: int) -> Path:
    """An n-line list of hard links to `originals` in `classes` class folders."""
    lines = []
    for c in range(classes):
        (root / "train" / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % classes
        rel = f"train/n{c:08d}/n{c:08d}_{i}.JPEG"
        os.link(originals[i % len(originals)], root / rel)
        lines.append(f"{rel} {c}\n")
    path = root / "train_list.txt"
    path.write_text("".join(lines))
    return path


def time_scan(paths, workers: int, threads: int, delay: float) -> float:
    real = check.inspect_file

    def slow(path):
        time.sleep(delay)
        return real(path)
    check.inspect_file = slow if delay else real
    try:
        start, cpu = time.perf_counter(), cpu_s()
        sizes, _, bad = check.inspect_files(paths, workers=workers, threads=threads, min_parallel=1)
        assert not bad and (sizes > 0).all()
        return time.perf_counter() - start, cpu_s() - cpu
    finally:
        check.inspect_file = real


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (the forked checkers)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def latency(root: Path, originals: list, a) -> dict:
    shutil.rmtree(root / "lat", ignore_errors=True)
    samples = read_list(str(link_set(root / "lat", originals, a.files, 10)), str(root / "lat"))
    times = {}
    for _ in range(a.rounds):
        for workers in a.workers:
            for threads in a.threads:
                for delay in (a.delay_ms / 1000, 0.0):
                    key = f"w{workers}_t{threads}_{'delay' if delay else 'cached'}"
                    times.setdefault(key, []).append(time_scan(samples.paths, workers, threads, delay))
    out = {}
    for key, runs in times.items():
        t, cpu = (float(np.median(v)) for v in zip(*runs))
        out[key] = {"s": round(t, 3), "cpu_us_per_file": round(1e6 * cpu / a.files, 1)}
        print(f"{key:24s} {t:7.3f} s median ({min(r[0] for r in runs):.3f}-"
              f"{max(r[0] for r in runs):.3f}), {a.files / t:,.0f} files/s, "
              f"{out[key]['cpu_us_per_file']} CPU-us per file", flush=True)
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def full_scale(root: Path, originals: list, a) -> dict:
    list_path = root / "big" / "train_list.txt"
    if not list_path.is_file():
        start = time.perf_counter()
        link_set(root / "big", originals, a.lines, 1000)
        print(f"{a.lines:,} links in {time.perf_counter() - start:.1f} s", flush=True)
    samples = read_list(str(list_path), str(root / "big"))
    if os.path.exists(manifest.manifest_path(samples)):  # time a build, not a read
        os.remove(manifest.manifest_path(samples))
    wall, cpu = time.perf_counter(), cpu_s()
    table = manifest.load_or_build(samples, "", workers=max(a.workers))
    res = {"build_s": round(time.perf_counter() - wall, 1), "build_workers": max(a.workers),
           "build_cpu_s": round(cpu_s() - cpu, 1), "bad": len(table.bad),
           "manifest_mb": round(os.path.getsize(manifest.manifest_path(samples)) / 2 ** 20, 1)}
    proc = subprocess.run([sys.executable, __file__, "--rank", str(list_path)], check=True,
                          capture_output=True, text=True)
    res["rank"] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(res), flush=True)
    return res


def rank_start(list_path: str) -> dict:
    """What every rank does at start, in a fresh process: parse the list, read the
    manifest. Wall and CPU time without tracemalloc, then the memory held with it."""
    root = os.path.dirname(list_path)
    rss0 = rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    samples = read_list(list_path, root)
    parsed = time.perf_counter()
    table = manifest.load_or_build(samples, "", workers=1)
    assert not table.built_here
    res = {"parse_s": round(parsed - wall, 3), "manifest_read_s": round(time.perf_counter() - parsed, 3),
           "cpu_s": round(time.process_time() - cpu, 3), "rss_delta_mb": round(rss_mb() - rss0, 1)}
    del samples, table
    tracemalloc.start()
    samples = read_list(list_path, root)
    table = manifest.load_or_build(samples, "", workers=1)
    held, peak = tracemalloc.get_traced_memory()
    res.update(tables_mb=round(held / 2 ** 20, 1), peak_mb=round(peak / 2 ** 20, 1))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--delay-ms", type=float, default=1.0)
    p.add_argument("--workers", default="1,2", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--threads", default="1,4,16,32", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lines", type=int, default=0, help="also time an N-line split")
    p.add_argument("--dir", help="keep the generated files here (reused by the next run)")
    p.add_argument("--rank", help=argparse.SUPPRESS)  # internal: rank_start in a fresh process
    a = p.parse_args(argv)
    if a.rank:
        print(json.dumps(rank_start(a.rank)))
        return 0
    result = {"files": a.files, "delay_ms": a.delay_ms, "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="manifest_bench_") as tmp:
        tmp = a.dir or tmp
        originals = write_originals(Path(tmp) / "orig")
        if a.files:
            result["scan_s"] = latency(Path(tmp), originals, a)
        if a.lines:
            result["full_scale"] = full_scale(Path(tmp), originals, a)
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
