"""DALI loader: our plan feeds DALI through external_source; our iterator reads DLPack.

Why external_source and not fn.readers.file: the shuffle, the shard and every crop
window come from ppdpn.data.plan (deterministic in (seed, epoch, sample)), so a resumed
run repeats its batches exactly; the reader would bring its own RNG and order. Feeding
the bytes ourselves also tells us which file sits in which slot, so a file that breaks
a batch is found, named and replaced, where a broken reader stays broken.

Pipelines are built per epoch (and rebuilt after a decode failure, from the failed
step): they hold no state of ours, and building one takes milliseconds. On a CPU two
pipelines take turns, so that one decodes while the other is between batches.
The official nvidia.dali.plugin.paddle iterator fails on CPU Paddle (docs/reference.md §8);
DALI's default executor keeps outputs alive while referenced, so handing its buffers
to paddle through DLPack is zero-copy and safe.
On a CPU, DALI does what it does best there, decoding only the crop window (ROI
decode), and the train batch is finished by OpenCV in the loader's threads (`finish`),
the fallback loader's own transform: DALI's CPU resize and normalise cost ~4x more.
On a GPU everything after reading the bytes is DALI's (nvJPEG, resize, normalise).
"""
from __future__ import annotations

import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import numpy as np

from ppdpn.data.base import (MEAN_255, STD_255, SUBSTITUTE_SIZE, LoaderBase, _substitute_jpeg,
                             image_shape, log, resize_flip_normalize)
from ppdpn.data.check import BadFile, bytes_changed, size_changed, size_in_bytes

# Batches whose files are read ahead by threads while DALI decodes (reading a file
# releases the GIL, so reading overlaps decoding even on 2 cores).
READ_AHEAD = 3
# Batch arrays DaliLoader.finish keeps for reuse: the one being filled, the one the
# trainer holds, and spares for a trainer that keeps the previous batch too.
KEPT_BATCHES = 4
# A step that fails this often even after substitution is a bug, not a bad file.
MAX_FAILURES_PER_STEP = 3


def _read_bytes(samples, i: int, size: Sequence[int], nbytes: int = -1):
    """File bytes as uint8, or the reason they cannot be fed: unreadable, a header that
    no longer gives the pre-flight `size` (w, h), or another byte count than the
    manifest's `nbytes` (-1: unknown). A file rewritten since the pre-flight would get
    a crop window meant for another image, and DALI's CPU resize crashes the process
    (SIGSEGV) on an eval window outside the image."""
    try:
        data = samples.read(i)
    except OSError as e:
        return f"unreadable mid-run ({e.strerror or e})"
    if not data.size:
        return "empty mid-run (0 bytes)"
    try:
        now = size_in_bytes(data)
    except BadFile as e:
        return f"{e} (mid-run)"
    return size_changed(now, size) or bytes_changed(data.size, nbytes) or data


def _refs_of_a_listed_array() -> int:
    """sys.getrefcount of an array that only a list holds, read in a loop over the list
    as DaliLoader._free_batch does: 3 on CPython 3.11 (the list, the loop variable,
    getrefcount's argument). Measured rather than assumed: interpreters differ in
    which of these references they count."""
    listed = [np.empty(1)]
    for arr in listed:
        count = sys.getrefcount(arr)
    return count


UNHELD_REFS = _refs_of_a_listed_array()


def _is_data_error(err: Exception) -> bool:
    """An error raised while an operator (the decoder) ran, as opposed to one in feeding."""
    text = str(err)
    return bool(re.search(r"Error in \w+ operator", text)) or "decode" in text.lower()


