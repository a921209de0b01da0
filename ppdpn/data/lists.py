"""Data set layouts: PaddleClas list files and class-folder trees (ImageFolder).

A list file holds one `relative/path.JPEG label` per line, paths relative to the image
root (PaddleClas format). A class-folder tree `root/<class>/<image>` gets labels from
the sorted class folder names, like torchvision's ImageFolder.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ppdpn.data.paths import PathTable

# Extensions an ImageFolder scan takes; everything else (txt, csv, hidden files) is skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class DataSetError(ValueError):
    """A list file or folder that cannot be read as a data set; names file and line."""


@dataclass
class Samples:
    """The samples of one split: paths and integer labels, in list order.

    `paths` is a PathTable (two numpy arrays, no per-path str: 1.28 M of them would
    cost ~130 MB per rank and every fork of a data set would touch them); it indexes
    and iterates like the list of full paths it replaces."""
    paths: PathTable  # image_root (or the class-folder tree) joined on access
    labels: np.ndarray  # int64 [n]
    source: str  # the list file or folder they came from (for messages)
    digest: str = ""  # sha256 of what they were read from; "" for a subset

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def rel_paths(self) -> PathTable:
        """The paths as written in the list (relative to the root), for cleaned lists."""
        return self.paths.with_root("")

    def content_digest(self) -> str:
        """What the manifest is keyed by: the list file's sha256, else one of the
        relative paths and labels themselves (a folder scan, a subset)."""
        if self.digest:
            return self.digest
        h = hashlib.sha256()
        for arr in (self.paths.offsets, self.paths.blob, self.labels.astype(np.int64)):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def name(self, i: int) -> str:
        """How messages name sample i (its path; a shard member for packed data)."""
        return self.paths[i]

    def read(self, i: int) -> np.ndarray:
        """Sample i's encoded bytes as uint8, the one way the loaders read a sample.
        Raises OSError."""
        from ppdpn.data.check import read_file
        return read_file(self.paths[i])

    def header(self, i: int) -> Tuple[int, int]:
        """(width, height) from sample i's header now; raises BadFile with the reason."""
        from ppdpn.data.check import image_header
        return image_header(self.paths[i])

    def read_in_blocks(self, block: int, window: int) -> None:
        """DataLoader.shuffle_block's reading: loose files are one file per sample in any
        order, so nothing changes (packed shards read a block at once)."""

    def subset(self, keep: Sequence[int]) -> "Samples":
        keep = np.asarray(keep, dtype=np.int64).reshape(-1)
        return Samples(self.paths.take(keep), self.labels[keep], self.source)


# Class indices are stored as int64 and used as one-hot columns: anything past int32 is a
# corrupted line, not a real class.
MAX_LABEL = 2 ** 31


def parse_list_line(line: str, where: str) -> Optional[Tuple[str, int]]:
    """`path label` -> (path, label); blank lines -> None. Paths may contain spaces:
    the label is the last whitespace-separated field."""
    text = line.strip()
    if not text:
        return None
    parts = text.rsplit(None, 1)
    if len(parts) != 2:
        raise DataSetError(f"{where}: expected 'path label', got {text!r}")
    try:
        label = int(parts[1])
    except ValueError:
        raise DataSetError(f"{where}: label {parts[1]!r} is not an integer") from None
    if not 0 <= label < MAX_LABEL:
        raise DataSetError(f"{where}: label {parts[1][:24]!r} is not in 0..{MAX_LABEL - 1}")
    if "\x00" in parts[0]:
        raise DataSetError(f"{where}: path {parts[0][:60]!r} holds a NUL character")
    return parts[0], label


# Bytes of a list parsed at a time by the fast parser: bounds its numpy temporaries
# (about ten arrays of this many elements) whatever the list's size.
PARSE_CHUNK = 4 * 2 ** 20
# Longest label the fast parser reads: 9 digits stay below MAX_LABEL.
FAST_LABEL_DIGITS = 9


def read_list(list_path: str, image_root: str,
              malformed: Optional[List[str]] = None) -> Samples:
    """Read a PaddleClas list file; relative paths are joined to `image_root`.

    A malformed line raises, or with a `malformed` list is reported there and skipped
    (the validation tool reports every one instead of stopping at the first)."""
    if not os.path.isfile(list_path):
        raise DataSetError(f"list file not found: {list_path}")
    with open(list_path, "rb") as f:
        data = f.read()
    parsed = _parse_plain_list(data)
    if parsed is None:  # something unusual: the careful parser, which names the line
        rel, labels = _parse_lines(data, list_path, malformed)
        table = PathTable.from_strings(rel, image_root)
    else:
        blob, offsets, labels = parsed
        table = PathTable(blob, offsets, image_root)
    if not len(table):
        raise DataSetError(f"{list_path}: no samples")
    return Samples(table, np.asarray(labels, dtype=np.int64), list_path,
                   hashlib.sha256(data).hexdigest())


