"""Make the embedded demo data set: procedurally drawn textures as JPEGs.

    python -m data.make_demo --out demo_data [--seed 0] [--classes 10]
                             [--train-per-class 500] [--val-per-class 100]

Writes the ImageNet/PaddleClas layout: OUT/train/<NN_class>/<NN_class>_<i>.jpg,
OUT/val/..., OUT/train_list.txt, OUT/val_list.txt (paths relative to OUT) and
OUT/labels.txt ("index name" per line). Deterministic: image i of class c in a split is
drawn from its own generator seeded by (seed, split, c, i), so the output does not
depend on the worker count. See data/README.md for what the classes look like.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `ppdpn` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402

from ppdpn.data.lists import write_list  # noqa: E402

CLASSES = ("horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard",
           "crosshatch", "zigzag", "dots", "rings", "sunburst", "blobs")
SIDE_RANGE = (80, 160)  # width and height drawn independently: aspect ratios 1:2 to 2:1
# Periods are drawn as a number of repeats across the short side, so a pattern has about
# the same scale in the network's input whatever the image size: 3-6 repeats put 12-24 px
# per period into the 64 px eval crop (checkerboard cells of 6-12 px, wide enough to
# survive blur and JPEG), and 2-6 into a random-resized training crop of area 0.4-1
# (11-34 px per period), so eval scales lie inside the training scales.
REPEATS = (3.0, 6.0)
# Foreground and background colours are uniform in RGB and independent of the class; this
# minimum distance keeps the pattern visible after noise and JPEG.
MIN_CONTRAST = 90.0
DUTY = (0.35, 0.65)  # foreground share of a period: stripes, rings, rays, zigzag
_SPLIT_CODE = {"train": 0, "val": 1}
_TILT = math.radians(10)  # orientation jitter of the oriented classes


def _colours(rng):
    while True:
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if np.linalg.norm(fg - bg) >= MIN_CONTRAST:
            return fg, bg


def _rotated(u, v, angle):
    c, s = math.cos(angle), math.sin(angle)
    return u * c + v * s, -u * s + v * c


def _orientation(kind, rng):
    """Angle of the pattern. Training flips images left-right, which maps an angle a to
    -a, so every class is closed under the flip: horizontal, vertical, or diagonal either
    way, each +-10 degrees; the hexagonal dots take any rotation."""
    tilt = rng.uniform(-_TILT, _TILT)
    if kind == "vertical_stripes":
        return math.pi / 2 + tilt
    if kind in ("diagonal_stripes", "crosshatch"):
        return rng.choice([-1, 1]) * math.pi / 4 + tilt
    if kind == "dots":
        return rng.uniform(0, math.pi)
    return tilt


def _mask(kind, w, h, rng):
    """The class's two-level pattern filling the whole image (1 = foreground), so that
    every crop of it shows the class: random period, phase, duty and orientation."""
    period = min(w, h) / rng.uniform(*REPEATS)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind in ("rings", "sunburst"):  # centred in the middle half: crops see curvature
        x, y = x - rng.uniform(0.25, 0.75) * w, y - rng.uniform(0.25, 0.75) * h
        if kind == "rings":
            radius = np.hypot(x, y) + rng.uniform(0, period)
            return radius % period < period * rng.uniform(*DUTY)
        rays = int(rng.integers(8, 17))  # foreground wedges
        turn = np.arctan2(y, x) / (2 * math.pi) * rays + rng.uniform(0, 1)
        return turn % 1 < rng.uniform(*DUTY)
    if kind == "blobs":  # smooth random field cut at its median: irregular, no period
        field = rng.standard_normal((int(h / period * 2) + 2, int(w / period * 2) + 2))
        field = cv2.resize(field.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        return field > np.median(field)
    x, y = x - rng.uniform(0, w), y - rng.uniform(0, h)
    u, v = _rotated(x, y, _orientation(kind, rng))
    if kind.endswith("stripes"):
        return v % period < period * rng.uniform(*DUTY)
    if kind == "crosshatch":  # thin lines both ways: a lattice of diamonds
        width = period * rng.uniform(0.12, 0.22)
        return (u % period < width) | (v % period < width)
    if kind == "checkerboard":
        return (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 1
    if kind == "dots":  # a hexagonal lattice: unlike the checkerboard's squares
        row = period * math.sqrt(3) / 2
        du = (u + np.floor(v / row) % 2 * period / 2) % period - period / 2
        dv = v % row - row / 2
        return np.hypot(du, dv) < period * rng.uniform(0.18, 0.28)
    # zigzag: horizontal stripes displaced by a triangle wave along them
    wave, amp = period * rng.uniform(1.2, 2.2), period * rng.uniform(0.35, 0.6)
    tri = np.abs((u / wave) % 1 * 2 - 1) * amp
    return (v + tri) % period < period * rng.uniform(*DUTY)


def draw_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image of class `label`: pattern, colours, shading, blur, noise."""
    w, h = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, 2))
    mask = _mask(CLASSES[label], w, h, rng).astype(np.float32)
    mask = cv2.GaussianBlur(mask, (0, 0), rng.uniform(0.4, 1.2))  # soft, anti-aliased edges
    fg, bg = (c.astype(np.float32) for c in _colours(rng))
    angle = rng.uniform(0, 2 * math.pi)  # soft light gradient: colour alone varies in-image
    amp = rng.uniform(-40, 40) / max(w, h)
    shade = (np.arange(w, dtype=np.float32)[None, :] * (math.cos(angle) * amp)
             + np.arange(h, dtype=np.float32)[:, None] * (math.sin(angle) * amp))
    img = bg + (fg - bg) * mask[..., None] + shade[..., None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(3, 12))
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_one(job):
    out, rel, label, seed_key = job
    rng = np.random.default_rng(seed_key)
    img = draw_image(label, rng)
    quality = int(rng.integers(75, 96))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    buf.tofile(os.path.join(out, rel))