class _Feeder:
    """DALI's external source for one pipeline's steps of a run (start, start + stride,
    ...): each call returns its next step's encoded bytes and crop windows,
    substituting files known or found to be bad."""

    def __init__(self, loader: "DaliLoader", epoch: int, idx: np.ndarray, valid: np.ndarray,
                 start: int, stride: int = 1):
        self.loader, self.epoch, self.idx, self.step = loader, epoch, idx, start
        self.valid = valid  # the plan's mask: 0 for padding slots
        self.stride = stride  # feeds steps start, start + stride, ...
        self.substituted: Dict[int, np.ndarray] = {}  # step -> bool [B]
        self.flips: Dict[int, np.ndarray] = {}  # step -> flips, for DaliLoader.finish
        self.fed: Dict[int, Dict[int, np.ndarray]] = {}  # step -> {slot: bytes} fed as is
        self._pool = ThreadPoolExecutor(max_workers=2)
        self._reads: Dict[int, object] = {}

    def _prefetch(self, step: int) -> None:
        for s in range(step, min(step + READ_AHEAD * self.stride, len(self.idx)), self.stride):
            if s not in self._reads:
                row, loader = self.idx[s], self.loader
                files = list(zip(row.tolist(), loader.sizes[row].tolist(),
                                 loader.file_bytes[row].tolist()))
                self._reads[s] = self._pool.submit(
                    lambda fs, samples=loader.samples: [_read_bytes(samples, *f) for f in fs], files)

    def __call__(self):
        s = self.step
        if s >= len(self.idx):
            raise StopIteration
        self.step += self.stride
        self._prefetch(s)
        raw = self._reads.pop(s).result()
        loader, row = self.loader, self.idx[s]
        win, flips = loader.windows(self.epoch, row)
        forced = (self.epoch, s) in loader._forced
        subs = np.zeros(len(row), dtype=bool)
        enc, self.fed[s] = [], {}
        for k, (i, data) in enumerate(zip(row, raw)):
            if isinstance(data, str):
                loader.record_failure(int(i), data)
            if forced or isinstance(data, str) or int(i) in loader.failed:
                subs[k] = True
                data = loader.substitute
                win[k] = (0, 0, SUBSTITUTE_SIZE, SUBSTITUTE_SIZE)
            else:
                self.fed[s][k] = data
            enc.append(data)
        self.substituted[s], self.flips[s] = subs, flips
        labels = loader.samples.labels[row].astype(np.int64)
        counted = (self.valid[s] * ~subs).astype(np.float32)  # substitutes do not count
        return loader.pipeline_inputs(enc, win, flips) + (labels, counted)

    def release(self, step: int) -> None:
        """Forget the bytes of steps before `step`: DALI is done with them."""
        for s in [s for s in self.fed if s < step]:
            del self.fed[s], self.substituted[s], self.flips[s]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# nvJPEG's buffers (DALI `mixed` decoder) are sized up front for full-size ImageNet JPEGs,
# the values NVIDIA's DALI ImageNet examples (DeepLearningExamples RN50, PaddleClas's
# dali.py) use: ~201 MiB per thread of device memory and ~134 MiB of pinned host memory.
# With DALI's defaults (16 MiB / 8 MiB) the first large images of a run reallocate them,
# stalling steps while the run warms up. They apply to `mixed` only; the CPU decoder has
# no such buffers.
DEVICE_MEMORY_PADDING = 211025920
HOST_MEMORY_PADDING = 140544512


def decoder_args(device: str) -> dict:
    """fn.decoders.image / image_slice arguments for `device` ("cpu" or "mixed")."""
    from nvidia.dali import types
    # EXIF orientation ignored so header sizes match decoded pixels.
    args = dict(device=device, output_type=types.RGB, adjust_orientation=False)
    if device == "mixed":
        args.update(device_memory_padding=DEVICE_MEMORY_PADDING,
                    host_memory_padding=HOST_MEMORY_PADDING)
    return args


class _Source:
    """The external source a pipeline keeps for its whole life: it serves the current
    epoch's feeder, so a pipeline built once runs every epoch (DaliLoader.pipelines)."""

    def __init__(self, feeder: "_Feeder"):
        self.feeder = feeder

    def __call__(self):
        return self.feeder()


def linear_resize_args() -> dict:
    """fn.resize arguments for bilinear without antialiasing, like cv2.INTER_LINEAR in
    PaddleClas and in our fallback loader."""
    from nvidia.dali import types
    return dict(interp_type=types.INTERP_LINEAR, antialias=False)