def _parse_lines(data: bytes, list_path: str, malformed: Optional[List[str]]):
    """Line by line with parse_list_line, reading the bytes as text as open() would."""
    rel, labels = [], []
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace")
    for lineno, line in enumerate(text, 1):
        try:
            item = parse_list_line(line, f"{list_path}:{lineno}")
        except DataSetError as e:
            if malformed is None:
                raise
            malformed.append(str(e))
            continue
        if item is not None:
            rel.append(item[0])
            labels.append(item[1])
    return rel, labels


def _parse_plain_list(data: bytes):
    """(path blob, offsets, labels) of a list in the usual form, or None.

    The usual form: printable ASCII, every line `path label` with one space before a
    label of 1-9 digits, no blank lines and no padding; paths may hold single spaces.
    For such a list this gives what parse_list_line gives, in numpy instead of a
    Python loop (1.28 M lines: ~0.3 s instead of ~3 s). Anything else returns None,
    and the careful parser reads the file and names the line at fault."""
    blobs, lengths, labels = [], [], []
    pos = 0
    while pos < len(data):
        cut = data.find(b"\n", min(pos + PARSE_CHUNK, len(data)) - 1)
        end = len(data) if cut < 0 else cut + 1
        piece = np.frombuffer(data, dtype=np.uint8, count=end - pos, offset=pos)
        if piece[-1] != ord("\n"):  # last line without its newline
            piece = np.append(piece, np.uint8(ord("\n")))
        got = _parse_piece(piece)
        if got is None:
            return None
        blobs.append(got[0])
        lengths.append(got[1])
        labels.append(got[2])
        pos = end
    if not blobs:
        return None
    lengths = np.concatenate(lengths)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.concatenate(blobs), offsets, np.concatenate(labels)


def _parse_piece(arr: np.ndarray):
    """_parse_plain_list on whole lines `arr` (ending with a newline)."""
    newline = arr == ord("\n")
    if arr.max() > 126 or np.count_nonzero(arr < 32) != np.count_nonzero(newline):
        return None  # tabs, CR, NUL, other control bytes or non-ASCII: the careful way
    ends = np.flatnonzero(newline)
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    if np.any(ends == starts):
        return None  # a blank line
    spaces = np.flatnonzero(arr == ord(" "))
    sep = spaces[np.maximum(np.searchsorted(spaces, ends) - 1, 0)] if len(spaces) else starts
    label_len = ends - sep - 1  # sep: the last space of each line (if any is in it)
    if (np.any(sep <= starts) or np.any(label_len < 1) or np.any(label_len > FAST_LABEL_DIGITS)
            or np.any(arr[sep - 1] == ord(" ")) or np.any(arr[starts] == ord(" "))):
        return None  # no label, no path, a long label, or padding around a field
    labels = np.zeros(len(ends), dtype=np.int64)
    in_path = np.ones(len(arr), dtype=bool)
    in_path[sep] = False
    for k in range(FAST_LABEL_DIGITS + 1):  # k-th byte from the right, newline first
        at = np.maximum(ends - k, 0)
        inside = at > sep
        in_path[at[inside]] = False
        if k == 0:
            continue
        digit = arr[at].astype(np.int64) - ord("0")
        if np.any(inside & ((digit < 0) | (digit > 9))):
            return None  # a label that is not a plain decimal number
        labels += np.where(inside, digit, 0) * 10 ** (k - 1)
    return arr[in_path], sep - starts, labels


def scan_image_folder(root: str) -> Tuple[Samples, List[str]]:
    """A class-folder tree -> (samples, class names); label = index of the sorted name."""
    base = Path(root)
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataSetError(f"{root}: no class folders")
    labels, rel = [], []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(base / name):
            dirnames.sort()  # os.walk order is file-system order; sort for determinism
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith("."):
                    rel.append(os.path.relpath(os.path.join(dirpath, fn), root))
                    labels.append(label)
    if not rel:
        raise DataSetError(f"{root}: class folders hold no {'/'.join(IMAGE_EXTENSIONS)} files")
    samples = Samples(PathTable.from_strings(rel, str(base)), np.asarray(labels, dtype=np.int64), root)
    samples.digest = samples.content_digest()
    return samples, classes


def resolve_split(image_root: str, list_name: str) -> str:
    """`list_name` relative to `image_root` unless absolute (DataConfig convention)."""
    return list_name if os.path.isabs(list_name) else os.path.join(image_root, list_name)


def load_split(image_root: str, list_name: str) -> Samples:
    """Samples of a split named in DataConfig: a list file, a class-folder tree when
    the name points at a directory (e.g. `val_list: val`), or packed shards when it
    names their index (`*.index.npz`, ppdpn/data/shards.py)."""
    target = resolve_split(image_root, list_name)
    if target.endswith(".index.npz"):  # packed shards (python -m data.pack)
        from ppdpn.data.shards import load_shards
        return load_shards(target)
    if os.path.isdir(target):
        return scan_image_folder(target)[0]
    return read_list(target, image_root)


def write_list(path: str, rel_paths: Sequence[str], labels: Sequence[int]) -> None:
    """Write a PaddleClas list atomically (a half-written list must never be read)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p, y in zip(rel_paths, labels):
            f.write(f"{p} {int(y)}\n")
    os.replace(tmp, path)
