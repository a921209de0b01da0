"""Packed shards: a data set as a few hundred tar files, each sample read by offset.

Why: on NFS, Lustre or GPFS, opening 1.28 M small files per epoch costs more than
reading them. A few hundred large files, each opened once per process and read with
`os.pread` at offsets from an index, cost a few hundred opens per epoch.

Layout (written by `python -m data.pack`; data/README.md "Packed shards"):

    <out>/<name>-000000.tar ...  POSIX ustar. Per sample two adjacent members,
                                 `<key>.jpg` or `<key>.png` (the source file's bytes)
                                 and `<key>.cls` (the label as decimal text), the names
                                 webdataset groups by; the key is the sample's position
                                 in the source list, 9 digits.
    <out>/<name>.index.npz       per sample, in list order: shard number, offset and size
                                 of the image bytes, label, width and height, key and
                                 kind (0 jpg, 1 png); the shard names, sizes and sha256;
                                 format name and version; the source list's sha256.

The index order is the sample order: the plan (ppdpn/data/plan.py) works on sample
ids, so both loaders shard, shuffle, crop and resume exactly as on loose files.
"""
from __future__ import annotations

import errno
import io
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ppdpn.data.check import (JPEG_MAGIC, MIN_FILE_BYTES, PNG_MAGIC, BadFile, _check_tail,
                              _jpeg_size, _png_size)
from ppdpn.data.lists import DataSetError, Samples

FORMAT = "ppdpn-shards"
VERSION = 1
INDEX_SUFFIX = ".index.npz"
KINDS = (".jpg", ".png")  # index `kind` -> member extension
BLOCK = 512  # tar block: every header and every member's padded data
END_OF_ARCHIVE = 2 * BLOCK  # two zero blocks close a tar file
KEY_DIGITS = 9  # keys up to 999,999,999 samples: no dots, sorted like the list
PER_SAMPLE = ("shard", "offset", "size", "label", "wh", "key", "kind")


def member_key(pos: int) -> str:
    return f"{int(pos):0{KEY_DIGITS}d}"


