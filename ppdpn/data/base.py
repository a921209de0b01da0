"""What the DALI and the fallback loader share: pre-flight, plan, crops, bad-file book."""
from __future__ import annotations

import logging
from typing import Dict, Iterator, Optional, Set, Tuple

import numpy as np

from ppdpn.data.check import find_bad_labels
from ppdpn.data.lists import DataSetError, Samples
from ppdpn.data.manifest import FileTable
from ppdpn.data.plan import ShardPlan, eval_windows, train_windows
from ppdpn.preprocess import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("ppdpn.data")

# ImageNet statistics (ppdpn/preprocess.py) in 0-255 units.
MEAN_255 = tuple(255.0 * m for m in IMAGENET_MEAN)
STD_255 = tuple(255.0 * s for s in IMAGENET_STD)
# (x - mean) / std as x * scale + shift, per channel
_SCALE = [1.0 / s for s in STD_255]
_SHIFT = [-m / s for m, s in zip(MEAN_255, STD_255)]
# Stand-in for a file that failed mid-run: a tiny grey image every decoder reads,
# decoded in the failed sample's slot so batch shapes and step counts never change.
SUBSTITUTE_SIZE = 16


def image_shape(layout: str, h: int, w: int) -> tuple:
    """One loader output image's shape: CHW for NCHW batches, HWC for NHWC."""
    return (3, h, w) if layout == "NCHW" else (h, w, 3)


def normalize(img: np.ndarray, layout: str = "NCHW", dtype: str = "float32",
              out: Optional[np.ndarray] = None) -> np.ndarray:
    """HWC uint8 RGB -> (x - mean) / std as `dtype`, CHW for NCHW and HWC for NHWC,
    written into `out` when given. OpenCV arithmetic on whole planes: numpy
    broadcasting over a last axis of length 3 costs ~10x more (0.9 against 0.08 ms for
    224 x 224 here). OpenCV releases the GIL, so threads can share the work."""
    import cv2
    shape = image_shape(layout, *img.shape[:2])
    if out is None:
        out = np.empty(shape, dtype=dtype)
    f32 = out if out.dtype == np.float32 else np.empty(shape, dtype=np.float32)
    if layout == "NCHW":  # one pass per plane: x * scale + shift
        for c, plane in enumerate(cv2.split(img)):
            cv2.addWeighted(plane, _SCALE[c], plane, 0.0, _SHIFT[c], dst=f32[c], dtype=cv2.CV_32F)
    else:
        f32[...] = img
        cv2.multiply(f32, (*_SCALE, 1.0), dst=f32)
        cv2.add(f32, (*_SHIFT, 0.0), dst=f32)
    if f32 is not out:
        out[...] = f32
    return out


def resize_flip_normalize(crop: np.ndarray, size: int, flip: bool, layout: str = "NCHW",
                          dtype: str = "float32", out: Optional[np.ndarray] = None) -> np.ndarray:
    """The train transform after the crop, as PaddleClas does it: cv2.resize
    INTER_LINEAR (no antialiasing) to size x size, horizontal flip, normalize. Both
    loaders run it on a CPU (DALI's CPU resize and normalise cost ~4x more here)."""
    import cv2
    img = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    if flip:
        img = cv2.flip(img, 1)
    return normalize(img, layout, dtype, out)


class BadDataError(DataSetError):
    """The pre-flight check found bad files and DataConfig.drop_bad_files is off."""


