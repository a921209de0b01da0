"""Pre-flight checks of image files: existence, size, magic, end marker, header size.

DALI has no skip option: a missing or empty file breaks its reader for good, and a text
file named .jpg fails a whole batch without a name (docs/reference.md §8). So every file is
checked before the first step. The check reads only the header and the tail of each
file, and keeps each image's width and height from its JPEG SOF / PNG IHDR: the loaders
compute crop windows from them without decoding.
"""
from __future__ import annotations

import contextlib
import gc
import os
import struct
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
import multiprocessing as mp
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ppdpn.data.paths import PathTable

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Smallest decodable file is a few hundred bytes; below this it is a stub or a fragment.
MIN_FILE_BYTES = 64
# EXIF/ICC segments can push the frame header past the first block; 64 KiB holds the
# SOF of nearly every camera JPEG, larger headers are read on demand.
HEAD_BYTES = 64 * 1024
# Some writers append padding after the JPEG end marker; look this far back for it.
TAIL_BYTES = 64 * 1024
# SOF markers C0-CF except DHT (C4), JPG (C8) and DAC (CC), which share the range.
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Below this many files worker processes cost more than they save.
PARALLEL_MIN_FILES = 20000
# Threads per checking process. On NFS a header check is ~3 round trips (stat, open +
# read, tail read) of ~1 ms each against ~30 us of Python: 16-32 threads keep a
# process busy; more only add GIL hand-offs (bench/manifest_build.py measures it).
THREADS_PER_WORKER = 16
# A thread needs this many files to be worth starting.
MIN_FILES_PER_THREAD = 8


class BadFile(Exception):
    """A file that would fail in the loader; str() is the reason."""


def _jpeg_size(head, more: Optional[Callable[[int], bytes]] = None) -> Tuple[int, int, int]:
    """(width, height, offset of the scan start) from the JPEG markers in `head`, the
    file's first bytes; more(n), when given, returns its first n bytes."""
    pos = 2
    while True:
        if pos + 4 > len(head):  # header longer than what we read: read more
            head = more(len(head) * 4 + 4) if more else head
            if pos + 4 > len(head):
                raise BadFile("truncated JPEG header (no frame header before end of file)")
        if head[pos] != 0xFF:
            raise BadFile(f"corrupt JPEG header (no marker at byte {pos})")
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers carry no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            raise BadFile("JPEG without frame header (SOF) before the image data")
        (length,) = struct.unpack(">H", head[pos + 2:pos + 4])
        if marker in _SOF_MARKERS:
            if pos + 9 > len(head) and more:
                head = more(pos + 16)
            if pos + 9 > len(head):
                raise BadFile("truncated JPEG frame header")
            h, w = struct.unpack(">HH", head[pos + 5:pos + 9])
            if w == 0 or h == 0:
                raise BadFile(f"JPEG frame header gives size {w}x{h}")
            return w, h, pos
        pos += 2 + length


def _png_size(head) -> Tuple[int, int]:
    if bytes(head[12:16]) != b"IHDR":
        raise BadFile("corrupt PNG header (no IHDR)")
    w, h = struct.unpack(">II", head[16:24])
    if w == 0 or h == 0:
        raise BadFile(f"PNG header gives size {w}x{h}")
    return w, h


