"""Loader without DALI: paddle.io.DataLoader with OpenCV workers.

It takes its batches, shard, crop windows and flips from the same plan as the DALI
loader (ppdpn.data.plan), so both have the same crop distribution, the same sharding
and the same exactly-once guarantee by construction; only the decoder differs.
The transforms are PaddleClas's: cv2 decode to RGB, crop, cv2.resize INTER_LINEAR,
flip, (x - mean) / std, HWC -> CHW.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from ppdpn.data.base import LoaderBase, image_shape, normalize, resize_flip_normalize
from ppdpn.data.check import BadFile, bytes_changed, no_garbage_for_forks, size_changed
from ppdpn.data.lists import Samples
from ppdpn.preprocess import eval_geometry

# (sample index, x, y, w, h, flip, counted): one sample's work, decided in the main
# process; counted is 0 for the plan's padding slots.
Job = Tuple[int, int, int, int, int, int, int]


def _single_threaded_cv2() -> None:
    """Called in the parent before the DataLoader forks its workers, never in a worker:
    once the parent has used OpenCV's thread pool, cv2.setNumThreads in a forked worker
    hangs forever (seen here). The workers inherit one thread each, which is what we
    want anyway: the worker processes already fill the cores."""
    import cv2
    cv2.setNumThreads(1)


class _JobDataset:
    """Map-style data set indexed by jobs rather than by sample number."""

    def __init__(self, samples: Samples, sizes: np.ndarray, train: bool,
                 size: int, resize_short: int, layout: str, dtype: str,
                 file_bytes: Optional[np.ndarray] = None):
        self.samples, self.sizes, self.labels, self.train = samples, sizes, samples.labels, train
        self.file_bytes = file_bytes  # int64 [n] from the manifest (-1: unknown), or None
        self.size = size
        self.resize_short, self.layout, self.dtype = resize_short, layout, dtype

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, sample: int) -> np.ndarray:
        import cv2
        data = self.samples.read(sample)
        if self.file_bytes is not None and bytes_changed(data.size, int(self.file_bytes[sample])):
            raise ValueError("byte count changed")
        img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if img is None:
            raise ValueError("OpenCV cannot decode it")
        # A file rewritten since the pre-flight: its crop window was meant for another image
        if size_changed((img.shape[1], img.shape[0]), self.sizes[sample]):
            raise ValueError("size changed")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def transform(self, img: np.ndarray, job: Job) -> np.ndarray:
        import cv2
        _, x, y, w, h, flip, _ = job
        if self.train:
            return resize_flip_normalize(img[y:y + h, x:x + w], self.size, flip,
                                         self.layout, self.dtype)
        ih, iw = img.shape[:2]
        rw, rh, x0, y0 = eval_geometry(iw, ih, self.resize_short, self.size)
        img = cv2.resize(img, (rw, rh), interpolation=cv2.INTER_LINEAR)
        return normalize(img[y0:y0 + self.size, x0:x0 + self.size], self.layout, self.dtype)

    def __getitem__(self, job: Job):
        """(image, label, counted, ok): ok = False when the file failed. Never raised: a
        raising worker kills the whole DataLoader without naming the file
        (docs/reference.md §8)."""
        label = self.labels[job[0]]
        try:
            return self.transform(self._decode(job[0]), job), label, job[6], True
        except Exception:
            return (np.zeros(image_shape(self.layout, self.size, self.size), dtype=self.dtype),
                    label, job[6], False)


def _collate(items):
    """(images, labels int64, valid float32, failed slots). The arrays become tensors
    on the training device in the DataLoader's own thread (pinned memory, asynchronous
    copy on a GPU), so the training loop makes no host-to-device copy; the failed slots
    are a tuple of ints, which the DataLoader hands back as a host-side list."""
    imgs, labels, counted, ok = zip(*items)
    ok = np.asarray(ok, dtype=bool)
    valid = np.asarray(counted, dtype=np.float32) * ok
    return (np.stack(imgs), np.asarray(labels, dtype=np.int64), valid,
            tuple(int(k) for k in np.nonzero(~ok)[0]))


class FallbackLoader(LoaderBase):
    """paddle.io.DataLoader over the plan's batches; a new DataLoader per epoch, so
    worker processes see the current epoch's jobs and the failed-file book."""

    def dataset(self) -> _JobDataset:
        c = self.cfg
        return _JobDataset(self.samples, self.sizes, self.is_train, self.image_size,
                           c.resize_short, c.output_layout, self.output_dtype, self.file_bytes)

    def jobs(self, epoch: int, idx: np.ndarray, valid: np.ndarray,
             start_step: int) -> List[List[Job]]:
        batches = []
        for row, counted in zip(idx[start_step:], valid[start_step:]):
            win, flips = self.windows(epoch, row)
            win = np.rint(win).astype(np.int64)  # eval windows are unused here (see transform)
            batches.append([(int(i), *map(int, w), int(f), int(c))
                            for i, w, f, c in zip(row, win, flips, counted)])
        return batches

    def epoch(self, epoch: int, start_step: int = 0):
        """Yield (images, labels int64, valid float32) for steps start_step.. of `epoch`."""
        import paddle
        self._check_start(start_step)
        idx, valid = self.plan.batches(epoch)
        if self.cfg.num_workers:
            _single_threaded_cv2()
        loader = paddle.io.DataLoader(
            self.dataset(), batch_sampler=self.jobs(epoch, idx, valid, start_step),
            num_workers=self.cfg.num_workers, collate_fn=_collate, return_list=True,
            prefetch_factor=self.cfg.prefetch)
        # The DataLoader puts its tensors on the current device (paddle.set_device).
        with no_garbage_for_forks():
            batches = iter(loader)  # forks the workers
        for step, (images, labels, keep, failed) in enumerate(batches, start_step):
            for k in failed:
                self.record_failure(int(idx[step][k]), self._diagnose(int(idx[step][k])))
            yield images, labels, keep

    def _diagnose(self, sample: int) -> str:
        """Why a file failed in a worker (workers can only say 'failed')."""
        try:
            now = self.samples.header(sample)
        except BadFile as e:
            return f"{e} (mid-run)"
        changed = size_changed(now, self.sizes[sample])
        if changed:
            return changed
        try:
            changed = bytes_changed(self.samples.read(sample).size, int(self.file_bytes[sample]))
        except OSError as e:
            return f"unreadable mid-run ({e.strerror or e})"
        return changed or "decode failed (OpenCV cannot decode it)"
