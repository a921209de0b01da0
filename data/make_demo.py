"""Make the embedded demo data set: procedurally drawn shapes and textures as JPEGs.

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

CLASSES = ("circle", "square", "triangle", "star", "cross",
           "rings", "horizontal_stripes", "diagonal_stripes", "checkerboard", "dots")
SIDE_RANGE = (80, 160)  # width and height drawn independently: aspect ratios 1:2 to 2:1
# Foreground and background colours are uniform in RGB and independent of the class; this
# minimum distance keeps the pattern visible after noise and JPEG.
MIN_CONTRAST = 90.0
_SPLIT_CODE = {"train": 0, "val": 1}
_SUB = 4  # cv2 polygon sub-pixel bits: smooth edges at small sizes


def _colours(rng):
    while True:
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if np.linalg.norm(fg - bg) >= MIN_CONTRAST:
            return fg, bg


def _rotated(u, v, angle):
    c, s = math.cos(angle), math.sin(angle)
    return u * c + v * s, -u * s + v * c


def _polygon(kind, r, rng):
    """Unit-free vertex list (x, y) of a shape of radius r around the origin."""
    if kind == "square":
        t = np.arange(4) * math.pi / 2 + math.pi / 4
        return np.stack([np.cos(t), np.sin(t)], 1) * r
    if kind == "triangle":
        t = np.arange(3) * 2 * math.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1) * r
    if kind == "star":
        t = np.arange(10) * math.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        return np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)
    # cross: a plus sign with arms of width 2a
    a = r * rng.uniform(0.25, 0.35)
    return np.array([(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a),
                     (-r, -a), (-r, a), (-a, a), (-a, r)], dtype=np.float64)


def _shape_mask(kind, w, h, rng):
    """1-3 filled shapes of random size, position and rotation (several, so that a small
    random crop still tends to hold one whole shape)."""
    mask = np.zeros((h, w), np.uint8)
    count = rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])
    size = {1: (0.28, 0.42), 2: (0.18, 0.28), 3: (0.14, 0.22)}[count]
    for _ in range(count):
        r = rng.uniform(*size) * min(w, h)
        cx, cy = rng.uniform(r * 0.8, w - r * 0.8), rng.uniform(r * 0.8, h - r * 0.8)
        if kind == "circle":
            cv2.circle(mask, (int(cx * 16), int(cy * 16)), int(r * 16), 255, -1, cv2.LINE_AA, _SUB)
            continue
        pts = _polygon(kind, r, rng)
        x, y = _rotated(pts[:, 0], pts[:, 1], rng.uniform(0, 2 * math.pi))
        poly = np.stack([x + cx, y + cy], 1) * 16
        cv2.fillPoly(mask, [poly.round().astype(np.int32)], 255, cv2.LINE_AA, _SUB)
    return mask.astype(np.float32) / 255.0


def _texture_mask(kind, w, h, rng):
    """Patterns filling the whole image, so every crop shows them."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = x - rng.uniform(0, w), y - rng.uniform(0, h)
    if kind == "rings":
        period = rng.uniform(8, 16)
        return (np.hypot(x, y) % period < period * rng.uniform(0.35, 0.6)).astype(np.float32)
    if kind in ("horizontal_stripes", "diagonal_stripes"):
        tilt = rng.uniform(-0.17, 0.17)  # +-10 degrees
        if kind == "diagonal_stripes":
            tilt += rng.choice([-1, 1]) * math.pi / 4
        u, v = _rotated(x, y, tilt)
        period = rng.uniform(8, 18)
        return (v % period < period / 2).astype(np.float32)
    u, v = _rotated(x, y, rng.uniform(0, math.pi / 2))
    if kind == "checkerboard":
        cell = rng.uniform(7, 16)
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    spacing = rng.uniform(11, 20)  # dots on a rotated lattice
    du = (u % spacing) - spacing / 2
    dv = (v % spacing) - spacing / 2
    return (np.hypot(du, dv) < spacing * rng.uniform(0.2, 0.3)).astype(np.float32)


def draw_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image of class `label`: pattern mask, colours, shading, noise."""
    w, h = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, 2))
    kind = CLASSES[label]
    mask = _shape_mask(kind, w, h, rng) if label < 5 else _texture_mask(kind, w, h, rng)
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