class DaliLoader(LoaderBase):
    """DALI pipelines (mixed/nvJPEG decode on GPU, CPU decode otherwise) + own iterator."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.substitute = _substitute_jpeg()
        self.decode_device = "mixed" if self.ctx.use_gpu else "cpu"  # DistContext decides
        # On a CPU, train batches are finished on the host (see finish).
        self.finish_on_host = self.is_train and self.decode_device == "cpu"
        # finish runs on num_workers threads: the caller's and these
        helpers = max(0, self.cfg.num_workers - 1) if self.finish_on_host else 0
        self._pool = ThreadPoolExecutor(helpers, "dali-finish") if helpers else None
        self._batches: List[np.ndarray] = []  # see _free_batch
        # Pipelines taking turns (see pipelines): two when DALI decodes on the CPU.
        self.pipelines_per_run = 2 if self.decode_device == "cpu" else 1
        self._parked: Dict[int, list] = {}  # n -> [(source, pipeline)] at an epoch's end

    def pipeline_inputs(self, enc: List[np.ndarray], win: np.ndarray, flips: np.ndarray):
        """Per-sample inputs of the external source, in the order build_pipeline expects
        (the feeder appends labels and the valid mask)."""
        # Dense [B, ...] arrays: DALI takes them as a batch without per-sample overhead.
        win = np.asarray(win, dtype=np.float32)
        # (DALI rejects strided views, hence the contiguous copies.)
        if self.is_train:  # image_slice: anchor (x, y) and shape (w, h) in pixels
            out = (enc, np.ascontiguousarray(win[:, :2]), np.ascontiguousarray(win[:, 2:]))
            return out if self.finish_on_host else out + (np.asarray(flips, dtype=np.int32),)
        starts = np.ascontiguousarray(win[:, [1, 0]])  # resize's ROI is in shape order: (y, x)
        return enc, starts, np.ascontiguousarray(starts + win[:, [3, 2]])

    def build_pipeline(self, source):
        """Train: ROI decode of the crop window, resize, flip, normalise; on a CPU the
        pipeline ends with the decoded crops and `finish` does the rest. Eval: decode,
        resize the centre-crop window to image_size (equal to PaddleClas's
        resize-short-then-crop, see plan.eval_windows), normalise. Every pipeline also
        outputs the batch's labels (int64) and valid mask (float32): on a GPU DALI copies
        them to the device with the images, asynchronously, so the training loop never
        makes a blocking host-to-device copy of its own."""
        from nvidia.dali import Pipeline, fn, types
        cfg, size = self.cfg, [self.image_size, self.image_size]
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, cfg.num_workers),
                        device_id=self.ctx.dali_device_id, prefetch_queue_depth=cfg.prefetch)
        u8, f32, i32 = types.UINT8, types.FLOAT, types.INT32
        decode = decoder_args(self.decode_device)
        slice_args = dict(normalized_anchor=False, normalized_shape=False, **decode)
        targets = [types.INT64, f32]  # labels, valid: the last two outputs of the feeder
        with pipe:
            if self.finish_on_host:
                enc, anchor, shape, labels, valid = fn.external_source(
                    source=source, num_outputs=5, batch=True, dtype=[u8, f32, f32] + targets)
                img = fn.decoders.image_slice(enc, anchor, shape, **slice_args)
            else:
                if self.is_train:
                    enc, anchor, shape, flip, labels, valid = fn.external_source(
                        source=source, num_outputs=6, batch=True,
                        dtype=[u8, f32, f32, i32] + targets)
                    img = fn.decoders.image_slice(enc, anchor, shape, **slice_args)
                    img = fn.resize(img, size=size, **linear_resize_args())
                else:
                    enc, start, end, labels, valid = fn.external_source(
                        source=source, num_outputs=5, batch=True, dtype=[u8, f32, f32] + targets)
                    img = fn.resize(fn.decoders.image(enc, **decode), size=size,
                                    roi_start=start, roi_end=end, roi_relative=False,
                                    **linear_resize_args())
                    flip = 0
                img = fn.crop_mirror_normalize(
                    img, mirror=flip, mean=list(MEAN_255), std=list(STD_255),
                    dtype=types.FLOAT16 if self.output_dtype == "float16" else types.FLOAT,
                    output_layout="CHW" if cfg.output_layout == "NCHW" else "HWC")
            if self.decode_device == "mixed":
                labels, valid = labels.gpu(), valid.gpu()
            pipe.set_outputs(img, labels, valid)
        pipe.build()
        return pipe

    def finish(self, crops, flips: np.ndarray) -> np.ndarray:
        """A CPU train batch from DALI's decoded crops: resize_flip_normalize (the
        fallback loader's own code) over num_workers threads into one batch array.
        DALI's CPU resize + crop_mirror_normalize cost ~1.0 ms per 224 px image here,
        OpenCV's ~0.25 (`bench/loader.py --stages`), and running it outside the pipeline
        lets it overlap with DALI decoding the next batches. Each of num_workers threads,
        the calling one included, takes every num_workers-th image: one task per thread
        rather than per image, and the caller works instead of waiting."""
        c, size = self.cfg, self.image_size
        batch = self._free_batch((len(crops), *image_shape(c.output_layout, size, size)))
        threads = max(1, c.num_workers)

        def part(first: int) -> None:
            for k in range(first, len(crops), threads):
                resize_flip_normalize(np.asarray(crops[k]), size, bool(flips[k]),
                                      c.output_layout, self.output_dtype, out=batch[k])
        helpers = [self._pool.submit(part, first) for first in range(1, threads)]
        try:
            part(0)
        finally:  # never hand out (or refill) a batch a helper is still writing
            for done in helpers:
                done.result()
        return batch

    def _free_batch(self, shape: tuple) -> np.ndarray:
        """A batch array nobody else holds, from the few the loader keeps: filling an
        array already mapped costs less than faulting in ~20 MB of fresh pages a step.
        An array is taken only when nothing but the list holds it (UNHELD_REFS): a paddle
        tensor made from it by DLPack holds a reference until it is freed, so a batch in
        use is never overwritten. A trainer that keeps more than KEPT_BATCHES gets fresh
        arrays."""
        for arr in self._batches:
            if arr.shape == shape and sys.getrefcount(arr) == UNHELD_REFS:
                return arr
        arr = np.empty(shape, dtype=self.output_dtype)
        if len(self._batches) < KEPT_BATCHES:
            self._batches.append(arr)
        return arr

    def pipelines(self, epoch: int, idx: np.ndarray, valid: np.ndarray,
                  step: int) -> List[tuple]:
        """(feeder, pipeline, source) triples that feed steps step.. of `epoch` taking
        turns: triple k feeds steps step + k, step + k + n, ... With one pipeline a core
        idles whenever DALI sits between two batches (its decoder's set-up, the last
        images of a batch: ~7 % of the two cores here); a second pipeline decodes
        meanwhile (idle ~5 %; +3 % img/s for train, +19 % for eval in paired A/B runs).

        Pipelines are built once and reused by the next epoch when an epoch ran to its
        end (see _park): building one on a GPU allocates nvJPEG's paddings (~200 MiB of
        device memory per thread), which NVIDIA's and PaddleClas's loaders also do once
        per run. An epoch left early or broken by a bad file rebuilds them."""
        n = max(1, min(self.pipelines_per_run, self.steps_per_epoch - step))
        feeders = [_Feeder(self, epoch, idx, valid, step + k, stride=n) for k in range(n)]
        parked = self._parked.pop(n, None)
        if parked is None:
            sources = [_Source(feeder) for feeder in feeders]
            return [(f, self.build_pipeline(src), src) for f, src in zip(feeders, sources)]
        for feeder, (source, pipe) in zip(feeders, parked):
            source.feeder = feeder  # first: the reset pipeline prefetches from it at once
            pipe.reset()
        return [(f, pipe, source) for f, (source, pipe) in zip(feeders, parked)]

    def _park(self, triples: List[tuple]) -> None:
        """Keep the pipelines of an epoch that ran to its end for the next one. Each must
        be at the end of its epoch (its next run() raises StopIteration); one that is not
        is dropped and rebuilt next time."""
        for _, pipe, source in triples:
            try:
                pipe.run()
                return  # a batch beyond the epoch: not at its end
            except StopIteration:
                source.feeder = None  # release the epoch's feeder and its bytes
            except RuntimeError:
                return
        self._parked[len(triples)] = [(source, pipe) for _, pipe, source in triples]

    def epoch(self, epoch: int, start_step: int = 0):
        """Yield (images, labels int64, valid float32) for steps start_step.. of `epoch`."""
        from paddle.utils.dlpack import from_dlpack
        self._check_start(start_step)
        idx, valid = self.plan.batches(epoch)
        step, failures = start_step, 0
        while step < self.steps_per_epoch:
            triples, first = self.pipelines(epoch, idx, valid, step), step
            try:
                while step < self.steps_per_epoch:
                    feeder, pipe, _ = triples[(step - first) % len(triples)]
                    try:
                        out, labels, ok = pipe.run()
                    except RuntimeError as err:
                        if not _is_data_error(err):
                            raise  # a bug of ours or of the setup, not a bad file
                        failures += 1
                        self._on_failure(err, feeder, epoch, step, failures)
                        break  # rebuild the pipelines and feed this step again
                    if self.finish_on_host:
                        images = from_dlpack(self.finish(out, feeder.flips[step]))
                        # Hand DALI back its outputs now, not at the next run() (0-2 %
                        # more img/s in A/B runs).
                        del out
                    else:
                        images = from_dlpack(out.as_tensor())
                    # from_dlpack speaks the DLPack protocol: for GPU outputs it passes
                    # Paddle's current stream to DALI's __dlpack__, and DALI makes that
                    # stream wait for its copy (an event), so the host never blocks.
                    # (`__dlpack__(None)` would make DALI wait on the host instead.)
                    labels, ok = from_dlpack(labels.as_tensor()), from_dlpack(ok.as_tensor())
                    feeder.release(step)
                    yield images, labels, ok
                    step, failures = step + 1, 0
            finally:
                for feeder, _, _ in triples:
                    feeder.close()
                if step == self.steps_per_epoch:
                    self._park(triples)
                triples = pipe = None  # unparked pipelines go now, not at the next rebuild

    def _on_failure(self, err: Exception, feeder: _Feeder, epoch: int, step: int,
                    failures: int) -> None:
        """Find the file(s) that broke a batch, record them, or substitute the batch."""
        text = str(err)
        suspects = []
        for s in sorted(feeder.fed):  # the failed step first, then those prefetched
            if s >= step:
                suspects += [(s, k, feeder.fed[s][k]) for k in sorted(feeder.fed[s])]
        found = 0
        named = re.search(r"sample #(\d+)", text)  # DALI names the slot, not the file
        if named:
            k = int(named.group(1))
            hit = [x for x in suspects if x[0] == step and x[1] == k]
            suspects = hit + [x for x in suspects if x not in hit]
        for s, k, data in suspects:
            why = self.decode_alone(data)
            if why:
                self.record_failure(int(feeder.idx[s][k]), why)
                found += 1
                if s == step and named:
                    break  # the named slot is confirmed; others are checked if it recurs
        if found and failures < MAX_FAILURES_PER_STEP:
            return
        names = [self.samples.name(i) for i in feeder.idx[step]]
        if (epoch, step) in self._forced:  # even the stand-in image failed: not a file issue
            raise RuntimeError(f"step {step} of epoch {epoch} keeps failing; files: "
                               f"{names}; DALI: {text}") from err
        self._forced.add((epoch, step))
        log.warning("batch %d of epoch %d failed and no single file explains it; "
                    "substituting all of it (rank %d). Files: %s. DALI: %s",
                    step, epoch, self.ctx.rank, ", ".join(names), text.strip()[-500:])

    def decode_alone(self, data: np.ndarray) -> Optional[str]:
        """Decode one file in a batch-of-one pipeline on the same device; the error or None."""
        from nvidia.dali import Pipeline, fn, types
        pipe = Pipeline(batch_size=1, num_threads=1, device_id=self.ctx.dali_device_id,
                        prefetch_queue_depth=1)
        with pipe:
            enc = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
            pipe.set_outputs(fn.decoders.image(enc, device=self.decode_device,
                                               output_type=types.RGB))
        try:
            pipe.build()
            pipe.run()
        except RuntimeError as e:
            if not _is_data_error(e):
                raise
            return f"DALI ({self.decode_device}) cannot decode it"
        finally:
            del pipe
        return None