def _substitute_jpeg() -> np.ndarray:
    import cv2
    grey = np.full((SUBSTITUTE_SIZE, SUBSTITUTE_SIZE, 3), 128, dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", grey)
    assert ok
    return buf.reshape(-1)


def preflight(samples: Samples, table: FileTable, drop_bad: bool,
              num_classes: Optional[int] = None) -> Tuple[Samples, np.ndarray, np.ndarray]:
    """Stop naming every bad file of a split, or drop them, from the manifest's verdict
    (`table`) and this run's label range.

    Returns the kept samples, their (width, height) int32 [n, 2] from the headers and
    their sizes in bytes int64 [n] when checked."""
    bad = dict(table.bad)
    for i, why in find_bad_labels(samples.labels, num_classes) + table.duplicates():
        bad.setdefault(i, why)
    if not bad:
        return samples, table.sizes, table.nbytes
    lines = [f"  {samples.name(i)}: {why}" for i, why in sorted(bad.items())]
    if not drop_bad:
        raise BadDataError(f"{samples.source}: {len(bad)} of {len(samples)} files are bad "
                           "(set DataLoader.drop_bad_files=True to skip them, or write a "
                           "cleaned list with `python -m data.validate --write-clean`):\n"
                           + "\n".join(lines))
    keep = np.ones(len(samples), dtype=bool)
    keep[list(bad)] = False
    keep = np.flatnonzero(keep)
    if not len(keep):
        raise BadDataError(f"{samples.source}: every file is bad:\n" + "\n".join(lines))
    log.warning("%s: dropping %d bad of %d files:\n%s", samples.source, len(bad),
                len(samples), "\n".join(lines))
    return samples.subset(keep), table.sizes[keep], table.nbytes[keep]


class LoaderBase:
    """Epoch plan, crop windows and the book of files that failed mid-run.

    Subclasses implement `epoch(epoch, start_step)` yielding (images, labels, valid)."""

    def __init__(self, cfg, split: str, ctx, seed: int, samples: Samples, sizes: np.ndarray,
                 file_bytes: Optional[np.ndarray] = None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.cfg, self.split, self.ctx, self.seed = cfg, split, ctx, int(seed)
        self.samples, self.sizes = samples, np.asarray(sizes, dtype=np.int64)
        # each file's size in bytes when the manifest was built (-1: unknown): a file
        # rewritten since then is caught when it is read, by name
        self.file_bytes = (np.full(len(samples), -1, dtype=np.int64) if file_bytes is None
                           else np.asarray(file_bytes, dtype=np.int64))
        self.is_train = split == "train"
        self.batch_size = cfg.batch_size if self.is_train else (cfg.eval_batch_size or cfg.batch_size)
        self.plan = ShardPlan(len(samples), ctx.world_size, ctx.rank, self.batch_size,
                              shuffle=self.is_train, seed=self.seed,
                              block=cfg.shuffle_block, window=cfg.shuffle_window)
        # packed shards: one read serves a block (an eval split reads ids in order)
        samples.read_in_blocks(cfg.shuffle_block, cfg.shuffle_window)
        self.num_samples = len(samples)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.image_size = cfg.image_size
        # fp16 batches only where a model consumes them: training under AMP, which runs on
        # a GPU only (load_config refuses output_dtype float16 without AMP.use_amp). Eval
        # always reads fp32: an fp32 eval needs fp32 inputs, and autocast casts them itself.
        self.output_dtype = cfg.output_dtype if self.is_train and ctx.use_gpu else "float32"
        self.failed: Dict[int, str] = {}  # sample index -> why it failed mid-run
        self._forced: Set[Tuple[int, int]] = set()  # (epoch, step) fed wholly substituted

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator:
        raise NotImplementedError

    def _check_start(self, start_step: int) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} outside 0..{self.steps_per_epoch}")

    def windows(self, epoch: int, index: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Per-sample source windows (x, y, w, h) and flips: random for train, the
        PaddleClas centre crop for eval."""
        if self.is_train:
            return train_windows(self.seed, epoch, index, self.sizes,
                                 self.cfg.scale, self.cfg.ratio)
        win = eval_windows(index, self.sizes, self.cfg.resize_short, self.image_size)
        return win, np.zeros(len(index), dtype=np.int32)

    def record_failure(self, sample: int, reason: str) -> None:
        """Log a file that failed after the pre-flight; later epochs substitute it."""
        if sample not in self.failed:
            self.failed[sample] = reason
            log.warning("skipping %s (rank %d): %s; its slot is marked invalid",
                        self.samples.name(sample), self.ctx.rank, reason)
