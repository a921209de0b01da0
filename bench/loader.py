"""Loader throughput: DALI train pipeline vs the fallback loader, on the same JPEGs.

    python bench/loader.py [--images 1600] [--batch-size 32] [--threads 2] [--rounds 30]

Writes ImageNet-like JPEGs (~500x375, quality 90, cut from the photographs scikit-image
ships) to a temporary folder, then times, interleaved in each round so machine load
hits all alike: the DALI loader's epoch (our iterator: paddle tensors via DLPack), the
same pipeline driven by bare pipe.run(), and the fallback loader (paddle DataLoader with
`threads` OpenCV worker processes). On a CPU the loader finishes train batches on the
host (DaliLoader.finish: resize, flip, normalise of DALI's decoded crops), so there the
bare figure is pipe.run() + finish to a numpy batch: what the iterator adds is the rest
(paddle hand-off, labels, bookkeeping). Whole epochs are timed (start-up until the first
batch is also reported apart), with the CPU time they cost. Rates are medians over
the rounds; ratios are medians of the ratios within each round (paired, so that a
slow round slows both sides).
Other processes on a 2-core machine change every wall-clock number (the load average
is reported); CPU time per image is the steadier measure of the same thing.
Also measures the DALI eval transform against PaddleClas's OpenCV one on the photos.
`--stages` also times variants of the CPU train pipeline on the same bytes, read into
memory first: ROI decode alone, full decode alone, then ROI decode + resize + normalise
by DALI's CPU operators and by OpenCV in DaliLoader.finish, which is what the loader
runs on a CPU (the source of docs/performance.md's stage table).
The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402

from ppdpn.config import DataConfig  # noqa: E402
from ppdpn.data import build_loader  # noqa: E402
from ppdpn.data.base import MEAN_255, STD_255  # noqa: E402
from ppdpn.data.dali import linear_resize_args  # noqa: E402
from ppdpn.dist import DistContext  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
          "immunohistochemistry", "stereo_motorcycle")


def load_photos():
    import skimage.data as sd
    out = {}
    for name in PHOTOS:
        img = getattr(sd, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo pair: the left view
        out[name] = img[..., :3] if img.ndim == 3 else np.stack([img] * 3, -1)
    return out


def write_photos(root: Path, photos) -> None:
    """Each photograph as a JPEG, as is, plus the val list: the eval comparison set."""
    os.makedirs(root / "photos", exist_ok=True)
    lines = []
    for k, (name, img) in enumerate(photos.items()):
        cv2.imwrite(str(root / "photos" / f"{name}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        lines.append(f"photos/{name}.jpg {k}\n")
    (root / "val_list.txt").write_text("".join(lines))


def write_train_set(root: Path, photos, count: int, seed: int = 0) -> None:
    """`count` JPEGs of ImageNet's typical size, random crops of the photographs."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "train", exist_ok=True)
    imgs = list(photos.values())
    lines = []
    for i in range(count):
        src = imgs[i % len(imgs)]
        h, w = src.shape[:2]
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (int(rng.integers(350, 641)), int(rng.integers(280, 501)))
        out = cv2.resize(src[y:y + ch, x:x + cw], size, interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(root / "train" / f"{i:05d}.jpg"), cv2.cvtColor(out, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        lines.append(f"train/{i:05d}.jpg {i % 1000}\n")
    (root / "train_list.txt").write_text("".join(lines))


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _rate(batches) -> Tuple[float, float, float]:
    """(img/s over the whole epoch, seconds until its first batch, CPU ms per image).
    The whole epoch is timed: with prefetching, rates measured after the first batch
    flatter whichever loader queued more batches during start-up."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    first, n = None, 0
    for count in batches:
        first = first or time.perf_counter()
        n += count
    wall = time.perf_counter() - start
    return n / wall, first - start, (_cpu_seconds() - cpu) / n * 1000


def epoch_images(loader, epoch: int):
    for images, labels, valid in loader.epoch(epoch):
        yield images.shape[0]


def bare_pipe_batches(loader, epoch: int):
    """The same pipelines and feeders, taking turns as in the loader, no DLPack, no
    paddle (CPU: finished to numpy)."""
    idx, valid = loader.plan.batches(epoch)
    triples = loader.pipelines(epoch, idx, valid, 0)
    for step in range(loader.steps_per_epoch):
        feeder, pipe, _ = triples[step % len(triples)]
        out, _, _ = pipe.run()  # images, labels, valid
        if loader.finish_on_host:
            out = loader.finish(out, feeder.flips[step])
        feeder.release(step)
        yield out
    for feeder, _, _ in triples:
        feeder.close()
    loader._park(triples)  # reused by the next epoch, as DaliLoader.epoch does


def bare_pipe_images(loader, epoch: int):
    """Like epoch_images, the consumer holds each batch until the next one arrives."""
    for out in bare_pipe_batches(loader, epoch):
        yield len(out)


def round_order(names, r: int) -> list:
    """Round r's order: the rotations of `names`, then those of its reverse. Interleaved,
    load changes hit all loaders; over 2 x len(names) rounds each starts each position
    equally often and follows each other loader equally often (the fallback's exit,
    its worker processes' memory returned to the system, slows whatever runs next)."""
    seq = names if (r // len(names)) % 2 == 0 else names[::-1]
    k = r % len(names)
    return seq[k:] + seq[:k]


STAGES = ("roi_decode", "full_decode", "roi_decode+dali_resize+dali_normalize",
          "roi_decode+opencv_finish")


def stage_rates(loader, rounds: int) -> dict:
    """{variant: (img/s, CPU ms per image)}, medians over `rounds` interleaved rounds."""
    from nvidia.dali import Pipeline, fn, types
    paths = loader.samples.paths
    idx, _ = loader.plan.batches(0)
    data = [np.fromfile(p, dtype=np.uint8) for p in paths]
    feeds, flips = [], []  # the train pipeline's inputs on a CPU, the flips apart
    for row in idx:
        win, flip = loader.windows(0, row)
        feeds.append(loader.pipeline_inputs([data[i] for i in row], win, flip))
        flips.append(flip)

    def build(variant):
        batches = ((*feed, flip) for feed, flip in zip(feeds, flips))
        pipe = Pipeline(batch_size=loader.batch_size, num_threads=loader.cfg.num_workers,
                        device_id=None, prefetch_queue_depth=loader.cfg.prefetch)
        with pipe:
            enc, anchor, shape, flip = fn.external_source(
                source=lambda: next(batches), num_outputs=4, batch=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32])
            if variant == "full_decode":
                out = fn.decoders.image(enc, device="cpu", output_type=types.RGB)
            else:
                out = fn.decoders.image_slice(enc, anchor, shape, device="cpu",
                                              output_type=types.RGB, normalized_anchor=False,
                                              normalized_shape=False, adjust_orientation=False)
            if "dali_resize" in variant:
                out = fn.resize(out, size=[loader.image_size] * 2, **linear_resize_args())
                out = fn.crop_mirror_normalize(out, mirror=flip, mean=list(MEAN_255),
                                               std=list(STD_255), output_layout="CHW")
            pipe.set_outputs(out)
        pipe.build()
        return pipe

    def run(variant):
        pipe = build(variant)
        for k in range(len(feeds) - loader.cfg.prefetch - 1):  # the source runs ahead
            (out,) = pipe.run()
            if variant.endswith("opencv_finish"):  # what the loader runs on a CPU
                out = loader.finish(out, flips[k])
            yield len(out)

    got = {v: ([], []) for v in STAGES}
    for _ in range(rounds):
        for v in STAGES:
            rate, _, cpu = _rate(run(v))
            got[v][0].append(rate)
            got[v][1].append(cpu)
    return {v: (statistics.median(r), statistics.median(c)) for v, (r, c) in got.items()}


def eval_difference(root: Path, threads: int) -> dict:
    """Mean |DALI eval - PaddleClas OpenCV eval| in 0-255 levels, per photograph."""
    cfg = DataConfig(backend="dali", image_root=str(root), batch_size=1, num_workers=threads)
    loader = build_loader(cfg, "val", DistContext(), seed=0)
    diffs = {}
    for (images, _, _), path in zip(loader.epoch(0), loader.samples.paths):
        got = images.numpy()[0].transpose(1, 2, 0) * np.asarray(STD_255) + np.asarray(MEAN_255)
        img = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        h, w = img.shape[:2]
        percent = 256 / min(w, h)
        rw, rh = int(round(w * percent)), int(round(h * percent))
        ref = cv2.resize(img, (rw, rh), interpolation=cv2.INTER_LINEAR)
        x, y = (rw - 224) // 2, (rh - 224) // 2
        ref = ref[y:y + 224, x:x + 224].astype(np.float64)
        diffs[Path(path).stem] = float(np.abs(got - ref).mean())
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    # 30 rounds: a multiple of round_order's balanced cycle of 6. Measured here, the
    # median ratio's run-to-run spread was 2.03-2.19 in ten 30-round runs (sd ~2 %) and
    # 1.98-2.22 in fourteen 10-round runs (sd ~3 %); single rounds' sd is 2-10 %.
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--stage-rounds", type=int, default=10)
    p.add_argument("--stages", action="store_true", help="also time the CPU pipeline's stages")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ppdpn_bench_") as tmp:
        root = Path(tmp)
        photos = load_photos()
        write_photos(root, photos)
        write_train_set(root, photos, a.images)
        cfg = dict(image_root=str(root), batch_size=a.batch_size, num_workers=a.threads)
        dali = build_loader(DataConfig(backend="dali", **cfg), "train", DistContext(), seed=0)
        fallback = build_loader(DataConfig(backend="fallback", **cfg), "train", DistContext(), 0)
        _rate(epoch_images(dali, 100))  # warm the page cache and DALI's allocations
        runs = {"dali": lambda e: epoch_images(dali, e),
                "bare": lambda e: bare_pipe_images(dali, e),
                "fallback": lambda e: epoch_images(fallback, e)}
        rates, startup, cpu_ms = ({k: [] for k in runs} for _ in range(3))
        names = list(runs)
        for r in range(a.rounds):
            for name in round_order(names, r):
                rate, up, cpu = _rate(runs[name](r))
                rates[name].append(rate)
                startup[name].append(up)
                cpu_ms[name].append(cpu)
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f} img/s ({cpu_ms[k][-1]:.2f} CPU ms/img)"
                                             for k, v in rates.items()), flush=True)
        eval_mad = eval_difference(root, a.threads)
        stages = stage_rates(dali, a.stage_rounds) if a.stages else {}
    for v, (rate, cpu) in stages.items():
        print(f"stage {v}: {rate:.0f} img/s, {cpu:.2f} CPU ms/img")
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_ms.items()}

    def paired(a, b):  # median over rounds of a[r] / b[r]
        return statistics.median(x / y for x, y in zip(a, b))
    print("eval |DALI - OpenCV| per photo (0-255 levels): "
          + ", ".join(f"{k} {v:.3f}" for k, v in eval_mad.items()))
    result = {
        "dali_img_s": round(med["dali"], 1), "fallback_img_s": round(med["fallback"], 1),
        "ratio": round(paired(rates["dali"], rates["fallback"]), 2),
        "bare_pipe_img_s": round(med["bare"], 1),
        "iterator_overhead": round(paired(rates["bare"], rates["dali"]) - 1.0, 4),
        "iterator_overhead_cpu": round(paired(cpu_ms["dali"], cpu_ms["bare"]) - 1.0, 4),
        # CPU cost per image: what bounds img/s on idle cores, and less noisy than wall time
        "dali_cpu_ms_per_img": round(cpu["dali"], 3),
        "fallback_cpu_ms_per_img": round(cpu["fallback"], 3),
        "cpu_ratio": round(paired(cpu_ms["fallback"], cpu_ms["dali"]), 2),
        "dali_startup_s": round(statistics.median(startup["dali"]), 3),
        "fallback_startup_s": round(statistics.median(startup["fallback"]), 3),
        "eval_mad_vs_opencv": round(float(np.mean(list(eval_mad.values()))), 3),
        "eval_mad_max_photo": round(max(eval_mad.values()), 3),
        "images": a.images, "batch_size": a.batch_size, "image_size": 224,
        "threads": a.threads, "rounds": a.rounds, "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    if stages:
        result["stages_cpu_ms_per_img"] = {v: round(c, 3) for v, (_, c) in stages.items()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
