"""The pieces of data.pack that touch bytes: read-ahead of source files, the shard
writer, the read-back check of a written shard, the per-shard records a resumed pack
keeps, and the check that an index matches its shards."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np

from ppdpn.data.check import BadFile
from ppdpn.data.lists import Samples
from ppdpn.data.shards import (BLOCK, END_OF_ARCHIVE, ShardIndex, check_sample,
                               image_bytes_header, member_key, padded, parse_tar_header,
                               tar_header)


def read_sample(samples: Samples, pos: int):
    """(bytes, (w, h, kind)) or (None, reason): one source file read and checked."""
    try:
        data = samples.read(pos)
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    try:
        return data, image_bytes_header(data)
    except BadFile as e:
        return None, str(e)


class Prefetch:
    """Source samples start.. in order, read ahead by a thread pool."""

    def __init__(self, pool: ThreadPoolExecutor, samples: Samples, start: int, depth: int,
                 known_bad: Optional[Dict[int, str]] = None):
        self.pool, self.samples, self.depth = pool, samples, depth
        self.known_bad = known_bad or {}  # position -> reason, never read (duplicates)
        self.pos = self._next = start
        self.window: deque = deque()
        self.pending = None

    def get(self):
        if self.pending is not None:
            item, self.pending = self.pending, None
            self.pos += 1
            return item
        while len(self.window) < self.depth and self._next < len(self.samples):
            why = self.known_bad.get(self._next)
            self.window.append(why or self.pool.submit(read_sample, self.samples, self._next))
            self._next += 1
        item = self.window.popleft()
        item = (None, item) if isinstance(item, str) else item.result()
        self.pos += 1
        return item

    def unget(self, item) -> None:
        """Give back the sample that did not fit: it opens the next shard."""
        self.pending = item
        self.pos -= 1


class ShardWriter:
    """Tar members into `path`, hashing what is written, so the read-back can compare."""

    def __init__(self, path: str):
        self.path, self.f, self.size = path, open(path, "wb", buffering=1 << 20), 0
        self.sha = hashlib.sha256()

    def _write(self, piece) -> None:
        self.f.write(piece)
        self.sha.update(piece)
        self.size += len(piece)

    def add(self, name: str, data) -> int:
        """Write one member; return the offset of its data."""
        self._write(tar_header(name, len(data)))
        offset = self.size
        self._write(data)
        self._write(bytes(padded(len(data)) - len(data)))
        return offset

    def finish(self) -> Tuple[int, str]:
        self._write(bytes(END_OF_ARCHIVE))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.size, self.sha.hexdigest()

    def abandon(self) -> None:
        self.f.close()
        os.unlink(self.path)


def sample_bytes(n: int) -> int:
    """What one sample of n image bytes adds to a shard: two headers, padded data and
    the label member (a label fits one block)."""
    return BLOCK + padded(n) + 2 * BLOCK


def verify_written(path: str, sha: str, size: int, entries: Dict) -> Optional[str]:
    """Read a just-written shard back: same bytes as written (sha256), and every
    member's tar header, image header and label as the index will say."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if len(mm) != size or hashlib.sha256(mm).hexdigest() != sha:
            return "read back differs from what was written"
        one = entry_index(entries, name=os.path.basename(path))
        for i in range(len(one)):
            why, _ = check_sample(lambda o, n: mm[o:o + n], one, i, size)
            if why:
                return f"{one.member(i)}: {why}"
        if mm[size - END_OF_ARCHIVE:] != bytes(END_OF_ARCHIVE):
            return "no end-of-archive blocks"
    return None


def entry_index(e: Dict, name: str) -> ShardIndex:
    """A one-shard ShardIndex over a shard's entries (for check_sample)."""
    n = len(e["key"])
    return ShardIndex([name], np.zeros(1, np.int64), [""], np.zeros(n, np.int32),
                      e["offset"], e["size"], e["label"], e["wh"], e["key"], e["kind"])


def entries_of(rows: List[Tuple]) -> Dict[str, np.ndarray]:
    cols = list(zip(*rows)) if rows else [()] * 7
    return {"key": np.asarray(cols[0], np.int64), "offset": np.asarray(cols[1], np.int64),
            "size": np.asarray(cols[2], np.int64), "label": np.asarray(cols[3], np.int64),
            "wh": np.asarray(cols[4], np.int32).reshape(-1, 2),
            "kind": np.asarray(cols[5], np.uint8)}


def load_record(path: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["meta"])), {a: z[a] for a in z.files if a != "meta"}


def quick_check(index: ShardIndex) -> List[str]:
    """Does the index match the shards? Sizes of the files and the tar headers of every
    member (name, size, offset); the image bytes are data.validate's job."""
    problems = []
    for k, name in enumerate(index.shards):
        path = index.shard_path(k)
        if not os.path.isfile(path):
            problems.append(f"{name}: missing")
            continue
        if os.path.getsize(path) != index.shard_bytes[k]:
            problems.append(f"{name}: {os.path.getsize(path)} bytes, the index says "
                            f"{index.shard_bytes[k]}")
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            for i in np.nonzero(index.shard == k)[0]:
                off, size = int(index.offset[i]), int(index.size[i])
                want = [(off - BLOCK, index.member(i), size),
                        (off + padded(size), member_key(index.key[i]) + ".cls", None)]
                for at, member, nbytes in want:
                    try:
                        got = parse_tar_header(os.pread(fd, BLOCK, at))
                    except BadFile as e:
                        got = (str(e), None)
                    if got[0] != member or (nbytes is not None and got[1] != nbytes):
                        problems.append(f"{name}:{member}: tar header at {at} gives {got}")
        finally:
            os.close(fd)
    return problems
