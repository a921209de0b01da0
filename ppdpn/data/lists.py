"""Data set layouts: PaddleClas list files and class-folder trees (ImageFolder).

A list file holds one `relative/path.JPEG label` per line, paths relative to the image
root (PaddleClas format). A class-folder tree `root/<class>/<image>` gets labels from
the sorted class folder names, like torchvision's ImageFolder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

# Extensions an ImageFolder scan takes; everything else (txt, csv, hidden files) is skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class DataSetError(ValueError):
    """A list file or folder that cannot be read as a data set; names file and line."""


@dataclass
class Samples:
    """The samples of one split: absolute paths and integer labels, in list order."""
    paths: List[str]
    labels: np.ndarray  # int64 [n]
    source: str  # the list file or folder they came from (for messages)
    rel_paths: Optional[List[str]] = None  # as written in the list (for cleaned lists)

    def __len__(self) -> int:
        return len(self.paths)

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

    def subset(self, keep: Sequence[int]) -> "Samples":
        keep = list(keep)
        rel = [self.rel_paths[i] for i in keep] if self.rel_paths is not None else None
        return Samples([self.paths[i] for i in keep], self.labels[keep], self.source, rel)


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


def read_list(list_path: str, image_root: str,
              malformed: Optional[List[str]] = None) -> Samples:
    """Read a PaddleClas list file; relative paths are joined to `image_root`.

    A malformed line raises, or with a `malformed` list is reported there and skipped
    (the validation tool reports every one instead of stopping at the first)."""
    if not os.path.isfile(list_path):
        raise DataSetError(f"list file not found: {list_path}")
    paths, labels, rel = [], [], []
    with open(list_path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            try:
                item = parse_list_line(line, f"{list_path}:{lineno}")
            except DataSetError as e:
                if malformed is None:
                    raise
                malformed.append(str(e))
                continue
            if item is None:
                continue
            rel.append(item[0])
            paths.append(os.path.join(image_root, item[0]))
            labels.append(item[1])
    if not paths:
        raise DataSetError(f"{list_path}: no samples")
    return Samples(paths, np.asarray(labels, dtype=np.int64), list_path, rel)


def scan_image_folder(root: str) -> Tuple[Samples, List[str]]:
    """A class-folder tree -> (samples, class names); label = index of the sorted name."""
    base = Path(root)
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataSetError(f"{root}: no class folders")
    paths, labels, rel = [], [], []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(base / name):
            dirnames.sort()  # os.walk order is file-system order; sort for determinism
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith("."):
                    full = os.path.join(dirpath, fn)
                    paths.append(full)
                    rel.append(os.path.relpath(full, root))
                    labels.append(label)
    if not paths:
        raise DataSetError(f"{root}: class folders hold no {'/'.join(IMAGE_EXTENSIONS)} files")
    return Samples(paths, np.asarray(labels, dtype=np.int64), root, rel), classes


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
