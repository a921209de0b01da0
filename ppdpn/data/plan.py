"""What each rank reads at each step, and with which crop: computed here, in numpy.

Everything random in the input pipeline is a pure function of (seed, epoch, sample):
the epoch's shuffle, the shard of each rank, and every crop window and flip. Neither
DALI's RNG nor worker count or thread timing enters, so a run resumed at step k gets
the very batches an uninterrupted run gets, and both loaders crop alike by construction.

Random numbers come from a counter-based hash (the SplitMix64 finaliser) of
(seed, epoch, sample index, draw number) rather than numpy's Generator, whose streams
numpy does not promise to keep across versions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from ppdpn.preprocess import eval_geometry

# torchvision / PaddleClas RandomResizedCrop: this many tries before the centre crop.
CROP_ATTEMPTS = 10
# Draws per sample: area and ratio per attempt, x and y offset, flip.
_DRAWS = 2 * CROP_ATTEMPTS + 3
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # odd constant spreading consecutive counters


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijection of uint64 with good avalanche."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, stream: int, epoch: int, index: np.ndarray, draws: int) -> np.ndarray:
    """Uniform [0, 1) floats [len(index), draws], a pure function of all the arguments."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        key = _mix64(np.uint64(seed) * _GOLDEN + np.uint64(stream))
        key = _mix64(key ^ (np.uint64(epoch) * _GOLDEN))
        per_sample = _mix64(key + np.asarray(index, dtype=np.uint64) * _GOLDEN)
        counters = np.arange(1, draws + 1, dtype=np.uint64) * _GOLDEN
        bits = _mix64(per_sample[:, None] ^ counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# Distinct streams so the shuffle and the crops never reuse the same numbers.
_SHUFFLE_STREAM, _CROP_STREAM, _BLOCK_STREAM = 1, 2, 3


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, block: int = 1,
                window: int = 1) -> np.ndarray:
    """The epoch's global order of sample indices: a hash-keyed permutation or 0..n-1.

    block > 1: a block-local shuffle. Samples are grouped into blocks of `block`
    consecutive ids; the blocks are put in a random order, and the samples of each run
    of `window` blocks in that order are shuffled together. Still a permutation (every
    sample once per epoch), but a batch draws on a few blocks, so a reader of packed
    shards serves many samples per read (FFCV's quasi-random order, webdataset's shard
    shuffle). Sample ids must then not follow the classes: `data.pack` stores shuffled."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    keys = hash_uniform(seed, _SHUFFLE_STREAM, epoch, np.arange(n), 1)[:, 0]
    if block <= 1:
        return np.argsort(keys, kind="stable").astype(np.int64)
    blocks = -(-n // block)
    block_keys = hash_uniform(seed, _BLOCK_STREAM, epoch, np.arange(blocks), 1)[:, 0]
    place = np.empty(blocks, dtype=np.int64)  # each block's place in the block order
    place[np.argsort(block_keys, kind="stable")] = np.arange(blocks)
    group = place[np.arange(n) // block] // max(1, window)
    return np.lexsort((keys, group)).astype(np.int64)  # by window, then by key


@dataclass(frozen=True)
class ShardPlan:
    """Sharding with padding: every rank gets ceil(n / world) samples, in
    ceil(that / batch_size) full batches; padded slots repeat real samples, valid = 0."""
    num_samples: int
    world_size: int
    rank: int
    batch_size: int
    shuffle: bool
    seed: int
    block: int = 1  # epoch_order's block-local shuffle: samples per block
    window: int = 1  # blocks shuffled together

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError("a split needs at least one sample")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of {self.world_size}")

    @property
    def per_rank(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def batches(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(sample index int64 [steps, B], valid float32 [steps, B]) of this rank."""
        n, world, per = self.num_samples, self.world_size, self.per_rank
        order = epoch_order(n, self.seed, epoch, self.shuffle, self.block, self.window)
        padded = np.resize(order, per * world)  # np.resize repeats from the start
        valid = (np.arange(per * world) < n).astype(np.float32)
        mine = slice(self.rank * per, (self.rank + 1) * per)  # contiguous block per rank
        total = self.steps_per_epoch * self.batch_size
        idx = np.resize(padded[mine], total)
        ok = np.where(np.arange(total) < per, np.resize(valid[mine], total), 0.0)
        steps = self.steps_per_epoch
        return idx.reshape(steps, -1), ok.astype(np.float32).reshape(steps, -1)


def random_resized_crop(width: np.ndarray, height: np.ndarray, u: np.ndarray,
                        scale: Sequence[float], ratio: Sequence[float]) -> np.ndarray:
    """RandomResizedCrop windows (x, y, w, h) int32 [n, 4] from uniforms u [n, >= 22].

    The torchvision algorithm, vectorised: up to 10 tries of an area fraction in `scale`
    and a log-uniform aspect ratio in `ratio`; the first window that fits wins; if none
    fits, the largest centre crop whose ratio is clamped into `ratio`.
    """
    W = np.asarray(width, dtype=np.float64)[:, None]
    H = np.asarray(height, dtype=np.float64)[:, None]
    k = CROP_ATTEMPTS
    area = W * H * (scale[0] + (scale[1] - scale[0]) * u[:, :k])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, k:2 * k])
    w = np.rint(np.sqrt(area * aspect))
    h = np.rint(np.sqrt(area / aspect))
    fits = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(u))
    cw, ch = w[rows, first], h[rows, first]
    W, H = W[:, 0], H[:, 0]
    cx = np.floor(u[:, 2 * k] * (W - cw + 1))
    cy = np.floor(u[:, 2 * k + 1] * (H - ch + 1))
    # Fallback: whole image, trimmed to the nearest allowed aspect ratio, centred.
    in_ratio = W / H
    fw = np.where(in_ratio > ratio[1], np.rint(H * ratio[1]), W)
    fh = np.where(in_ratio < ratio[0], np.rint(W / ratio[0]), H)
    none = ~fits.any(axis=1)
    cw, ch = np.where(none, fw, cw), np.where(none, fh, ch)
    cx = np.where(none, (W - cw) // 2, cx)
    cy = np.where(none, (H - ch) // 2, cy)
    return np.stack([cx, cy, cw, ch], axis=1).astype(np.int32)


def train_windows(seed: int, epoch: int, index: np.ndarray, sizes: np.ndarray,
                  scale: Sequence[float], ratio: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Crop windows int32 [n, 4] and flip flags int32 [n] of samples `index` in `epoch`.
    Keyed by sample index, so the crop does not depend on rank, batch size or step."""
    u = hash_uniform(seed, _CROP_STREAM, epoch, index, _DRAWS)
    wh = sizes[index]
    windows = random_resized_crop(wh[:, 0], wh[:, 1], u, scale, ratio)
    flips = (u[:, -1] < 0.5).astype(np.int32)
    return windows, flips


def eval_windows(index: np.ndarray, sizes: np.ndarray, resize_short: int, crop: int) -> np.ndarray:
    """The eval crop as a window in source pixels (x, y, w, h) float64 [n, 4].

    Resizing this window straight to crop x crop equals resize-then-crop exactly: both
    map output pixel u to source (u + x0 + 0.5) * w / W' - 0.5 (half-pixel centres)."""
    out = np.empty((len(index), 4), dtype=np.float64)
    for row, i in enumerate(index):
        w, h = int(sizes[i, 0]), int(sizes[i, 1])
        rw, rh, x0, y0 = eval_geometry(w, h, resize_short, crop)
        sx, sy = w / rw, h / rh
        out[row] = (x0 * sx, y0 * sy, crop * sx, crop * sy)
    return out