def read_file(path: str) -> np.ndarray:
    """A whole file as uint8, as the loaders feed it to a decoder: one fstat and one
    read into an uninitialised array (~12 us for a 46 KB JPEG here against ~25 us for
    np.fromfile). A file that grows while it is read is read again whole. Raises
    OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = np.empty(os.fstat(fd).st_size, dtype=np.uint8)
        got = os.readv(fd, [data]) if data.size else 0
        if got == data.size and not os.read(fd, 1):
            return data
    finally:
        os.close(fd)
    return np.fromfile(path, dtype=np.uint8)  # rewritten meanwhile: whatever it is now


def size_in_bytes(data) -> Tuple[int, int]:
    """(width, height) from the header of a JPEG or PNG file already in memory (bytes or
    a uint8 array), raising BadFile with the reason. The loaders compare it with the
    pre-flight size of each file they feed: a file rewritten since then would get a crop
    window computed for another image."""
    head = memoryview(data).cast("B")
    if bytes(head[:3]) == JPEG_MAGIC:
        return _jpeg_size(head)[:2]
    if bytes(head[:8]) == PNG_MAGIC:
        if len(head) < 24:
            raise BadFile("truncated PNG header")
        return _png_size(head)
    raise BadFile(f"not a JPEG or PNG image (starts with {bytes(head[:8])!r})")


def size_changed(now: Tuple[int, int], was) -> Optional[str]:
    """Why a file whose image is `now` (w, h) but was `was` at the pre-flight must be
    skipped, or None when the sizes agree."""
    was = tuple(int(v) for v in was)
    if tuple(now) == was:
        return None
    return (f"changed since the pre-flight check: its header gives {now[0]}x{now[1]}, "
            f"the check read {was[0]}x{was[1]}")


def bytes_changed(now: int, was: int) -> Optional[str]:
    """Why a file of `now` bytes that had `was` bytes when the manifest was built must be
    skipped (same pixel size, other content: another image), or None; was < 0: unknown."""
    if was < 0 or now == was:
        return None
    return f"changed since the manifest was built ({now} bytes, manifest says {was})"


def _check_tail(f, size: int, needle: bytes, after: int, what: str) -> None:
    """The end marker must appear after `after` (an EXIF thumbnail carries its own)."""
    for span in (4096, TAIL_BYTES):  # most files end exactly with it: read little first
        start = max(0, size - span)
        f.seek(start)
        found = f.read().rfind(needle)
        if found >= 0 and start + found > after:
            return
        if start == 0:
            break
    raise BadFile(f"truncated: no {what} end marker")


def image_header(path: str) -> Tuple[int, int]:
    """(width, height) of a JPEG or PNG file, raising BadFile with the reason."""
    return inspect_file(path)[:2]


def inspect_file(path: str) -> Tuple[int, int, int]:
    """(width, height, size in bytes) of a JPEG or PNG file, raising BadFile with the
    reason: what the manifest keeps of every file."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BadFile("missing") from None
    except OSError as e:
        raise BadFile(f"unreadable ({e.strerror})") from None
    if size == 0:
        raise BadFile("empty (0 bytes)")
    if size < MIN_FILE_BYTES:
        raise BadFile(f"too small ({size} bytes)")
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            if head.startswith(JPEG_MAGIC):
                def more(n: int) -> bytes:
                    f.seek(0)
                    return f.read(n)
                w, h, sof = _jpeg_size(head, more)
                _check_tail(f, size, b"\xff\xd9", sof, "JPEG")
                return w, h, size
            if head.startswith(PNG_MAGIC):
                w, h = _png_size(head)
                _check_tail(f, size, b"IEND", 16, "PNG")
                return w, h, size
    except OSError as e:
        raise BadFile(f"unreadable ({e.strerror})") from None
    raise BadFile(f"not a JPEG or PNG image (starts with {head[:8]!r})")