def padded(n: int) -> int:
    """Bytes a member of n data bytes occupies after its header (tar pads to blocks)."""
    return -(-n // BLOCK) * BLOCK


# ustar header fields (POSIX.1-1988): (offset, length). Written and parsed here rather
# than with tarfile.TarInfo: in a profiled pack of 4,000 files, TarInfo.frombuf took
# 2.4 s for 16,000 headers, parse_tar_header 0.75 s (tobuf 0.5 s, tar_header 0.28 s).
_NAME, _MODE, _UID, _GID, _SIZE, _MTIME, _CHKSUM = (
    (0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (148, 8))
_TYPE, _MAGIC, _PREFIX = (156, 1), (257, 8), (345, 155)
_MAX_SIZE = 8 ** 11 - 1  # 11 octal digits


def _put(buf: bytearray, field: Tuple[int, int], value: bytes) -> None:
    buf[field[0]:field[0] + len(value)] = value


def tar_header(name: str, size: int) -> bytes:
    """A deterministic ustar header for a regular file (mtime 0, uid/gid 0, mode 0644):
    packing the same source twice gives byte-identical shards, which is what makes a
    resumed pack checkable against an uninterrupted one."""
    raw = name.encode("ascii")
    if len(raw) > _NAME[1] or not 0 <= size <= _MAX_SIZE:
        raise ValueError(f"tar member {name!r} of {size} bytes does not fit a ustar header")
    buf = bytearray(BLOCK)
    _put(buf, _NAME, raw)
    for field, value in ((_MODE, 0o644), (_UID, 0), (_GID, 0)):
        _put(buf, field, b"%07o\0" % value)
    _put(buf, _SIZE, b"%011o\0" % size)
    _put(buf, _MTIME, b"%011o\0" % 0)
    _put(buf, _TYPE, b"0")
    _put(buf, _MAGIC, b"ustar\x0000")
    _put(buf, _CHKSUM, b" " * 8)  # the checksum counts its own field as spaces
    _put(buf, _CHKSUM, b"%06o\0 " % sum(buf))
    return bytes(buf)


def _field(buf, field: Tuple[int, int]) -> bytes:
    return bytes(buf[field[0]:field[0] + field[1]]).split(b"\0", 1)[0]


def parse_tar_header(buf) -> Tuple[str, int]:
    """(name, size) of a ustar header block; BadFile when it is not one."""
    if len(buf) < BLOCK:
        raise BadFile("tar header cut off by the end of the shard")
    block = bytes(buf[:BLOCK])
    if not block.strip(b"\0"):
        raise BadFile("no tar header (zero block)")
    if block[_MAGIC[0]:_MAGIC[0] + 5] != b"ustar":
        raise BadFile("no valid tar header (no ustar magic)")
    try:
        stored = int(_field(block, _CHKSUM).strip() or b"x", 8)
        size = int(_field(block, _SIZE).strip() or b"x", 8)
        name = _field(block, _NAME).decode("utf-8")
        prefix = _field(block, _PREFIX).decode("utf-8")
    except ValueError:
        raise BadFile("no valid tar header (unreadable number or name)") from None
    if stored != sum(block) - sum(block[148:156]) + 8 * 32:
        raise BadFile("no valid tar header (bad checksum)")
    return (f"{prefix}/{name}" if prefix else name), size


def image_bytes_header(data) -> Tuple[int, int, int]:
    """(width, height, kind) of an image already in memory, with the checks of
    check.image_header (size, magic, frame header, end marker) so a packed sample is
    judged exactly as the loose file would be. Raises BadFile with the reason."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n == 0:
        raise BadFile("empty (0 bytes)")
    if n < MIN_FILE_BYTES:
        raise BadFile(f"too small ({n} bytes)")
    if bytes(view[:3]) == JPEG_MAGIC:
        w, h, sof = _jpeg_size(view)
        _check_tail(io.BytesIO(view), n, b"\xff\xd9", sof, "JPEG")
        return w, h, 0
    if bytes(view[:8]) == PNG_MAGIC:
        if n < 24:
            raise BadFile("truncated PNG header")
        w, h = _png_size(view)
        _check_tail(io.BytesIO(view), n, b"IEND", 16, "PNG")
        return w, h, 1
    raise BadFile(f"not a JPEG or PNG image (starts with {bytes(view[:8])!r})")


@dataclass
class ShardIndex:
    """The index file in memory: per-sample numpy arrays plus the shard table."""
    shards: List[str]
    shard_bytes: np.ndarray  # int64 [shards]
    shard_sha256: List[str]
    shard: np.ndarray  # int32 [n]
    offset: np.ndarray  # int64 [n], of the image bytes (after their tar header)
    size: np.ndarray  # int64 [n]
    label: np.ndarray  # int64 [n]
    wh: np.ndarray  # int32 [n, 2], width and height from the header
    key: np.ndarray  # int64 [n], position in the source list
    kind: np.ndarray  # uint8 [n], index into KINDS
    source: str = ""
    source_sha256: str = ""
    params: Dict = field(default_factory=dict)
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    folder: str = ""  # where the shards are: the index file's directory

    def __len__(self) -> int:
        return len(self.label)

    def member(self, i: int) -> str:
        return member_key(self.key[i]) + KINDS[self.kind[i]]

    def name(self, i: int) -> str:
        return f"{self.shards[self.shard[i]]}:{self.member(i)}"

    def shard_path(self, k: int) -> str:
        return os.path.join(self.folder, self.shards[k])

    def take(self, keep) -> "ShardIndex":
        keep = np.asarray(keep, dtype=np.int64)
        return replace(self, **{a: getattr(self, a)[keep] for a in PER_SAMPLE})

    def save(self, path: str) -> None:
        """Atomic: write aside, fsync, rename, fsync the directory."""
        arrays = {a: getattr(self, a) for a in PER_SAMPLE}
        arrays.update(format=np.array(FORMAT), version=np.array(VERSION),
                      shards=np.array(self.shards, dtype=str),
                      shard_bytes=np.asarray(self.shard_bytes, np.int64),
                      shard_sha256=np.array(self.shard_sha256, dtype=str),
                      source=np.array(self.source), source_sha256=np.array(self.source_sha256),
                      params=np.array(json.dumps(self.params, sort_keys=True)),
                      dropped=np.asarray(self.dropped, np.int64))
        write_atomic(path, lambda f: np.savez_compressed(f, **arrays))

    @classmethod
    def load(cls, path: str) -> "ShardIndex":
        if not os.path.isfile(path):
            raise DataSetError(f"shard index not found: {path}")
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # an .npz is a zip file
                raise DataSetError(f"{path}: not a ppdpn shard index (not an .npz file)")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z.files or str(z["format"]) != FORMAT:
                    raise DataSetError(f"{path}: not a ppdpn shard index (no format {FORMAT!r})")
                if int(z["version"]) != VERSION:
                    raise DataSetError(f"{path}: shard index version {int(z['version'])}, "
                                       f"this code reads version {VERSION}")
                per = {a: z[a] for a in PER_SAMPLE}
                return cls(shards=[str(s) for s in z["shards"]], shard_bytes=z["shard_bytes"],
                           shard_sha256=[str(s) for s in z["shard_sha256"]],
                           source=str(z["source"]), source_sha256=str(z["source_sha256"]),
                           params=json.loads(str(z["params"])), dropped=z["dropped"],
                           folder=os.path.dirname(os.path.abspath(path)), **per)
        except DataSetError:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise DataSetError(f"{path}: unreadable shard index ({e})") from None


def write_atomic(path: str, write: Callable) -> None:
    """write(f) into `path`.tmp, fsync, rename over `path`, fsync the directory: a
    reader never sees half a file, and a crash leaves the old one or the new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_shard_index(path: str) -> bool:
    """Recognised by name: DataConfig.train_list / val_list naming `*.index.npz`."""
    return path.endswith(INDEX_SUFFIX)


class _Names(Sequence):
    """`samples.paths` for code that prints paths: the member names, made on demand."""

    def __init__(self, samples: "ShardSamples"):
        self._samples = samples

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._samples.name(k) for k in range(len(self))[i]]
        return self._samples.name(i)


class ShardSamples(Samples):
    """Samples read from packed shards by offset (pread on one fd per shard).

    Fds are opened lazily and shared by threads (pread needs no seek). A forked
    DataLoader worker notices the new pid and opens its own: the inherited ones share
    the parent's file descriptions, and closing or reopening them there is the child's
    business only.

    With `read_in_blocks(block, window)` (the loader passes DataLoader.shuffle_block and
    shuffle_window), block > 1, a read fetches the whole span of the sample's block (ids
    block*b .. block*b+b-1 in the same shard, stored side by side) with one pread and
    keeps the last 2 * window spans (the plan never has more than `window` begun and
    unfinished); the other samples of the block are served from memory. One process, one set
    of blocks: threads share it, forked workers each start their own."""

    def __init__(self, index: ShardIndex, source: str = ""):
        # Samples' constructor is not called: everything lives in the index's arrays,
        # and Samples' fields are properties here, whatever Samples stores itself.
        self.index = index
        self._source = source or index.folder
        self.block, self.keep_blocks = 1, 0
        self._reset_process_state()

    labels = property(lambda self: self.index.label)
    sizes = property(lambda self: self.index.wh)  # (w, h) per sample, from the index
    source = property(lambda self: self._source)
    rel_paths = property(lambda self: None)
    paths = property(lambda self: _Names(self))

    def read_in_blocks(self, block: int, window: int) -> None:
        with self._lock:
            self.block, self.keep_blocks = int(block), 2 * max(1, int(window))
            self._blocks.clear()

    def _reset_process_state(self) -> None:
        """Fds, lock and spans of this process (none yet)."""
        self._fds: Dict[int, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._blocks: "OrderedDict[Tuple[int, int], Tuple[int, np.ndarray]]" = OrderedDict()
        self._loading: Dict[Tuple[int, int], threading.Event] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_fds", "_pid", "_lock", "_blocks", "_loading"):
            state.pop(k)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_process_state()

    def __repr__(self) -> str:
        return f"ShardSamples({len(self)} samples in {len(self.index.shards)} shards of {self.source})"

    def __len__(self) -> int:
        return len(self.index)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
            self._blocks.clear()
        if self._pid == os.getpid():
            for fd in fds.values():
                os.close(fd)

    def _forked(self) -> None:
        """In a forked child: drop the parent's fds (its file descriptions), blocks and
        lock (another thread may have held it at the fork)."""
        inherited = self._fds
        self._reset_process_state()
        for fd in inherited.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is not None:
            return fd
        with self._lock:
            if k not in self._fds:
                try:
                    self._fds[k] = os.open(self.index.shard_path(k), os.O_RDONLY)
                except OSError as e:
                    if e.errno != errno.EMFILE:
                        raise
                    for old in self._fds.values():  # out of fds: start over with this one
                        os.close(old)
                    self._fds = {k: os.open(self.index.shard_path(k), os.O_RDONLY)}
            return self._fds[k]

    def name(self, i: int) -> str:
        return self.index.name(i)

    def read(self, i: int) -> np.ndarray:
        """The image bytes of sample i as uint8; OSError when the shard is unreadable
        or shorter than the index says."""
        if self._pid != os.getpid():
            self._forked()
        if self.block > 1:
            data = self._from_block(int(i))
            if data is not None:
                return data
        return self._pread(int(self.index.shard[i]), int(self.index.offset[i]),
                           int(self.index.size[i]))

    def _pread(self, shard: int, offset: int, size: int) -> np.ndarray:
        data = np.empty(size, dtype=np.uint8)
        got = os.preadv(self._fd(shard), [data], offset) if size else 0
        if got != size:
            raise OSError(errno.EIO, f"shard ends inside this member ({got} of {size} bytes "
                                     f"at offset {offset})")
        return data

    def _from_block(self, i: int) -> Optional[np.ndarray]:
        """Sample i cut from its block's span, read once by whichever thread asked
        first; None when the span cannot be read whole (a damaged shard: the sample's
        own read then names the problem)."""
        key = (i // self.block, int(self.index.shard[i]))
        span = self._span(key)
        if span is None:
            return None
        start, data = span
        lo = int(self.index.offset[i]) - start
        return data[lo:lo + int(self.index.size[i])].copy()

    def _span(self, key: Tuple[int, int]) -> Optional[Tuple[int, np.ndarray]]:
        with self._lock:
            span = self._blocks.get(key)
            if span is not None:
                self._blocks.move_to_end(key)
                return span
            loading = self._loading.get(key)
            if loading is None:
                self._loading[key] = threading.Event()
        if loading is not None:  # another thread reads it: wait, then look again
            loading.wait()
            with self._lock:
                return self._blocks.get(key)
        span = None
        try:
            first = key[0] * self.block
            ids = np.arange(first, min(first + self.block, len(self.index)))
            ids = ids[self.index.shard[ids] == key[1]]
            start = int(self.index.offset[ids].min())
            end = int((self.index.offset[ids] + self.index.size[ids]).max())
            span = start, self._pread(key[1], start, end - start)
        except OSError:
            pass
        finally:
            with self._lock:
                if span is not None:
                    self._blocks[key] = span
                    while len(self._blocks) > self.keep_blocks:
                        self._blocks.popitem(last=False)
                self._loading.pop(key).set()
        return span

    def header(self, i: int) -> Tuple[int, int]:
        try:
            return image_bytes_header(self.read(i))[:2]
        except OSError as e:
            raise BadFile(f"unreadable ({e.strerror or e})") from None

    def subset(self, keep: Sequence[int]) -> "ShardSamples":
        return ShardSamples(self.index.take(keep), self.source)


def load_shards(path: str) -> ShardSamples:
    return ShardSamples(ShardIndex.load(path), path)


def shard_preflight(samples: ShardSamples, drop_bad: bool,
                    num_classes: Optional[int] = None) -> Tuple[ShardSamples, np.ndarray]:
    """The pre-flight for shards: sizes come from the index (checked when packing and
    by data.validate), duplicates cannot exist, so only the label range is checked."""
    from ppdpn.data.base import BadDataError, log
    from ppdpn.data.check import find_bad_labels
    bad = find_bad_labels(samples.labels, num_classes)
    if not bad:
        return samples, samples.sizes
    lines = [f"  {samples.name(i)}: {why}" for i, why in bad]
    if not drop_bad or len(bad) == len(samples):
        raise BadDataError(f"{samples.source}: {len(bad)} of {len(samples)} samples are bad:\n"
                           + "\n".join(lines))
    log.warning("%s: dropping %d bad of %d samples:\n%s", samples.source, len(bad),
                len(samples), "\n".join(lines))
    keep = np.setdiff1d(np.arange(len(samples)), [i for i, _ in bad])
    kept = samples.subset(keep)
    return kept, kept.sizes


def check_sample(read: Callable[[int, int], bytes], index: ShardIndex, i: int,
                 shard_size: int) -> Tuple[Optional[str], Optional[bytes]]:
    """(problem or None, image bytes) of sample i: offset and size inside the shard,
    the tar headers of both members (name, size), the image header check against the
    index's width and height, and the label member. read(offset, n) reads the shard."""
    off, size = int(index.offset[i]), int(index.size[i])
    key = member_key(index.key[i])
    if off < BLOCK or off % BLOCK or size <= 0:
        return f"index gives offset {off}, size {size}: not a member's data", None
    end = off + padded(size) + 2 * BLOCK
    if end > shard_size:
        return (f"member ends at byte {end} beyond the end of the shard "
                f"({shard_size} bytes): truncated shard or wrong index"), None
    try:
        name, tsize = parse_tar_header(read(off - BLOCK, BLOCK))
        if (name, tsize) != (index.member(i), size):
            return (f"tar header says {name!r}, {tsize} bytes; the index "
                    f"{index.member(i)!r}, {size} bytes"), None
        data = read(off, size)
        w, h, kind = image_bytes_header(data)
        if (w, h) != tuple(int(v) for v in index.wh[i]) or kind != index.kind[i]:
            return f"header gives {KINDS[kind]} {w}x{h}, the index {tuple(index.wh[i])}", data
        cls_off = off + padded(size)
        name, tsize = parse_tar_header(read(cls_off, BLOCK))
        text = bytes(read(cls_off + BLOCK, tsize)) if name == key + ".cls" and tsize < 32 else b""
        if text != str(int(index.label[i])).encode():
            return f"label member {name!r} holds {text[:20]!r}, the index {index.label[i]}", data
    except BadFile as e:
        return str(e), None
    return None, data