def class_dir(label: int) -> str:
    """`NN_name`: sorted folder names give the labels, so ImageFolder reads it too."""
    return f"{label:02d}_{CLASSES[label]}"


def make_demo(out: str, seed: int = 0, classes: int = 10, train_per_class: int = 500,
              val_per_class: int = 100, workers: int = 0) -> dict:
    """Write the demo data set under `out`; returns counts and seconds taken."""
    if not 2 <= classes <= len(CLASSES):
        raise ValueError(f"classes must be 2..{len(CLASSES)}, got {classes}")
    start = time.time()
    jobs, lists = [], {}
    for split, per in (("train", train_per_class), ("val", val_per_class)):
        rels, labels = [], []
        for c in range(classes):
            os.makedirs(os.path.join(out, split, class_dir(c)), exist_ok=True)
            for i in range(per):
                rel = f"{split}/{class_dir(c)}/{class_dir(c)}_{i:05d}.jpg"
                jobs.append((out, rel, c, [seed, _SPLIT_CODE[split], c, i]))
                rels.append(rel)
                labels.append(c)
        lists[split] = (rels, labels)
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            pool.map(_write_one, jobs, chunksize=64)
    else:
        for job in jobs:
            _write_one(job)
    for split, (rels, labels) in lists.items():
        write_list(os.path.join(out, f"{split}_list.txt"), rels, labels)
    with open(os.path.join(out, "labels.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{c} {CLASSES[c]}\n" for c in range(classes))
    return {"train": len(lists["train"][0]), "val": len(lists["val"][0]),
            "classes": classes, "seconds": round(time.time() - start, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--workers", type=int, default=0, help="processes (0: up to 8 CPUs)")
    a = p.parse_args(argv)
    info = make_demo(a.out, a.seed, a.classes, a.train_per_class, a.val_per_class, a.workers)
    print(f"demo data set in {a.out}: {info['train']} train + {info['val']} val images, "
          f"{info['classes']} classes, {info['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