def _check_range(paths: Sequence[str], start: int, end: int, threads: int = 1):
    """inspect_file on paths[start:end] -> (sizes int32 [k, 2], bytes int64 [k],
    [(position in the range, reason)]), with `threads` threads over contiguous blocks:
    on a network file system each open and read waits a round trip with the GIL
    released, so threads overlap the waits; the parse itself is a few microseconds."""
    n = end - start
    sizes = np.full((n, 2), -1, dtype=np.int32)
    nbytes = np.full(n, -1, dtype=np.int64)
    bad: List[Tuple[int, str]] = []

    def run(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            try:
                w, h, nbytes[i] = inspect_file(paths[start + i])
                sizes[i] = w, h
            except BadFile as e:
                bad.append((i, str(e)))  # list.append is atomic: no lock needed

    threads = max(1, min(threads, n // MIN_FILES_PER_THREAD))
    if threads == 1:
        run(0, n)
    else:
        cuts = np.linspace(0, n, threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, cuts[:-1], cuts[1:]))
    return sizes, nbytes, sorted(bad)


# What the forked workers check: set before the pool forks, so a worker gets its paths
# by inheritance and each task pickles two ints instead of thousands of strings.
_SHARED: Sequence[str] = ()


def _check_shared(start: int, end: int, threads: int):
    return _check_range(_SHARED, start, end, threads)


@contextlib.contextmanager
def no_garbage_for_forks():
    """Around a fork (process pools here, paddle's DataLoader workers in fallback.py): a
    forked child that finalised an earlier loader's DALI pipeline, unreachable but not yet
    collected in this process, waited forever on the pipeline's threads, which do not
    exist in the child (seen as a hung test). So the garbage is collected here first, and
    what is left is frozen while the children start: their collector never looks at
    objects they inherited."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def inspect_files(paths: Sequence[str], workers: int = 1, threads: int = THREADS_PER_WORKER,
                  chunk: int = 4096, min_parallel: int = PARALLEL_MIN_FILES):
    """inspect_file on every path -> (sizes int32 [n, 2] (w, h; -1 if bad), bytes int64
    [n] (-1 if bad), [(index, reason)] sorted).

    Large lists go to `workers` processes (the parse is Python, so threads alone would
    share one core), each with `threads` threads (file-system round trips). Forked, as
    paddle's DataLoader does: spawn would re-run the trainer's main module in every
    worker. The children touch only files and numpy, never the DALI or Paddle threads
    the parent may hold."""
    global _SHARED
    n = len(paths)
    if workers <= 1 or n < min_parallel:
        return _check_range(paths, 0, n, threads)
    chunk = min(chunk, -(-n // workers))  # every worker gets a share
    starts = list(range(0, n, chunk))
    ends = [min(n, s + chunk) for s in starts]
    sizes, nbytes, bad = [], [], []
    _SHARED = paths
    try:
        with no_garbage_for_forks(), \
                ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            for s0, (s, b, why) in zip(starts, pool.map(_check_shared, starts, ends,
                                                         [threads] * len(starts))):
                sizes.append(s)
                nbytes.append(b)
                bad.extend((s0 + i, r) for i, r in why)
    finally:
        _SHARED = ()
    return np.concatenate(sizes), np.concatenate(nbytes), bad


def check_files(paths: Sequence[str], workers: int = 1, chunk: int = 4096,
                min_parallel: int = PARALLEL_MIN_FILES) -> Tuple[np.ndarray, List[Tuple[int, str]]]:
    """Header check of every path -> (sizes int32 [n, 2] (w, h; -1 if bad), [(index, reason)])."""
    sizes, _, bad = inspect_files(paths, workers, chunk=chunk, min_parallel=min_parallel)
    return sizes, bad


def find_duplicates(paths: Sequence[str]) -> List[Tuple[int, str]]:
    """Later occurrences of a path already listed: they would be seen twice per epoch."""
    if not isinstance(paths, PathTable):
        paths = PathTable.from_strings(paths)
    return [(i, f"duplicate of line {first + 1}") for i, first in paths.duplicates()]


def find_bad_labels(labels: np.ndarray, num_classes: Optional[int]) -> List[Tuple[int, str]]:
    """Labels below 0 or (when the class count is known) at or above it."""
    top = num_classes if num_classes else np.iinfo(np.int64).max
    out = np.nonzero((labels < 0) | (labels >= top))[0]
    rng = f"[0, {num_classes})" if num_classes else ">= 0"
    return [(int(i), f"label {int(labels[i])} out of range {rng}") for i in out]
