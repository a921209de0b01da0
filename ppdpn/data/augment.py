"""Batch augmentation on the device after loading: Mixup, CutMix, label smoothing.

Applied to whatever batch a loader hands out, so it works with DALI as well as with the
fallback loader (PaddleClas's DALI path silently skips mixup). Eval never calls it.
The partner of sample i is sample B-1-i (the batch reversed, as timm does): no random
permutation to draw, and every sample is mixed with a different one when B > 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np


def smooth_one_hot(labels, num_classes: int, label_smoothing: float):
    """Soft targets float32 [B, C]: 1 - eps + eps/C on the label, eps/C elsewhere."""
    import paddle.nn.functional as F
    onehot = F.one_hot(labels.astype("int64"), num_classes).astype("float32")
    if label_smoothing > 0:
        onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
    return onehot


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator):
    """A box of area (1 - lam) * H * W at a uniform centre, clipped to the image;
    returns (y1, y2, x1, x2) and the lam that the clipped area really gives."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return (y1, y2, x1, x2), 1.0 - (y2 - y1) * (x2 - x1) / float(height * width)


def box_mask(y1: int, y2: int, x1: int, x2: int, height: int, width: int, dtype):
    """[H, W] mask, 1 inside rows y1..y2-1 and columns x1..x2-1, made on the device from
    two aranges: the box's corners are kernel arguments, so nothing is copied from the
    host (a numpy mask + paddle.to_tensor would be a blocking copy every CutMix step)."""
    import paddle
    rows = paddle.arange(height, dtype="int32")
    cols = paddle.arange(width, dtype="int32")
    inside_rows = paddle.logical_and(rows >= y1, rows < y2).astype(dtype)
    inside_cols = paddle.logical_and(cols >= x1, cols < x2).astype(dtype)
    return inside_rows.unsqueeze(1) * inside_cols.unsqueeze(0)


def mix_batch(images, labels, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              label_smoothing: float, rng: np.random.Generator,
              data_format: str = "NCHW") -> Tuple[object, object]:
    """(images, soft targets float32 [B, C]). With both alphas 0 only label smoothing;
    with both > 0, Mixup or CutMix with probability 0.5 each, per batch (like timm)."""
    import paddle
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    partner = images.flip(axis=[0])
    if use_cutmix:
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
        h_axis, w_axis = (2, 3) if data_format == "NCHW" else (1, 2)
        height, width = images.shape[h_axis], images.shape[w_axis]
        (y1, y2, x1, x2), lam = cutmix_box(height, width, lam, rng)
        box = box_mask(y1, y2, x1, x2, height, width, images.dtype)
        box = box.reshape([1, 1, height, width] if data_format == "NCHW" else [1, height, width, 1])
        images = images * (1.0 - box) + partner * box
    else:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        images = images * lam + partner * (1.0 - lam)
    targets = targets * lam + targets.flip(axis=[0]) * (1.0 - lam)
    return images, targets


@dataclass(frozen=True)
class BatchAugment:
    """mix_batch with the recipe's settings bound once: `augment(images, labels, rng)`."""
    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0
    data_format: str = "NCHW"

    @classmethod
    def from_config(cls, cfg) -> "BatchAugment":
        d = cfg.DataLoader
        return cls(cfg.Arch.class_num, d.mixup_alpha, d.cutmix_alpha,
                   cfg.Loss.label_smoothing, d.output_layout)

    def __call__(self, images, labels, rng: np.random.Generator):
        return mix_batch(images, labels, self.num_classes, self.mixup_alpha,
                         self.cutmix_alpha, self.label_smoothing, rng, self.data_format)
