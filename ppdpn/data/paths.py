"""PathTable: a split's relative paths as one bytes blob plus offsets.

ImageNet's train list has 1.28 M lines; as Python strings its paths cost ~100 bytes
each per rank and make every fork or pickle of a data set touch millions of objects.
Here they are two numpy arrays (~45 bytes per path); a path becomes a str only when
someone asks for it.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, List, Sequence, Tuple

import numpy as np

# Above this many bytes of fixed-width keys, duplicates are found with a dict instead
# of np.unique (one very long path would make every row as wide as it).
MAX_KEY_BYTES = 256 * 2 ** 20


def _encode(text: str) -> bytes:
    # surrogateescape: os.walk hands undecodable file names back as lone surrogates
    return text.encode("utf-8", "surrogateescape")


class PathTable(Sequence[str]):
    """Paths as `root` joined to the i-th relative path of `blob`; a read-only sequence
    of str, so callers that indexed or iterated the old lists keep working."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, root: str = ""):
        self.blob = np.asarray(blob, dtype=np.uint8)
        self.offsets = np.asarray(offsets, dtype=np.int64)  # [n + 1], offsets[0] == 0
        self.root = root

    @classmethod
    def from_strings(cls, rel: Iterable[str], root: str = "") -> "PathTable":
        parts = [_encode(p) for p in rel]
        lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.frombuffer(b"".join(parts), dtype=np.uint8), offsets, root)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def relative(self, i: int) -> str:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.blob[start:end].tobytes().decode("utf-8", "surrogateescape")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"path index {i} out of range for {n} paths")
        rel = self.relative(i % n)
        return os.path.join(self.root, rel) if self.root else rel

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def with_root(self, root: str) -> "PathTable":
        """The same relative paths below another root (shares the arrays)."""
        return PathTable(self.blob, self.offsets, root)

    def take(self, keep) -> "PathTable":
        """The paths at positions `keep`, still two arrays (no per-path objects)."""
        keep = np.asarray(keep, dtype=np.int64).reshape(-1)
        starts, lengths = self.offsets[keep], np.diff(self.offsets)[keep]
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # byte j of the result comes from starts[row] + (j - offsets[row])
        src = np.arange(offsets[-1], dtype=np.int64)
        src += np.repeat(starts - offsets[:-1], lengths)
        return PathTable(self.blob[src], offsets, self.root)

    def nbytes(self) -> int:
        return self.blob.nbytes + self.offsets.nbytes

    def duplicates(self) -> List[Tuple[int, int]]:
        """(i, first) for every path that names the same file as an earlier one (after
        os.path.normpath of the joined path), in order of i."""
        keys = self._fixed_width_keys()
        if keys is None:  # too wide for one array: the plain way
            return _first_seen((os.path.normpath(p) for p in self), range(len(self)))
        # One 64-bit hash per path from its 8-byte words, sorted: only paths whose hash
        # another path shares are compared byte for byte (all of them for a real
        # duplicate, almost never anything else).
        words = keys.view(np.uint64)
        h = np.zeros(len(self), dtype=np.uint64)
        for j in range(words.shape[1]):
            h ^= words[:, j]
            h *= np.uint64(0x9E3779B97F4A7C15)  # odd: a bijection of uint64, spreads bits
        order = np.argsort(h, kind="stable")
        same = h[order[1:]] == h[order[:-1]]
        shared = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))
        return _first_seen((keys[i].tobytes() for i in shared), shared.tolist())

    def _fixed_width_keys(self):
        """Each relative path as a row of bytes zero-padded to whole 64-bit words, or
        None when a path needs os.path.normpath (`.`, `..`, `//`, a leading or trailing
        `/`: then the caller compares normalised strings) or the array would be too
        large. Below one root, distinct plain relative paths name distinct files."""
        n = len(self)
        lengths = np.diff(self.offsets)
        width = -(-max(int(lengths.max()) if n else 1, 1) // 8) * 8
        if width * n > MAX_KEY_BYTES or self._needs_normpath().any():
            return None
        keys = np.zeros((n, width), dtype=np.uint8)
        step = max(1, (8 * 2 ** 20) // width)  # rows per piece: bounded temporaries
        for a in range(0, n, step):
            b = min(n, a + step)
            lens = lengths[a:b]
            rows = np.repeat(np.arange(a, b), lens)
            cols = np.arange(int(lens.sum())) - np.repeat(self.offsets[a:b] - self.offsets[a], lens)
            keys[rows, cols] = self.blob[self.offsets[a]:self.offsets[b]]
        return keys

    def _needs_normpath(self) -> np.ndarray:
        """Paths that os.path.normpath could change: `.`/`..` components, `//`, a
        leading or trailing `/`. Found with numpy on the blob, not per path."""
        n, blob = len(self), self.blob
        if not len(blob):
            return np.ones(n, dtype=bool)
        starts, ends = self.offsets[:-1], self.offsets[1:]
        first = blob[np.minimum(starts, len(blob) - 1)]  # garbage for empty paths,
        last = blob[np.maximum(ends - 1, 0)]  # which are odd anyway
        odd = (ends == starts) | (first == ord(".")) | (first == ord("/")) | (last == ord("/"))
        slash = blob[:-1] == ord("/")
        hits = np.nonzero(slash & ((blob[1:] == ord("/")) | (blob[1:] == ord("."))))[0]
        odd[np.searchsorted(self.offsets, hits, side="right") - 1] = True
        return odd

def _first_seen(keys: Iterable, index: Iterable[int]) -> List[Tuple[int, int]]:
    """(i, first i with the same key) for every repeated key, in order of i."""
    first, out = {}, []
    for k, i in zip(keys, index):
        if k in first:
            out.append((i, first[k]))
        else:
            first[k] = i
    return out
